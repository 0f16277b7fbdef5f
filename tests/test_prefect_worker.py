"""The pipeline as a service: a real Prefect server on 127.0.0.1, the deployments of `prefect.yaml`
registered on a process work pool, and a worker that executes them (tiny model, a few minutes).

What a user relies on: a manual run with `from_stage` runs the right stages and finds the
rest cached; the nightly cron has its next runs scheduled; a schedule that fires within a minute is
executed by the worker; a cancelled run stops its stage and the next run resumes the stage's run.

The stores here: SQLite (Prefect's database, the recipe's MLflow store in the work dir). The same
deployments on PostgreSQL (the Prefect server on asyncpg, the MLflow server's store on the database),
the pipeline and a manual `only=dpo` run included, are tests/test_two_workers.py's `postgres` half:
running them here again cost the suite about 8 minutes for no path that test does not take.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_pipeline import write_tiny_recipe
from trlm.prefect_db import seed_prefect_database

REPO = Path(__file__).resolve().parents[1]
POOL = "trlm-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir, shared_data):
    """Prefect server + work pool + deployments from prefect.yaml + one worker, all on loopback;
    Prefect's database and the recipe's MLflow store both SQLite."""
    root = tmp_path_factory.mktemp("service")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_PORT": str(port), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5", "TRLM_SRC_DIR": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    logs = root / "logs"
    logs.mkdir()
    seed_prefect_database(root / "prefect" / "prefect.db")  # migrated once per suite, not per server
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        _wait_for(f"{api}/health", 120)
        recipe = write_tiny_recipe(root, tiny_model_dir, shared_data)
        deployments = _deployments_file(root, recipe)
        for cmd in (["work-pool", "create", POOL, "--type", "process"], ["deploy", "--all", "--no-prompt", "--prefect-file", str(deployments)]):
            done = subprocess.run([sys.executable, "-m", "prefect", *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout + done.stderr
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "1"], cwd=root, env=env,
                                  stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        # The tests' own client calls go to this server. A setting, not only the environment: an
        # earlier test module's Prefect test harness leaves its settings loaded in this process.
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            yield {"api": api, "recipe": recipe, "logs": logs, "env": env}
    finally:
        for proc in (worker, server):
            if proc is not None:
                _stop(proc)


def _deployments_file(root: Path, recipe: Path) -> Path:
    """The shipped prefect.yaml, pointed at the test's pool and tiny recipe, plus one deployment
    whose schedule fires every minute (running only data-prep, which is cached by then). That
    schedule starts inactive: the schedule test turns it on for one run (else every minute of the
    module costs the worker a flow run's process, and the other tests their turn on the worker)."""
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for dep in doc["deployments"]:
        dep["work_pool"]["name"] = POOL
        dep["parameters"]["recipe"] = str(recipe)
    soon = {**doc["deployments"][0], "name": "trlm-every-minute", "parameters": {"recipe": str(recipe), "overrides": [], "only": "data-prep"},
            "schedules": [{"cron": "* * * * *", "timezone": "UTC", "active": False}]}
    doc["deployments"].append(soon)
    path = root / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(name: str, parameters: dict, timeout_s: float = 420):
    from prefect.deployments import run_deployment

    return run_deployment(f"trlm-pipeline/{name}", parameters=parameters, timeout=timeout_s)


def _stage_runs(recipe: Path) -> list:
    from trlm.stages.registry import load_recipe
    from trlm.runs.tracking import TAG_KIND, setup_tracking

    tracker = setup_tracking(load_recipe(str(recipe), check_files=False))
    return [r for r in tracker.client.search_runs([tracker.experiment_id], max_results=500) if r.data.tags.get(TAG_KIND) == "stage"]


def _count(runs, stage: str) -> int:
    return sum(1 for r in runs if r.data.tags.get("trlm.stage") == stage)


def test_the_worker_runs_the_manual_deployment_with_stage_parameters(service):
    first = _run("trlm-manual", {})
    assert first.state.is_completed(), first.state
    before = _stage_runs(service["recipe"])
    assert {_count(before, s) for s in ("data-prep", "sft-general", "sft-think", "dpo", "eval")} == {1}

    # `only` alone (a manual only=dpo on another worker) is tests/test_two_workers.py's first scenario.
    tail = _run("trlm-manual", {"from_stage": "sft-think", "overrides": ["dpo.beta=0.3"]})
    assert tail.state.is_completed(), tail.state
    last = _stage_runs(service["recipe"])
    assert (_count(last, "sft-think"), _count(last, "dpo"), _count(last, "eval")) == (1, 2, 2), "sft-think cached, dpo and eval reran"


def test_two_runs_started_together_do_not_clobber_each_other(service):
    """Both runs finish; the stage they share runs once (the other finds it cached) and is complete."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    params = {"only": "dpo", "overrides": ["dpo.beta=0.5"]}
    before = _count(_stage_runs(service["recipe"]), "dpo")
    started = [run_deployment("trlm-pipeline/trlm-manual", parameters=params, timeout=0) for _ in range(2)]

    async def final_states():
        async with get_client() as client:
            for _ in range(600):
                states = [(await client.read_flow_run(r.id)).state for r in started]
                if all(s.is_final() for s in states):
                    return states
                await asyncio.sleep(1)
            return states

    assert all(s.is_completed() for s in asyncio.run(final_states()))
    dpo = [r for r in _stage_runs(service["recipe"]) if r.data.tags.get("trlm.stage") == "dpo"]
    assert len(dpo) == before + 1 and all(r.info.status == "FINISHED" for r in dpo)
    from trlm.artifacts import verify_fingerprint
    from trlm.runs.tracking import setup_tracking
    from trlm.stages.registry import load_recipe

    tracker = setup_tracking(load_recipe(str(service["recipe"]), check_files=False))
    assert verify_fingerprint(tracker.local_artifact_dir(max(dpo, key=lambda r: r.info.start_time)) / "output")


def test_schedules_are_created_and_one_fires_on_the_worker(service):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

    async def runs_of(name: str, states: list[str]):
        async with get_client() as client:
            dep = await client.read_deployment_by_name(f"trlm-pipeline/{name}")
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))))

    async def set_active(name: str, active: bool) -> None:
        async with get_client() as client:
            dep = await client.read_deployment_by_name(f"trlm-pipeline/{name}")
            for schedule in await client.read_deployment_schedules(dep.id):
                await client.update_deployment_schedule(dep.id, schedule.id, active=active)

    deadline = time.time() + 60
    while time.time() < deadline and not (nightly := asyncio.run(runs_of("trlm-nightly", ["SCHEDULED"]))):
        time.sleep(2)
    assert nightly and all(r.expected_start_time.hour == 2 and r.expected_start_time.minute == 0 for r in nightly)

    assert not asyncio.run(runs_of("trlm-every-minute", ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"])), "an inactive schedule fired"
    asyncio.run(set_active("trlm-every-minute", True))
    deadline = time.time() + 240
    while time.time() < deadline and not (fired := asyncio.run(runs_of("trlm-every-minute", ["COMPLETED"]))):
        time.sleep(3)
    asyncio.run(set_active("trlm-every-minute", False))  # the worker is free again for the next test
    assert fired, f"no scheduled run completed on the worker; see {service['logs']}"


def test_a_cancelled_run_stops_its_stage_and_the_next_run_resumes_it(service):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    steps = 50  # the cancel lands within seconds of the first checkpoint (step 5: about step 12 on the 2-core CPU), well before the last
    slow = {"only": "sft-general", "overrides": [f"sft_general.train.max_steps={steps}", "sft_general.train.save_steps=5"]}
    flow_run = run_deployment("trlm-pipeline/trlm-manual", parameters=slow, timeout=0)
    artifacts = Path(yaml.safe_load(service["recipe"].read_text())["work_dir"]) / "mlartifacts"
    deadline = time.time() + 300
    # mlartifacts/<experiment>/<run>/artifacts/output/... (relative artifact locations)
    while time.time() < deadline and not list(artifacts.glob("*/*/artifacts/output/checkpoints/step-*/COMPLETE")):
        time.sleep(0.5)
    assert list(artifacts.glob("*/*/artifacts/output/checkpoints/step-*/COMPLETE")), "the stage never saved a checkpoint"

    async def cancel_and_wait():
        async with get_client() as client:
            await client.set_flow_run_state(flow_run.id, Cancelling())
            for _ in range(120):
                state = (await client.read_flow_run(flow_run.id)).state
                if state.is_final():
                    return state
                await asyncio.sleep(1)
            return state

    assert asyncio.run(cancel_and_wait()).is_cancelled()
    interrupted = [r for r in _stage_runs(service["recipe"]) if r.data.tags.get("trlm.stage") == "sft-general" and r.info.status != "FINISHED"]
    assert len(interrupted) == 1, "the cancelled stage left one unfinished run with its checkpoints"
    from trlm.runs.tracking import OUTPUT, setup_tracking
    from trlm.stages.registry import load_recipe
    from trlm.training.checkpoints import complete_checkpoints

    tracker = setup_tracking(load_recipe(str(service["recipe"]), check_files=False))
    run_dir = tracker.local_artifact_dir(interrupted[0]) / OUTPUT
    checkpoints = complete_checkpoints(run_dir)
    assert checkpoints, f"no complete checkpoint in {run_dir}: {sorted(p.name for p in (run_dir / 'checkpoints').glob('*'))}"
    newest = int(checkpoints[-1].name.removeprefix("step-"))
    assert 0 < newest < steps and newest % 5 == 0

    again = _run("trlm-manual", slow, timeout_s=900)
    assert again.state.is_completed(), again.state
    finished = [r for r in _stage_runs(service["recipe"]) if r.data.tags.get("trlm.stage") == "sft-general" and r.info.status == "FINISHED"]
    resumed = next((r for r in finished if r.info.run_id == interrupted[0].info.run_id), None)
    assert resumed is not None, "the next run resumed the interrupted stage run"
    assert resumed.data.tags["trlm.resumed_from_step"] == str(newest), "training restarted from the newest checkpoint, not from step 0"
    client = tracker.client
    assert sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "loss")) == list(range(1, steps + 1)), "each step logged once"
