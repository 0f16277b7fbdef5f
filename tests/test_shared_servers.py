"""One pipeline across machines that share nothing but an MLflow server's URL, with real servers on
127.0.0.1: `mlflow server --serve-artifacts` (its destination a directory, or an S3 bucket on moto's
S3 server) and the Prefect test server. Two work directories (TRLM_HOME) stand in for two machines.

Machine A runs the first stages; their outputs go to the artifact store; A's directory is deleted;
machine B runs the rest, finding A's stages through the server and downloading each upstream
artifact once. `trlm status` says the same on either machine. A 200 MB upload streams: the
uploading process's memory grows by a small fraction of the file.

The server's store is SQLite here. The same hand-off on PostgreSQL, with two server processes as a
shared server runs it, is tests/test_two_workers.py's `TestOnPostgreSQL`: the pipeline on one worker,
a stage on the other, every upstream output downloaded once and verified, `trlm status` equal everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from servers import count_downloads, mlflow_on_s3, mlflow_server, moto_s3_server, s3_objects
from test_pipeline import write_tiny_recipe
from trlm.cli import app
from trlm.stages.registry import stage_names

STAGES = stage_names()


@pytest.fixture(scope="module")
def dir_store(tmp_path_factory):
    """An MLflow server whose artifact destination is a local directory (the server's own, not a
    worker's), its store SQLite."""
    root = tmp_path_factory.mktemp("dir-store")
    server = mlflow_server(root, str(root / "artifacts"))
    try:
        yield server.start(timeout=150)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """moto's S3 server with a bucket, and an MLflow server on that bucket."""
    root = tmp_path_factory.mktemp("stores")
    moto = s3 = None
    try:
        moto = moto_s3_server(root).start(timeout=60)
        s3 = mlflow_on_s3(root / "s3-store", moto).start(timeout=150)
        yield SimpleNamespace(moto=moto, s3=s3)
    finally:
        for srv in (s3, moto):
            if srv is not None:
                srv.stop()


@pytest.fixture()
def recipe(tmp_path, tiny_model_dir, shared_data, prefect_env, monkeypatch) -> Path:
    """The tiny recipe without a work dir or tracking URI of its own: each machine's environment decides."""
    from prefect.logging import configuration
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the test server, never a Prefect server found on :4200
    if not configuration.PROCESS_LOGGING_CONFIG:  # else Prefect's console handler binds to the first CliRunner's stream, closed after it
        configuration.setup_logging()
    path = write_tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    doc = yaml.safe_load(path.read_text())
    del doc["work_dir"], doc["tracking_uri"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _machine(monkeypatch, home: Path, server) -> None:
    monkeypatch.setenv("TRLM_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)


def _trlm(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output[-3000:]
    return result.stdout


def _status(recipe: Path) -> list[dict]:
    return json.loads(_trlm("status", "--recipe", recipe, "--json"))["stages"]


def _states(status: list[dict]) -> list[str]:
    return [s["state"] for s in status]


@pytest.fixture()
def downloads(monkeypatch) -> list[str]:
    """Every artifact download MLflow is asked for (the one call `Tracker.resolve` downloads with)."""
    return count_downloads(monkeypatch)


def _tracker(recipe: Path):
    from trlm.stages.registry import load_recipe
    from trlm.runs.tracking import setup_tracking

    return setup_tracking(load_recipe(str(recipe)))


def test_stages_run_on_two_machines_sharing_only_the_server(dir_store, recipe, tmp_path, monkeypatch, downloads):
    local_store = dir_store
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    _machine(monkeypatch, a, local_store)
    _trlm("run", "--recipe", recipe, "--only", "data-prep")
    _trlm("run", "--recipe", recipe, "--only", "sft-general")
    on_a = _status(recipe)
    assert _states(on_a) == ["done", "done"] + ["missing"] * (len(STAGES) - 2)
    store = local_store.log.parent / "artifacts"
    for stage in on_a[:2]:
        assert stage["artifact_uri"] == f"runs:/{stage['run_id']}/output" and stage["artifact_path"] is None
        uploaded = list(store.rglob(f"{stage['run_id']}/artifacts/output/fingerprint.json"))
        assert len(uploaded) == 1, f"{stage['stage']}'s output is in the artifact store, not only on A's disk"
    assert not list(a.rglob("mlartifacts")) and downloads == []
    shutil.rmtree(a)  # machine A is gone

    _machine(monkeypatch, b, local_store)
    assert _status(recipe) == on_a, "B sees A's stages through the server"
    _trlm("run", "--recipe", recipe, "--from", "sft-think")
    on_b = _status(recipe)
    assert _states(on_b) == ["done"] * len(STAGES)
    assert on_b[:2] == on_a[:2], "A's stages were reused, not rerun"
    # Each of A's artifacts was downloaded once (data-prep feeds sft-think and dpo); B's own outputs
    # stayed in its staging directory, and were uploaded.
    from_a = {s["run_id"] for s in on_a[:2]}
    assert sorted(downloads) == sorted(f"runs:/{r}/output" for r in from_a)
    assert {p.name for p in (b / "downloads").iterdir()} == from_a
    for stage in on_b[2:]:
        assert len(list(store.rglob(f"{stage['run_id']}/artifacts/output/fingerprint.json"))) == 1, stage["stage"]
    tracker = _tracker(recipe)
    for uri in (s["artifact_uri"] for s in on_b):
        assert (tracker.resolve(uri) / "fingerprint.json").is_file()
    assert len(downloads) == 2, "a second resolve downloads nothing"

    _machine(monkeypatch, tmp_path / "machine-c", local_store)  # any other machine
    assert _status(recipe) == on_b


def test_the_hand_off_through_an_s3_artifact_store(stores, recipe, tmp_path, monkeypatch, downloads):
    moto, server = stores.moto, stores.s3
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    _machine(monkeypatch, a, server)
    _trlm("run", "--recipe", recipe, "--only", "data-prep")
    on_a = _status(recipe)
    prep = on_a[0]["run_id"]
    keys = s3_objects(moto.url, "trlm-artifacts")
    assert any(k.endswith(f"{prep}/artifacts/output/fingerprint.json") for k in keys), "data-prep's output is in the bucket"
    shutil.rmtree(a)

    _machine(monkeypatch, b, server)
    assert _status(recipe) == on_a
    _trlm("run", "--recipe", recipe, "--only", "sft-general")
    on_b = _status(recipe)
    assert _states(on_b)[:2] == ["done", "done"] and on_b[0] == on_a[0]
    assert downloads == [f"runs:/{prep}/output"]
    sft = on_b[1]["run_id"]
    model = [v for k, v in s3_objects(moto.url, "trlm-artifacts").items() if k.endswith(f"{sft}/artifacts/output/model/model.safetensors")]
    assert len(model) == 1 and model[0] > 1_000_000
    _machine(monkeypatch, tmp_path / "machine-c", server)
    assert _status(recipe) == on_b


@pytest.mark.parametrize("mode,limit_mb", [("proxied", 32), ("presigned-multipart", 100)])
def test_a_large_upload_streams(stores, tmp_path, mode, limit_mb):
    """200 MB through the server to S3 (one streamed PUT, our default), or in presigned parts
    straight to the bucket: the uploading process never holds the file."""
    moto, server = stores.moto, stores.s3
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    if mode == "presigned-multipart":
        env |= {"MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true", "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(50 << 20)}
    probe = Path(__file__).with_name("upload_probe.py")
    proc = subprocess.run([sys.executable, str(probe), "--work", str(tmp_path), "--size-mb", "200"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nupload of {m['file_mb']} MB ({mode}): {m['seconds']} s, RSS {m['rss_before_mb']} -> peak {m['rss_peak_mb']} MB "
          f"(+{m['growth_mb']} MB); reading the file whole: +{m['control_growth_mb']} MB")
    assert m["control_growth_mb"] > 150, "the sampling sees a file held whole"
    assert m["growth_mb"] < limit_mb
    sizes = [v for k, v in s3_objects(moto.url, "trlm-artifacts").items() if k.endswith(f"{m['run_id']}/artifacts/output/model/model.safetensors")]
    assert sizes == [200 << 20]
