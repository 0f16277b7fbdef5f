"""What a user meets first, as a user meets it: `trlm up`, `trlm run`, the two UIs in a real browser,
`trlm down`, then the finished work dir copied elsewhere and rerun there.

The commands run as subprocesses (a fresh Python each, as from a shell), so Prefect reads its
settings the way it does for a user. The browser is Debian's Chromium driven by Playwright; CI
installs it (`.ci/run`). One pair of servers serves the whole module, in file order.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from test_pipeline import write_tiny_recipe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("no Chromium here (CI installs Debian's chromium: .ci/run)", allow_module_level=True)
TRLM = [sys.executable, "-m", "trlm.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def user(tmp_path_factory, tiny_model_dir, shared_data):
    """A user's shell: the tiny recipe (no tracking URI: the work dir's own store), a clean
    environment, and a stand-in for the global ~/.prefect that nothing may write."""
    root = tmp_path_factory.mktemp("user")
    recipe = write_tiny_recipe(root, tiny_model_dir, shared_data)
    doc = yaml.safe_load(recipe.read_text())
    doc.pop("tracking_uri")
    doc["eval"].pop("models", None)  # every model of the pipeline: the report's width as users see it (five columns)
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(HOME=str(root / "user-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    ports = {"prefect": _free_port(), "mlflow": _free_port()}
    return {"root": root, "recipe": str(recipe), "work": Path(doc["work_dir"]), "env": env, "ports": ports}


def trlm(user, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([*TRLM, *args, "--recipe", user["recipe"]], env=env or user["env"], capture_output=True, text=True, timeout=timeout)
    result.output = result.stdout + result.stderr
    return result


def _api(port: int, path: str, body: dict | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api{path}", data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def servers(user):
    p = user["ports"]
    try:
        up = trlm(user, "up", "--prefect-port", str(p["prefect"]), "--mlflow-port", str(p["mlflow"]), timeout=300)
        assert up.returncode == 0, up.output
        yield up
    finally:
        trlm(user, "down", timeout=120)  # a no-op when the test below has stopped them


@pytest.fixture(scope="module")
def run(user, servers):
    result = trlm(user, "run")
    assert result.returncode == 0, result.output[-4000:]
    return result


def test_trlm_up_keeps_its_servers_state_in_the_work_dir(user, servers):
    p = user["ports"]
    with urllib.request.urlopen(f"http://127.0.0.1:{p['prefect']}/ui-settings", timeout=10) as response:
        assert json.loads(response.read())["api_url"] == f"http://127.0.0.1:{p['prefect']}/api"  # the UI calls its own API
    assert (user["work"] / "prefect" / "prefect.db").is_file()
    assert f"runs:     http://127.0.0.1:{p['mlflow']}/#/experiments/" in servers.stdout


def test_trlm_run_reports_to_the_server_trlm_up_started(user, run):
    p = user["ports"]
    assert "temporary server" not in run.output.lower()
    assert f"reports to http://127.0.0.1:{p['prefect']} (the server `trlm up` started for this work dir)" in run.output
    flow_runs = _api(p["prefect"], "/flow_runs/filter")
    assert [r["state_type"] for r in flow_runs] == ["COMPLETED"]
    assert not (user["root"] / "user-home" / ".prefect" / "prefect.db").exists(), "nothing in the user's global Prefect database"
    # MLflow through the server: artifacts as `mlflow-artifacts:` URIs, the bytes in this work dir.
    from mlflow import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{p['mlflow']}")
    runs = client.search_runs([client.get_experiment_by_name("trlm").experiment_id])
    assert runs and all(r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in runs)
    dpo = next(r for r in runs if r.data.tags.get("trlm.stage") == "dpo")
    assert dpo.inputs.dataset_inputs and {d.dataset.name for d in dpo.inputs.dataset_inputs} == {"data", "model"}
    assert dpo.outputs.model_outputs, "the DPO model is a LoggedModel of its run"
    assert any(k.startswith("system/") for k in dpo.data.metrics), "system metrics"
    grpo = next(r for r in runs if r.data.tags.get("trlm.stage") == "grpo")  # the pipeline's last training stage
    assert client.get_model_version_by_alias("tiny", "candidate").run_id == grpo.info.run_id
    # GRPO's sample completions: an MLflow table fetched through the server
    table = json.loads(Path(client.download_artifacts(grpo.info.run_id, "tables/samples-step-1.json", str(user["root"]))).read_text())
    assert table["columns"][:5] == ["step", "prompt", "completion", "reward", "advantage"] and table["data"]
    assert "model registry: tiny@candidate is version 1 (moved there: evaluated by eval)" in run.output


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = chromium.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        yield page
        chromium.close()


def test_the_prefect_ui_shows_the_run_its_tasks_and_artifacts(user, run, browser, tmp_path_factory):
    p = user["ports"]
    flow_run = _api(p["prefect"], "/flow_runs/filter")[0]
    browser.goto(f"http://127.0.0.1:{p['prefect']}/runs/flow-run/{flow_run['id']}")
    browser.get_by_text(flow_run["name"]).first.wait_for()
    browser.get_by_text("Task Runs", exact=True).click()
    for task in ("data-prep-", "sft-general-", "sft-think-", "dpo-", "eval-"):
        browser.get_by_role("link", name=task).first.wait_for()
    browser.get_by_text("Artifacts", exact=True).click()
    browser.get_by_text("dpo-summary").first.wait_for()
    shots = tmp_path_factory.getbasetemp()
    browser.screenshot(path=str(shots / "prefect-flow-run.png"), full_page=True)
    browser.get_by_text("eval-report").first.click()
    browser.get_by_role("table").first.wait_for()
    browser.screenshot(path=str(shots / "prefect-report.png"), full_page=True)
    widest = browser.evaluate("Math.max(...[...document.querySelectorAll('table')].map(t => t.getBoundingClientRect().right))")
    overflow = browser.evaluate("[...document.querySelectorAll('table')].some(t => t.parentElement.scrollWidth > t.parentElement.clientWidth + 1)")
    assert widest <= 1280 and not overflow, "the report table fits the pane of a 1,280 px window"


def test_the_mlflow_link_shows_the_pipeline_its_stages_a_chart_and_the_candidate(user, run, browser, tmp_path_factory):
    p = user["ports"]
    flow_run = _api(p["prefect"], "/flow_runs/filter")[0]
    artifacts = _api(p["prefect"], "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    link = next(a["data"] for a in artifacts if a["key"] == "dpo-mlflow").split("](")[1].rstrip(")")  # [text](url)
    assert link.startswith(f"http://127.0.0.1:{p['mlflow']}/#/experiments/")
    browser.goto(link)
    browser.get_by_text("Model training", exact=True).first.wait_for()  # a training run, not a GenAI evaluation run
    browser.get_by_text("Model metrics", exact=True).click()
    browser.locator("svg.main-svg").first.wait_for()  # the per-step metric charts
    browser.get_by_text("accuracies", exact=True).first.wait_for()
    shots = tmp_path_factory.getbasetemp()
    browser.screenshot(path=str(shots / "mlflow-dpo-run.png"), full_page=True)
    experiment = link.split("/#/experiments/")[1].split("/")[0]
    browser.goto(f"http://127.0.0.1:{p['mlflow']}/#/experiments/{experiment}/runs?workflowType=machine_learning")
    pipeline_row = browser.locator("[role=row]", has_text="pipeline-tiny-").first
    pipeline_row.locator("button").first.click()  # expand the pipeline run: its stage runs
    for stage in ("data-prep-", "sft-general-", "sft-think-", "dpo-", "eval-"):
        browser.get_by_text(stage, exact=False).first.wait_for()
    browser.screenshot(path=str(shots / "mlflow-runs.png"), full_page=True)
    browser.goto(f"http://127.0.0.1:{p['mlflow']}/#/models/tiny?workflowType=machine_learning")
    browser.get_by_text("candidate").first.wait_for()  # the alias, shown as "@ candidate"
    browser.screenshot(path=str(shots / "mlflow-registry.png"), full_page=True)


def test_trlm_down_leaves_nothing_running(user, run):
    down = trlm(user, "down", timeout=120)
    assert down.returncode == 0, down.output
    assert "stopped prefect" in down.output and "stopped mlflow" in down.output
    work = str(user["work"])
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if any(work in a or str(port) in a
            for a in (p.info["cmdline"] or []) for port in user["ports"].values())]
    assert left == []
    for port in user["ports"].values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(root)): (f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob("*") if f.is_file()}


def test_a_copied_work_dir_is_its_own(user, run):
    """Copied elsewhere, a finished work dir reads and writes only itself, and a forced data-prep
    under other offline switches reproduces its data bit for bit."""
    original = user["work"]
    trlm(user, "down", timeout=120)
    copy = user["root"] / "moved" / "home"
    shutil.copytree(original, copy, symlinks=True)
    before = _snapshot(original)
    doc = yaml.safe_load(Path(user["recipe"]).read_text())
    doc["work_dir"] = str(copy)
    recipe = copy.parent / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    moved = {**user, "recipe": str(recipe)}
    status = trlm(moved, "status", "--json")
    assert status.returncode == 0, status.output
    assert {s["state"] for s in json.loads(status.stdout)["stages"]} == {"done"}
    cached = trlm(moved, "run")
    assert cached.returncode == 0 and "nothing to do" in cached.output, cached.output[-3000:]
    forced = trlm(moved, "run", "--only", "data-prep", "--force", "data-prep", env={**user["env"], "HF_HUB_OFFLINE": "1"})
    assert forced.returncode == 0, forced.output[-3000:]
    assert "forced data-prep: reproduces the previous run" in forced.output
    assert _snapshot(original) == before, "the copy wrote into the original work dir"
    after = trlm(moved, "status", "--json")
    assert {s["state"] for s in json.loads(after.stdout)["stages"]} == {"done"}, "downstream stays cached"
