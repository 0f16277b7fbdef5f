"""Two workers on the shared servers, as in production, on 127.0.0.1 with the tiny recipe.

One Prefect server, one MLflow server with served artifacts (its destination a directory of its
own; on PostgreSQL two server processes), the deployments of `prefect.yaml` on one process pool, and two workers (`--limit 1`) that poll
it, each with its own empty TRLM_HOME and, where `unshare --uts` works (root), its own host name
(`worker-a`, `worker-b`): to MLflow's owner tags they are two machines, as in production, so a dead
worker's runs cannot be recognised by process id on the other. They share nothing but the URLs.

Which worker runs a flow run is chosen, not left to the race between their polls: the other worker
is SIGSTOPped (it stops polling; nothing of it is lost) until the chosen one has claimed the run
(its state leaves SCHEDULED), then SIGCONTed. Which worker ran a stage is read back from where its
output was staged: `$TRLM_HOME/staging/<run_id>` exists only on the worker that executed the run.

1. The pipeline on worker A, then `only=dpo` with another beta on worker B: B fetches A's upstream
   outputs from MLflow (verified downloads in B's TRLM_HOME, no retraining), every stage key has
   exactly one MLflow run, and `trlm status` says the same from A's, B's or a fresh work dir. The
   test prints which worker ran each stage.
2. Worker A is SIGKILLed (its process group and its flow run's, which Prefect starts in a session
   of its own) in the middle of a training stage. Prefect marks its flow run CRASHED (heartbeats
   every 30 s from prefect.yaml's job variables, and the zombie automation that the first deployment
   run created; `flows/heartbeats.py`); the same run started again goes to B and finishes; the killed
   stage's MLflow run is marked KILLED by B's run, through the Prefect server (A's process cannot be
   checked from "another machine"), and the new one is FINISHED.

Cost: both scenarios share one set of servers and workers per store; each store is a test class, so
pytest-xdist runs the two stores at once (SQLite: Prefect's database and MLflow's store in files;
PostgreSQL: both on one throwaway cluster). The second test runs after the
first on the same servers: it needs the first's upstream stages and the automation its first
deployment run created. The kill waits only for the stage's MLflow run to be RUNNING (not for a
training step, which a fast machine could finish before the next poll); Prefect's server then
crashes the flow run when the trigger's 90 s window after the last heartbeat ends (60 to 95 s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

from servers import LOOPBACK, Server, free_port, mlflow_server
from test_pipeline import write_tiny_recipe
from trlm.prefect_db import seed_prefect_database

REPO = Path(__file__).resolve().parents[1]
POOL = "trlm-two-workers"
WORKERS = ("worker-a", "worker-b")
STEPS = 8
SLOW = {"only": "sft-general", "overrides": [f"sft_general.train.max_steps={STEPS}", f"sft_general.train.save_steps={STEPS // 2}"]}


def _separate_hosts() -> bool:
    """Can a worker get a host name of its own (a UTS namespace: root, or an unprivileged user namespace)?"""
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--uts", "hostname", "trlm-probe"], capture_output=True, timeout=10).returncode == 0


@pytest.fixture(scope="class")
def cluster(request, tmp_path_factory, tiny_model_dir, shared_data):
    store = request.cls.store
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp(f"two-workers-{store}")
    port = free_port()
    api = f"http://{LOOPBACK}:{port}/api"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRLM_HOME"))},
           "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5", "TRLM_SRC_DIR": str(REPO),
           "MLFLOW_DISABLE_TELEMETRY": "true", "NO_PROXY": LOOPBACK}
    backend = None
    if store == "postgres":
        pg = request.getfixturevalue("postgres")
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = pg.url(pg.database("prefect"), "asyncpg")
        backend = pg.url(pg.database("mlflow"))
    else:
        seed_prefect_database(root / "prefect" / "prefect.db")  # migrated once per suite, not per server
    logs = root / "logs"
    # on PostgreSQL with two server processes, as a shared server runs it (SQLite: one writer, one process)
    mlflow = mlflow_server(root / "mlflow", str(root / "mlflow" / "artifacts"), backend=backend, workers=2 if backend else 1)
    prefect = Server("prefect server", [sys.executable, "-m", "prefect", "server", "start", "--host", LOOPBACK, "--port", str(port)],
                     env, port, logs / "prefect-server.log", health="/api/health")
    workers: dict[str, subprocess.Popen] = {}
    separate = _separate_hosts()
    try:
        mlflow.launch(), prefect.launch()
        mlflow.wait_ready(180), prefect.wait_ready(180)
        recipe = write_tiny_recipe(root, tiny_model_dir, shared_data)
        doc = yaml.safe_load(recipe.read_text())
        del doc["work_dir"], doc["tracking_uri"]  # each worker's environment decides: its TRLM_HOME, the shared server
        recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
        deployments = _deployments_file(root, recipe)
        for cmd in (["work-pool", "create", POOL, "--type", "process"], ["deploy", "--all", "--no-prompt", "--prefect-file", str(deployments)]):
            done = subprocess.run([sys.executable, "-m", "prefect", *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
            assert done.returncode == 0, done.stdout + done.stderr
        homes = {name: root / name for name in WORKERS}
        for name in WORKERS:
            homes[name].mkdir()  # empty
            cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "1", "--name", name]
            if separate:
                cmd = ["unshare", "--uts", "sh", "-c", f'hostname {name} && exec "$@"', "sh", *cmd]
            workers[name] = subprocess.Popen(cmd, cwd=homes[name], env={**env, "TRLM_HOME": str(homes[name]), "MLFLOW_TRACKING_URI": mlflow.url},
                                             stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            yield SimpleNamespace(store=store, api=api, mlflow=mlflow.url, recipe=recipe, root=root, homes=homes, workers=workers,
                                  logs=logs, separate_hosts=separate, started=t0)
    finally:
        for proc in workers.values():
            _kill_tree(proc.pid, signal.SIGTERM)
        for proc in workers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid, signal.SIGKILL)
        prefect.stop()
        mlflow.stop()
        print(f"\n[{store}] two-workers module: {time.monotonic() - t0:.0f} s with the servers' start and stop")


def _deployments_file(root: Path, recipe: Path) -> Path:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for dep in doc["deployments"]:
        dep["work_pool"] = {**dep["work_pool"], "name": POOL}
        dep["parameters"]["recipe"] = str(recipe)
        dep["schedules"] = []  # no nightly run in the middle of the test
    path = root / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _kill_tree(pid: int, sig: int) -> None:
    """`sig` to the worker's process group and to every process group below it: Prefect starts each
    flow run in a session of its own, which a signal to the worker's group alone would miss."""
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    groups = set()
    for p in family:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass


def _flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _wait_state(flow_run_id, done, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        flow_run = _flow_run(flow_run_id)
        if done(flow_run.state) or time.monotonic() > deadline:
            assert done(flow_run.state), f"flow run {flow_run.name} is {flow_run.state.type.value}, not {what}, after {timeout_s:.0f} s"
            return flow_run
        time.sleep(1)


def _start_on(cluster, worker: str, parameters: dict):
    """Start a `trlm-manual` run that `worker` claims: every other live worker is paused (SIGSTOP)
    until the run has left SCHEDULED, then resumed."""
    from prefect.deployments import run_deployment

    paused = [p for name, p in cluster.workers.items() if name != worker and p.poll() is None]
    for proc in paused:
        os.killpg(proc.pid, signal.SIGSTOP)
    try:
        flow_run = run_deployment("trlm-pipeline/trlm-manual", parameters=parameters, timeout=0)
        _wait_state(flow_run.id, lambda s: s.type.value != "SCHEDULED", 120, f"claimed by {worker}")
    finally:
        for proc in paused:
            os.killpg(proc.pid, signal.SIGCONT)
    return flow_run


def _finish(flow_run, timeout_s: float = 900):
    return _wait_state(flow_run.id, lambda s: s.is_final(), timeout_s, "final")


@pytest.fixture()
def observer(cluster, monkeypatch, tmp_path):
    """This process as one more machine: a work dir of its own, the shared servers."""
    monkeypatch.setenv("TRLM_HOME", str(tmp_path / "observer"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster.mlflow)
    monkeypatch.setenv("PREFECT_API_URL", cluster.api)
    return _tracker(cluster)


def _tracker(cluster):
    from trlm.runs.tracking import setup_tracking
    from trlm.stages.registry import load_recipe

    return setup_tracking(load_recipe(str(cluster.recipe), check_files=False))


def _stage_runs(tracker) -> list:
    from trlm.runs.tracking import TAG_KIND

    return [r for r in tracker.client.search_runs([tracker.experiment_id], max_results=1000) if r.data.tags.get(TAG_KIND) == "stage"]


def _ran_on(cluster, run) -> str:
    """The worker whose TRLM_HOME staged the run's output (only the executing machine does)."""
    found = [name for name, home in cluster.homes.items() if (home / "staging" / run.info.run_id).is_dir()]
    assert len(found) == 1, f"run {run.info.run_id} staged on {found}"
    return found[0]


def _host(run) -> str:
    return (run.data.tags.get("trlm.owner") or "?").split()[0]


def _print_table(cluster, title: str, rows: list[tuple[str, ...]]) -> None:
    header = ("stage", "key", "MLflow run", "status", "worker", "host")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n[{cluster.store}] {title}")
    for row in [header, *rows]:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def _row(cluster, run) -> tuple[str, ...]:
    t = run.data.tags
    return (t["trlm.stage"], t["trlm.stage_key"][:8], run.info.run_id[:8], run.info.status, _ran_on(cluster, run), _host(run))


def _status(home: Path, cluster, monkeypatch) -> list[dict]:
    from typer.testing import CliRunner

    from trlm.cli import app

    monkeypatch.setenv("TRLM_HOME", str(home))
    result = CliRunner().invoke(app, ["status", "--recipe", str(cluster.recipe), "--json"])
    assert result.exit_code == 0, result.output[-3000:]
    return json.loads(result.stdout)["stages"]


class _BothScenarios:
    """Both scenarios on one set of servers; a class per store, so that pytest-xdist (`--dist loadscope`)
    can run the two stores on two of its workers at once."""

    store: str

    def test_each_stage_runs_once_on_one_worker_and_the_other_fetches_it(self, cluster, observer, monkeypatch):
        scenario_one(cluster, observer, monkeypatch)

    def test_a_worker_killed_mid_stage_crashes_its_run_and_the_other_finishes_it(self, cluster, observer):
        scenario_two(cluster, observer)


class TestOnSQLite(_BothScenarios):
    store = "sqlite"


class TestOnPostgreSQL(_BothScenarios):
    store = "postgres"


def scenario_one(cluster, observer, monkeypatch):
    t0 = time.monotonic()
    a, b = WORKERS
    full = _finish(_start_on(cluster, a, {}))
    assert full.state.is_completed(), f"{full.state}; see {cluster.logs}"
    only = _finish(_start_on(cluster, b, {"only": "dpo", "overrides": ["dpo.beta=0.3"]}))
    assert only.state.is_completed(), f"{only.state}; see {cluster.logs}"

    runs = sorted(_stage_runs(observer), key=lambda r: r.info.start_time)
    rows = [_row(cluster, r) for r in runs]
    _print_table(cluster, "who ran what: the pipeline on worker-a, then only=dpo (beta 0.3) on worker-b", rows)
    per_key = Counter((r.data.tags["trlm.stage"], r.data.tags["trlm.stage_key"]) for r in runs)
    assert set(per_key.values()) == {1}, f"a stage key ran twice: {per_key}"
    assert all(r.info.status == "FINISHED" for r in runs)
    by_flow_run = {fr.id: [r for r in runs if r.data.tags.get("prefect.flow_run_id") == str(fr.id)] for fr in (full, only)}
    assert {_ran_on(cluster, r) for r in by_flow_run[full.id]} == {a} and len(by_flow_run[full.id]) >= 6
    assert [(r.data.tags["trlm.stage"], _ran_on(cluster, r)) for r in by_flow_run[only.id]] == [("dpo", b)], "B ran dpo alone"
    if cluster.separate_hosts:
        assert {_host(r) for r in by_flow_run[full.id]} == {a} and {_host(r) for r in by_flow_run[only.id]} == {b}

    # B got dpo's inputs (sft-think's model, data-prep's preference data) from MLflow: downloaded
    # into its TRLM_HOME and verified against the fingerprints of A's runs, never retrained.
    from trlm.runs.artifact_store import download_problem
    from trlm.runs.tracking import run_outputs

    done_on_a = {r.data.tags["trlm.stage"]: r for r in by_flow_run[full.id]}
    fetched = {p.name for p in (cluster.homes[b] / "downloads").iterdir()}
    assert {done_on_a["sft-think"].info.run_id, done_on_a["data-prep"].info.run_id} <= fetched
    assert fetched <= {r.info.run_id for r in by_flow_run[full.id]}, "B downloads only A's runs"
    for run_id in fetched:
        run = next(r for r in runs if r.info.run_id == run_id)
        assert download_problem(cluster.homes[b] / "downloads" / run_id / "output", run_outputs(run)) is None
    assert not (cluster.homes[a] / "downloads").exists() or not any((cluster.homes[a] / "downloads").iterdir())

    # One answer from every work dir: A's, B's, and one that has never run anything.
    statuses = [_status(home, cluster, monkeypatch) for home in (cluster.homes[a], cluster.homes[b], cluster.root / "fresh")]
    assert statuses[0] == statuses[1] == statuses[2]
    assert {s["state"] for s in statuses[0]} == {"done"}

    from trlm.flows.heartbeats import ZOMBIE_AUTOMATION
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert len(client.read_automations_by_name(ZOMBIE_AUTOMATION)) == 1, "the first deployment run created the automation, once"
    print(f"[{cluster.store}] scenario 1 (pipeline on A, only=dpo on B, status x3): {time.monotonic() - t0:.0f} s")


def scenario_two(cluster, observer):
    t0 = time.monotonic()
    a, b = WORKERS
    # After the first test (same servers): its upstream stages are done, its first run created the automation.
    doomed = _start_on(cluster, a, SLOW)
    client = observer.client
    deadline = time.monotonic() + 400
    stage_run = None
    while time.monotonic() < deadline:  # A has started the stage: its MLflow run exists, RUNNING
        mine = [r for r in _stage_runs(observer) if r.data.tags.get("prefect.flow_run_id") == str(doomed.id) and r.data.tags.get("trlm.stage") == "sft-general"]
        if mine and mine[0].info.status == "RUNNING":
            stage_run = mine[0]
            break
        assert _flow_run(doomed.id).state.type.value in ("PENDING", "RUNNING"), _flow_run(doomed.id).state
        time.sleep(0.3)
    assert stage_run is not None, f"worker-a never started the stage; see {cluster.logs}"
    _kill_tree(cluster.workers[a].pid, signal.SIGKILL)  # the worker and its flow run's process, like a machine that died
    cluster.workers[a].wait(timeout=30)
    killed = time.monotonic()
    assert client.get_run(stage_run.info.run_id).info.status == "RUNNING", "killed in the middle of the stage, not after it"
    steps = [m.step for m in client.get_metric_history(stage_run.info.run_id, "loss")]
    crashed = _wait_state(doomed.id, lambda s: s.is_final(), 300, "CRASHED")
    assert crashed.state.is_crashed(), crashed.state
    print(f"\n[{cluster.store}] worker-a killed with {len(steps)} of {STEPS} steps logged; Prefect: {crashed.state.name} "
          f"after {time.monotonic() - killed:.0f} s ({crashed.state.message})")

    again = _finish(_start_on(cluster, b, SLOW))
    assert again.state.is_completed(), f"{again.state}; see {cluster.logs}"
    key = stage_run.data.tags["trlm.stage_key"]
    same_key = sorted((r for r in _stage_runs(observer) if r.data.tags.get("trlm.stage_key") == key), key=lambda r: r.info.start_time)
    _print_table(cluster, "the killed stage and its rerun", [_row(cluster, r) for r in same_key])
    assert [r.info.run_id for r in same_key][0] == stage_run.info.run_id and len(same_key) == 2
    dead, finished = same_key
    assert dead.info.status == "KILLED", f"the killed worker's run is {dead.info.status}"
    if cluster.separate_hosts:  # another machine's process cannot be checked: Prefect's CRASHED state closed it
        assert "Crashed" in dead.data.tags["trlm.error"] and str(doomed.id) in dead.data.tags["trlm.error"], dead.data.tags["trlm.error"]
    assert (_ran_on(cluster, dead), _ran_on(cluster, finished)) == (a, b)
    assert finished.info.status == "FINISHED" and finished.data.tags["prefect.flow_run_id"] == str(again.id)
    assert sorted(m.step for m in client.get_metric_history(finished.info.run_id, "loss")) == list(range(1, STEPS + 1))
    parent = [r for r in client.search_runs([observer.experiment_id], max_results=1000)
              if r.data.tags.get("trlm.kind") == "pipeline" and r.data.tags.get("prefect.flow_run_id") == str(doomed.id)]
    assert [r.info.status for r in parent] == ["KILLED"], "the dead flow run's pipeline run is closed too"
    print(f"[{cluster.store}] scenario 2 (kill, crash, rerun on B): {time.monotonic() - t0:.0f} s")
