"""N-gram overlap between training mixtures and the benchmarks' evaluated splits.

    report = check_overlap({"sft-general": texts, "dpo": more_texts}, data_root=root, tasks=cfg.tasks)

Every text is normalised the same way: lowercase, punctuation removed (Unicode categories P* and S*
become spaces), whitespace collapsed; words are the space-separated pieces. A benchmark item is
*contaminated* by a mixture when one of its word n-grams (default 13, as in GPT-3 and lm-eval's
decontamination tooling) occurs in a mixture text. An item shorter than n words but of at least
MIN_SHORT_WORDS (8) words is matched on its whole text instead (counted as `short_items`); an item
shorter still is not checked (counted as `too_short`), since so few words match by chance.

The benchmark items are read from the data root in the hub datasets' own schemas (no lm-eval run is
needed): the text that a model sees for the item, e.g. question and answer choices. The index holds the
benchmark side; the mixtures are streamed, so they may be any iterable of strings.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

_PUNCT_TABLE: dict[int, str] | None = None
_WS = re.compile(r"\s+")
MAX_IDS_LISTED = 200  # per (mixture, benchmark) pair; the count is always complete


def _punct_table() -> dict[int, str]:
    global _PUNCT_TABLE
    if _PUNCT_TABLE is None:
        _PUNCT_TABLE = {
            i: " " for i in range(sys.maxunicode + 1) if unicodedata.category(chr(i))[0] in ("P", "S")
        }
    return _PUNCT_TABLE


def normalize(text: str) -> str:
    """Lowercase, strip punctuation and symbols, collapse whitespace."""
    return _WS.sub(" ", text.lower().translate(_punct_table())).strip()


def ngrams(words: list[str], n: int) -> Iterator[str]:
    for i in range(len(words) - n + 1):
        yield " ".join(words[i : i + n])


# --- benchmark items -----------------------------------------------------------------------------


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _arc(cfg: str) -> Callable[[Path], Iterator[tuple[str, str]]]:
    def items(root: Path) -> Iterator[tuple[str, str]]:
        for row in _jsonl(root / "allenai__ai2_arc" / cfg / "test.jsonl"):
            yield row["id"], row["question"] + "\n" + "\n".join(row["choices"]["text"])

    return items


def _boolq(root: Path) -> Iterator[tuple[str, str]]:
    for row in _jsonl(root / "aps__super_glue" / "boolq" / "validation.jsonl"):
        yield f"validation:{row['idx']}", row["passage"] + "\n" + row["question"]


def _piqa(root: Path) -> Iterator[tuple[str, str]]:
    for i, row in enumerate(_jsonl(root / "baber__piqa" / "validation.jsonl")):
        yield f"validation:{i}", row["goal"] + "\n" + row["sol1"] + "\n" + row["sol2"]


def _gsm8k(root: Path) -> Iterator[tuple[str, str]]:
    for i, row in enumerate(_jsonl(root / "openai__gsm8k" / "main" / "test.jsonl")):
        yield f"test:{i}", row["question"] + "\n" + row["answer"]


def _ifeval(root: Path) -> Iterator[tuple[str, str]]:
    for row in _jsonl(root / "google__IFEval" / "train.jsonl"):
        yield f"key:{row['key']}", row["prompt"]


def _bbh(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted((root / "SaylorTwift__bbh").glob("*.jsonl")):
        for i, row in enumerate(_jsonl(path)):
            yield f"{path.stem}:{i}", row["input"]


def _mmlu(root: Path) -> Iterator[tuple[str, str]]:
    for sub in sorted(p for p in (root / "cais__mmlu").iterdir() if p.is_dir() and p.name != "all"):
        test = sub / "test.jsonl"
        if test.is_file():
            for i, row in enumerate(_jsonl(test)):
                yield f"{sub.name}:{i}", row["question"] + "\n" + "\n".join(row["choices"])


# task name (as in EvalConfig.tasks) -> (evaluated split, item reader)
BENCHMARK_ITEMS: dict[str, tuple[str, Callable[[Path], Iterator[tuple[str, str]]]]] = {
    "arc_challenge": ("allenai/ai2_arc ARC-Challenge test", _arc("ARC-Challenge")),
    "arc_easy": ("allenai/ai2_arc ARC-Easy test", _arc("ARC-Easy")),
    "boolq": ("aps/super_glue boolq validation", _boolq),
    "piqa": ("baber/piqa validation", _piqa),
    "gsm8k": ("openai/gsm8k main test", _gsm8k),
    "ifeval": ("google/IFEval train", _ifeval),
    "bbh": ("SaylorTwift/bbh test (27 tasks)", _bbh),
    "mmlu": ("cais/mmlu test (57 subjects)", _mmlu),
}


MIN_SHORT_WORDS = 8  # items with fewer words than this are too short to check meaningfully


class _Index:
    """One index over all benchmarks: n-gram -> [(task, item number)], plus whole-text entries for
    items of MIN_SHORT_WORDS..n-1 words (matched as n-grams of their own length)."""

    def __init__(self, n: int):
        self.n = n
        self.grams: dict[str, list[tuple[str, int]]] = defaultdict(list)
        self.short: dict[int, dict[str, list[tuple[str, int]]]] = defaultdict(lambda: defaultdict(list))
        self.ids: dict[str, list[str]] = {}
        self.stats: dict[str, dict[str, int]] = {}

    def add(self, task: str, items: Iterable[tuple[str, str]]) -> None:
        ids = self.ids.setdefault(task, [])
        stats = self.stats.setdefault(task, {"short_items": 0, "too_short": 0})
        for item_id, text in items:
            k = len(ids)
            ids.append(item_id)
            words = normalize(text).split()
            if len(words) < MIN_SHORT_WORDS:
                stats["too_short"] += 1
                continue
            if len(words) < self.n:
                stats["short_items"] += 1
                self.short[len(words)][" ".join(words)].append((task, k))
                continue
            for g in set(ngrams(words, self.n)):
                self.grams[g].append((task, k))

    def matches(self, words: list[str]) -> set[tuple[str, int]]:
        hit: set[tuple[str, int]] = set()
        grams = self.grams
        for g in ngrams(words, self.n):
            ks = grams.get(g)
            if ks:
                hit.update(ks)
        for length, table in self.short.items():
            if length > len(words):
                continue
            for g in ngrams(words, length):
                ks = table.get(g)
                if ks:
                    hit.update(ks)
        return hit


def check_overlap(
    mixtures: dict[str, Iterable[str]],
    *,
    data_root: Path,
    tasks: list[str],
    n: int = 13,
) -> dict:
    """Report, per (mixture, benchmark) pair, which benchmark items share an n-gram with the mixture.

    Returns::

        {"n": 13, "normalisation": "...",
         "benchmarks": {task: {"split": str, "items": int, "short_items": int, "too_short": int}},
         "mixtures": {name: {"texts": int}},
         "pairs": {mixture: {task: {"overlapping_items": int, "fraction": float,
                                   "item_ids": [...], "mixture_texts_with_overlap": int,
                                   "examples": [{"item_id", "mixture_text_index"}...]}}},
         "contaminated": bool}

    `item_ids` lists at most 200 ids per pair (sorted); the counts are complete.
    """
    data_root = Path(data_root).expanduser().resolve()
    unknown = [t for t in tasks if t not in BENCHMARK_ITEMS]
    if unknown:
        raise ValueError(f"no decontamination reader for task(s) {unknown}; known: {sorted(BENCHMARK_ITEMS)}")
    index = _Index(n)
    bench_info = {}
    for task in tasks:
        split, reader = BENCHMARK_ITEMS[task]
        index.add(task, reader(data_root))
        bench_info[task] = {"split": split, "items": len(index.ids[task]), **index.stats[task]}

    pairs: dict[str, dict[str, dict]] = {}
    mixture_info = {}
    for name, texts in mixtures.items():
        hits: dict[str, dict[int, int]] = {t: {} for t in tasks}  # task -> item -> first mixture text index
        texts_with_hit: dict[str, int] = {t: 0 for t in tasks}
        count = 0
        for i, text in enumerate(texts):
            count += 1
            words = normalize(text).split()
            if not words:
                continue
            found = index.matches(words)
            for task in {t for t, _ in found}:
                texts_with_hit[task] += 1
            for task, k in found:
                hits[task].setdefault(k, i)
        mixture_info[name] = {"texts": count}
        pairs[name] = {}
        for task in tasks:
            ids_all = index.ids[task]
            items = sorted(hits[task])
            ids = sorted(ids_all[k] for k in items)
            pairs[name][task] = {
                "overlapping_items": len(items),
                "fraction": len(items) / len(ids_all) if ids_all else 0.0,
                "item_ids": ids[:MAX_IDS_LISTED],
                "mixture_texts_with_overlap": texts_with_hit[task],
                "examples": [{"item_id": ids_all[k], "mixture_text_index": hits[task][k]} for k in items[:10]],
            }
    return {
        "n": n,
        "normalisation": "lowercase; Unicode punctuation and symbols -> space; whitespace collapsed; words split on spaces",
        "benchmarks": bench_info,
        "mixtures": mixture_info,
        "pairs": pairs,
        "contaminated": any(p["overlapping_items"] for per in pairs.values() for p in per.values()),
    }
