"""Which lm-eval tasks run, on which items, with which (recorded) deviations from their standard YAML.

The task definitions are lm-eval's own (`lm_eval/tasks/...`), loaded by name through `TaskManager`;
nothing is forked. Three things can differ from a plain `lm_eval --tasks X` run, and each is recorded in
the results by the harness:

1. **Missing declared splits** (offline data only). lm-eval builds a task's few-shot sampler when the
   task is created, so it loads the declared `training_split` even for a 0-shot task. PIQA and BoolQ
   declare `train`, which the offline data does not have. For a task that evaluates 0-shot, a declared
   training/validation split that is *not the evaluated split* and is missing from the data is set to
   `None` (`split_overrides`). lm-eval then draws no examples from it; the evaluated split and every
   prompt are unchanged. A missing evaluated split, or a missing split that few-shot examples would come
   from, is an error: nothing is ever fabricated.
2. **Subsets.** `smoke` evaluates a fixed, seeded subset: for groups (mmlu, bbh) a seeded subset of
   subtasks, and for each (sub)task a seeded subset of items (lm-eval's `samples=`). `sample` (N) sets
   the size of that seeded subset, in either profile. `limit` (N) means what lm-eval's `--limit N`
   means: the *first* N items of each (sub)task (passed to lm-eval as `limit=`); it replaces the
   seeded items of `smoke`. The chosen subtasks and item indices are recorded.
3. **Generation length.** `max_gen_toks` (the config's, or the smoke default) caps generation for
   generate_until tasks; the effective `generation_kwargs` of every task are recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trlm.eval.mirror import BENCHMARKS, mirrored_splits

log = logging.getLogger(__name__)

# Smoke profile: a fixed, seeded subset, sized so that one 135M model's smoke evaluation of all 8
# tasks stays near 2 minutes on a 2-core CPU (cost model from measured speeds: forward ~440 tokens/s,
# greedy decoding ~8 steps/s at batch 4-8; GSM8K and BBH prompts are ~1,000-1,200 tokens each because
# of their few-shot examples). Items are per leaf task; MMLU and BBH also sample their subtasks.
SMOKE_ITEMS: dict[str, int] = {
    "arc_challenge": 16,
    "arc_easy": 16,
    "boolq": 10,
    "piqa": 16,
    "mmlu": 4,  # per subtask
    "gsm8k": 2,
    "bbh": 2,  # per subtask
    "ifeval": 6,
}
SMOKE_DEFAULT_ITEMS = 10
SMOKE_SUBTASKS: dict[str, int] = {"mmlu": 4, "bbh": 2}
SMOKE_MAX_GEN_TOKS = 64

# The task groups used here whose subtasks are sampled in the smoke profile.
GROUP_TASKS = ("mmlu", "bbh")


class TaskPlanError(ValueError):
    """A task cannot be run faithfully on the offline data (the message says why)."""


@dataclass
class TaskPlan:
    """What one requested task (or group) runs, and how it deviates from the plain YAML."""

    name: str
    split_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # leaf -> {key: [declared, used]}
    subtasks_total: int | None = None  # groups only
    subtasks: list[str] | None = None  # groups only: leaf tasks evaluated (None = all)
    items_per_leaf: int | None = None  # None = every item
    selection: str = "all"  # all | seeded (a seeded subset, lm-eval's samples=) | first (lm-eval's limit=)
    notes: list[str] = field(default_factory=list)


def _seed_rng(seed: int, *parts: str) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`, so this is stable across processes and platforms.
    return random.Random(":".join([str(seed), *parts]))


def choose_subtasks(group: str, leaves: list[str], k: int | None, seed: int) -> list[str]:
    if k is None or k >= len(leaves):
        return sorted(leaves)
    return sorted(_seed_rng(seed, "subtasks", group).sample(sorted(leaves), k))


def choose_items(task: str, n_total: int, k: int | None, seed: int) -> list[int] | None:
    """Sorted seeded item indices, or None for every item (lm-eval's `samples` needs them sorted)."""
    if k is None or k >= n_total:
        return None
    return sorted(_seed_rng(seed, "items", task).sample(range(n_total), k))


def indices_digest(indices: list[int] | None) -> str | None:
    if indices is None:
        return None
    return hashlib.sha256(json.dumps(indices).encode()).hexdigest()[:16]


# --- split checks ------------------------------------------------------------------------------


def _yaml_config(task_manager, name: str) -> dict[str, Any] | None:
    """The task's YAML config (includes resolved, functions unresolved), or None if not a YAML task."""
    entry = task_manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        return None
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # pragma: no cover - older/newer lm-eval layout
        return None
    return load_yaml(entry.yaml_path, resolve_func=False)


def split_overrides_for(task_manager, name: str, data_root: Path) -> dict[str, list[Any]]:
    """`{config_key: [declared, None]}` for declared-but-missing splits that a 0-shot task never reads.

    Only for tasks whose dataset the offline mirror provides; raises `TaskPlanError` when the evaluated
    split, or a split few-shot examples would be drawn from, is missing.
    """
    cfg = _yaml_config(task_manager, name)
    if not cfg:
        return {}
    hub_id, config = cfg.get("dataset_path"), cfg.get("dataset_name")
    if hub_id not in BENCHMARKS:
        return {}
    have = set(mirrored_splits(data_root, hub_id, config))
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    if eval_split not in have:
        raise TaskPlanError(f"{name}: evaluated split {eval_split!r} of {hub_id}/{config or 'default'} is not in the offline data")
    num_fewshot = cfg.get("num_fewshot") or 0
    fewshot_cfg = cfg.get("fewshot_config") or {}
    fewshot_split = cfg.get("fewshot_split") or fewshot_cfg.get("split")
    if fewshot_split and fewshot_split not in have:
        raise TaskPlanError(f"{name}: few-shot split {fewshot_split!r} of {hub_id} is not in the offline data")
    overrides: dict[str, list[Any]] = {}
    for key in ("training_split", "validation_split"):
        declared = cfg.get(key)
        if declared and declared not in have and declared != eval_split:
            if num_fewshot > 0 and not fewshot_split and not fewshot_cfg.get("samples"):
                raise TaskPlanError(
                    f"{name}: {num_fewshot}-shot task would draw examples from {key}={declared!r}, "
                    f"which is not in the offline data"
                )
            overrides[key] = [declared, None]
    return overrides


# --- loading ------------------------------------------------------------------------------------


def leaf_tasks(obj) -> list:
    from lm_eval.api.group import Group

    return obj.get_all_tasks() if isinstance(obj, Group) else [obj]


def _prune_group(group, keep: set[str]) -> None:
    """Remove leaf tasks not in `keep` (and subgroups left empty) from a loaded lm-eval Group, in place."""
    from lm_eval.api.group import Group

    for child in list(group):
        if isinstance(child, Group):
            _prune_group(child, keep)
            if len(child) == 0:
                group.pop(child.name)
        elif child.task_name not in keep:
            group.pop(child.task_name)


def first_items(n_total: int, limit: int | None) -> list[int] | None:
    """The indices lm-eval's `limit=` evaluates (the first `limit` items), or None for every item."""
    if limit is None or limit >= n_total:
        return None
    return list(range(limit))


def load_task(task_manager, name: str, *, data_root: Path, profile: str, limit: int | None, seed: int, sample: int | None = None):
    """Load one requested task/group by its standard name; return `(obj, plan, samples)`.

    `obj` is a lm-eval Task or (possibly pruned) Group; `samples` maps leaf task names to sorted item
    indices for lm-eval's `samples=` (leaves evaluated in full are absent). With `limit` (the first N
    items, lm-eval's own `limit=`, which the caller passes on) `samples` is empty and
    `plan.selection == "first"`; `sample` or the smoke profile give a seeded subset.
    """
    if limit is not None and sample is not None:
        raise TaskPlanError(f"{name}: give limit (the first N items, as lm-eval's --limit) or sample (a seeded subset of N), not both")
    plan = TaskPlan(name=name)
    overrides = split_overrides_for(task_manager, name, data_root)
    if overrides:
        # A one-member inline group is lm-eval's public way to build a registered task with overrides;
        # the task keeps its name and YAML, and the wrapper is discarded.
        wrapper = task_manager.load([{"group": f"__trlm_overrides_{name}", "task": [{"task": name, **{k: v[1] for k, v in overrides.items()}}]}])
        obj = wrapper["tasks"][name]
        plan.split_overrides[name] = overrides
        for key, (declared, used) in overrides.items():
            plan.notes.append(
                f"{name}: lm-eval's YAML declares {key}={declared!r}, which the offline data does not have; "
                f"it was set to {used!r} for this run. The task is {obj.get_config('num_fewshot') or 0}-shot, so no "
                f"example is ever drawn from that split; the evaluated split and the prompts are unchanged."
            )
    else:
        loaded = task_manager.load([name])
        if name in loaded["groups"]:
            obj = loaded["groups"][name]
        else:
            obj = loaded["tasks"][name]

    leaves = leaf_tasks(obj)
    if len(leaves) > 1 or name in GROUP_TASKS:
        plan.subtasks_total = len(leaves)
        k = SMOKE_SUBTASKS.get(name) if profile == "smoke" else None
        chosen = choose_subtasks(name, [t.task_name for t in leaves], k, seed)
        if len(chosen) < len(leaves):
            _prune_group(obj, set(chosen))
            plan.subtasks = chosen
            plan.notes.append(
                f"{name}: {profile} profile evaluates {len(chosen)} of {len(leaves)} subtasks, chosen with seed {seed}: "
                + ", ".join(chosen)
            )
        leaves = leaf_tasks(obj)

    unit = "subtask" if len(leaves) > 1 else "task"
    samples: dict[str, list[int]] = {}
    if limit is not None:
        plan.items_per_leaf = limit
        if any(first_items(len(t.eval_docs), limit) is not None for t in leaves):
            plan.selection = "first"
            plan.notes.append(f"{name}: evaluates the first {limit} items of each {unit} (lm-eval's limit); the item indices are recorded in settings")
        return obj, plan, samples
    if sample is not None:
        per_leaf = sample
    elif profile == "smoke":
        per_leaf = SMOKE_ITEMS.get(name, SMOKE_DEFAULT_ITEMS)
    else:
        per_leaf = None
    plan.items_per_leaf = per_leaf
    for task in leaves:
        idx = choose_items(task.task_name, len(task.eval_docs), per_leaf, seed)
        if idx is not None:
            samples[task.task_name] = idx
    if samples:
        plan.selection = "seeded"
        plan.notes.append(
            f"{name}: {profile} profile evaluates a seeded subset (seed {seed}) of at most {per_leaf} items per "
            f"{unit}; the item indices are recorded in settings"
        )
    return obj, plan, samples
