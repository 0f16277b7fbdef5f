"""A work dir whose MLflow store is PostgreSQL, opened by the client itself (no tracking server), on
the real cluster of tests/servers.py: its artifacts are the work dir's own, relative like a SQLite
store's, and `trlm up` serves it, with Prefect's server on PostgreSQL too. The password in the URIs
(trust authentication accepts any) is never printed."""

from __future__ import annotations

import json
import urllib.request

import pytest
import yaml
from typer.testing import CliRunner

from servers import free_port
from test_pipeline import write_tiny_recipe
from trlm.cli import app

SECRET = "s3cr3tPW"


@pytest.fixture(scope="module")
def pg_work(tmp_path_factory, tiny_model_dir, shared_data, postgres):
    root = tmp_path_factory.mktemp("pg-work")
    recipe = write_tiny_recipe(root, tiny_model_dir, shared_data)
    doc = yaml.safe_load(recipe.read_text())
    doc["tracking_uri"] = postgres.url(postgres.database("mlflow")).replace("://trlm@", f"://trlm:{SECRET}@")
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    return {"recipe": str(recipe), "work": root / "home", "prefect_db": postgres.url(postgres.database("prefect"), "asyncpg")}


def _trlm(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output[-3000:]
    assert SECRET not in result.output
    return result.stdout


def test_a_postgres_store_keeps_relative_artifacts_in_the_work_dir(pg_work, prefect_env, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the test harness's server
    _trlm("run", "--recipe", pg_work["recipe"], "--only", "data-prep")
    prep = json.loads(_trlm("status", "--recipe", pg_work["recipe"], "--json"))["stages"][0]
    assert prep["state"] == "done"
    # read and written in place under the work dir, as with SQLite: no upload, no download
    out = pg_work["work"] / "mlartifacts"
    assert len(list(out.glob(f"*/{prep['run_id']}/artifacts/output/fingerprint.json"))) == 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(yaml.safe_load(open(pg_work["recipe"]))["tracking_uri"])
    experiment = client.get_run(prep["run_id"]).info.experiment_id
    assert client.get_experiment(experiment).artifact_location.startswith("mlflow-artifacts:/"), "relative, so the work dir can move"


def test_trlm_up_serves_a_postgres_store_with_prefect_on_postgres(pg_work, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", pg_work["prefect_db"].replace("://trlm@", f"://trlm:{SECRET}@"))
    ports = {"prefect": free_port(), "mlflow": free_port()}
    try:
        up = _trlm("up", "--recipe", pg_work["recipe"], "--prefect-port", str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"]))
        assert "postgresql://trlm:***@" in up and "postgresql+asyncpg://trlm:***@" in up
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['prefect']}/api/health", timeout=10) as response:
            assert response.status == 200
        # through the server: the run made on the database directly, its artifacts served from the work dir
        server = f"http://127.0.0.1:{ports['mlflow']}"
        prep = json.loads(_trlm("status", "--recipe", pg_work["recipe"], "--tracking-uri", server, "--json"))["stages"][0]
        assert prep["state"] == "done"
        import mlflow

        listed = mlflow.artifacts.list_artifacts(run_id=prep["run_id"], artifact_path="output", tracking_uri=server)
        assert "output/fingerprint.json" in {f.path for f in listed}
    finally:
        down = CliRunner().invoke(app, ["down", "--recipe", pg_work["recipe"]])
    assert down.exit_code == 0 and "STILL RUNNING" not in down.output, down.output
