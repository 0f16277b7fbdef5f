"""Executing one unit of tracked work (a stage, or a sub-step of one) in an MLflow run.

`run_stage` skips work whose key has a FINISHED run (after checking that run's artifact still
matches its fingerprint), or resumes an unfinished run of the same key in its own directory, or
starts a new run; it marks the run FINISHED only once the output's fingerprint is written and
recorded (and, with a remote artifact store, the upload checked complete against it), and FAILED (or
KILLED) with the reason otherwise: later, if the tracking server is unreachable at that moment.
While it executes, the work holds a lock on its key in the work dir, so a second process reaching
the same stage stops with a clear error.
A forced rerun is tagged with whether it reproduced the run it replaced (`trlm.reproduced`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trlm.artifacts import FINGERPRINT_FILE, hash_directory, hash_json, mask_secrets, part_fingerprint, read_fingerprint, stage_key
from trlm.runs.lineage import CodeVersion, code_version
from trlm.recipe import Recipe
from trlm.stage import MODEL, Stage
from trlm.runs.tracking import (
    OUTPUT,
    TAG_CODE,
    TAG_KEY,
    TAG_KIND,
    TAG_LIBRARIES,
    TAG_MODEL_ID,
    TAG_OUTPUT_FP,
    TAG_OWNER,
    TAG_RECIPE,
    TAG_REPRODUCED,
    TAG_RERUN_OF,
    TAG_RESUMED,
    TAG_STAGE,
    TAG_UNRESUMABLE,
    MetricLogger,
    Tracker,
    flatten,
    last_logged_step,
    owner_tag,
    run_outputs,
)

log = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    stage: str
    key: str
    run_id: str
    artifact_uri: str
    path: str
    outputs: dict[str, str]
    cached: bool
    summary: dict[str, Any] = field(default_factory=dict)
    reproduced: bool | None = None  # forced reruns only: same outputs as the run it replaces?


@dataclass(frozen=True)
class Work:
    """One unit of tracked work: a stage, or a sub-step of one (`eval:dpo`)."""

    name: str
    key: str
    inputs: dict[str, str]
    config: Any  # logged as the run's params
    code: CodeVersion
    hands_on: str = "all"  # model | parts | all: which output fingerprints downstream keys use
    sources: dict[str, str] = field(default_factory=dict)  # input name -> where it came from (`runs:/...`, a path)
    tables: Callable[[Path], dict[str, list[dict]]] | None = None  # the stage's `tables` hook: logged as MLflow tables


def run_stage(
    tracker: Tracker,
    recipe: Recipe,
    work: Work,
    execute: Callable[[Path, MetricLogger], dict],
    *,
    parent_run_id: str | None,
    force: bool = False,
    extra_tags: dict[str, str] | None = None,
) -> StageOutcome:
    """Skip if done; else resume an unfinished run of the same key or start one; mark FINISHED/FAILED.

    While it executes, the stage holds a lock on its key in the work dir (`stage_lock`): a second
    process that wants the same stage (a nightly run overlapping a manual one) stops with a clear
    error instead of resuming the same run into the same directory at the same time.
    """
    stage, key = work.name, work.key
    done = tracker.find_done(stage, key)
    if done is not None and not force and (problem := artifact_problem(tracker, done)) is not None:
        # A cached artifact that no longer matches its fingerprint (edited, truncated, deleted) is
        # never handed on: its run is marked FAILED with the reason, and the stage runs again.
        log.warning("%s: the cached artifact of run %s is damaged (%s); running the stage again", stage, done.info.run_id, problem)
        tracker.client.set_tag(done.info.run_id, "trlm.error", f"artifact damaged after it finished: {problem}")
        tracker.client.set_tag(done.info.run_id, TAG_UNRESUMABLE, "true")
        tracker.client.set_terminated(done.info.run_id, "FAILED")
        done = None
    if done is None or force:
        with stage_lock(tracker.work_dir, stage, key):
            done = tracker.find_done(stage, key)  # finished by another process since the first look?
            if done is None or force:
                return _start_or_resume(tracker, recipe, work, execute, done, parent_run_id, extra_tags)
    log.info("%s: cached (key %s, run %s)", stage, key[:12], done.info.run_id)
    local = tracker.local_artifact_dir(done)
    return StageOutcome(stage, key, done.info.run_id, tracker.artifact_uri(done), str(local / OUTPUT) if local else "", run_outputs(done), True)


def artifact_problem(tracker: Tracker, run) -> str | None:
    """Why a FINISHED run's local artifact cannot be reused (None when its bytes match its fingerprint).

    Remote artifacts are checked when they are downloaded (`Tracker.resolve`)."""
    local = tracker.local_artifact_dir(run)
    if local is None:
        return None
    out = local / OUTPUT
    record_file = out / FINGERPRINT_FILE
    if not record_file.is_file():
        return f"{record_file} is missing"
    try:
        record = json.loads(record_file.read_text())
        files, exclude = record["files"], tuple(record.get("exclude", ("checkpoints",)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{record_file} is unreadable ({exc})"
    if hash_json(files) != record.get("fingerprint"):
        return f"{record_file} was edited"
    now = hash_directory(out, exclude)
    changed = sorted(k for k in set(files) | set(now) if files.get(k) != now.get(k))
    if changed:
        return f"{len(changed)} file(s) differ from the fingerprint: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}"
    return None


class StageBusy(RuntimeError):
    """Another process is executing the same stage (same key) in this work dir."""


@contextlib.contextmanager
def stage_lock(work_dir: Path, stage: str, key: str):
    """An exclusive lock on (stage, key) under `work_dir/locks/`, held while the stage executes.

    flock: the OS releases it when the holder exits, even on kill -9, so no stale lock survives a
    crash. It guards processes sharing one work dir (one machine, or a shared file system that
    supports flock); runs on other machines that only share the MLflow server are not covered.
    """
    import fcntl
    import socket
    import time

    path = Path(work_dir) / "locks" / f"{stage.replace(':', '-')}-{key[:16]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StageBusy(
                f"{stage} (key {key[:12]}) is being executed by {holder}; this run stops here. "
                "When that run has finished, run again: the stage will be cached."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start_or_resume(tracker, recipe, work: Work, execute, done, parent_run_id, extra_tags) -> StageOutcome:
    """Execute a stage in a new MLflow run, or in an unfinished one of the same key (resume)."""
    from mlflow.entities import Param, RunTag

    stage, key, inputs = work.name, work.key, work.inputs
    # Failures kept while the server was unreachable first: their runs become FAILED, so resumable.
    tracker.flush_pending()
    # --force skips the FINISHED run, but still resumes an unfinished (killed) run of the same key.
    run = tracker.find_resumable(stage, key)
    client = tracker.client
    logged_through = None
    if run is not None:
        log.info("%s: resuming unfinished run %s", stage, run.info.run_id)
        client.update_run(run.info.run_id, status="RUNNING")
        logged_through = last_logged_step(client, run)
    else:
        tags = {TAG_KEY: key, TAG_STAGE: stage, TAG_RECIPE: recipe.name, TAG_KIND: "stage", "mlflow.runName": f"{stage}-{key[:8]}",
                TAG_CODE: json.dumps(work.code.modules, sort_keys=True), TAG_LIBRARIES: json.dumps(work.code.libraries, sort_keys=True)}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        tags.update({f"trlm.input.{k}": v for k, v in inputs.items()})
        run = client.create_run(tracker.experiment_id, run_name=f"{stage}-{key[:8]}", tags=tags)
        params = flatten("", work.config, {})
        client.log_batch(run.info.run_id, params=[Param(k[:250], v[:6000]) for k, v in params.items()], synchronous=True)
        log_inputs(client, run.info.run_id, work)
    run_id = run.info.run_id
    client.set_tag(run_id, TAG_OWNER, owner_tag())
    for k, v in (extra_tags or {}).items():
        client.set_tag(run_id, k, v)
    out = tracker.output_dir_for_writing(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    logger = MetricLogger(client, run_id, logged_through)
    monitor = system_metrics(run_id, resume=run is not None and logged_through is not None)
    try:
        with monitor:
            summary = execute(out, logger)
        fingerprint = read_fingerprint(out)
        if fingerprint is None:
            raise RuntimeError(f"{stage} finished without writing {out}/fingerprint.json")
        # Training stages hand on the fingerprint of `model/` alone (not of metrics.json's timings).
        outputs = {"all": fingerprint}
        if work.hands_on == MODEL:
            model_fp = part_fingerprint(out, MODEL)
            if model_fp is None:
                raise RuntimeError(f"{stage} finished without a model/ directory in {out}")
            outputs = {MODEL: model_fp}
        outputs |= summary.pop("_outputs", {})
        tags = [RunTag(f"{TAG_OUTPUT_FP}.{k}", v) for k, v in outputs.items()]
        if summary.get("resumed_from_step") is not None:  # where the training actually restarted
            tags.append(RunTag(TAG_RESUMED, str(summary["resumed_from_step"])))
        reproduced = reproduces(done, outputs) if done is not None else None
        if reproduced is not None:
            tags += [RunTag(TAG_RERUN_OF, done.info.run_id), RunTag(TAG_REPRODUCED, str(reproduced).lower())]
            log.info("%s: forced rerun %s run %s (%s)", stage, "REPRODUCES" if reproduced else "does NOT reproduce", done.info.run_id,
                     "same output fingerprints" if reproduced else "output fingerprints differ")
        client.log_batch(run_id, tags=tags, synchronous=True)
        if tracker.local_artifact_dir(run) is None:
            tracker.upload_output(run_id, out)  # checked against fingerprint.json: never FINISHED when incomplete
        if work.hands_on == MODEL:
            log_model(tracker, run_id, stage, outputs[MODEL])
        for name, rows in (work.tables(out) if work.tables is not None else {}).items():
            if rows:
                tracker.log_table(run_id, name, rows)
        client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        error = mask_secrets("".join(traceback.format_exception_only(type(exc), exc)))[-5000:]
        tracker.mark_failed(run_id, error, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    log.info("%s: done (run %s)", stage, run_id)
    return StageOutcome(stage, key, run_id, tracker.artifact_uri(run), str(out), outputs, False, summary, reproduced)


def log_inputs(client, run_id: str, work: Work) -> None:
    """Each input as an MLflow dataset input (the runs list's Dataset column): its name, where it
    came from, and its content fingerprint as the digest (MLflow keeps 36 characters; the source has it whole)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    datasets = [DatasetInput(Dataset(name=name, digest=fingerprint[:36], source_type="trlm",
                                     source=json.dumps({"uri": work.sources.get(name, ""), "fingerprint": fingerprint})),
                             tags=[InputTag("mlflow.data.context", MODEL if name == MODEL else "training")])
                for name, fingerprint in sorted(work.inputs.items())]
    if datasets:
        client.log_inputs(run_id, datasets=datasets)


def log_model(tracker: Tracker, run_id: str, stage: str, fingerprint: str) -> str:
    """The stage's `model/` as an MLflow LoggedModel of its run (the runs list's Models column), its
    weights left where they are (`runs:/<id>/output/model`). Returns the model id."""
    from mlflow.entities import LoggedModelOutput

    client = tracker.client
    model = client.create_logged_model(tracker.experiment_id, name=stage, source_run_id=run_id, model_type="causal-lm",
                                       tags={"trlm.fingerprint": fingerprint, "trlm.weights": f"runs:/{run_id}/{OUTPUT}/{MODEL}"})
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    client.set_tag(run_id, TAG_MODEL_ID, model.model_id)
    return model.model_id


def system_metrics(run_id: str, resume: bool):
    """CPU, memory, disk and GPU use of this process's machine, logged into the run every 10 s."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, samples_before_logging=1, resume_logging=resume)

    @contextlib.contextmanager
    def running():
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            # MLflow's monitor drops the sample it holds when stopped: a stage shorter than one
            # interval would show none. Its state at the end, once.
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()

    return running()


def substep_runner(tracker: Tracker, recipe: Recipe, stage: Stage, parent_run_id: str, force: bool) -> Callable[..., Path]:
    """The `cached_step` a stage gets: a memoised sub-step (`eval:dpo`) with its own MLflow run
    under the stage's run, keyed by its own code (the import closure of `code_module`), config and
    input fingerprints. Returns the sub-step's output directory."""

    def cached_step(sub: str, fingerprints: dict[str, str], fn: Callable[[Path, MetricLogger], None], *, config: Any, code_module: str) -> Path:
        name = f"{stage.name}:{sub}"
        code = code_version(stage, code_module)
        work = Work(name, stage_key(name, code.digest, config, fingerprints), fingerprints, config, code)

        def execute(out: Path, on_log: MetricLogger) -> dict:
            fn(out, on_log)
            return {}

        outcome = run_stage(tracker, recipe, work, execute, parent_run_id=parent_run_id, force=force, extra_tags={"trlm.substep": sub})
        return tracker.resolve(outcome.artifact_uri)

    return cached_step


def reproduces(previous, outputs: dict[str, str]) -> bool | None:
    """Does a forced rerun give the same outputs as the FINISHED run of the same key?

    Compared: what downstream stages consume (a stage's `model/`, or its named parts). None where
    the output is only a whole-directory hash, which may hold timings.
    """
    compared = {k: v for k, v in outputs.items() if k != "all"}
    if not compared:
        return None
    before = run_outputs(previous)
    return all(before.get(k) == v for k, v in compared.items())


