"""One lm-eval call's output split back into each requested task or group: its result tables, baselines,
per-item samples and recorded settings (eval/harness.py makes the call, for all of a model's tasks at once).

`run` is the harness's per-evaluation record: `cfg`, and the dicts `results`, `subtask_results`,
`baselines` and `samples` that this module fills.
"""

from __future__ import annotations

from typing import Any

from trlm.eval.results import baselines, full_split_majority, ifeval_inst_stderr, ifeval_instruction_counts, metric_table, pool_baselines, task_record
from trlm.eval.tasks import first_items, indices_digest, leaf_tasks


def _members(groups: dict[str, list[str]], name: str) -> set[str]:
    """The leaves and groups under `name` (itself included), from lm-eval's `group_subtasks`."""
    found = {name}
    for sub in groups.get(name, []):
        found |= _members(groups, sub)
    return found


def task_outcome(run, out: dict, name: str, obj, plan, samples, *, wall: float, together: list[str]) -> dict[str, Any]:
    """One task's (or group's) part of an lm-eval call's output, added to `run`; returns its settings."""
    groups = out.get("group_subtasks", {})
    mine = _members(groups, name)
    leaves = [t for t in out["results"] if t not in groups and t in mine]
    leaf_records = {}
    leaf_baselines = []
    leaf_objs = {t.task_name: t for t in leaf_tasks(obj)}
    for leaf in leaves:
        table, b, leaf_records[leaf] = _leaf(run, out, leaf, leaf_objs.get(leaf), samples, plan)
        leaf_baselines.append(b)
        if leaf == name:
            run.results[name] = table
            run.baselines[name] = b
        else:
            run.subtask_results[leaf] = table
    for g in groups:
        if g != name and g in mine and g in out["results"]:
            run.subtask_results[g] = metric_table(out["results"][g], int(out["results"][g].get("sample_len") or 0))
    if name in out["results"] and name in groups:
        n = int(out["results"][name].get("sample_len") or 0)
        run.results[name] = metric_table(out["results"][name], n)
        run.baselines[name] = pool_baselines(leaf_baselines)
    return {
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
        "wall_s": round(wall, 1),  # of the lm-eval call, shared by the tasks evaluated together
        "evaluated_together": together if len(together) > 1 else None,
        "leaves": leaf_records,
    }


def _leaf(run, out: dict, leaf: str, leaf_obj, samples: dict, plan) -> tuple[dict, dict, dict]:
    """One leaf task of lm-eval's output: its metric table, its baselines and its recorded settings."""
    n_samples = out.get("n-samples", {})
    n = int(out["results"][leaf].get("sample_len") or n_samples.get(leaf, {}).get("effective") or 0)
    table = metric_table(out["results"][leaf], n)
    leaf_samples = out.get("samples", {}).get(leaf, [])
    run.samples[leaf] = leaf_samples
    task_cfg = out["configs"].get(leaf, {})
    if task_cfg.get("task") == "ifeval" or leaf == "ifeval":
        for metric, se in ifeval_inst_stderr(leaf_samples).items():
            if metric in table and table[metric]["stderr"] is None:
                table[metric]["stderr"] = se
    output_type = task_cfg.get("output_type", "")
    label = None
    # Majority class where answers come from a small fixed set: multiple choice, and BBH's
    # generated answers. Not for GSM8K (a number per problem) or IFEval (no gold answer).
    if output_type == "multiple_choice" or leaf.startswith("bbh"):
        found = full_split_majority(leaf_obj) if leaf_obj is not None else None
        label = found[0] if found else None
    b = baselines(leaf_samples, output_type, label)
    rec = task_record(leaf, task_cfg, out["versions"].get(leaf), out["n-shot"].get(leaf), n_samples.get(leaf))
    first = first_items(len(leaf_obj.eval_docs), run.cfg.limit) if leaf_obj is not None else None
    if leaf in samples:
        rec["subset"] = {"kind": "seeded", "seed": run.cfg.seed, "n": len(samples[leaf]), "indices_sha256": indices_digest(samples[leaf]), "indices": samples[leaf]}
    elif first is not None:
        rec["subset"] = {"kind": "first", "n": len(first), "indices_sha256": indices_digest(first), "indices": first}
    else:
        rec["subset"] = {"kind": "all"}
    if leaf in plan.split_overrides:
        rec["split_overrides"] = plan.split_overrides[leaf]
    if leaf == "ifeval":
        rec["instruction_counts"] = ifeval_instruction_counts(leaf_samples)
    return table, b, rec
