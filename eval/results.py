"""lm-eval's output as our result document's pieces: metric tables, stderrs lm-eval leaves out,
chance and majority-class baselines on the items evaluated, and each task's recorded settings."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from typing import Any


def _float(x: Any) -> float | None:
    if x is None or isinstance(x, str):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def metric_table(raw: dict[str, Any], n: int) -> dict[str, dict[str, Any]]:
    """lm-eval's flat `{"acc,none": x, "acc_stderr,none": y}` -> `{"acc": {"value", "stderr", "n"}}`."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        value_f = _float(value)
        if value_f is None:
            continue
        name = metric if filt == "none" else f"{metric},{filt}"
        stderr = _float(raw.get(f"{metric}_stderr,{filt}"))
        out[name] = {"value": value_f, "stderr": stderr, "n": int(n)}
    return out


def _mean_stderr(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var) / math.sqrt(n)


def full_split_majority(task) -> tuple[str, float] | None:
    """The most frequent gold target over the task's whole evaluated split, and its share there.

    Kept on the task object, which the eval stage shares between its models (eval/shared.py): rendering
    every target of a split takes seconds (BoolQ's 3,270), and it does not depend on the model."""
    if "_trlm_full_split_majority" in vars(task):
        return task._trlm_full_split_majority
    try:
        targets = [str(task.doc_to_target(doc)) for doc in task.eval_docs]
    except Exception:  # pragma: no cover - a task whose targets cannot be rendered without a model
        targets = []
    found = None
    if targets:
        label, count = Counter(targets).most_common(1)[0]
        found = (label, count / len(targets))
    task._trlm_full_split_majority = found
    return found


def baselines(samples: list[dict[str, Any]], output_type: str, majority_label: str | None) -> dict[str, Any]:
    """Chance and majority-class accuracy on the very items evaluated (from lm-eval's logged samples).

    The majority-class "model" always gives the most frequent gold target of the task's *whole*
    evaluated split (`majority_label`: an answer position for multiple choice, e.g. BoolQ's "yes"; an
    answer string for BBH); its baseline is the share of evaluated items with that target. Chance is the
    mean of 1/#choices (multiple choice only; None for generative tasks).
    """
    docs: dict[Any, dict[str, Any]] = {}
    for s in samples:  # one entry per (doc, filter); keep one per doc
        docs.setdefault(s["doc_id"], s)
    n = len(docs)
    if n == 0:
        return {"chance": None, "majority": None, "n": 0}
    majority = None
    if majority_label is not None:
        majority = sum(str(s.get("target")) == majority_label for s in docs.values()) / n
    chance = None
    if output_type == "multiple_choice":
        chance = sum(1.0 / max(1, len(s.get("arguments") or [])) for s in docs.values()) / n
    return {"chance": chance, "majority": majority, "majority_label": majority_label, "n": n}


def pool_baselines(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Size-weighted pool of per-subtask baselines (the group metrics are size-weighted too)."""
    n = sum(p["n"] for p in parts)
    out: dict[str, Any] = {"n": n}
    for key in ("chance", "majority"):
        vals = [(p[key], p["n"]) for p in parts if p.get(key) is not None]
        out[key] = sum(v * k for v, k in vals) / sum(k for _, k in vals) if vals and len(vals) == len(parts) and n else None
    return out


def ifeval_inst_stderr(samples: list[dict[str, Any]]) -> dict[str, float | None]:
    """Closed-form stderr of the instruction-level IFEval accuracies (lm-eval reports none for them)."""
    out = {}
    for metric in ("inst_level_strict_acc", "inst_level_loose_acc"):
        flat: list[float] = []
        seen = set()
        for s in samples:
            if s["doc_id"] in seen or metric not in s:
                continue
            seen.add(s["doc_id"])
            flat.extend(float(x) for x in s[metric])
        out[metric] = _mean_stderr(flat)
    return out


def ifeval_instruction_counts(samples: list[dict[str, Any]]) -> dict[str, int]:
    counts: Counter = Counter()
    seen = set()
    for s in samples:
        if s["doc_id"] in seen:
            continue
        seen.add(s["doc_id"])
        counts.update(s["doc"].get("instruction_id_list") or [])
    return dict(sorted(counts.items()))


def _clean_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A task config without machine-specific paths, for hashing."""
    cfg = json.loads(json.dumps(cfg, default=str, sort_keys=True))
    meta = cfg.get("metadata")
    if isinstance(meta, dict):
        meta.pop("config_source", None)
    return cfg


def task_record(name: str, task_cfg: dict[str, Any], version: Any, n_shot: Any, n_samples: dict | None) -> dict[str, Any]:
    keys = (
        "dataset_path", "dataset_name", "training_split", "validation_split", "test_split", "fewshot_split",
        "output_type", "num_fewshot", "generation_kwargs", "target_delimiter", "fewshot_delimiter", "repeats",
    )
    rec = {k: task_cfg.get(k) for k in keys if task_cfg.get(k) is not None}
    rec["task_version"] = version
    rec["num_fewshot"] = n_shot
    rec["metrics"] = [m.get("metric") for m in task_cfg.get("metric_list") or []]
    if task_cfg.get("filter_list"):
        rec["filters"] = [f.get("name") for f in task_cfg["filter_list"]]
    rec["config_sha256"] = hashlib.sha256(json.dumps(_clean_config(task_cfg), sort_keys=True).encode()).hexdigest()
    if n_samples:
        rec["n_total"] = n_samples.get("original")
        rec["n_evaluated"] = n_samples.get("effective")
    return rec
