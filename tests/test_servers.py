"""`trlm down` kills only the servers `trlm up` started; `trlm up` never overwrites a running server's
pid file; printed tracking URIs never show credentials."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from types import SimpleNamespace

import psutil
import pytest
from typer.testing import CliRunner

from trlm.cli import _where_to_look, app
from trlm.servers import record_server, recorded_process


@pytest.fixture
def servers_dir(tmp_path, monkeypatch):
    """A work dir; the commands get a stand-in recipe (what `up`/`down` read of it: paths, store URI)."""
    home = tmp_path / "home"
    recipe = SimpleNamespace(name="offline-smoke", work_path=home, experiment="trlm", resolved_tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.setattr("trlm.cli._load", lambda *args, **kwargs: (recipe, []))
    d = home / "servers"
    d.mkdir(parents=True)
    return d


@pytest.fixture
def bystander():
    """An unrelated process that a careless `down` would kill (its own process group, like a server)."""
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def _alive(proc: subprocess.Popen) -> bool:
    time.sleep(0.3)
    return proc.poll() is None


def test_down_does_not_kill_an_unrelated_process_behind_a_pid_file(servers_dir, bystander):
    (servers_dir / "prefect.pid").write_text(str(bystander.pid))  # a bare pid (older `up`, or a reused number)
    rec = record_server(servers_dir / "mlflow.pid", bystander.pid, ["sleep", "30"])
    (servers_dir / "mlflow.pid").write_text(json.dumps({**rec, "create_time": rec["create_time"] - 100}))  # same pid, other process
    other = record_server(servers_dir / "other.pid", bystander.pid, ["mlflow", "server", "--port", "5000"])  # same pid and start, other command
    assert other["pid"] == bystander.pid
    result = CliRunner().invoke(app, ["down"])
    assert result.exit_code == 0, result.output
    assert _alive(bystander)
    assert "cannot be verified" in result.output and "different process" in result.output and "different command" in result.output
    assert list(servers_dir.glob("*.pid")) == []  # stale pid files are removed


def test_down_stops_the_recorded_server(servers_dir, bystander):
    record_server(servers_dir / "prefect.pid", bystander.pid, ["sleep", "30"], port=4200)
    proc, why = recorded_process(servers_dir / "prefect.pid")
    assert proc is not None and proc.pid == bystander.pid, why
    result = CliRunner().invoke(app, ["down"])
    assert result.exit_code == 0 and "stopped prefect" in result.output, result.output
    bystander.wait(timeout=10)
    assert not (servers_dir / "prefect.pid").exists()


def test_a_second_up_refuses_while_a_server_runs(servers_dir, bystander):
    record_server(servers_dir / "mlflow.pid", bystander.pid, ["sleep", "30"], port=5000)
    before = (servers_dir / "mlflow.pid").read_text()
    children = set(psutil.Process().children(recursive=True))
    result = CliRunner().invoke(app, ["up"])
    assert result.exit_code == 2 and "still running" in result.output and "trlm down" in result.output
    assert (servers_dir / "mlflow.pid").read_text() == before and not (servers_dir / "prefect.pid").exists()
    assert set(psutil.Process().children(recursive=True)) == children  # nothing was started


def test_up_refuses_ports_in_use(servers_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(app, ["up", "--prefect-port", str(port), "--mlflow-port", str(port)])
    assert result.exit_code == 2 and f"port {port}" in result.output
    assert list(servers_dir.glob("*.pid")) == []


def test_where_to_look_masks_credentials(capsys, tmp_path):
    r = SimpleNamespace(name="offline-smoke", resolved_tracking_uri="https://alice:tok3n@mlflow.example.com?token=abc", work_path=tmp_path)
    _where_to_look(r)
    out = capsys.readouterr().out
    assert "tok3n" not in out and "abc" not in out and "alice" not in out and "MLflow UI:  https://mlflow.example.com" in out
    r = SimpleNamespace(name="offline-smoke", resolved_tracking_uri="postgresql://alice:tok3n@db.example.com/mlflow", work_path=tmp_path)
    _where_to_look(r)
    out = capsys.readouterr().out
    assert "tok3n" not in out and "postgresql://alice:***@db.example.com/mlflow" in out


@pytest.mark.parametrize("flags,limit,sample", [
    (["--limit", "5"], 5, None),  # lm-eval's --limit: the first 5 items
    (["--sample", "5"], None, 5),  # a seeded subset of 5
    ([], None, 7),  # neither: the recipe's own choice stays
])
def test_eval_limit_and_sample_flags(monkeypatch, tmp_path, flags, limit, sample):
    from trlm.eval.config import EvalConfig

    recipe = SimpleNamespace(name="x", eval=EvalConfig(sample=7), data_path=tmp_path, work_path=tmp_path)
    monkeypatch.setattr("trlm.cli._load", lambda *args, **kwargs: (recipe, []))
    monkeypatch.setattr("trlm.cli.quiet_environment", lambda r: None)
    seen = {}

    def fake_evaluate_checkpoint(model, cfg, **kwargs):
        seen["cfg"] = cfg
        return {"results": {}}

    monkeypatch.setattr("trlm.eval.harness.evaluate_checkpoint", fake_evaluate_checkpoint)
    result = CliRunner().invoke(app, ["eval", "--model", "m", *flags])
    assert result.exit_code == 0, result.output
    assert (seen["cfg"].limit, seen["cfg"].sample) == (limit, sample)


def test_eval_refuses_limit_and_sample_together(monkeypatch, tmp_path):
    from trlm.eval.config import EvalConfig

    recipe = SimpleNamespace(name="x", eval=EvalConfig(), data_path=tmp_path, work_path=tmp_path)
    monkeypatch.setattr("trlm.cli._load", lambda *args, **kwargs: (recipe, []))
    monkeypatch.setattr("trlm.cli.quiet_environment", lambda r: None)
    result = CliRunner().invoke(app, ["eval", "--model", "m", "--limit", "3", "--sample", "3"])
    assert result.exit_code == 2 and "not both" in result.output


EPHEMERAL_PROBE = """
import subprocess, sys
import httpx
from prefect.server.api.server import SubprocessASGIServer
from trlm.servers import start_temporary_prefect

original_start, original_command, calls = SubprocessASGIServer.start, SubprocessASGIServer._run_uvicorn_command, []

def start(self, timeout=None):
    calls.append(self.port)
    if len(calls) == 1:  # the first start never answers, as on a loaded machine
        self._run_uvicorn_command = lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        return original_start(self, timeout=2)
    return original_start(self, timeout=120)

SubprocessASGIServer.start = start
start_temporary_prefect(sys.argv[1], lambda line: print(line))
server = SubprocessASGIServer()
print("attempts", len(calls), "health", httpx.get(server.api_url + "/health").status_code)
server.stop()
"""


def test_a_temporary_prefect_server_that_times_out_is_started_again(tmp_path):
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # the work dir's own database, as `trlm run` sets it: seeded, so the second start is quick
    env |= {"PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'work' / 'prefect' / 'prefect.db'}"}
    out = subprocess.run([sys.executable, "-c", EPHEMERAL_PROBE, str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-2:] == [
        "note: Prefect's temporary server did not answer in time (attempt 1 of 3); starting it again",
        "attempts 2 health 200",
    ]
    assert (tmp_path / "work" / "prefect" / "prefect.db").is_file(), "the temporary server's database"


def test_other_temporary_server_errors_are_not_retried(monkeypatch, tmp_path):
    from prefect.server.api.server import SubprocessASGIServer

    from trlm.servers import start_temporary_prefect

    calls = []

    def start(self, timeout=None):
        calls.append(timeout)
        raise RuntimeError("Unable to find an available port after multiple attempts")

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(SubprocessASGIServer, "start", start)
    monkeypatch.setattr("prefect.settings.get_current_settings",
                        lambda: SimpleNamespace(api=SimpleNamespace(url=None), server=SimpleNamespace(ephemeral=SimpleNamespace(enabled=True))))
    with pytest.raises(RuntimeError, match="available port"):
        start_temporary_prefect(tmp_path, print)
    assert calls == [None]
