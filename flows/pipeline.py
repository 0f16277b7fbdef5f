"""The Prefect flow: the pipeline's stages in order, orchestration only.

Every stage runs through one generic task (`stage_task`) that reads the stage's declaration
(`trlm/stage.py`): it computes the stage's key from its code, config and input fingerprints, skips
it when a FINISHED MLflow run has that key, or resolves its inputs to local paths and calls its run
function inside a tracked MLflow run. Tasks take and return small dicts (run ids, `runs:/` URIs,
fingerprints), never model objects. Whether a stage runs is decided by content, not by Prefect's
cache, so a cache hit holds across flow runs, processes and machines sharing the tracking store.

Retries: a task is retried once only for a transient error (a network or file-system hiccup, where
the retry resumes the stage's unfinished MLflow run from its last checkpoint). An error that would
recur (an invalid recipe, bad data, a non-finite loss, a busy stage) fails at once.

The work itself lives in `trlm.stages.*` and `trlm.eval.*`; nothing there imports Prefect.

    from trlm.flows.pipeline import pipeline
    pipeline(recipe="offline-smoke", from_stage=STAGE)   # `trlm stages` lists them
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from trlm.artifacts import mask_secrets, remove_leftovers
from trlm.process_setup import mask_output
from trlm.flows.heartbeats import HEARTBEAT_FREQUENCY_S, close_runs_of_ended_flow_runs, ensure_zombie_automation
from trlm.flows.launch import launch_command, launch_env, launch_plan, run_stage_process
from trlm.flows.publish import publish
from trlm.runs.lineage import base_fingerprint, code_version, compute_key, short_hash, stage_config, stage_inputs
from trlm.runs.tracking import TAG_KIND, TAG_OWNER, TAG_RECIPE, Tracker, close_abandoned_runs, owner_tag, promote, register_model, setup_tracking
from trlm.runs.runner import Work, run_stage, substep_runner
from trlm.recipe import Recipe
from trlm.stage import BASE, Stage, StageContext, final_model, split_ref
from trlm.stages.registry import chosen, get_stage, load_recipe, stage_names

DEFAULT_PIPELINE = "trlm.stages.registry:PIPELINE"
TRANSIENT_NOT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def load_pipeline(path: str) -> tuple[Stage, ...]:
    """`module:attribute` -> the tuple of stages (the default pipeline, or a test's / a user's own)."""
    module, _, attribute = path.partition(":")
    return tuple(getattr(importlib.import_module(module), attribute or "PIPELINE"))


def _open(ref: dict) -> tuple[Recipe, Tracker, tuple[Stage, ...]]:
    pipeline_ = load_pipeline(ref.get("pipeline", DEFAULT_PIPELINE))
    recipe = load_recipe(ref["recipe"], ref["overrides"], check_files=False, pipeline=pipeline_)
    return recipe, setup_tracking(recipe), chosen(recipe.stages, pipeline_)  # the stages this recipe runs


def _retry_transient(task, task_run, state) -> bool:
    """Retry connection and I/O errors; fail at once on anything a retry would only repeat."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return isinstance(exc, OSError) and not isinstance(exc, TRANSIENT_NOT)


def _prefect_tags() -> dict[str, str]:
    tags = {}
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
        tags["prefect.flow_run_name"] = str(flow_run.name)
    return tags


@task(name="base-model", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_transient, cache_policy=NO_CACHE)
def base_model_task(ref: dict) -> dict:
    from trlm.base_model import materialize_base_model

    recipe, _, _ = _open(ref)
    path = materialize_base_model(recipe.base_model, recipe.work_path)
    check_file = path / "sanity_check.json"
    if check_file.is_file():
        check = json.loads(check_file.read_text())
        get_run_logger().info("base model %s: %r -> %r", path, check["prompt"], check["answer"])
    return {"path": str(path), "fingerprint": base_fingerprint(recipe)}


def _input_paths(recipe: Recipe, stage: Stage, tracker: Tracker, base: dict, upstream: dict[str, dict]) -> dict[str, Path]:
    """Each declared input as a local path: the base checkpoint, or a part of an upstream artifact."""
    paths = {}
    for name, ref in stage.inputs(recipe).items():
        source, part = split_ref(ref)
        if source == BASE:
            paths[name] = Path(base["path"])
            continue
        root = tracker.resolve(upstream[source]["artifact_uri"])
        paths[name] = root if part == "all" else root / part
    return paths


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_retry_transient, cache_policy=NO_CACHE)
def stage_task(name: str, ref: dict, base: dict, upstream: dict[str, dict], parent_run_id: str, force: bool = False) -> dict:
    recipe, tracker, pipeline_ = _open(ref)
    stage = get_stage(name, pipeline_)
    inputs = stage_inputs(recipe, stage, {k: v["outputs"] for k, v in upstream.items()}, base["fingerprint"])
    work = Work(stage.name, compute_key(recipe, stage, inputs), inputs, stage_config(recipe, stage), code_version(stage), stage.hands_on,
                _input_sources(recipe, stage, base, upstream), tables=stage.tables)
    paths = _input_paths(recipe, stage, tracker, base, upstream)
    declared = {k: v for k, v in inputs.items() if k in paths}

    def execute(out: Path, on_log) -> dict:
        ctx = StageContext(recipe, stage.config_of(recipe), out, paths, declared, on_log,
                           cached_step=substep_runner(tracker, recipe, stage, on_log.run_id, force))
        if (plan := launch_plan(stage, ctx.config)) is not None:  # several processes: under torchrun / accelerate
            cmd = launch_command(stage, ctx, out.parent / f"{stage.name}-config.json")
            get_run_logger().info("%s: %d processes under %s", stage.name, plan.num_processes, plan.launcher)
            return run_stage_process(cmd, out, on_log, get_run_logger().info, env=launch_env(plan.num_processes))
        return stage.run(ctx) or {}

    outcome = run_stage(tracker, recipe, work, execute, parent_run_id=parent_run_id, force=force, extra_tags=_prefect_tags())
    publish(tracker, stage, outcome, recipe.name, recipe.work_path)
    result = dict(outcome.__dict__)
    if (note := _model_registry(recipe, tracker, stage, pipeline_, outcome, upstream)) is not None:
        get_run_logger().info("%s", note)
        result["registry"] = note
    return result


def _input_sources(recipe: Recipe, stage: Stage, base: dict, upstream: dict[str, dict]) -> dict[str, str]:
    """Where each input comes from, for MLflow's dataset inputs: an upstream run's artifact, or the base model."""
    sources = {}
    for name, ref in stage.inputs(recipe).items():
        source, part = split_ref(ref)
        if source == BASE:
            sources[name] = f"base model {recipe.base_model.source}"
        elif source in upstream:
            sources[name] = f"runs:/{upstream[source]['run_id']}/output" + ("" if part == "all" else f"/{part}")
    return sources


def _model_registry(recipe: Recipe, tracker: Tracker, stage: Stage, pipeline_: tuple[Stage, ...], outcome, upstream: dict[str, dict]) -> str | None:
    """The final model is registered when it is trained, and gets its alias (`@candidate`) only from
    a stage that approves it (the eval stage, once its evaluation finished)."""
    final = final_model(pipeline_)
    if stage.name == final and not outcome.cached:
        version = register_model(tracker, recipe.name, outcome.run_id)
        return (f"registered {recipe.name} version {version} from {stage.name}; not evaluated yet, so no alias: "
                f"the evaluation stage moves @candidate to it when it has evaluated it")
    consumed = {split_ref(ref)[0] for ref in stage.inputs(recipe).values()}
    if stage.approves and final in consumed and final in upstream:
        version, moved = promote(tracker, recipe.name, upstream[final]["run_id"], stage.approves)
        return f"{recipe.name}@{stage.approves} is version {version} ({'moved there: evaluated by' if moved else 'unchanged, evaluated by'} {stage.name})"
    return None


def _watch_heartbeats(logger) -> None:
    """A deployment run: make sure its server crashes flow runs whose heartbeats stop (`flows/heartbeats.py`)."""
    from prefect.settings import get_current_settings

    frequency = get_current_settings().flows.heartbeat_frequency
    if frequency is None or frequency > HEARTBEAT_FREQUENCY_S:
        logger.warning("PREFECT_FLOWS_HEARTBEAT_FREQUENCY is %s, not %d as prefect.yaml's work pool sets: a run this worker "
                       "executes may be marked CRASHED between two heartbeats", frequency, HEARTBEAT_FREQUENCY_S)
    try:
        if ensure_zombie_automation():
            logger.info("created the Prefect automation that marks flow runs CRASHED when their heartbeats stop")
    except Exception as exc:  # noqa: BLE001 - housekeeping: the run goes on
        logger.warning("could not create the zombie flow-run automation: %s", mask_secrets(str(exc)))


def selected_stages(names: list[str], only: str | None, from_stage: str | None) -> list[str]:
    if only and from_stage:
        raise ValueError("give --only or --from, not both")
    if only:
        return [only]
    if from_stage:
        return names[names.index(from_stage):]
    return list(names)


def _flow_run_name() -> str:
    params = flow_run.parameters or {}
    recipe = str(params.get("recipe") or "offline-smoke")
    return f"{Path(recipe).stem if recipe.endswith(('.yaml', '.yml')) else recipe}-{short_hash(params)}"


@flow(name="trlm-pipeline", flow_run_name=_flow_run_name, log_prints=True)
def pipeline(
    recipe: str = "offline-smoke",
    overrides: list[str] | None = None,
    only: str | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    stages: str = DEFAULT_PIPELINE,
) -> dict:
    """Run the pipeline (or a part of it) for a recipe; returns each stage's outcome.

    `stages` names the list of stages as `module:attribute` (default: the TRLM pipeline)."""
    from trlm.runs.lineage import plan

    mask_output()  # a worker's flow run starts here, not in the CLI
    logger = get_run_logger()
    ref = {"recipe": recipe, "overrides": list(overrides or []), "pipeline": stages}
    r, tracker, pipeline_ = _open(ref)
    names = stage_names(pipeline_)
    force = list(force or [])
    wanted = selected_stages(names, only, from_stage)
    parent = tracker.client.create_run(
        tracker.experiment_id,
        run_name=f"pipeline-{r.name}-{short_hash(ref)}",
        tags={TAG_KIND: "pipeline", TAG_RECIPE: r.name, **_prefect_tags(), "trlm.stages": ",".join(wanted), TAG_OWNER: owner_tag()},
    )
    parent_id = parent.info.run_id
    for leftover in remove_leftovers(r.work_path):  # deployment runs start here, not in the CLI
        logger.info("removed %s, left behind by a killed process", leftover)
    for run_id in close_abandoned_runs(tracker):
        logger.warning("MLflow run %s was left RUNNING by a process that died: marked KILLED", run_id)
    for run_id, state in close_runs_of_ended_flow_runs(tracker):
        logger.warning("MLflow run %s was left RUNNING by a flow run that ended %s (a worker or machine died): marked KILLED", run_id, state)
    if deployment.id:
        _watch_heartbeats(logger)
    try:
        done = {p.stage: p for p in plan(r, tracker, pipeline_)}
        base = base_model_task(ref)
        upstream: dict[str, dict] = {}
        for name in names:
            if name not in wanted:
                p = done[name]
                if p.state == "done":
                    upstream[name] = {"run_id": p.run_id, "artifact_uri": p.artifact_uri, "outputs": p.outputs, "path": p.artifact_path}
                continue
            needs = {split_ref(ref_)[0] for ref_ in get_stage(name, pipeline_).inputs(r).values()} - {BASE}
            missing = [s for s in names if s in needs and s not in upstream]
            if missing:
                raise RuntimeError(f"cannot run {name}: upstream stage {missing[-1]} has no finished artifact for this recipe and config; "
                                   f"run `trlm run --from {missing[0]}` first")
            upstream[name] = stage_task.with_options(name=name)(name, ref, base, upstream, parent_id, force=name in force)
            logger.info("%s: %s", name, "cached" if upstream[name].get("cached") else "done")
        tracker.client.set_terminated(parent_id, "FINISHED")
    except BaseException as exc:
        tracker.client.set_tag(parent_id, "trlm.error", mask_secrets(str(exc))[-5000:])
        tracker.client.set_terminated(parent_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return {s: {k: v for k, v in o.items() if k in ("run_id", "artifact_uri", "cached", "key", "path", "reproduced", "registry")} for s, o in upstream.items()}
