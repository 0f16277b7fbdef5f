"""The Prefect flow: data-prep -> sft-general -> sft-think -> dpo -> eval, orchestration only.

Each stage is a Prefect task that takes and returns small dicts (MLflow run ids, `runs:/` URIs,
fingerprints), never model objects. Whether a stage runs is decided by content, not by Prefect's
cache: `trlm.lineage` looks up a FINISHED MLflow run tagged with the stage's key (code version +
resolved config + input fingerprints), so a cache hit holds across flow runs, processes and
machines sharing the tracking store. A task retry (transient failure) resumes the stage's unfinished
MLflow run in the same artifact directory, where the trainer finds its last checkpoint.

The work itself lives in `trlm.stages.*` and `trlm.eval.*`; nothing there imports Prefect.

    from trlm.flows.pipeline import pipeline
    pipeline(recipe="offline-smoke", only="dpo")
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib import resources
import sys
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from trlm.lineage import (
    MODEL_INPUT,
    TAG_KIND,
    TAG_RECIPE,
    StageOutcome,
    Tracker,
    compute_key,
    base_fingerprint,
    register_model,
    run_stage,
    setup_tracking,
    short_hash,
    stage_inputs,
)
from trlm.recipe import STAGES, TRAINING_STAGES, Recipe, load_recipe

MLFLOW_UI = os.environ.get("TRLM_MLFLOW_UI", "http://127.0.0.1:5000")


def _open(ref: dict) -> tuple[Recipe, Tracker]:
    recipe = load_recipe(ref["recipe"], ref["overrides"])
    return recipe, setup_tracking(recipe)


def _run_link(tracker: Tracker, run_id: str) -> str:
    return f"{MLFLOW_UI}/#/experiments/{tracker.experiment_id}/runs/{run_id}"


def _publish(tracker: Tracker, outcome: StageOutcome, headline: dict[str, float], plot: Path | None) -> None:
    """Prefect UI: a markdown summary, a table, a link to the MLflow run (and its curves)."""
    key = outcome.stage.replace("_", "-")
    link = _run_link(tracker, outcome.run_id)
    state = "cached" if outcome.cached else "ran"
    if outcome.reproduced is not None:  # a forced rerun
        state += ", forced: " + ("reproduces the previous run bit for bit" if outcome.reproduced else "output DIFFERS from the previous run")
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in headline.items())
    curves = f"\n\nLoss/reward curves: [{plot.name}]({link}) (MLflow run artifacts, `plots/`)" if plot else ""
    create_markdown_artifact(
        key=f"{key}-summary",
        markdown=f"### {outcome.stage} ({state})\n\nMLflow run: [{outcome.run_id}]({link})  \nkey: `{outcome.key[:16]}`  \n"
        f"artifact: `{outcome.artifact_uri}`\n\n| metric | value |\n|---|---|\n{rows}{curves}",
        description=f"{outcome.stage} summary",
    )
    create_table_artifact(key=f"{key}-metrics", table=[{"metric": k, "value": float(v)} for k, v in headline.items()] or [{"metric": "-", "value": 0.0}])
    create_link_artifact(key=f"{key}-mlflow", link=link, link_text=f"MLflow run of {outcome.stage}")


def _plot_curves(history: list[dict], out_png: Path, title: str) -> Path | None:
    keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "mean_token_accuracy") if any(k in h for h in history)]
    if not history or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
        pts = [(h["step"], h[k]) for h in history if k in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _log_plot(tracker: Tracker, run_id: str, png: Path | None) -> None:
    if png is not None:
        tracker.client.log_artifact(run_id, str(png), "plots")


# --- tasks -------------------------------------------------------------------------------------


@task(name="base-model", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def base_model_task(ref: dict) -> dict:
    from trlm.base_model import materialize_base_model

    recipe, _ = _open(ref)
    path = materialize_base_model(recipe.base_model, recipe.work_path)
    check_file = path / "sanity_check.json"
    if check_file.is_file():
        check = json.loads(check_file.read_text())
        get_run_logger().info("base model %s: %r -> %r", path, check["prompt"], check["answer"])
    return {"path": str(path), "fingerprint": base_fingerprint(recipe)}


@task(name="data-prep", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def data_prep_task(ref: dict, base: dict, parent_run_id: str, force: bool = False) -> dict:
    from trlm.stages.data_prep import prepare_data

    recipe, tracker = _open(ref)
    inputs = stage_inputs(recipe, "data-prep", {}, base["fingerprint"])
    key = compute_key(recipe, "data-prep", inputs)

    def execute(out: Path, on_log) -> dict:
        summary = prepare_data(recipe, base_model_dir=Path(base["path"]), out_dir=out)
        for stage in TRAINING_STAGES:
            s = summary[stage]
            on_log({"rows_in": s["rows_in"], "rows_out": s["rows_out"], "total_tokens": s["total_tokens"], "truncated": s["truncated"]}, TRAINING_STAGES.index(stage))
            tracker.client.log_dict(on_log.run_id, s, f"stats/{stage}.json")
        return {"_outputs": {stage: summary[stage]["fingerprint"] for stage in TRAINING_STAGES}, "stats": {s: summary[s]["rows_out"] for s in TRAINING_STAGES}}

    outcome = run_stage(tracker, recipe, "data-prep", key, inputs, execute, parent_run_id=parent_run_id, force=force, extra_tags=_prefect_tags())
    headline = {}
    for stage in TRAINING_STAGES:
        stats = json.loads((Path(outcome.path) / stage / "stats.json").read_text()) if outcome.path else {}
        headline[f"{stage} rows"] = stats.get("rows_out", 0)
        headline[f"{stage} tokens"] = stats.get("total_tokens", 0)
    _publish(tracker, outcome, headline, None)
    return outcome.__dict__


def _prefect_tags() -> dict[str, str]:
    tags = {}
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
        tags["prefect.flow_run_name"] = str(flow_run.name)
    return tags


def run_stage_process(cmd: list[str], out: Path, on_log, log_line: Callable[[str], None]) -> dict:
    """Run a stage's CLI (`python -m trlm.stages.sft ...`, possibly under `accelerate launch`) and
    stream its output: every line goes to `log_line`, and the per-step metric lines it prints
    (`{"step": N, ...}` JSON) go to `on_log`, so MLflow charts the run live as in-process runs.
    Returns the summary the stage saved in `out/metrics.json`."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            text = line.rsplit("\r", 1)[-1].strip()  # a progress bar redraw may share the line
            if text:
                log_line(text)
            if text.startswith('{"step"'):
                try:
                    metrics = json.loads(text)
                except ValueError:
                    continue
                on_log({k: v for k, v in metrics.items() if k != "step"}, int(metrics["step"]))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}")
    return json.loads((out / "metrics.json").read_text())["summary"]


def _train(stage: str, recipe: Recipe, ref: dict, model_dir: Path, data_dir: Path, out: Path, on_log) -> dict:
    """In-process on CPU / one device; under `accelerate launch` when several GPUs are visible."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        module = "trlm.stages.dpo" if stage == "dpo" else "trlm.stages.sft"
        config = os.environ.get("TRLM_ACCELERATE_CONFIG", str(resources.files("trlm") / "accelerate_configs" / "multi_gpu.yaml"))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "-m", module,
               "--recipe", ref["recipe"], "--stage", stage, "--model-dir", str(model_dir), "--data-dir", str(data_dir), "--out-dir", str(out),
               *[a for o in ref["overrides"] for a in ("--set", o)]]
        return run_stage_process(cmd, out, on_log, get_run_logger().info)
    cfg = recipe.stage_config(stage)
    if stage == "dpo":
        from trlm.stages.dpo import train_dpo

        return train_dpo(cfg, model_dir=model_dir, data_dir=data_dir, out_dir=out, on_log=on_log)
    from trlm.stages.sft import train_sft

    return train_sft(cfg, model_dir=model_dir, data_dir=data_dir, out_dir=out, on_log=on_log)


@task(retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def train_task(stage: str, ref: dict, base: dict, upstream: dict[str, dict], parent_run_id: str, force: bool = False) -> dict:
    recipe, tracker = _open(ref)
    outputs = {k: v["outputs"] for k, v in upstream.items()}
    inputs = stage_inputs(recipe, stage, outputs, base["fingerprint"])
    key = compute_key(recipe, stage, inputs)
    source = MODEL_INPUT[stage]
    model_dir = Path(base["path"]) if source == "base" else tracker.resolve(upstream[source]["artifact_uri"]) / "model"
    data_dir = tracker.resolve(upstream["data-prep"]["artifact_uri"]) / stage

    def execute(out: Path, on_log) -> dict:
        return _train(stage, recipe, ref, model_dir, data_dir, out, on_log) or {}

    outcome = run_stage(tracker, recipe, stage, key, inputs, execute, parent_run_id=parent_run_id, force=force, extra_tags=_prefect_tags())
    history_file = Path(outcome.path) / "metrics.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    history = history.get("history", history) if isinstance(history, dict) else history
    png = None
    if not outcome.cached:
        png = _plot_curves(history, Path(recipe.work_path) / "plots" / outcome.run_id / f"{stage}-curves.png", f"{recipe.name}: {stage}")
        _log_plot(tracker, outcome.run_id, png)
    last = history[-1] if history else {}
    headline = {k: v for k, v in last.items() if isinstance(v, (int, float)) and k != "step"}
    _publish(tracker, outcome, headline, png)
    if stage == "dpo" and not outcome.cached:
        version = register_model(tracker, recipe.name, outcome.run_id, alias="candidate")
        get_run_logger().info("registered %s version %s as %s@candidate", recipe.name, version, recipe.name)
    return outcome.__dict__


@task(name="eval", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def eval_task(ref: dict, base: dict, upstream: dict[str, dict], parent_run_id: str, force: bool = False) -> dict:
    from trlm.eval.harness import evaluate_checkpoint
    from trlm.eval.report import headline_metrics, write_report
    from trlm.artifacts import write_fingerprint

    recipe, tracker = _open(ref)
    outputs = {k: v["outputs"] for k, v in upstream.items()}
    inputs = stage_inputs(recipe, "eval", outputs, base["fingerprint"])
    key = compute_key(recipe, "eval", inputs)
    model_dirs = {"base": Path(base["path"])}
    for model in recipe.eval.models:
        if model != "base":
            model_dirs[model] = tracker.resolve(upstream[model]["artifact_uri"]) / "model"

    def execute(out: Path, on_log) -> dict:
        # One MLflow run per evaluated model, keyed by (eval settings, model fingerprint), so
        # a changed DPO model re-evaluates only itself.
        columns = {}
        for model, path in model_dirs.items():
            model_key = compute_key(recipe, "eval", {"model": inputs[model]})

            def eval_one(model_out: Path, model_log, model=model, path=path) -> dict:
                doc = evaluate_checkpoint(str(path), recipe.eval, data_root=recipe.data_path, work_dir=recipe.work_path)
                model_out.mkdir(parents=True, exist_ok=True)
                (model_out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
                model_log(headline_metrics(doc), 0)
                write_fingerprint(model_out)
                return {}

            link = {"trlm.evaluated_model": model, "trlm.model_run_id": upstream.get(model, {}).get("run_id", "")}
            res = run_stage(tracker, recipe, f"eval:{model}", model_key, {"model": inputs[model]}, eval_one, parent_run_id=on_log.run_id, force=force, extra_tags=link)
            columns[model] = json.loads((Path(tracker.resolve(res.artifact_uri)) / "results.json").read_text())
        md, png = write_report(columns, out)
        (out / "results.json").write_text(json.dumps(columns, indent=2, default=str))
        for model, doc in columns.items():
            on_log({f"{model}/{k}": v for k, v in headline_metrics(doc).items()}, 0)
        write_fingerprint(out)
        return {"report": str(md)}

    outcome = run_stage(tracker, recipe, "eval", key, inputs, execute, parent_run_id=parent_run_id, force=force, extra_tags=_prefect_tags())
    report = Path(outcome.path) / "report.md"
    if report.is_file():
        create_markdown_artifact(key="reproduction-report", markdown=report.read_text(), description="TRLM reproduction report")
    results = json.loads((Path(outcome.path) / "results.json").read_text()) if (Path(outcome.path) / "results.json").is_file() else {}
    table = [{"model": m, **{k: round(v, 4) for k, v in headline_metrics(doc).items()}} for m, doc in results.items()]
    if table:
        create_table_artifact(key="eval-results", table=table, description="headline metrics per model")
    create_link_artifact(key="eval-mlflow", link=_run_link(tracker, outcome.run_id), link_text="MLflow run of eval")
    return outcome.__dict__


# --- the flow ----------------------------------------------------------------------------------


def selected_stages(only: str | None, from_stage: str | None) -> list[str]:
    if only and from_stage:
        raise ValueError("give --only or --from, not both")
    if only:
        return [only]
    if from_stage:
        return list(STAGES[STAGES.index(from_stage):])
    return list(STAGES)


def _flow_run_name() -> str:
    params = flow_run.parameters or {}
    return f"{params.get('recipe') or 'offline-smoke'}-{short_hash(params)}"


@flow(name="trlm-pipeline", flow_run_name=_flow_run_name, log_prints=True)
def pipeline(
    recipe: str = "offline-smoke",
    overrides: list[str] | None = None,
    only: str | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
) -> dict:
    """Run the TRLM pipeline (or a part of it) for a recipe; returns each stage's outcome."""
    logger = get_run_logger()
    ref = {"recipe": recipe, "overrides": list(overrides or [])}
    r, tracker = _open(ref)
    force = list(force or [])
    wanted = selected_stages(only, from_stage)
    parent = tracker.client.create_run(
        tracker.experiment_id,
        run_name=f"pipeline-{r.name}-{short_hash(ref)}",
        tags={TAG_KIND: "pipeline", TAG_RECIPE: r.name, **_prefect_tags(), "trlm.stages": ",".join(wanted)},
    )
    parent_id = parent.info.run_id
    try:
        from trlm.lineage import plan

        done = {p.stage: p for p in plan(r, tracker)}
        base = base_model_task(ref)
        upstream: dict[str, dict] = {}
        for stage in STAGES:
            if stage not in wanted:
                p = done[stage]
                if p.state == "done":
                    upstream[stage] = {"run_id": p.run_id, "artifact_uri": p.artifact_uri, "outputs": p.outputs, "path": p.artifact_path}
                continue
            missing = [s for s in STAGES[: STAGES.index(stage)] if s not in wanted and s not in upstream]
            if missing:
                raise RuntimeError(f"cannot run {stage}: upstream stage {missing[-1]} has no finished artifact for this recipe and config; run `trlm run --from {missing[0]}` first")
            if stage == "data-prep":
                upstream[stage] = data_prep_task(ref, base, parent_id, force=stage in force)
            elif stage == "eval":
                upstream[stage] = eval_task(ref, base, upstream, parent_id, force=stage in force)
            else:
                upstream[stage] = train_task.with_options(name=stage)(stage, ref, base, upstream, parent_id, force=stage in force)
            logger.info("%s: %s", stage, "cached" if upstream[stage].get("cached") else "done")
        tracker.client.set_terminated(parent_id, "FINISHED")
    except BaseException as exc:
        tracker.client.set_tag(parent_id, "trlm.error", str(exc)[-5000:])
        tracker.client.set_terminated(parent_id, "FAILED")
        raise
    return {s: {k: v for k, v in o.items() if k in ("run_id", "artifact_uri", "cached", "key", "path", "reproduced")} for s, o in upstream.items()}
