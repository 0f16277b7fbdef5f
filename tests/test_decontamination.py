"""13-gram decontamination: a planted benchmark item is found; clean text is not flagged."""

from __future__ import annotations

import json

from trlm.stages.data_prep.decontamination import check_overlap, normalize


def _row(path, i):
    with open(path) as f:
        for k, line in enumerate(f):
            if k == i:
                return json.loads(line)


def test_normalisation():
    assert normalize("  Hello,   WORLD!\n It's  (fine)…") == "hello world it s fine"


def test_planted_overlap_is_found_and_clean_text_is_not(shared_data):
    arc = _row(shared_data / "allenai__ai2_arc" / "ARC-Challenge" / "test.jsonl", 10)
    gsm = _row(shared_data / "openai__gsm8k" / "main" / "test.jsonl", 7)
    # the same question, differently cased and punctuated, inside a longer training text
    planted_arc = "Here is a quiz for you!!! " + arc["question"].upper().replace(" ", "  ") + " -- answer carefully."
    planted_gsm = "User: " + gsm["question"].replace(".", " ;") + "\nAssistant: let me think."
    clean = [
        "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill all afternoon long.",
        "Write a haiku about autumn leaves falling gently onto a quiet pond in the early morning light of October.",
    ]
    report = check_overlap(
        {"planted": [clean[0], planted_arc, planted_gsm], "clean": clean},
        data_root=shared_data,
        tasks=["arc_challenge", "gsm8k"],
    )
    assert report["n"] == 13
    assert report["benchmarks"]["arc_challenge"]["items"] == 1172
    assert report["benchmarks"]["gsm8k"]["items"] == 1319
    assert report["mixtures"] == {"planted": {"texts": 3}, "clean": {"texts": 2}}

    p = report["pairs"]["planted"]
    assert p["arc_challenge"]["item_ids"] == [arc["id"]] and p["arc_challenge"]["overlapping_items"] == 1
    assert p["arc_challenge"]["examples"] == [{"item_id": arc["id"], "mixture_text_index": 1}]
    assert p["gsm8k"]["item_ids"] == ["test:7"] and p["gsm8k"]["mixture_texts_with_overlap"] == 1
    assert report["contaminated"] is True

    c = report["pairs"]["clean"]
    assert all(v["overlapping_items"] == 0 and v["item_ids"] == [] for v in c.values())


def test_a_shorter_ngram_setting_and_unknown_task(shared_data):
    import pytest

    arc = _row(shared_data / "allenai__ai2_arc" / "ARC-Challenge" / "test.jsonl", 3)
    words = normalize(arc["question"]).split()
    assert len(words) >= 8
    # 8 consecutive words of the question are enough at n=8 but not at n=13
    fragment = " ".join(words[:8])
    at8 = check_overlap({"m": [fragment]}, data_root=shared_data, tasks=["arc_challenge"], n=8)
    at13 = check_overlap({"m": [fragment]}, data_root=shared_data, tasks=["arc_challenge"], n=13)
    assert arc["id"] in at8["pairs"]["m"]["arc_challenge"]["item_ids"]
    assert at13["pairs"]["m"]["arc_challenge"]["overlapping_items"] == 0
    with pytest.raises(ValueError, match="hellaswag"):
        check_overlap({"m": []}, data_root=shared_data, tasks=["hellaswag"])
