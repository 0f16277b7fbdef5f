"""Tracked execution of one unit of work: damaged cached artifacts rerun, abandoned runs are closed,
errors are stored without credentials, and the tracking URI never becomes a flow parameter."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trlm.artifacts import write_fingerprint
from trlm.runs.lineage import code_version
from trlm.runs.runner import Work, run_stage
from trlm.stages.registry import PIPELINE
from trlm.runs.tracking import TAG_OWNER, Tracker, close_abandoned_runs


class _Recipe:
    name = "probe"


@pytest.fixture()
def tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "probe", tmp_path)


def _work(key: str = "k" * 64) -> Work:
    return Work("probe", key, {"model": "m"}, {"x": 1}, code_version(PIPELINE[0]))


def _write(text: str):
    def execute(out: Path, on_log) -> dict:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.txt").write_text(text)
        write_fingerprint(out)
        return {}

    return execute


def test_a_damaged_cached_artifact_is_not_handed_on(tracker):
    first = run_stage(tracker, _Recipe(), _work(), _write("good"), parent_run_id=None)
    assert run_stage(tracker, _Recipe(), _work(), _write("good"), parent_run_id=None).cached
    (Path(first.path) / "result.txt").write_text("tampered")
    again = run_stage(tracker, _Recipe(), _work(), _write("good"), parent_run_id=None)
    assert not again.cached and again.run_id != first.run_id
    assert (Path(again.path) / "result.txt").read_text() == "good"
    old = tracker.client.get_run(first.run_id)
    assert old.info.status == "FAILED"
    assert "artifact damaged after it finished: 1 file(s) differ from the fingerprint: result.txt" in old.data.tags["trlm.error"]
    assert run_stage(tracker, _Recipe(), _work(), _write("good"), parent_run_id=None).run_id == again.run_id


def test_runs_left_running_by_a_dead_process_are_closed(tracker):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import psutil

    me = psutil.Process()
    orphan = tracker.client.create_run(tracker.experiment_id, tags={TAG_OWNER: f"{socket.gethostname()} {dead.pid} {me.create_time():.0f}"})
    alive = tracker.client.create_run(tracker.experiment_id, tags={TAG_OWNER: f"{socket.gethostname()} {os.getpid()} {me.create_time():.0f}"})
    remote = tracker.client.create_run(tracker.experiment_id, tags={TAG_OWNER: f"another-host {os.getpid()} 1"})
    assert close_abandoned_runs(tracker) == [orphan.info.run_id]
    closed = tracker.client.get_run(orphan.info.run_id)
    assert closed.info.status == "KILLED" and "ended without finishing" in closed.data.tags["trlm.error"]
    assert tracker.client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert tracker.client.get_run(remote.info.run_id).info.status == "RUNNING", "another machine's process cannot be checked here"


def test_an_error_is_stored_without_credentials(tracker):
    def fail(out: Path, on_log) -> dict:
        raise ConnectionError("cannot reach https://alice:s3cret-token@mlflow.example.org/api")

    with pytest.raises(ConnectionError):
        run_stage(tracker, _Recipe(), _work("f" * 64), fail, parent_run_id=None)
    run = tracker.client.search_runs([tracker.experiment_id], "tags.`trlm.stage_key` = '" + "f" * 64 + "'")[0]
    assert run.info.status == "FAILED"
    assert "s3cret-token" not in run.data.tags["trlm.error"] and "alice:***@mlflow.example.org" in run.data.tags["trlm.error"]


def test_the_tracking_uri_travels_in_the_environment_not_in_overrides(monkeypatch, shared_data):
    from trlm import cli

    monkeypatch.setenv("TRLM_DATA_ROOT", str(shared_data))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = "https://alice:s3cret-token@mlflow.example.org"
    recipe, overrides = cli._load(None, ["dpo.beta=0.2"], uri)
    assert not any("s3cret" in o for o in overrides), "overrides become Prefect flow parameters"
    assert os.environ["MLFLOW_TRACKING_URI"] == uri and recipe.resolved_tracking_uri == uri


def test_status_names_where_an_unfinished_run_resumes_and_its_damaged_checkpoints(tracker):
    from trlm.runs.lineage import resume_note
    from trlm.training.checkpoints import CHECKPOINTS, write_manifest

    def crash_after_two_checkpoints(out: Path, on_log) -> dict:
        for step in (2, 4):
            checkpoint = out / CHECKPOINTS / f"step-{step:06d}"
            checkpoint.mkdir(parents=True)
            (checkpoint / "model.safetensors").write_bytes(b"weights" * 100)
            write_manifest(checkpoint, step)
        raise RuntimeError("killed")

    key = "c" * 64
    assert resume_note(tracker, "probe", key) == ""
    with pytest.raises(RuntimeError):
        run_stage(tracker, _Recipe(), _work(key), crash_after_two_checkpoints, parent_run_id=None)
    run_id = tracker.find_resumable("probe", key).info.run_id
    assert resume_note(tracker, "probe", key) == f"unfinished run {run_id[:8]} resumes from step-000004"
    newest = tracker.output_dir_for_writing(tracker.client.get_run(run_id)) / CHECKPOINTS / "step-000004"
    (newest / "model.safetensors").write_bytes(b"weights")
    assert resume_note(tracker, "probe", key) == (f"unfinished run {run_id[:8]} resumes from step-000002; step-000004 is damaged: "
                                                  f"{newest / 'model.safetensors'} differs from its manifest (7 bytes; truncated or damaged)")
