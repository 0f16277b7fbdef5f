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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trlm.eval.config import EvalConfig
from trlm.eval.mirror import build_mirror, offline_datasets
from trlm.eval.punkt import AFFECTED_IFEVAL_INSTRUCTIONS, ensure_punkt_tab
from trlm.eval.quiet import env_info_once, no_git_probe, quiet
from trlm.eval.outcome import task_outcome
from trlm.eval.shared import share_requests, shared_task
from trlm.eval.task_index import task_manager
from trlm.eval.tasks import SMOKE_MAX_GEN_TOKS, leaf_tasks

log = logging.getLogger(__name__)

RESULT_SCHEMA = 1
# The chat message used to record what the chat template renders around a prompt.
_TEMPLATE_PROBE = [{"role": "user", "content": "{prompt}"}]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_samples(path: Path, samples: dict[str, list[dict[str, Any]]]) -> None:
    from lm_eval.utils import handle_non_serializable

    from trlm.artifacts import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:  # a unique temporary: two evaluations of one model never clash
        for task, rows in sorted(samples.items()):
            for row in rows:
                f.write(json.dumps({"task": task, **row}, default=handle_non_serializable, ensure_ascii=False) + "\n")


@dataclass
class _Run:
    """What every task of one evaluation shares, and what the tasks add to the result document."""

    lm: Any
    tm: Any
    cfg: EvalConfig
    data_root: Path
    sample: int | None
    gen_kwargs: dict | None
    bootstrap_iters: int
    seeds: dict[str, int]
    notes: list[str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    subtask_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _load(run: _Run, name: str):
    cfg = run.cfg
    return shared_task(run.tm, name, data_root=run.data_root, profile=cfg.profile, limit=cfg.limit, sample=run.sample, seed=cfg.seed)


def disjoint_calls(tasks: list[str], leaves: dict[str, set[str]]) -> list[list[str]]:
    """The tasks in as few lm-eval calls as possible, no two tasks of a call sharing a leaf task (lm-eval
    refuses a duplicate task in one call: `mmlu` with `mmlu_philosophy`, `bbh` with one of its subtasks).
    None when nothing is requested."""
    calls: list[tuple[list[str], set[str]]] = []
    for name in dict.fromkeys(tasks):
        fit = next((c for c in calls if not c[1] & leaves[name]), None)
        if fit is None:
            calls.append(([name], set(leaves[name])))
        else:
            fit[0].append(name)
            fit[1].update(leaves[name])
    return [names for names, _ in calls]


def _evaluate_tasks(run: _Run, names: list[str]) -> dict[str, dict[str, Any]]:
    """Tasks or groups through one lm-eval call: adds their results, baselines and samples to `run`;
    returns each one's settings. One call for all of them: lm-eval hands the backend every task's
    log-likelihood requests at once, then every generation request, so the trlm backend packs and
    batches across tasks (each model's five log-likelihood tasks of the smoke profile: 21 s one call
    each, 17.5 s together) and decodes GSM8K's, BBH's and IFEval's rows in the same batches (a decode
    step on a CPU costs about the same whatever the batch). Each task's requests, items and metrics
    are those of a call of its own (tests/test_eval_harness.py compares them with lm-eval's)."""
    import lm_eval

    cfg = run.cfg
    t0 = time.time()
    loaded = {name: _load(run, name) for name in names}
    samples: dict = {}
    for obj, plan, chosen in loaded.values():
        share_requests(obj, run.lm)  # loaded, and its requests built, once per process (eval/shared.py)
        run.notes.extend(plan.notes)
        samples.update(chosen or {})
    out = lm_eval.simple_evaluate(
        model=run.lm,
        tasks=[obj for obj, _, _ in loaded.values()],
        samples=samples or None,
        limit=cfg.limit,
        apply_chat_template=cfg.apply_chat_template,
        fewshot_as_multiturn=cfg.fewshot_as_multiturn,
        gen_kwargs=dict(run.gen_kwargs) if run.gen_kwargs else None,
        bootstrap_iters=run.bootstrap_iters,
        log_samples=True,
        task_manager=run.tm,
        **run.seeds,
    )
    wall = time.time() - t0
    log.info("evaluated %s in %.1f s", " + ".join(names), wall)
    return {name: task_outcome(run, out, name, *loaded[name], wall=wall, together=names) for name in names}


def _generation_cap(cfg: EvalConfig, notes: list[str]) -> tuple[int | None, dict | None]:
    """max_gen_toks (the config's, or the smoke default) and the gen_kwargs override it makes."""
    max_gen_toks = cfg.max_gen_toks
    if max_gen_toks is None and cfg.profile == "smoke":
        max_gen_toks = SMOKE_MAX_GEN_TOKS
    gen_kwargs = {"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None
    if gen_kwargs:
        notes.append(
            f"max_gen_toks capped at {max_gen_toks} for every generate_until task (lm-eval defaults: gsm8k 256, "
            f"bbh 1024, ifeval 1280); longer answers are cut off, which lowers generative scores"
        )
    return max_gen_toks, gen_kwargs


def _tasks_to_run(cfg: EvalConfig, work_dir: Path, notes: list[str]) -> tuple[list[str], dict | None]:
    """The requested tasks, less IFEval when its NLTK data cannot be had (the note says which checks that loses)."""
    tasks = list(cfg.tasks)
    punkt_info = None
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
    return tasks, punkt_info


@contextlib.contextmanager
def _evaluation_mode(model, num_threads: int | None):
    """The model in eval mode, and torch on `num_threads` threads if set, for the block; both restored after.
    Yields the thread count before."""
    import torch

    was_training = getattr(model, "training", False)
    model.eval()
    threads_before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield threads_before
    finally:
        if num_threads:
            torch.set_num_threads(threads_before)
        if was_training:
            model.train()


def _chat_template(lm, tokenizer, cfg: EvalConfig) -> tuple[str | None, str | None]:
    """The chat template lm-eval applies, and what it renders around a prompt (None when not applied)."""
    chat_template = lm.chat_template(True) if cfg.apply_chat_template else None
    rendered_probe = None
    if cfg.apply_chat_template:
        with contextlib.suppress(Exception):
            rendered_probe = tokenizer.apply_chat_template(_TEMPLATE_PROBE, tokenize=False, add_generation_prompt=True)
    return chat_template, rendered_probe


def _model_api(model, tokenizer, cfg: EvalConfig):
    """lm-eval's model side for `cfg.backend`: HFLM (the reference) or TrlmLM (its subclass, shared contexts once)."""
    backend = getattr(cfg, "backend", "hf")
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=cfg.batch_size)
    from trlm.eval.backend import TrlmLM

    return TrlmLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=cfg.batch_size, gen_batch_size=cfg.gen_batch_size,
                  gen_workers=cfg.gen_workers)


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
    import torch

    t_start = time.time()
    data_root = Path(data_root).expanduser().resolve()
    work_dir = Path(work_dir).expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    mirror = build_mirror(data_root, work_dir)
    notes: list[str] = []
    max_gen_toks, gen_kwargs = _generation_cap(cfg, notes)
    tasks, punkt_info = _tasks_to_run(cfg, work_dir, notes)

    num_threads = getattr(cfg, "num_threads", None)
    with _evaluation_mode(model, num_threads) as threads_before:
        lm = _model_api(model, tokenizer, cfg)
        chat_template, rendered_probe = _chat_template(lm, tokenizer, cfg)
        # limit: the first N items of each task, exactly lm-eval's `limit`; sample: a seeded subset of N
        run = _Run(lm=lm, tm=None, cfg=cfg, data_root=data_root, sample=getattr(cfg, "sample", None), gen_kwargs=gen_kwargs,
                   bootstrap_iters=100 if cfg.profile == "smoke" else 100000, notes=notes,
                   seeds={"random_seed": cfg.seed, "numpy_random_seed": cfg.seed, "torch_random_seed": cfg.seed, "fewshot_random_seed": cfg.seed})
        with offline_datasets(mirror), quiet(progress), no_git_probe(), env_info_once(), torch.no_grad():
            run.tm = task_manager(tasks)
            task_settings: dict[str, dict] = {}
            for names in disjoint_calls(tasks, {name: {t.task_name for t in leaf_tasks(_load(run, name)[0])} for name in tasks}):
                task_settings.update(_evaluate_tasks(run, names))
    task_settings = {name: task_settings[name] for name in tasks}
    run.results = {name: run.results[name] for name in tasks if name in run.results}

    samples_path = work_dir / "eval-samples" / f"{model_fingerprint.replace('/', '_').replace(':', '_')[:40]}-{cfg.profile}.jsonl"
    _write_samples(samples_path, run.samples)

    settings = {
        "schema": RESULT_SCHEMA,
        "profile": cfg.profile,
        "model_fingerprint": model_fingerprint,
        "model_class": type(model).__name__,
        "model_dtype": str(getattr(model, "dtype", "")),
        "device": str(getattr(model, "device", "")),
        "versions": {dist: _version(dist) for dist in ("lm_eval", "transformers", "torch", "datasets", "nltk")},
        "apply_chat_template": cfg.apply_chat_template,
        "fewshot_as_multiturn": cfg.fewshot_as_multiturn,
        "system_instruction": None,
        "chat_template_sha256": _sha256_text(chat_template),
        "chat_template_rendered_probe": rendered_probe,
        "backend": getattr(cfg, "backend", "hf"),
        "batch_size": cfg.batch_size,
        "gen_batch_size": cfg.gen_batch_size if getattr(cfg, "backend", "hf") == "trlm" else None,
        "gen_workers": cfg.gen_workers if getattr(cfg, "backend", "hf") == "trlm" else None,
        "torch_num_threads": num_threads or threads_before,
        "max_length": lm.max_length,
        # lm-eval can cut a generation at an end-of-thinking token before scoring; the published TRLM
        # evaluation did not, and neither does this one: <think> text stays in the scored answer.
        "think_end_token": getattr(lm, "think_end_token", None),
        "seeds": run.seeds,
        "bootstrap_iters": run.bootstrap_iters,
        "max_gen_toks": max_gen_toks,
        "gen_kwargs_override": gen_kwargs,
        "limit": cfg.limit,
        "sample": run.sample,
        "tasks_requested": list(cfg.tasks),
        "tasks": task_settings,
        "data": {"data_root": str(data_root), "mirror": str(mirror), "hub_offline": True},
        "punkt_tab": punkt_info,
        "samples_file": str(samples_path),
        "wall_s": round(time.time() - t_start, 1),
    }
    return {"settings": settings, "results": run.results, "subtask_results": run.subtask_results, "baselines": run.baselines, "notes": notes}


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
