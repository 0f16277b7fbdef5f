"""Benchmarks through lm-evaluation-harness's Python API, offline, with every setting recorded.

    doc = evaluate(model, tokenizer, recipe.eval, data_root=recipe.data_path,
                   work_dir=recipe.work_path / "eval", model_fingerprint=fp)

The in-memory model and tokenizer are wrapped in lm-eval's `HFLM` (nothing is reloaded from a hub) and
lm-eval's *standard* tasks (`arc_challenge`, `mmlu`, `bbh`, ...) are run by name, with the settings of
the published TRLM evaluation: the model's chat template applied, few-shot examples as multi-turn chat,
each task's default few-shot count. The datasets come from the data root through an offline mirror
(`trlm.eval.mirror`); IFEval's NLTK model from `trlm.eval.punkt`.

The returned document is JSON-serialisable:

    {"settings": {...everything needed to say whether two results are comparable...},
     "results": {task_or_group: {metric: {"value": float, "stderr": float | None, "n": int}}},
     "subtask_results": {leaf_task: {...}},           # members of groups (mmlu_*, bbh_cot_fewshot_*)
     "baselines": {task_or_group: {"chance": float | None, "majority": float | None, "n": int}},
     "notes": [str, ...]}

Metric names are lm-eval's `metric,filter` keys with the `,none` filter dropped: `acc`, `acc_norm`,
`exact_match,strict-match`, `exact_match,flexible-extract`, `exact_match,get-answer`,
`prompt_level_strict_acc`, ...
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from trlm.eval.config import EvalConfig

log = logging.getLogger(__name__)

RESULT_SCHEMA = 1
# The chat message used to record what the chat template renders around a prompt.
_TEMPLATE_PROBE = [{"role": "user", "content": "{prompt}"}]
_TASK_MANAGER = None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def _task_manager():
    """One lm-eval TaskManager per process: indexing the built-in YAMLs takes several seconds."""
    global _TASK_MANAGER
    if _TASK_MANAGER is None:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGER = TaskManager()
    return _TASK_MANAGER


def _float(x: Any) -> float | None:
    if x is None or isinstance(x, str):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _metric_table(raw: dict[str, Any], n: int) -> dict[str, dict[str, Any]]:
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


def _full_split_majority(task) -> tuple[str, float] | None:
    """The most frequent gold target over the task's whole evaluated split, and its share there."""
    try:
        targets = [str(task.doc_to_target(doc)) for doc in task.eval_docs]
    except Exception:  # pragma: no cover - a task whose targets cannot be rendered without a model
        return None
    if not targets:
        return None
    label, count = Counter(targets).most_common(1)[0]
    return label, count / len(targets)


def _baselines(samples: list[dict[str, Any]], output_type: str, majority_label: str | None) -> dict[str, Any]:
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


def _pool_baselines(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Size-weighted pool of per-subtask baselines (the group metrics are size-weighted too)."""
    n = sum(p["n"] for p in parts)
    out: dict[str, Any] = {"n": n}
    for key in ("chance", "majority"):
        vals = [(p[key], p["n"]) for p in parts if p.get(key) is not None]
        out[key] = sum(v * k for v, k in vals) / sum(k for _, k in vals) if vals and len(vals) == len(parts) and n else None
    return out


def _ifeval_inst_stderr(samples: list[dict[str, Any]]) -> dict[str, float | None]:
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


def _ifeval_instruction_counts(samples: list[dict[str, Any]]) -> dict[str, int]:
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


def _task_record(name: str, task_cfg: dict[str, Any], version: Any, n_shot: Any, n_samples: dict | None) -> dict[str, Any]:
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


def _write_samples(path: Path, samples: dict[str, list[dict[str, Any]]]) -> None:
    from lm_eval.utils import handle_non_serializable

    from trlm.artifacts import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:  # a unique temporary: two evaluations of one model never clash
        for task, rows in sorted(samples.items()):
            for row in rows:
                f.write(json.dumps({"task": task, **row}, default=handle_non_serializable, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def _quiet(progress: bool):
    """Without progress: no progress bars (lm-eval's, datasets') and no lm-eval INFO chatter.

    tqdm reads TQDM_DISABLE only when it is imported, so lm-eval's module-level `tqdm` names are
    swapped for a silent subclass for the duration of the block.
    """
    if progress:
        yield
        return
    import importlib

    import tqdm as tqdm_mod

    class _Silent(tqdm_mod.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    patched = []
    for name in ("lm_eval.models.huggingface", "lm_eval.api.model", "lm_eval.api.task", "lm_eval.evaluator"):
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(name)
            if getattr(mod, "tqdm", None) is tqdm_mod.tqdm:
                patched.append(mod)
                mod.tqdm = _Silent
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    lm_logger.setLevel(logging.WARNING)
    ds_bars = None
    with contextlib.suppress(ImportError):
        import datasets.utils.logging as ds_logging

        ds_bars = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        lm_logger.setLevel(level)
        for mod in patched:
            mod.tqdm = tqdm_mod.tqdm
        if ds_bars:
            ds_logging.enable_progress_bar()


@contextlib.contextmanager
def _no_git_probe():
    """lm-eval runs `git describe` in the working directory to record *its* commit; skip that.

    The working directory is the dataset mirror (not a repository), and lm-eval's version is recorded
    from the installed distribution instead.
    """
    import lm_eval.evaluator as ev

    saved = getattr(ev, "get_git_commit_hash", None)
    if saved is None:
        yield
        return
    ev.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        ev.get_git_commit_hash = saved


def evaluate(
    model,
    tokenizer,
    cfg: EvalConfig,
    *,
    data_root: Path,
    work_dir: Path,
    model_fingerprint: str,
    progress: bool = True,
) -> dict:
    """Evaluate an in-memory causal LM on `cfg.tasks`; return the results document (see module doc).

    `work_dir` receives the offline dataset mirror (`hf_mirror/`), the NLTK data for IFEval
    (`nltk_data/`) and the per-item samples (`eval-samples/<fingerprint>-<profile>.jsonl`). The model
    is put in eval mode for the run and restored afterwards; `cfg.num_threads`, if set, applies to the
    run only.
    """
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from trlm.eval.mirror import build_mirror, offline_datasets
    from trlm.eval.punkt import AFFECTED_IFEVAL_INSTRUCTIONS, ensure_punkt_tab
    from trlm.eval.tasks import SMOKE_MAX_GEN_TOKS, _leaf_tasks, first_items, indices_digest, load_task

    t_start = time.time()
    data_root = Path(data_root).expanduser().resolve()
    work_dir = Path(work_dir).expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    mirror = build_mirror(data_root, work_dir)
    notes: list[str] = []

    max_gen_toks = cfg.max_gen_toks
    if max_gen_toks is None and cfg.profile == "smoke":
        max_gen_toks = SMOKE_MAX_GEN_TOKS
    gen_kwargs = {"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None
    if gen_kwargs:
        notes.append(
            f"max_gen_toks capped at {max_gen_toks} for every generate_until task (lm-eval defaults: gsm8k 256, "
            f"bbh 1024, ifeval 1280); longer answers are cut off, which lowers generative scores"
        )
    bootstrap_iters = 100 if cfg.profile == "smoke" else 100000
    # limit: the first N items of each task, exactly lm-eval's `limit`; sample: a seeded subset of N
    sample = getattr(cfg, "sample", None)

    punkt_info = None
    tasks = list(cfg.tasks)
    if "ifeval" in tasks:
        punkt_info = ensure_punkt_tab(work_dir)
        if punkt_info["available"]:
            notes.append(f"ifeval: NLTK punkt_tab (English) from {punkt_info['source']}; IFEval's checkers run unchanged")
        else:
            tasks.remove("ifeval")
            notes.append(
                "ifeval NOT evaluated: " + punkt_info["reason"] + ". Without it these instruction types cannot be "
                "checked: " + "; ".join(f"{k} ({v})" for k, v in AFFECTED_IFEVAL_INSTRUCTIONS.items())
            )

    was_training = getattr(model, "training", False)
    model.eval()
    threads_before = torch.get_num_threads()
    num_threads = getattr(cfg, "num_threads", None)
    if num_threads:
        torch.set_num_threads(num_threads)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=cfg.batch_size)
    chat_template = lm.chat_template(True) if cfg.apply_chat_template else None
    rendered_probe = None
    if cfg.apply_chat_template:
        with contextlib.suppress(Exception):
            rendered_probe = tokenizer.apply_chat_template(_TEMPLATE_PROBE, tokenize=False, add_generation_prompt=True)

    results: dict[str, dict[str, Any]] = {}
    subtask_results: dict[str, dict[str, Any]] = {}
    baselines: dict[str, dict[str, Any]] = {}
    task_settings: dict[str, dict[str, Any]] = {}
    all_samples: dict[str, list[dict[str, Any]]] = {}
    seeds = {"random_seed": cfg.seed, "numpy_random_seed": cfg.seed, "torch_random_seed": cfg.seed, "fewshot_random_seed": cfg.seed}

    try:
        with offline_datasets(mirror), _quiet(progress), _no_git_probe(), torch.no_grad():
            tm = _task_manager()
            for name in tasks:
                t0 = time.time()
                obj, plan, samples = load_task(tm, name, data_root=data_root, profile=cfg.profile, limit=cfg.limit, sample=sample, seed=cfg.seed)
                notes.extend(plan.notes)
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[obj],
                    samples=samples or None,
                    limit=cfg.limit,
                    apply_chat_template=cfg.apply_chat_template,
                    fewshot_as_multiturn=cfg.fewshot_as_multiturn,
                    gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
                    bootstrap_iters=bootstrap_iters,
                    log_samples=True,
                    task_manager=tm,
                    **seeds,
                )
                wall = time.time() - t0
                groups = out.get("group_subtasks", {})
                leaves = [t for t in out["results"] if t not in groups]
                n_samples = out.get("n-samples", {})
                leaf_records = {}
                leaf_baselines = []
                leaf_objs = {t.task_name: t for t in _leaf_tasks(obj)}
                for leaf in leaves:
                    n = int(out["results"][leaf].get("sample_len") or n_samples.get(leaf, {}).get("effective") or 0)
                    table = _metric_table(out["results"][leaf], n)
                    leaf_samples = out.get("samples", {}).get(leaf, [])
                    all_samples[leaf] = leaf_samples
                    task_cfg = out["configs"].get(leaf, {})
                    if task_cfg.get("task") == "ifeval" or leaf == "ifeval":
                        for metric, se in _ifeval_inst_stderr(leaf_samples).items():
                            if metric in table and table[metric]["stderr"] is None:
                                table[metric]["stderr"] = se
                    output_type = task_cfg.get("output_type", "")
                    label = None
                    # Majority class where answers come from a small fixed set: multiple choice, and BBH's
                    # generated answers. Not for GSM8K (a number per problem) or IFEval (no gold answer).
                    if output_type == "multiple_choice" or leaf.startswith("bbh"):
                        found = _full_split_majority(leaf_objs[leaf]) if leaf in leaf_objs else None
                        label = found[0] if found else None
                    b = _baselines(leaf_samples, output_type, label)
                    leaf_baselines.append(b)
                    rec = _task_record(leaf, task_cfg, out["versions"].get(leaf), out["n-shot"].get(leaf), n_samples.get(leaf))
                    first = first_items(len(leaf_objs[leaf].eval_docs), cfg.limit) if leaf in leaf_objs else None
                    if leaf in samples:
                        rec["subset"] = {"kind": "seeded", "seed": cfg.seed, "n": len(samples[leaf]), "indices_sha256": indices_digest(samples[leaf]), "indices": samples[leaf]}
                    elif first is not None:
                        rec["subset"] = {"kind": "first", "n": len(first), "indices_sha256": indices_digest(first), "indices": first}
                    else:
                        rec["subset"] = {"kind": "all"}
                    if leaf in plan.split_overrides:
                        rec["split_overrides"] = plan.split_overrides[leaf]
                    if leaf == "ifeval":
                        rec["instruction_counts"] = _ifeval_instruction_counts(leaf_samples)
                    leaf_records[leaf] = rec
                    if leaf == name:
                        results[name] = table
                        baselines[name] = b
                    else:
                        subtask_results[leaf] = table
                for g in groups:
                    if g != name and g in out["results"]:
                        subtask_results[g] = _metric_table(out["results"][g], int(out["results"][g].get("sample_len") or 0))
                if name in out["results"] and name in groups:
                    n = int(out["results"][name].get("sample_len") or 0)
                    results[name] = _metric_table(out["results"][name], n)
                    baselines[name] = _pool_baselines(leaf_baselines)
                task_settings[name] = {
                    "task_version": out["versions"].get(name),
                    "kind": "group" if name in groups else "task",
                    "num_fewshot": out["n-shot"].get(name),
                    "n_evaluated": sum(r.get("n_evaluated") or 0 for r in leaf_records.values()),
                    "n_total": sum(r.get("n_total") or 0 for r in leaf_records.values()),
                    "subtasks_total": plan.subtasks_total,
                    "subtasks_evaluated": sorted(leaf_records) if name in groups else None,
                    "items_per_subtask" if name in groups else "items": plan.items_per_leaf,
                    "selection": plan.selection,
                    "split_overrides": plan.split_overrides or None,
                    "wall_s": round(wall, 1),
                    "leaves": leaf_records,
                }
                log.info("evaluated %s in %.1f s", name, wall)
    finally:
        if num_threads:
            torch.set_num_threads(threads_before)
        if was_training:
            model.train()

    samples_path = work_dir / "eval-samples" / f"{model_fingerprint.replace('/', '_').replace(':', '_')[:40]}-{cfg.profile}.jsonl"
    _write_samples(samples_path, all_samples)

    settings = {
        "schema": RESULT_SCHEMA,
        "profile": cfg.profile,
        "model_fingerprint": model_fingerprint,
        "model_class": type(model).__name__,
        "model_dtype": str(getattr(model, "dtype", "")),
        "device": str(getattr(model, "device", "")),
        "versions": {
            "lm_eval": _version("lm_eval"),
            "transformers": _version("transformers"),
            "torch": _version("torch"),
            "datasets": _version("datasets"),
            "nltk": _version("nltk"),
        },
        "apply_chat_template": cfg.apply_chat_template,
        "fewshot_as_multiturn": cfg.fewshot_as_multiturn,
        "system_instruction": None,
        "chat_template_sha256": _sha256_text(chat_template),
        "chat_template_rendered_probe": rendered_probe,
        "batch_size": cfg.batch_size,
        "torch_num_threads": num_threads or threads_before,
        "max_length": lm.max_length,
        # lm-eval can cut a generation at an end-of-thinking token before scoring; the published TRLM
        # evaluation did not, and neither does this one: <think> text stays in the scored answer.
        "think_end_token": getattr(lm, "think_end_token", None),
        "seeds": seeds,
        "bootstrap_iters": bootstrap_iters,
        "max_gen_toks": max_gen_toks,
        "gen_kwargs_override": gen_kwargs,
        "limit": cfg.limit,
        "sample": sample,
        "tasks_requested": list(cfg.tasks),
        "tasks": task_settings,
        "data": {"data_root": str(data_root), "mirror": str(mirror), "hub_offline": True},
        "punkt_tab": punkt_info,
        "samples_file": str(samples_path),
        "wall_s": round(time.time() - t_start, 1),
    }
    return {"settings": settings, "results": results, "subtask_results": subtask_results, "baselines": baselines, "notes": notes}


def _fingerprint_of(path: Path) -> str:
    from trlm.artifacts import hash_directory, hash_json, read_fingerprint

    fp = read_fingerprint(path)
    if fp:
        return fp
    return hash_json(hash_directory(path))


def evaluate_checkpoint(model: str, cfg: EvalConfig, *, data_root: Path, work_dir: Path, progress: bool = True) -> dict:
    """Load a checkpoint (local directory or hub id) with transformers and `evaluate` it.

    The fingerprint is the directory's `fingerprint.json` (a trlm artifact), else the SHA-256 over its
    files' hashes; for a hub id it is `hub:<id>@<commit loaded, or 'unknown'>`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model).expanduser()
    source = str(path.resolve()) if path.is_dir() else model
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    lm = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False)
    if path.is_dir():
        fingerprint = _fingerprint_of(path)
    else:
        # transformers records the hub commit it loaded (from the cache when offline)
        fingerprint = f"hub:{model}@{getattr(lm.config, '_commit_hash', None) or 'unknown'}"
    doc = evaluate(lm, tok, cfg, data_root=data_root, work_dir=work_dir, model_fingerprint=fingerprint, progress=progress)
    doc["settings"]["model_source"] = source
    return doc
