"""The reproduction report: our stages beside the published figures, with baselines and caveats.

    md, png = write_report({"base": doc0, "sft-general": doc1, "sft-think": None, "dpo": doc3}, out_dir)

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASH = "–"

# --- published figures -----------------------------------------------------------------------------
# Sources: Shekswess/tiny-reasoning-language-model README (TRLM-135M, its "SmolLM2-135M-Instruct" column
# copied from the SmolLM2 model card); the SmolLM2-135M-Instruct model card (lighteval). See
# shared/notes/trlm-recipe.md section 3 for how each was produced.

PUBLISHED_COLUMNS = ("SmolLM2-135M-Instruct (published)", "TRLM-135M (published)")

# Full evaluated split sizes and baselines of the published benchmarks (computed from the data files:
# ARC-Challenge test answer positions 266/311/310/285 of 1172, 4-choice except 7 items; BoolQ
# validation 2033 "yes" of 3270; PIQA validation label 1 = 928 of 1838; MMLU test answers
# A/B/C/D = 3222/3462/3582/3776 of 14042). Used to flag published figures (binomial standard error).
FULL_SPLITS: dict[str, dict[str, Any]] = {
    "arc_challenge": {"n": 1172, "chance": 0.2502, "majority": 311 / 1172},
    "arc_easy": {"n": 2376, "chance": 0.2502, "majority": 633 / 2376},
    "arc_average": {"n": 3548, "chance": 0.2502, "majority": None},
    "boolq": {"n": 3270, "chance": 0.5, "majority": 2033 / 3270},
    "piqa": {"n": 1838, "chance": 0.5, "majority": 928 / 1838},
    "mmlu": {"n": 14042, "chance": 0.25, "majority": 3776 / 14042},
    "gsm8k": {"n": 1319, "chance": None, "majority": None},
    "bbh": {"n": 6511, "chance": None, "majority": None},
    "ifeval": {"n": 541, "chance": None, "majority": None},
    "ifeval_mean4": {"n": 541, "chance": None, "majority": None},
}


@dataclass(frozen=True)
class Row:
    benchmark: str  # display name
    task: str  # task/group key in the results (or a derived key)
    metric: str  # metric key in the results document
    label: str  # exact metric description shown


ROWS: tuple[Row, ...] = (
    Row("ARC-Challenge", "arc_challenge", "acc", "acc (0-shot, lm-eval arc_challenge)"),
    Row("ARC-Challenge", "arc_challenge", "acc_norm", "acc_norm (0-shot)"),
    Row("ARC-Easy", "arc_easy", "acc", "acc (0-shot, lm-eval arc_easy)"),
    Row("ARC-Easy", "arc_easy", "acc_norm", "acc_norm (0-shot)"),
    Row("ARC average", "arc_average", "acc_norm", "mean of ARC-Easy and ARC-Challenge acc_norm"),
    Row("BBH", "bbh", "exact_match,get-answer", "exact_match, get-answer filter (3-shot CoT, 27 tasks size-weighted)"),
    Row("BoolQ", "boolq", "acc", "acc (0-shot)"),
    Row("GSM8K", "gsm8k", "exact_match,strict-match", "exact_match, strict-match (5-shot)"),
    Row("GSM8K", "gsm8k", "exact_match,flexible-extract", "exact_match, flexible-extract (5-shot)"),
    Row("IFEval", "ifeval", "prompt_level_strict_acc", "prompt-level strict acc"),
    Row("IFEval", "ifeval", "inst_level_strict_acc", "instruction-level strict acc"),
    Row("IFEval", "ifeval", "prompt_level_loose_acc", "prompt-level loose acc"),
    Row("IFEval", "ifeval", "inst_level_loose_acc", "instruction-level loose acc"),
    Row("IFEval", "ifeval_mean4", "mean4", "mean of the four IFEval metrics above"),
    Row("MMLU", "mmlu", "acc", "acc (0-shot MCF: letter answer, 57 subjects size-weighted)"),
    Row("PIQA", "piqa", "acc", "acc (0-shot)"),
    Row("PIQA", "piqa", "acc_norm", "acc_norm (0-shot)"),
)

# Derived rows: key -> (task, metric) parts averaged with equal weights.
DERIVED: dict[str, list[tuple[str, str]]] = {
    "arc_average": [("arc_easy", "acc_norm"), ("arc_challenge", "acc_norm")],
    "ifeval_mean4": [("ifeval", m) for m in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")],
}

COMMON_TRLM = (
    "TRLM-135M: lm-eval (version not pinned in the repository) run as `lm_eval --tasks gsm8k,bbh,arc_challenge,"
    "boolq,piqa,ifeval,mmlu --apply_chat_template --fewshot_as_multiturn --batch_size auto`, dtype bfloat16, "
    "with the TRLM chat template (its own system prompt); no per-task logs were published."
)
COMMON_SMOLLM2 = (
    "SmolLM2-135M-Instruct: figures from the model card, measured with lighteval (not lm-eval) with its chat "
    "template, vLLM, bf16; log-likelihood tasks use acc_norm_nospace. They are not re-measurements with our setup."
)

# (column, task key, metric key) -> (value in %, note)
PUBLISHED: dict[tuple[str, str, str], tuple[float, str]] = {
    ("TRLM-135M (published)", "arc_challenge", "acc_norm"): (
        40.61,
        "Published as 'ARC Challenge 40.61 (avg)'; the metric (acc, acc_norm or their mean) and what '(avg)' averages are not stated; placed on the acc_norm row.",
    ),
    ("SmolLM2-135M-Instruct (published)", "arc_average", "acc_norm"): (
        37.3,
        "Published as 'ARC (Average) 37.3': lighteval, the mean of ARC-Easy and ARC-Challenge, acc_norm_nospace, 0-shot. TRLM's table sets it beside its ARC-Challenge-only figure.",
    ),
    ("TRLM-135M (published)", "bbh", "exact_match,get-answer"): (
        36.80,
        "lm-eval `bbh` (3-shot chain-of-thought since lm-eval 0.4.5, max_gen_toks 1024); the lm-eval version used is unknown.",
    ),
    ("SmolLM2-135M-Instruct (published)", "bbh", "exact_match,get-answer"): (
        28.2,
        "lighteval 'BBH (3-shot)': a direct-answer prompt ('Question: … Answer:') scored with exact_match, not chain-of-thought: a different task formulation.",
    ),
    ("TRLM-135M (published)", "boolq", "acc"): (
        62.17,
        "Exactly the majority-class rate of the BoolQ validation split (2033 of 3270 answers are 'yes' = 62.17%): a model that always answers 'yes' scores this.",
    ),
    ("TRLM-135M (published)", "gsm8k", "exact_match,strict-match"): (
        2.59,
        "Which filter (strict-match or flexible-extract) is not stated; placed on strict-match. 5-shot, max_gen_toks 256, which cuts <think> traces short.",
    ),
    ("SmolLM2-135M-Instruct (published)", "gsm8k", "exact_match,strict-match"): (
        1.4,
        "lighteval 'GSM8K (5-shot)' scored with quasi_exact_match_gsm8k, 256 new tokens; not lm-eval's strict-match filter.",
    ),
    ("TRLM-135M (published)", "ifeval_mean4", "mean4"): (
        35.49,
        "Published as 'IFEval 35.49 (avg)'; which of the four lm-eval IFEval metrics are averaged is not stated; placed on the mean-of-four row.",
    ),
    ("SmolLM2-135M-Instruct (published)", "ifeval_mean4", "mean4"): (
        29.9,
        "lighteval 'IFEval (Average prompt/inst)': an average of prompt- and instruction-level accuracy (strict/loose not stated), not the mean of all four.",
    ),
    ("TRLM-135M (published)", "mmlu", "acc"): (
        34.95,
        "lm-eval `mmlu`: 0-shot multiple-choice format (letter answer), acc, size-weighted.",
    ),
    ("SmolLM2-135M-Instruct (published)", "mmlu", "acc"): (
        29.3,
        "lighteval 'MMLU (cloze)': the answer text is scored (no lettered options), acc_norm_nospace: a different task formulation from lm-eval's letter-answer MCF.",
    ),
    ("TRLM-135M (published)", "piqa", "acc"): (
        64.91,
        "Whether acc or acc_norm is not stated; placed on the acc row.",
    ),
    ("SmolLM2-135M-Instruct (published)", "piqa", "acc_norm"): (
        66.3,
        "lighteval 0-shot PIQA, acc_norm_nospace (length-normalised, no leading space before the answer).",
    ),
}


# --- helpers ------------------------------------------------------------------------------------


def _pct(x: float | None, digits: int = 2) -> str:
    return DASH if x is None else f"{100 * x:.{digits}f}"


def _short(h: str | None, k: int = 12) -> str:
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
            text = _pct(score["value"])
            if score.get("stderr") is not None:
                text += f" ± {_pct(score['stderr'])}"
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


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], png_name: str | None = None) -> str:
    cols = report["columns"]
    labels = [column_label(n, d) for n, d in cols.items()]
    # Our columns lead (a UI that cuts the table on the right keeps them); baselines and the published
    # figures follow for comparison.
    header = ["Benchmark", "Metric", *labels, "Chance", "Majority", *PUBLISHED_COLUMNS]
    body = []
    for r in report["rows"]:
        row, cells, base = r["row"], r["cells"], r["baseline"] or {}
        body.append(
            [row.benchmark, row.label]
            + [cells[n]["text"] for n in cols]
            + [_pct(base.get("chance"), 1), _pct(base.get("majority"), 1)]
            + [cells[p]["text"] for p in PUBLISHED_COLUMNS]
        )
    out = ["# TRLM-135M reproduction: evaluation report", ""]
    out.append(
        "Scores in % (± one standard error, closed form). **≈chance** / **≈majority**: the score is within 2 standard "
        "errors of the chance / majority-class baseline (for published figures: the binomial standard error at the full "
        "split size). Chance and majority are computed on the items our reference column evaluated; the majority-class "
        "answer is the most frequent gold answer of the whole split. Bracketed numbers refer to the notes. "
        f"{DASH} = not evaluated / not published."
    )
    out.append("")
    if any(d and (d.get('settings') or {}).get('profile') == 'smoke' for d in cols.values()):
        out.append(
            "**Smoke columns** evaluate a small seeded subset of items (and of MMLU/BBH subtasks) with a short generation "
            "budget: they check the pipeline, their scores are not estimates of the full benchmarks."
        )
        out.append("")
    out.append(_md_table(header, body))
    out.append("")
    if png_name:
        out += [f"![scores]({png_name})", ""]

    if report["mismatched"]:
        out.append("## Results with different settings")
        out.append("")
        out.append(
            "These cells were evaluated with settings that differ from the reference column of their row, so they are "
            "kept out of the main table."
        )
        out.append("")
        rows = [
            [m["row"].benchmark, m["row"].label, column_label(m["column"], cols[m["column"]]), m["cell"]["text"], column_label(m["reference_column"], cols[m["reference_column"]]), m["differs_in"]]
            for m in report["mismatched"]
        ]
        out.append(_md_table(["Benchmark", "Metric", "Column", "Score", "Reference column", "Settings that differ"], rows))
        out.append("")

    out.append("## Evaluation settings per column")
    out.append("")
    srows = []
    for name, doc in cols.items():
        if not doc:
            srows.append([name, "not run"] + [DASH] * 7)
            continue
        s = doc.get("settings") or {}
        srows.append([
            column_label(name, doc),
            s.get("profile", DASH),
            _short(s.get("model_fingerprint")),
            f"lm-eval {(s.get('versions') or {}).get('lm_eval')}",
            f"chat template {'on' if s.get('apply_chat_template') else 'off'} ({_short(s.get('chat_template_sha256'), 10)}), multi-turn few-shot {'on' if s.get('fewshot_as_multiturn') else 'off'}",
            f"max_gen_toks {s.get('max_gen_toks') or 'task default'}",
            f"seed {(s.get('seeds') or {}).get('fewshot_random_seed')}",
            s.get("model_dtype", DASH),
            f"{s.get('wall_s', DASH)} s",
        ])
    out.append(_md_table(["Column", "Profile", "Model fingerprint", "Harness", "Chat", "Generation", "Seed", "dtype", "Eval time"], srows))
    out.append("")
    probes = {}
    for name, doc in cols.items():
        p = ((doc or {}).get("settings") or {}).get("chat_template_rendered_probe")
        if p:
            probes.setdefault(p, []).append(name)
    if probes:
        out.append("What each chat template wraps around a prompt (`{prompt}`), including any system prompt:")
        out.append("")
        for p, names in probes.items():
            out.append(f"- {', '.join(names)}:")
            out.append("")
            out.append("  ```")
            out += ["  " + line for line in p.splitlines()]
            out.append("  ```")
        out.append("")

    out.append("## Notes")
    out.append("")
    for i, n in enumerate(report["notes"], 1):
        out.append(f"{i}. {n}")
    out.append(
        f"{len(report['notes']) + 1}. Standard errors of derived rows: ARC average = sqrt(se_E² + se_C²)/2 (independent test sets); "
        "IFEval mean of four = root of the mean of the four variances (the four metrics share items, so this is approximate)."
    )
    out.append("")
    run_notes: dict[str, list[str]] = {}
    for name, doc in cols.items():
        for n in (doc or {}).get("notes") or []:
            run_notes.setdefault(n, []).append(name)
    if run_notes:
        out.append("### Notes recorded by the evaluation runs")
        out.append("")
        for n, names in run_notes.items():
            out.append(f"- ({', '.join(names)}) {n}")
        out.append("")
    return "\n".join(out)


def render_compact(report: dict[str, Any], png_name: str | None = None) -> str:
    """The report for a UI pane about 700 px wide (Prefect's artifact view at a 1,280 px window):
    scores only, our columns first, short labels; standard errors, settings and notes stay in
    `report.md`. A `≈` marks a score within 2 standard errors of the chance or majority baseline."""
    cols = report["columns"]
    short_pub = {p: p.split("-")[0] + " pub." for p in PUBLISHED_COLUMNS}
    header = ["Benchmark", *cols, "chance", *short_pub.values()]
    body = []
    for r in report["rows"]:
        row, cells, base = r["row"], r["cells"], r["baseline"] or {}
        if all(cells[n].get("value") is None for n in cols):
            continue  # not evaluated by any of our columns: the full report lists it
        ours = [_pct(cells[n]["value"], 1) + (" ≈" if cells[n].get("flag") else "") if cells[n].get("value") is not None else DASH for n in cols]
        published = [_pct(cells[p]["value"], 1) if cells[p].get("value") is not None else DASH for p in PUBLISHED_COLUMNS]
        body.append([f"{row.benchmark} {row.metric.split(',')[-1]}", *ours, _pct(base.get("chance"), 0), *published])
    smoke = any(d and (d.get("settings") or {}).get("profile") == "smoke" for d in cols.values())
    out = ["### Evaluation" + (" (smoke subsets: a pipeline check, not benchmark estimates)" if smoke else ""), "",
           _md_table(header, body), "", "Scores in %. ≈: within 2 standard errors of chance or of the majority class. "
           "Standard errors, settings and notes: `report.md`.", ""]
    if png_name:
        out += [f"![scores]({png_name})", ""]
    return "\n".join(out)


# Rows drawn in the chart (each panel is one exact metric; published figures appear on the row they were placed on).
CHART_ROWS = (
    ("arc_challenge", "acc_norm"),
    ("arc_easy", "acc_norm"),
    ("arc_average", "acc_norm"),
    ("bbh", "exact_match,get-answer"),
    ("boolq", "acc"),
    ("gsm8k", "exact_match,strict-match"),
    ("ifeval_mean4", "mean4"),
    ("mmlu", "acc"),
    ("piqa", "acc"),
    ("piqa", "acc_norm"),
)


def render_chart(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = report["columns"]
    series = list(PUBLISHED_COLUMNS) + list(cols)
    series_labels = ["SmolLM2 (published)", "TRLM (published)"] + [column_label(n, d) for n, d in cols.items()]
    colors = ["#bbbbbb", "#888888", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    rows = {(r["row"].task, r["row"].metric): r for r in report["rows"]}
    fig, axes = plt.subplots(2, 5, figsize=(19, 8))
    for ax, key in zip(axes.flat, CHART_ROWS):
        r = rows[key]
        ax.set_title(f"{r['row'].benchmark}\n{r['row'].label}", fontsize=8, wrap=True)
        for i, name in enumerate(series):
            cell = r["cells"].get(name) or {}
            v = cell.get("value")
            if v is None:
                mark = "≠" if cell.get("moved") else DASH
                ax.text(i, 1.0, mark, ha="center", va="bottom", fontsize=9, color="#777777")
                continue
            se = cell.get("stderr")
            hatch = "//" if name in PUBLISHED_COLUMNS else None
            ax.bar(i, 100 * v, color=colors[i % len(colors)], hatch=hatch, edgecolor="white" if hatch else None,
                   yerr=None if se is None else 100 * se, capsize=3)
            top = 100 * (v + (se or 0))
            ax.text(i, min(top + 1.5, 93), f"{100 * v:.1f}", ha="center", va="bottom", fontsize=6.5)
        base = r["baseline"] or FULL_SPLITS.get(key[0]) or {}
        if base.get("chance") is not None:
            ax.axhline(100 * base["chance"], color="black", linestyle="--", linewidth=1, label="chance")
        if base.get("majority") is not None:
            ax.axhline(100 * base["majority"], color="red", linestyle=":", linewidth=1.2, label="majority class (items evaluated)")
        ax.set_xticks(range(len(series)))
        ax.set_xticklabels(series_labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel("%", fontsize=8)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle("TRLM-135M reproduction. Hatched: published figures (different setups, see the report's notes); "
                 "≠: evaluated with different settings (see report)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(columns: dict[str, dict | None], out_dir: Path) -> tuple[Path, Path]:
    """Write `report.md`, its compact form `report-ui.md` (for the UIs) and `report.png` into
    `out_dir`; return the report's and the chart's paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(columns)
    png = render_chart(report, out_dir / "report.png")
    md = out_dir / "report.md"
    md.write_text(render_markdown(report, png.name), encoding="utf-8")
    (out_dir / "report-ui.md").write_text(render_compact(report, png.name), encoding="utf-8")
    return md, png


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
