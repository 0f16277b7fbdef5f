"""The reproduction report as data: our stages beside the published figures, with baselines and caveats.

    report = build_report({"base": doc0, "sft-general": doc1, "sft-think": None, "dpo": doc3})

The published figures and their notes are data (`eval/published.py`); `eval/render.py` writes this
report as markdown and a chart (`write_report`).

Columns: published SmolLM2-135M-Instruct, published TRLM-135M, then our base and the three stages
(documents from `trlm.eval.harness.evaluate`; None = stage not run, shown as "–"). Every row names its
metric exactly. Each published figure whose setup differs from ours carries a numbered note.
Every score stands beside its chance and majority-class baselines, and a score within 2 standard
errors of one of them is flagged.

Comparability: for every task, each column's *evaluation settings signature* (lm-eval and task
versions, task config hash, few-shot count and seed, generation kwargs, subset, split overrides, chat
template on/off and multi-turn few-shot, IFEval's NLTK model) is computed. The main table shows, per
row, only the columns whose signature equals the row's reference signature (the one most columns
share; ties go to the one that evaluated more items, then to the earlier column). Any other cell is moved to a separate table, "Results with
different settings", which says which settings differ. So a column of the main table never mixes
results produced with different settings.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from typing import Any

from trlm.eval.published import COMMON_SMOLLM2, COMMON_TRLM, DERIVED, FULL_SPLITS, PUBLISHED, PUBLISHED_COLUMNS, ROWS

DASH = "–"

# --- helpers ------------------------------------------------------------------------------------


def pct(x: float | None, digits: int = 2) -> str:
    return DASH if x is None else f"{100 * x:.{digits}f}"


def short(h: str | None, k: int = 12) -> str:
    return DASH if not h else h[:k]


def _metric(doc: dict | None, task: str, metric: str) -> dict[str, Any] | None:
    """`{"value", "stderr", "n"}` of one metric, including the derived rows; None if absent."""
    if not doc:
        return None
    if task in DERIVED:
        parts = [_metric(doc, t, m) for t, m in DERIVED[task]]
        if any(p is None for p in parts):
            return None
        k = len(parts)
        value = sum(p["value"] for p in parts) / k
        ses = [p.get("stderr") for p in parts]
        # ARC: independent test sets. IFEval: the four metrics share items (correlated): the root of the
        # mean variance is used as an approximation and said so in the notes.
        if any(s is None for s in ses):
            se = None
        elif task == "arc_average":
            se = math.sqrt(sum(s * s for s in ses)) / k
        else:
            se = math.sqrt(sum(s * s for s in ses) / k)
        return {"value": value, "stderr": se, "n": min(p["n"] for p in parts)}
    return (doc.get("results") or {}).get(task, {}).get(metric)


def _baseline(doc: dict | None, task: str) -> dict[str, Any] | None:
    if not doc:
        return None
    if task in DERIVED:
        parts = [_baseline(doc, t) for t, _ in DERIVED[task]]
        if any(p is None for p in parts):
            return None
        out = {}
        for key in ("chance", "majority"):
            vals = [p.get(key) for p in parts]
            out[key] = None if any(v is None for v in vals) else sum(vals) / len(vals)
        return out
    return (doc.get("baselines") or {}).get(task)


def _task_signature(doc: dict, task: str) -> dict[str, Any] | None:
    """Everything about how `task` was evaluated that must match for two results to be comparable."""
    if task in DERIVED:
        parts = {t: _task_signature(doc, t) for t, _ in DERIVED[task]}
        return None if any(v is None for v in parts.values()) else {"derived": parts}
    s = doc.get("settings") or {}
    t = (s.get("tasks") or {}).get(task)
    if t is None:
        return None
    leaves = {}
    for name, rec in sorted((t.get("leaves") or {}).items()):
        subset = rec.get("subset") or {}
        leaves[name] = {
            "task_version": rec.get("task_version"),
            "num_fewshot": rec.get("num_fewshot"),
            "config_sha256": rec.get("config_sha256"),
            "generation_kwargs": rec.get("generation_kwargs"),
            "subset": subset.get("indices_sha256") or subset.get("kind"),
            "split_overrides": rec.get("split_overrides"),
        }
    # Not included: profile and the global max_gen_toks (the subsets and every generate task's effective
    # generation_kwargs are compared directly), and model properties (fingerprint, chat template text,
    # dtype), which are what the columns are meant to differ in; they are listed per column instead.
    sig = {
        "lm_eval": (s.get("versions") or {}).get("lm_eval"),
        "apply_chat_template": s.get("apply_chat_template"),
        "fewshot_as_multiturn": s.get("fewshot_as_multiturn"),
        "system_instruction": s.get("system_instruction"),
        "fewshot_seed": (s.get("seeds") or {}).get("fewshot_random_seed"),
        "task_version": t.get("task_version"),
        "num_fewshot": t.get("num_fewshot"),
        "subtasks": t.get("subtasks_evaluated"),
        "leaves": leaves,
    }
    if task == "ifeval":
        sig["punkt_tab"] = ((s.get("punkt_tab") or {}).get("sha256"))
    return sig


def _sig_hash(sig: Any) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix or "value"]


def _summarise_diff(keys: list[str]) -> str:
    """`["max_gen_toks", "leaves.mmlu_a.subset", "leaves.mmlu_b.subset"]` -> "max_gen_toks; subset (2 subtasks)"."""
    top: set[str] = set()
    per_leaf: dict[str, set[str]] = {}
    for k in keys:
        parts = k.split(".")
        if parts[0] == "derived" and len(parts) > 2:
            parts = parts[2:]
        if parts[0] == "leaves" and len(parts) > 2:
            per_leaf.setdefault(parts[2], set()).add(parts[1])
        else:
            top.add(parts[0])
    items = sorted(top)
    for field, leaves in sorted(per_leaf.items()):
        if field not in top:
            items.append(f"{field} ({len(leaves)} subtask{'s' if len(leaves) > 1 else ''})" if len(leaves) > 1 else field)
    return "; ".join(items)


def column_label(name: str, doc: dict | None) -> str:
    if not doc:
        return name
    s = doc.get("settings") or {}
    if s.get("profile") == "smoke":
        return f"{name} (smoke)"
    if s.get("limit") or s.get("sample"):
        return f"{name} (subset)"
    return name


def _flag(score: dict[str, Any] | None, base: dict[str, Any] | None) -> str:
    """'≈chance' / '≈majority' when the score is within 2 standard errors of that baseline."""
    if not score or not base or score.get("stderr") is None:
        return ""
    flags = []
    for key, label in (("chance", "≈chance"), ("majority", "≈majority")):
        b = base.get(key)
        if b is not None and abs(score["value"] - b) <= 2 * score["stderr"]:
            flags.append(label)
    return " ".join(flags)


def _published_flag(task: str, value_pct: float) -> str:
    info = FULL_SPLITS.get(task)
    if not info:
        return ""
    p = value_pct / 100
    se = math.sqrt(max(p * (1 - p), 1e-12) / info["n"])
    flags = []
    for key, label in (("chance", "≈chance"), ("majority", "≈majority")):
        b = info.get(key)
        if b is not None and abs(p - b) <= 2 * se:
            flags.append(label)
    return " ".join(flags)


def _reference_signatures(columns: dict[str, dict | None]) -> dict[str, tuple[str | None, dict[str, str]]]:
    """Per task: (reference signature hash, {column: its signature hash})."""
    tasks = {r.task for r in ROWS}
    out = {}
    for task in tasks:
        hashes = {}
        for name, doc in columns.items():
            if doc is None:
                continue
            sig = _task_signature(doc, task)
            if sig is not None and _metric_present(doc, task):
                hashes[name] = _sig_hash(sig)
        if not hashes:
            out[task] = (None, {})
            continue
        counts = Counter(hashes.values())
        items = {h: max(_n_evaluated(columns[n], task) for n, hh in hashes.items() if hh == h) for h in counts}
        # most columns; then the most items evaluated (a full run beats a smoke subset); then earliest column
        best = max((counts[h], items[h]) for h in counts)
        ref = next(h for n, h in hashes.items() if (counts[h], items[h]) == best)
        out[task] = (ref, hashes)
    return out


def _n_evaluated(doc: dict | None, task: str) -> int:
    if not doc:
        return 0
    if task in DERIVED:
        return min(_n_evaluated(doc, t) for t, _ in DERIVED[task])
    return int((((doc.get("settings") or {}).get("tasks") or {}).get(task) or {}).get("n_evaluated") or 0)


def _metric_present(doc: dict, task: str) -> bool:
    return any(_metric(doc, r.task, r.metric) is not None for r in ROWS if r.task == task)


# --- report ---------------------------------------------------------------------------------------


def build_report(columns: dict[str, dict | None]) -> dict[str, Any]:
    """The report's content as data (used by `write_report` and the tests)."""
    cols = dict(columns)  # in the caller's order (the pipeline's); None = not evaluated, shown as a dash
    refs = _reference_signatures(cols)
    notes: list[str] = []
    note_index: dict[str, int] = {}

    def note_ref(text: str) -> int:
        if text not in note_index:
            notes.append(text)
            note_index[text] = len(notes)
        return note_index[text]

    trlm_common = note_ref(COMMON_TRLM)
    smol_common = note_ref(COMMON_SMOLLM2)

    rows_out = []
    mismatched = []
    for row in ROWS:
        ref_hash, hashes = refs.get(row.task, (None, {}))
        baseline = None
        cells: dict[str, dict[str, Any]] = {}
        for pub in PUBLISHED_COLUMNS:
            entry = PUBLISHED.get((pub, row.task, row.metric))
            if entry is None:
                cells[pub] = {"text": DASH, "value": None}
                continue
            value, note = entry
            n1 = note_ref(note)
            common = trlm_common if pub.startswith("TRLM") else smol_common
            flag = _published_flag(row.task, value)
            cells[pub] = {
                "text": f"{value:.2f}" + (f" {flag}" if flag else "") + f" [{common},{n1}]",
                "value": value / 100,
                "flag": flag,
            }
        for name, doc in cols.items():
            score = _metric(doc, row.task, row.metric)
            if score is None:
                cells[name] = {"text": DASH, "value": None}
                continue
            base = _baseline(doc, row.task)
            if baseline is None and hashes.get(name) == ref_hash:
                baseline = base
            text = pct(score["value"])
            if score.get("stderr") is not None:
                text += f" ± {pct(score['stderr'])}"
            flag = _flag(score, base)
            if flag:
                text += f" {flag}"
            cell = {"text": text, "value": score["value"], "stderr": score.get("stderr"), "n": score.get("n"), "flag": flag}
            if hashes.get(name) != ref_hash:
                ref_col = next(n for n, h in hashes.items() if h == ref_hash)
                diff = _diff_keys(_task_signature(cols[ref_col], row.task), _task_signature(doc, row.task))
                mismatched.append({"row": row, "column": name, "cell": cell, "reference_column": ref_col, "differs_in": _summarise_diff(diff)})
                cells[name] = {"text": "≠ settings (see below)", "value": None, "moved": True}
            else:
                cells[name] = cell
        rows_out.append({"row": row, "cells": cells, "baseline": baseline})

    return {"columns": cols, "rows": rows_out, "mismatched": mismatched, "notes": notes, "refs": refs}


def headline_metrics(doc: dict | None, prefix: str = "") -> dict[str, float]:
    """Flat `{metric_key: value}` of every report row (and its stderr) for MLflow.

    Keys look like `arc_challenge/acc_norm`, `gsm8k/exact_match/strict-match`,
    `arc_average/acc_norm`, `ifeval_mean4/mean4`, plus `.../stderr` entries; MLflow forbids commas, so
    lm-eval's `metric,filter` becomes `metric/filter`. Values are fractions (0-1).
    """
    out: dict[str, float] = {}
    if not doc:
        return out
    for row in ROWS:
        m = _metric(doc, row.task, row.metric)
        if m is None:
            continue
        key = f"{prefix}{row.task}/{row.metric.replace(',', '/')}"
        out[key] = float(m["value"])
        if m.get("stderr") is not None:
            out[f"{key}/stderr"] = float(m["stderr"])
    return out
