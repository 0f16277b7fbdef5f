"""Stage keys, skip-if-done and MLflow lineage: what to run, what is cached, where artifacts live.

A stage's key hashes its code version (the bytes of its source files), its resolved config and the
fingerprints of its inputs (never paths, timestamps or run ids). A stage is *done* when the MLflow
experiment holds a FINISHED run tagged with that key: this holds across flow runs, processes and
machines that share the tracking store.

Each executed stage is one MLflow child run under the pipeline's parent run. Its output directory
IS the run's artifact directory `output/`: with a local artifact store the stage writes straight into
it (no copy); with a remote store it writes to a staging directory and uploads. Downstream stages get
`runs:/<id>/output` and resolve it through MLflow (a local path for local stores, a download
otherwise).

A training stage's output fingerprint is that of its `model/` directory alone, so a forced rerun
that reproduces the weights leaves downstream keys unchanged; the rerun is tagged with whether it
reproduced the run it replaced (`trlm.reproduced`).

No Prefect here: the CLI's `status` and the flow both use this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

from trlm.artifacts import hash_json, part_fingerprint, read_fingerprint, stage_key
from trlm.recipe import STAGES, Recipe, output_config

log = logging.getLogger(__name__)

# The modules whose source defines each stage's behaviour: editing one invalidates the stage's cache.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "data-prep": ("trlm.stages.data_prep", "trlm.data_spec", "trlm.eval.decontamination"),
    "sft-general": ("trlm.stages.sft", "trlm.stages.training", "trlm.stages.losses"),
    "sft-think": ("trlm.stages.sft", "trlm.stages.training", "trlm.stages.losses"),
    "dpo": ("trlm.stages.dpo", "trlm.stages.training", "trlm.stages.losses"),
    "eval": ("trlm.eval.harness", "trlm.eval.mirror"),
}
UPSTREAM = {"data-prep": None, "sft-general": "data-prep", "sft-think": "sft-general", "dpo": "sft-think", "eval": "dpo"}
MODEL_INPUT = {"sft-general": "base", "sft-think": "sft-general", "dpo": "sft-think"}

TAG_KEY = "trlm.stage_key"
TAG_STAGE = "trlm.stage"
TAG_RECIPE = "trlm.recipe"
TAG_OUTPUT_FP = "trlm.output_fingerprint"
TAG_KIND = "trlm.kind"
TAG_RERUN_OF = "trlm.rerun_of"  # a forced rerun: the FINISHED run of the same key it reran
TAG_REPRODUCED = "trlm.reproduced"  # "true" when its outputs' fingerprints equal that run's
OUTPUT = "output"


def code_version(stage: str) -> str:
    """SHA-256 over the source files of the stage's modules (found without importing them)."""
    h = hashlib.sha256()
    for name in STAGE_MODULES[stage]:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            h.update(f"missing:{name}".encode())
            continue
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()


def stage_config(recipe: Recipe, stage: str) -> dict:
    """The part of the recipe a stage's output depends on (its data mixture is covered by the data fingerprint)."""
    if stage == "data-prep":
        from trlm.stages.data_prep import data_prep_config

        return data_prep_config(recipe)
    if stage.startswith("eval:"):  # one evaluated model
        return recipe.eval.model_dump(mode="json")
    cfg = output_config(recipe.stage_config(stage))
    if stage != "eval":
        cfg.pop("data")
    return cfg


# --- the tracking store ------------------------------------------------------------------------


def setup_tracking(recipe: Recipe) -> "Tracker":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return Tracker(recipe.resolved_tracking_uri, recipe.experiment, recipe.work_path)


class Tracker:
    """MlflowClient with the few queries the pipeline needs. Uses explicit run ids, never the
    thread-local active run, because Prefect runs tasks in worker threads."""

    def __init__(self, tracking_uri: str, experiment: str, work_dir: Path):
        import mlflow
        from mlflow.tracking import MlflowClient

        work_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self.work_dir = work_dir
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            # Artifacts next to the DB in the work dir, not in a CWD-relative ./mlruns.
            location = (work_dir / "mlartifacts").as_uri() if tracking_uri.startswith("sqlite") else None
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id

    # queries
    def _search(self, filter_string: str, max_results: int = 20):
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"], max_results=max_results)

    def find_done(self, stage: str, key: str):
        runs = self._search(f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_STAGE}` = '{stage}' and attributes.status = 'FINISHED'", 1)
        return runs[0] if runs else None

    def find_resumable(self, stage: str, key: str):
        """An unfinished run of the same key (killed or failed): rerunning continues in its artifact dir."""
        for run in self._search(f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_STAGE}` = '{stage}'"):
            if run.info.status in ("RUNNING", "FAILED", "KILLED") and self.local_artifact_dir(run) is not None:
                return run
        return None

    def latest_done(self, stage: str, recipe_name: str):
        runs = self._search(f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_RECIPE}` = '{recipe_name}' and attributes.status = 'FINISHED'", 1)
        return runs[0] if runs else None

    # artifacts
    @staticmethod
    def local_artifact_dir(run) -> Path | None:
        uri = run.info.artifact_uri
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            return Path(unquote(parsed.path))
        return None

    def output_dir_for_writing(self, run) -> Path:
        local = self.local_artifact_dir(run)
        if local is not None:
            return local / OUTPUT
        return self.work_dir / "staging" / run.info.run_id / OUTPUT

    def resolve(self, uri: str) -> Path:
        """A `runs:/<id>/<path>` or `models:/…` URI -> local directory.

        A run whose artifacts sit on a local file system is read in place (MLflow's own
        `download_artifacts` would copy a `runs:/` URI into a temporary directory: hundreds of MB
        per checkpoint). Remote artifact stores are downloaded once into the work dir's cache.
        """
        import mlflow

        if uri.startswith("runs:/"):
            run_id, _, path = uri.removeprefix("runs:/").partition("/")
            run = self.client.get_run(run_id)
            local = self.local_artifact_dir(run)
            if local is not None:
                target = local / path
                if not target.exists():
                    raise RuntimeError(f"artifact {uri} does not exist at {target}")
                return target
            cache = self.work_dir / "downloads" / run_id / path
            if not cache.exists():
                cache.parent.mkdir(parents=True, exist_ok=True)
                mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(cache.parent), tracking_uri=self.tracking_uri)
            return cache
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=self.tracking_uri))
        except Exception as exc:  # noqa: BLE001 - re-raised with the URI named
            raise RuntimeError(f"cannot resolve artifact {uri}: {exc}") from exc

    def artifact_uri(self, run) -> str:
        return f"runs:/{run.info.run_id}/{OUTPUT}"


# --- planning ----------------------------------------------------------------------------------


@dataclass
class StagePlan:
    stage: str
    key: str | None
    state: str  # done | stale | missing | blocked
    run_id: str | None = None
    artifact_uri: str | None = None
    artifact_path: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # output fingerprints
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def run_outputs(run) -> dict[str, str]:
    return {k.removeprefix(TAG_OUTPUT_FP + "."): v for k, v in run.data.tags.items() if k.startswith(TAG_OUTPUT_FP + ".")}


def base_fingerprint(recipe: Recipe) -> str:
    from trlm.base_model import source_fingerprint

    return source_fingerprint(recipe.base_model)


def stage_inputs(recipe: Recipe, stage: str, upstream: dict[str, dict[str, str]], base_fp: str) -> dict[str, str] | None:
    """Input fingerprints of a stage, from the recorded outputs of its upstream stages (None = unknown)."""
    if stage == "data-prep":
        from trlm.stages.data_prep import data_prep_inputs

        return data_prep_inputs(recipe, base_fp)
    if stage == "eval":
        fps = {"base": base_fp}
        for model in recipe.eval.models:
            if model == "base":
                continue
            if model not in upstream:
                return None
            fps[model] = upstream[model]["model"]
        return fps
    data = upstream.get("data-prep", {}).get(stage)
    model_from = MODEL_INPUT[stage]
    model = base_fp if model_from == "base" else upstream.get(model_from, {}).get("model")
    if data is None or model is None:
        return None
    return {"model": model, "data": data}


def compute_key(recipe: Recipe, stage: str, inputs: dict[str, str]) -> str:
    return stage_key(stage, code_version(stage), stage_config(recipe, stage), inputs)


def plan(recipe: Recipe, tracker: Tracker) -> list[StagePlan]:
    """State of every stage for this recipe: done (cached), stale (done for other inputs), missing."""
    base_fp = base_fingerprint(recipe)
    upstream: dict[str, dict[str, str]] = {}
    plans = []
    for stage in STAGES:
        inputs = stage_inputs(recipe, stage, upstream, base_fp)
        if inputs is None:
            previous = tracker.latest_done(stage, recipe.name)
            plans.append(StagePlan(stage, None, "stale" if previous else "missing", note=f"waits for {UPSTREAM[stage]}"))
            continue
        key = compute_key(recipe, stage, inputs)
        run = tracker.find_done(stage, key)
        if run is not None:
            upstream[stage] = run_outputs(run)
            local = tracker.local_artifact_dir(run)
            plans.append(StagePlan(stage, key, "done", run.info.run_id, tracker.artifact_uri(run), str(local / OUTPUT) if local else None, upstream[stage]))
            continue
        previous = tracker.latest_done(stage, recipe.name)
        plans.append(StagePlan(stage, key, "stale" if previous else "missing", note="inputs, config or code changed" if previous else ""))
    return plans


# --- running one stage -------------------------------------------------------------------------


def flatten(prefix: str, obj: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj)
    return out


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


class MetricLogger:
    """The plain on_log(metrics, step) callback the stages take, forwarding to MLflow (batched).

    A resumed run restarts from its last checkpoint, so it replays steps it logged before the
    crash; those (step <= `logged_through`) are not logged again, or MLflow would chart each twice.
    """

    def __init__(self, client, run_id: str, logged_through: int | None = None):
        self.client, self.run_id, self.logged_through = client, run_id, logged_through

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        if self.logged_through is not None and step <= self.logged_through:
            return
        ts = int(time.time() * 1000)
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in clean.items()], synchronous=True)


def last_logged_step(client, run) -> int | None:
    """The highest step with a metric in `run` (None if it logged none)."""
    steps = [m.step for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)]
    return max(steps) if steps else None


def run_stage(
    tracker: Tracker,
    recipe: Recipe,
    stage: str,
    key: str,
    inputs: dict[str, str],
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
    done = tracker.find_done(stage, key)
    if done is None or force:
        with stage_lock(tracker.work_dir, stage, key):
            done = tracker.find_done(stage, key)  # finished by another process since the first look?
            if done is None or force:
                return _start_or_resume(tracker, recipe, stage, key, inputs, execute, done, parent_run_id, extra_tags)
    log.info("%s: cached (key %s, run %s)", stage, key[:12], done.info.run_id)
    local = tracker.local_artifact_dir(done)
    return StageOutcome(stage, key, done.info.run_id, tracker.artifact_uri(done), str(local / OUTPUT) if local else "", run_outputs(done), True)


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


def _start_or_resume(tracker, recipe, stage, key, inputs, execute, done, parent_run_id, extra_tags) -> StageOutcome:
    """Execute a stage in a new MLflow run, or in an unfinished one of the same key (resume)."""
    from mlflow.entities import Param, RunTag

    # --force skips the FINISHED run, but still resumes an unfinished (killed) run of the same key.
    run = tracker.find_resumable(stage, key)
    client = tracker.client
    logged_through = None
    if run is not None:
        log.info("%s: resuming unfinished run %s", stage, run.info.run_id)
        client.update_run(run.info.run_id, status="RUNNING")
        logged_through = last_logged_step(client, run)
    else:
        tags = {TAG_KEY: key, TAG_STAGE: stage, TAG_RECIPE: recipe.name, TAG_KIND: "stage", "mlflow.runName": f"{stage}-{key[:8]}"}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        tags.update({f"trlm.input.{k}": v for k, v in inputs.items()})
        run = client.create_run(tracker.experiment_id, run_name=f"{stage}-{key[:8]}", tags=tags)
        params = flatten("", stage_config(recipe, stage), {})
        client.log_batch(run.info.run_id, params=[Param(k[:250], v[:6000]) for k, v in params.items()], synchronous=True)
    run_id = run.info.run_id
    for k, v in (extra_tags or {}).items():
        client.set_tag(run_id, k, v)
    out = tracker.output_dir_for_writing(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    logger = MetricLogger(client, run_id, logged_through)
    try:
        summary = execute(out, logger)
        fingerprint = read_fingerprint(out)
        if fingerprint is None:
            raise RuntimeError(f"{stage} finished without writing {out}/fingerprint.json")
        # Training stages hand on the fingerprint of `model/` alone (not of metrics.json's timings).
        model_fp = part_fingerprint(out, "model") if stage in MODEL_INPUT else None
        if stage in MODEL_INPUT and model_fp is None:
            raise RuntimeError(f"{stage} finished without a model/ directory in {out}")
        outputs = {"model": model_fp} if model_fp else {"all": fingerprint}
        outputs |= summary.pop("_outputs", {})
        tags = [RunTag(f"{TAG_OUTPUT_FP}.{k}", v) for k, v in outputs.items()]
        reproduced = reproduces(done, outputs) if done is not None else None
        if reproduced is not None:
            tags += [RunTag(TAG_RERUN_OF, done.info.run_id), RunTag(TAG_REPRODUCED, str(reproduced).lower())]
            log.info("%s: forced rerun %s run %s (%s)", stage, "REPRODUCES" if reproduced else "does NOT reproduce", done.info.run_id,
                     "same output fingerprints" if reproduced else "output fingerprints differ")
        client.log_batch(run_id, tags=tags, synchronous=True)
        if tracker.local_artifact_dir(run) is None:
            client.log_artifacts(run_id, str(out), OUTPUT)
        client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        client.set_tag(run_id, "trlm.error", "".join(traceback.format_exception_only(type(exc), exc))[-5000:])
        client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    log.info("%s: done (run %s)", stage, run_id)
    return StageOutcome(stage, key, run_id, tracker.artifact_uri(run), str(out), outputs, False, summary, reproduced)


def reproduces(previous, outputs: dict[str, str]) -> bool | None:
    """Does a forced rerun give the same outputs as the FINISHED run of the same key?

    Compared: what downstream stages consume (the model of a training stage, the per-stage data of
    data-prep). None where the output is only a whole-directory hash with timings in it (eval).
    """
    compared = {k: v for k, v in outputs.items() if k != "all"}
    if not compared:
        return None
    before = run_outputs(previous)
    return all(before.get(k) == v for k, v in compared.items())


def register_model(tracker: Tracker, name: str, run_id: str, alias: str = "candidate") -> int:
    """Register `runs:/<id>/output/model` under `name` and point `alias` at the new version."""
    client = tracker.client
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"runs:/{run_id}/{OUTPUT}/model"
    version = client.create_model_version(name, source=source, run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def short_hash(obj: Any) -> str:
    return hash_json(obj)[:8]
