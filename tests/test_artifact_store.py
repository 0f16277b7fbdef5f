"""A remote artifact store (a real `mlflow server --serve-artifacts` on 127.0.0.1) never holds a
FINISHED run with an incomplete artifact, and no machine takes a partial download for a copy:

* an upload that fails half-way, or that silently leaves a file out or short, fails the run with
  the reason; a rerun resumes it here (from its staging directory) and completes it;
* a server that goes away mid-stage: the run is marked FAILED with the reason once it is back, and
  a rerun completes the stage;
* downloads are atomic and verified: a download killed half-way (a real SIGKILL) or corrupted is
  not a cached copy; a good one is downloaded once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

from servers import count_downloads, mlflow_server
from trlm.runs.artifact_store import UploadError, listed_sizes
from trlm.artifacts import hash_directory, write_fingerprint
from trlm.runs.lineage import code_version
from trlm.runs.runner import Work, run_stage
from trlm.stages.registry import PIPELINE
from trlm.runs.tracking import OUTPUT, Tracker

FILES = {"model/model.safetensors": b"w" * 300_000, "model/config.json": b"{}", "model/tokenizer.json": b"t" * 1000,
         "metrics.json": b"[]", "results.json": b'{"loss": 1.0}'}


class _Recipe:
    name = "remote-probe"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-local-store")
    srv = mlflow_server(root, str(root / "artifacts")).start(timeout=120)
    yield srv
    srv.stop()


@pytest.fixture()
def fast_failing_client(monkeypatch):
    """MLflow's client retries a refused connection for minutes by default; a test has seconds."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _tracker(server, work: Path, experiment: str) -> Tracker:
    return Tracker(server.url, experiment, work)


def _work(key: str) -> Work:
    return Work("probe", key, {"model": "m"}, {"x": 1}, code_version(PIPELINE[0]))


def _execute(calls: list[Path]):
    def execute(out: Path, on_log) -> dict:
        calls.append(out)
        for rel, data in FILES.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        write_fingerprint(out)
        return {}

    return execute


def _patch_upload(monkeypatch, how: str, scratch: Path, after: int = 2) -> None:
    real = HttpArtifactRepository.log_artifact
    seen = []

    def log_artifact(self, local_file, artifact_path=None):
        seen.append(local_file)
        if len(seen) <= after:
            return real(self, local_file, artifact_path)
        if how == "raise":
            raise ConnectionError("connection reset by peer (simulated)")
        if how == "truncate":  # the store kept the first bytes only
            short = Path(tempfile.mkdtemp(dir=scratch)) / Path(local_file).name
            short.write_bytes(Path(local_file).read_bytes()[:10])
            return real(self, str(short), artifact_path)
        return None  # "drop": the store said OK and kept nothing

    monkeypatch.setattr(HttpArtifactRepository, "log_artifact", log_artifact)


@pytest.mark.parametrize("how", ["raise", "drop", "truncate"])
def test_an_incomplete_upload_fails_the_run_and_a_rerun_completes_it(server, tmp_path, monkeypatch, how):
    tracker = _tracker(server, tmp_path / "work", f"upload-{how}")
    calls: list[Path] = []
    with monkeypatch.context() as m:
        _patch_upload(m, how, tmp_path)
        with pytest.raises(UploadError):
            run_stage(tracker, _Recipe(), _work(how * 8), _execute(calls), parent_run_id=None)
    (failed,) = tracker.client.search_runs([tracker.experiment_id])
    assert failed.info.status == "FAILED", "never FINISHED with an incomplete artifact"
    reason = failed.data.tags["trlm.error"]
    expected = {"raise": "upload of 6 file(s)", "drop": "file(s) missing", "truncate": "file(s) of another size"}[how]
    assert "UploadError" in reason and expected in reason, reason
    outcome = run_stage(tracker, _Recipe(), _work(how * 8), _execute(calls), parent_run_id=None)
    assert outcome.run_id == failed.info.run_id and calls[0] == calls[1], "the rerun resumes the run from its staging dir"
    assert tracker.client.get_run(outcome.run_id).info.status == "FINISHED"
    uploaded = listed_sizes(tracker.client, outcome.run_id, OUTPUT)
    assert {k: v for k, v in uploaded.items() if k != "fingerprint.json"} == {k: len(v) for k, v in FILES.items()}


def test_a_server_that_goes_away_mid_stage(server, tmp_path, fast_failing_client):
    tracker = _tracker(server, tmp_path / "work", "outage")
    calls: list[Path] = []

    def execute(out: Path, on_log) -> dict:
        calls.append(out)
        on_log({"loss": 2.0}, 1)
        if len(calls) == 1:
            server.stop()  # the tracking server goes away while the stage trains
        on_log({"loss": 1.0}, 2)
        return _execute([])(out, on_log)

    try:
        with pytest.raises(Exception) as info:
            run_stage(tracker, _Recipe(), _work("o" * 64), execute, parent_run_id=None)
        pending = list((tracker.work_dir / "pending-failures").glob("*.json"))
        assert len(pending) == 1, "the failure is kept until the server can take it"
    finally:
        if server.proc is None:
            server.start(timeout=120)  # same port, same store
    (run,) = tracker.client.search_runs([tracker.experiment_id])
    assert run.info.status == "RUNNING"
    assert tracker.flush_pending() == [run.info.run_id] and not pending[0].exists()
    run = tracker.client.get_run(run.info.run_id)
    assert run.info.status == "FAILED" and type(info.value).__name__ in run.data.tags["trlm.error"]
    outcome = run_stage(tracker, _Recipe(), _work("o" * 64), execute, parent_run_id=None)
    assert outcome.run_id == run.info.run_id and not outcome.cached
    assert tracker.client.get_run(outcome.run_id).info.status == "FINISHED"
    assert [m.step for m in tracker.client.get_metric_history(outcome.run_id, "loss")] == [1, 2]


@pytest.fixture()
def finished(server, tmp_path, request):
    """A stage run finished on one machine (work dir `a`), read from another (work dir `b`)."""
    maker = _tracker(server, tmp_path / "a", "downloads")
    outcome = run_stage(maker, _Recipe(), _work(request.node.name[:64].ljust(64, "d")), _execute([]), parent_run_id=None)
    return outcome, _tracker(server, tmp_path / "b", "downloads")


KILLED_DOWNLOAD = """
import os, signal, sys
from pathlib import Path
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from trlm.runs.tracking import Tracker
real = HttpArtifactRepository._download_file
done = []
def _download_file(self, remote_file_path, local_path):
    if done:  # the second file: half of it, then the process is killed
        Path(local_path).write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(remote_file_path)
    return real(self, remote_file_path, local_path)
HttpArtifactRepository._download_file = _download_file
Tracker(sys.argv[1], "downloads", Path(sys.argv[2])).resolve(sys.argv[3])
"""


def test_a_killed_download_is_not_a_cached_copy(finished, monkeypatch):
    outcome, reader = finished
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = subprocess.run([sys.executable, "-c", KILLED_DOWNLOAD, reader.tracking_uri, str(reader.work_dir), outcome.artifact_uri],
                          env=env, cwd=reader.work_dir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = reader.work_dir / "downloads" / outcome.run_id
    assert not (run_dir / OUTPUT).exists() and any(p.name.startswith(".tmp-output-") for p in run_dir.iterdir())
    calls = count_downloads(monkeypatch)
    path = reader.resolve(outcome.artifact_uri)
    assert path == run_dir / OUTPUT and len(calls) == 1
    assert hash_directory(path) == hash_directory(outcome.path)
    assert reader.resolve(outcome.artifact_uri + "/model") == path / "model" and len(calls) == 1, "downloaded once"


def test_a_corrupted_or_damaged_copy_is_never_used(finished, monkeypatch):
    outcome, reader = finished
    real = HttpArtifactRepository._download_file

    def corrupting(self, remote_file_path, local_path):
        real(self, remote_file_path, local_path)
        if remote_file_path.endswith("model.safetensors"):
            Path(local_path).write_bytes(b"x" * 300_000)  # same size, other bytes

    with monkeypatch.context() as m:
        m.setattr(HttpArtifactRepository, "_download_file", corrupting)
        with pytest.raises(RuntimeError, match="is not usable: its files do not match"):
            reader.resolve(outcome.artifact_uri)
    assert not (reader.work_dir / "downloads" / outcome.run_id / OUTPUT).exists()
    calls = count_downloads(monkeypatch)
    path = reader.resolve(outcome.artifact_uri)
    (path / "results.json").write_text("edited")  # the cached copy is damaged later
    again = reader.resolve(outcome.artifact_uri)
    assert again == path and (again / "results.json").read_bytes() == FILES["results.json"] and len(calls) == 2


def test_a_local_store_is_read_in_place(tmp_path):
    """Without a server (SQLite + a local artifact root) nothing is uploaded, downloaded or copied."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "local", tmp_path)
    outcome = run_stage(tracker, _Recipe(), _work("l" * 64), _execute([]), parent_run_id=None)
    run = tracker.client.get_run(outcome.run_id)
    assert tracker.resolve(outcome.artifact_uri) == tracker.local_artifact_dir(run) / OUTPUT == Path(outcome.path)
    assert not (tmp_path / "downloads").exists() and not (tmp_path / "staging").exists()


class _ListingClient:
    """A store whose listing holds every file; `sizes` says what it reports as each file's size."""

    def __init__(self, out: Path, sizes):
        self.out, self.sizes = out, sizes

    def list_artifacts(self, run_id, path):
        from mlflow.entities import FileInfo

        return [FileInfo(f"{path}/{p.relative_to(self.out).as_posix()}", False, self.sizes(p)) for p in sorted(self.out.rglob("*")) if p.is_file()]

    def download_artifacts(self, run_id, path, dst):
        target = Path(dst) / Path(path).name
        target.write_bytes((self.out / Path(path).relative_to(OUTPUT)).read_bytes())
        return str(target)


def test_an_upload_listed_without_sizes_is_refused(tmp_path):
    from trlm.runs.artifact_store import upload_problem

    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_bytes(b"w" * 1000)
    (out / "metrics.json").write_text("{}")
    write_fingerprint(out)
    assert upload_problem(_ListingClient(out, lambda p: p.stat().st_size), "r", out, OUTPUT) is None
    problem = upload_problem(_ListingClient(out, lambda p: None), "r", out, OUTPUT)
    assert problem == "3 file(s) listed without a size, so unchecked (fingerprint.json, metrics.json, model/model.safetensors)"
    half = upload_problem(_ListingClient(out, lambda p: None if p.name == "metrics.json" else p.stat().st_size), "r", out, OUTPUT)
    assert half == "1 file(s) listed without a size, so unchecked (metrics.json)"
