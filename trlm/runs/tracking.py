"""The MLflow tracking store as the pipeline uses it: runs by tag, artifacts, owners, the registry.

A stage is *done* when the experiment holds a FINISHED run tagged with its key: this holds across
flow runs, processes and machines that share the tracking store. Each executed stage is one MLflow
child run under the pipeline's parent run. Its output directory IS the run's artifact directory
`output/`: with a local artifact store the stage writes straight into it (no copy); with a remote
store (an MLflow server with `--serve-artifacts`, its destination a directory or S3) it writes to a
staging directory in the work dir, uploads it and checks the upload (`trlm.runs.artifact_store`).
Downstream stages get `runs:/<id>/output` and resolve it through MLflow: a local path for local
stores; otherwise this machine's copy (the staging directory of a run it executed, or a verified
download into `<work_dir>/downloads/<run_id>/`), downloaded once. So machines need to share nothing
but the tracking server's URL.

Every run records its owner (`host pid start-time`), so a run left RUNNING by a process that died
is found and marked KILLED by the next pipeline run on that machine.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from trlm.recipe import Recipe

TAG_KEY = "trlm.stage_key"
TAG_STAGE = "trlm.stage"
TAG_RECIPE = "trlm.recipe"
TAG_OUTPUT_FP = "trlm.output_fingerprint"
TAG_KIND = "trlm.kind"
TAG_CODE = "trlm.code"  # JSON: {module: source hash} of the stage's import closure
TAG_LIBRARIES = "trlm.libraries"  # JSON: {distribution: version}
TAG_RERUN_OF = "trlm.rerun_of"  # a forced rerun: the FINISHED run of the same key it reran
TAG_REPRODUCED = "trlm.reproduced"  # "true" when its outputs' fingerprints equal that run's
TAG_UNRESUMABLE = "trlm.unresumable"  # a failed run whose directory must not be resumed (damaged artifact)
TAG_MODEL_ID = "trlm.model_id"  # the LoggedModel of a training stage's `model/`
TAG_OWNER = "trlm.owner"  # "host pid start-time" of the process executing the run
TAG_RESUMED = "trlm.resumed_from_step"  # a training stage resumed from the checkpoint of that step
OUTPUT = "output"
EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow's UI picks training or GenAI views from it
TRAINING_KIND = "custom_model_development"

log = logging.getLogger(__name__)


def setup_tracking(recipe: Recipe) -> "Tracker":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return Tracker(recipe.resolved_tracking_uri, recipe.experiment, recipe.work_path)


class Tracker:
    """MlflowClient with the few queries the pipeline needs. Uses explicit run ids, never the
    thread-local active run, because Prefect runs tasks in worker threads."""

    def __init__(self, tracking_uri: str, experiment: str, work_dir: Path):
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from trlm.runs.artifact_store import PROXY_TRANSFER_DEFAULTS
        from trlm.artifacts import work_dir_lock
        from trlm.runs.mlflow_http import retry_only_when_told
        from trlm.servers import is_database_store

        retry_only_when_told()  # a tracking server's 429/503 are retried; its 500s and lost connections are not
        for name, value in PROXY_TRANSFER_DEFAULTS.items():
            os.environ.setdefault(name, value)
        work_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self.work_dir = work_dir
        # Where `mlflow-artifacts:/` paths live when this store is the work dir's own (a database it
        # opens itself, or the server `trlm up` started over it): read and written in place, no transfer.
        self.artifact_root = local_artifact_root(tracking_uri, work_dir)
        mlflow.set_tracking_uri(tracking_uri)
        # Two runs starting at once on a fresh work dir would both create and migrate the SQLite
        # store and both create the experiment: one process at a time, the others find them made.
        with work_dir_lock(work_dir, "mlflow-setup"):
            self.client = MlflowClient(tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)  # the first query creates the store
            if exp is None:
                # Relative to the work dir's artifact root, never an absolute path: a copied or moved
                # work dir reads and writes its own artifacts. (A server picks its own location.)
                location = f"mlflow-artifacts:/{_slug(experiment)}" if is_database_store(tracking_uri) else None
                try:
                    exp_id = self.client.create_experiment(experiment, artifact_location=location, tags={EXPERIMENT_KIND: TRAINING_KIND})
                except MlflowException:  # created meanwhile by a process on another machine (same server)
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
                self._refuse_foreign_artifacts(exp.artifact_location)
                if exp.tags.get(EXPERIMENT_KIND) != TRAINING_KIND:  # MLflow's UI would show GenAI views
                    self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND, TRAINING_KIND)
        self.experiment_id = exp_id

    def _refuse_foreign_artifacts(self, location: str) -> None:
        """An experiment of this work dir's own store whose artifacts are an absolute path elsewhere
        (a store made before locations were relative, then copied or moved): refuse, or every stage
        would read and write the other work dir's files."""
        parsed = urlparse(location)
        if self.artifact_root is None or parsed.scheme not in ("", "file"):
            return
        where = Path(unquote(parsed.path))
        if not where.is_relative_to(self.work_dir):
            raise WorkDirMoved(
                f"the MLflow store of work dir {self.work_dir} keeps its artifacts in {where}, outside it: the work dir was "
                f"copied or moved from {where.parent}. Use that work dir, or start this one afresh (an empty TRLM_HOME); "
                "work dirs made by this version hold relative locations and can be moved")

    # queries
    def _search(self, filter_string: str, max_results: int = 20):
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"], max_results=max_results)

    def find_done(self, stage: str, key: str):
        runs = self._search(f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_STAGE}` = '{stage}' and attributes.status = 'FINISHED'", 1)
        return runs[0] if runs else None

    def find_resumable(self, stage: str, key: str):
        """An unfinished run of the same key (killed or failed): rerunning continues in its directory."""
        for run in self._search(f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_STAGE}` = '{stage}'"):
            # a remote store's run resumes only where its staging directory is (the machine that ran it)
            here = self.local_artifact_dir(run) is not None or self.staging_dir(run.info.run_id).parent.is_dir()
            if run.info.status in ("RUNNING", "FAILED", "KILLED") and here and run.data.tags.get(TAG_UNRESUMABLE) != "true":
                return run
        return None

    def latest_done(self, stage: str, recipe_name: str):
        runs = self._search(f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_RECIPE}` = '{recipe_name}' and attributes.status = 'FINISHED'", 1)
        return runs[0] if runs else None

    # artifacts
    def local_artifact_dir(self, run) -> Path | None:
        """The run's artifact directory on this machine's file system, or None for a remote store."""
        parsed = urlparse(run.info.artifact_uri)
        if parsed.scheme in ("", "file"):
            return Path(unquote(parsed.path))
        if parsed.scheme == "mlflow-artifacts" and self.artifact_root is not None:
            return self.artifact_root / unquote(parsed.path).lstrip("/")
        return None

    def log_file(self, run_id: str, path: Path, artifact_dir: str) -> None:
        """One file into a run's artifacts (in place for the work dir's own store, else uploaded)."""
        import shutil

        local = self.local_artifact_dir(self.client.get_run(run_id))
        if local is None:
            self.client.log_artifact(run_id, str(path), artifact_dir)
            return
        (local / artifact_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, local / artifact_dir / Path(path).name)

    def log_table(self, run_id: str, name: str, rows: list[dict]) -> None:
        """Rows as an MLflow table (`tables/<name>.json`, the file format and tag of `MlflowClient.log_table`,
        shown in the run's artifact view), written the way `log_file` writes. Idempotent: a resumed
        run rewrites the file (log_table itself would append)."""
        import tempfile

        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.json"
            pd.DataFrame(rows).to_json(path, orient="split", index=False, date_format="iso")
            self.log_file(run_id, path, "tables")
        logged = json.loads(self.client.get_run(run_id).data.tags.get("mlflow.loggedArtifacts", "[]"))
        entry = {"path": f"tables/{name}.json", "type": "table"}
        if entry not in logged:
            self.client.set_tag(run_id, "mlflow.loggedArtifacts", json.dumps([*logged, entry]))

    def staging_dir(self, run_id: str) -> Path:
        """Where a run with a remote artifact store writes its output on this machine."""
        return self.work_dir / "staging" / run_id / OUTPUT

    def output_dir_for_writing(self, run) -> Path:
        local = self.local_artifact_dir(run)
        if local is not None:
            return local / OUTPUT
        return self.staging_dir(run.info.run_id)

    def upload_output(self, run_id: str, out: Path) -> None:
        """Upload a staged output to the remote store and check it is all there (else `UploadError`)."""
        from trlm.runs.artifact_store import upload_output

        upload_output(self.client, run_id, out, OUTPUT)

    def local_copy(self, run, path: str = OUTPUT) -> Path | None:
        """This machine's complete copy of a remote run's artifact `path` (a top-level name), if any:
        a verified download, or the staging directory of a FINISHED run executed here. Re-verified
        each time (as a local store's artifact is): a damaged download is discarded."""
        from trlm.runs.artifact_store import download_problem
        from trlm.artifacts import discard

        run_id = run.info.run_id
        candidates = [(self.work_dir / "downloads" / run_id / path, True)]
        if path == OUTPUT and run.info.status == "FINISHED":
            candidates.append((self.staging_dir(run_id), False))
        for copy, ours in candidates:
            if not copy.is_dir():
                continue
            problem = download_problem(copy, run_outputs(run)) if path == OUTPUT else None
            if problem is None:
                return copy
            log.warning("local copy %s of run %s is not usable (%s)%s", copy, run_id, problem, ": removed" if ours else "")
            if ours:
                discard(copy)
        return None

    def resolve(self, uri: str) -> Path:
        """A `runs:/<id>/<path>` or `models:/…` URI -> local directory.

        A run whose artifacts sit on a local file system is read in place (MLflow's own
        `download_artifacts` would copy a `runs:/` URI into a temporary directory: hundreds of MB
        per checkpoint). A remote run's artifact is this machine's copy (`local_copy`), or else is
        downloaded once, atomically and verified, into `<work_dir>/downloads/<run_id>/`.
        """
        import mlflow

        from trlm.runs.artifact_store import download_verified
        from trlm.artifacts import work_dir_lock

        if uri.startswith("models:/") and (source := self._version_source(uri)):
            uri = source  # a version registered from a run: that run's artifact, resolved as one
        if uri.startswith("runs:/"):
            run_id, _, path = uri.removeprefix("runs:/").partition("/")
            run = self.client.get_run(run_id)
            local = self.local_artifact_dir(run)
            if local is not None:
                target = local / path
                if not target.exists():
                    raise RuntimeError(f"artifact {uri} does not exist at {target}")
                return target
            top, _, rest = path.strip("/").partition("/")  # the unit fetched and verified: the whole `output`
            # one process per machine fetches it; the others wait, then find it (never replaced under a reader)
            with work_dir_lock(self.work_dir, f"download-{run_id}"):
                copy = self.local_copy(run, top)
                if copy is None:
                    fingerprints = run_outputs(run) if top == OUTPUT else None
                    copy = download_verified(self.tracking_uri, run_id, top, self.work_dir / "downloads" / run_id / top, fingerprints)
            return copy / rest if rest else copy
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=self.tracking_uri))
        except Exception as exc:  # noqa: BLE001 - re-raised with the URI named
            raise RuntimeError(f"cannot resolve artifact {uri}: {exc}") from exc

    def _version_source(self, uri: str) -> str | None:
        """`models:/<name>@<alias>` or `models:/<name>/<version>` -> the `runs:/` URI it was registered from."""
        name, _, rest = uri.removeprefix("models:/").partition("/")
        name, _, alias = name.partition("@")
        version = self.client.get_model_version_by_alias(name, alias) if alias else self.client.get_model_version(name, rest)
        return version.source if version.source.startswith("runs:/") else None

    # failures
    def mark_failed(self, run_id: str, error: str, status: str = "FAILED") -> None:
        """Tag the reason and end the run; if the server cannot be reached, keep the failure in the
        work dir: it is written to the run when the server answers again (`flush_pending`)."""
        from trlm.runs.artifact_store import record_pending_failure

        try:
            self.client.set_tag(run_id, "trlm.error", error)
            self.client.set_terminated(run_id, status)
        except Exception as exc:  # noqa: BLE001 - the server went away: record it later
            record_pending_failure(self.work_dir, run_id, status, error, exc)

    def flush_pending(self) -> list[str]:
        from trlm.runs.artifact_store import flush_pending_failures

        return flush_pending_failures(self.client, self.work_dir)

    def artifact_uri(self, run) -> str:
        return f"runs:/{run.info.run_id}/{OUTPUT}"


class WorkDirMoved(RuntimeError):
    """The work dir's MLflow store points at another work dir's artifacts."""


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "experiment"


def local_artifact_root(tracking_uri: str, work_dir: Path) -> Path | None:
    """`<work_dir>/mlartifacts` when the store is the work dir's own: a database it opens itself
    (SQLite, PostgreSQL, ...), or the MLflow server `trlm up` started for it (which serves that
    directory as `mlflow-artifacts:/`)."""
    from trlm.servers import ARTIFACTS_DIR, is_database_store, own_mlflow_url

    if is_database_store(tracking_uri) or tracking_uri.rstrip("/") == own_mlflow_url(work_dir):
        return Path(work_dir) / ARTIFACTS_DIR
    return None


def run_outputs(run) -> dict[str, str]:
    return {k.removeprefix(TAG_OUTPUT_FP + "."): v for k, v in run.data.tags.items() if k.startswith(TAG_OUTPUT_FP + ".")}


def flatten(prefix: str, obj: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj)
    return out


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


def owner_tag() -> str:
    """`host pid start-time` of this process: enough to tell later whether it is still alive."""
    import socket

    import psutil

    return f"{socket.gethostname()} {os.getpid()} {psutil.Process().create_time():.0f}"


def owner_alive(tag: str) -> bool | None:
    """Is the process named by an owner tag alive? None when it ran on another machine (unknowable here)."""
    import socket

    import psutil

    try:
        host, pid, started = tag.split()
        pid_, started_ = int(pid), float(started)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(pid_).create_time() - started_) < 2  # a reused pid has another start time
    except psutil.Error:
        return False


def close_abandoned_runs(tracker: Tracker) -> list[str]:
    """Mark KILLED every RUNNING run whose process on this machine has died (a killed `trlm run`),
    so no run stays RUNNING forever. A killed stage run stays resumable. Returns the run ids.
    Failures kept while the server was unreachable are written first (with their own reasons)."""
    tracker.flush_pending()
    closed = []
    for run in tracker._search("attributes.status = 'RUNNING'", 200):
        owner = run.data.tags.get(TAG_OWNER)
        if owner and owner_alive(owner) is False:
            tracker.client.set_tag(run.info.run_id, "trlm.error", f"abandoned: its process ({owner}) ended without finishing the run")
            tracker.client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def register_model(tracker: Tracker, name: str, run_id: str) -> int:
    """Register `runs:/<id>/output/model` under `name` (once per run); returns its version. No alias:
    `@candidate` is set by `promote`, once the model has been evaluated."""
    client = tracker.client
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return int(version.version)
    version = client.create_model_version(name, source=f"runs:/{run_id}/{OUTPUT}/model", run_id=run_id)
    return int(version.version)


def promote(tracker: Tracker, name: str, run_id: str, alias: str) -> tuple[int, bool]:
    """Point `name@alias` at the version of `run_id` (registered now if it was not). Returns
    (version, moved): moved is False when the alias already pointed there."""
    version = register_model(tracker, name, run_id)
    try:
        moved = int(tracker.client.get_model_version_by_alias(name, alias).version) != version
    except Exception:  # noqa: BLE001 - MlflowException: no such alias yet
        moved = True
    if moved:
        tracker.client.set_registered_model_alias(name, alias, str(version))
    return version, moved
