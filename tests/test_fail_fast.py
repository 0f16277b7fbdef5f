"""A server that does not answer is one clear line within seconds, never minutes of retries, and never
shows a credential (issue: a stopped MLflow server took 255 s and 142 lines of stderr to fail)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Generous for a loaded CI machine: the command itself needs ~10 s to import torch and the stages.
LIMIT_S = 45


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _trlm(tmp_path, *args, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "trlm.cli", *args], env={**base, "TRLM_HOME": str(tmp_path / "home"), **env},
                         capture_output=True, text=True, timeout=300)
    return out, time.time() - t0, [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("command", ["status", "run"])
def test_a_stopped_tracking_server_is_one_line_without_the_password(tmp_path, command):
    port = _closed_port()
    out, took, lines = _trlm(tmp_path, command, "--tracking-uri", f"http://alice:s3cr3tPW@127.0.0.1:{port}")
    assert out.returncode == 2 and took < LIMIT_S, (took, lines)
    assert lines == [f"error: the MLflow tracking server http://alice:***@127.0.0.1:{port} does not answer (ConnectionError): "
                     "start it, or check --tracking-uri / MLFLOW_TRACKING_URI"]
    assert "s3cr3tPW" not in out.stdout + out.stderr


def test_a_stopped_prefect_server_is_one_line(tmp_path):
    port = _closed_port()
    out, took, lines = _trlm(tmp_path, "run", PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    assert out.returncode == 2 and took < LIMIT_S, (took, lines)
    assert lines == [f"error: the Prefect server http://127.0.0.1:{port}/api does not answer (ConnectionError): "
                     "start it (`trlm up`), or check PREFECT_API_URL"]


@pytest.fixture()
def health_only_server():
    """A tracking server that passes the health check, then fails every API call (503): MLflow's own
    errors then carry the tracking URI, credentials and all."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path.endswith("/health") else 503)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.parametrize("command", ["status", "run"])
def test_mlflow_errors_never_show_the_password(tmp_path, health_only_server, command):
    uri = f"http://alice:s3cr3tPW@127.0.0.1:{health_only_server}"
    out, took, lines = _trlm(tmp_path, command, "--tracking-uri", uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    assert out.returncode != 0 and took < LIMIT_S, (took, lines)
    assert f"API request to http://alice:***@127.0.0.1:{health_only_server}/api/" in out.stderr
    assert "s3cr3tPW" not in out.stdout + out.stderr
    logs = [p for p in (tmp_path / "home").rglob("*") if p.is_file() and p.suffix in (".log", ".txt", ".json")]
    assert not [p for p in logs if "s3cr3tPW" in p.read_text(errors="replace")]


def test_run_logs_and_console_mask_credentials(tmp_path):
    """Every log record (message and traceback) and every line printed, after `mask_output`."""
    script = f"""
import logging, sys
from pathlib import Path
from trlm.process_setup import mask_output, route_tracebacks
mask_output()
logging.basicConfig(level=logging.INFO)
log_file = route_tracebacks(Path({str(tmp_path)!r}), verbose=True)
uri = "http://alice:s3cr3tPW@127.0.0.1:9/api"
try:
    raise ConnectionError("API request to %s failed" % uri)
except ConnectionError:
    logging.getLogger("mlflow.utils.rest_utils").exception("request to %s", uri)
print("View run at:", uri)
print(log_file)
raise RuntimeError(uri)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    log_file = Path(out.stdout.strip().splitlines()[-1])
    text = log_file.read_text()
    assert "request to http://alice:***@127.0.0.1:9/api" in text and "ConnectionError: API request to http://alice:***@" in text
    assert "View run at: http://alice:***@127.0.0.1:9/api" in out.stdout
    assert "RuntimeError: http://alice:***@" in out.stderr and "ConnectionError: API request to http://alice:***@" in out.stderr
    assert "s3cr3tPW" not in out.stdout + out.stderr + text


def test_library_chatter_stays_off_the_console():
    """A run's console carries our lines and warnings, not a line per checkpoint file accelerate
    saves nor MLflow's own INFO lines (its loggers are configured when it is imported)."""
    script = """
import logging
from trlm.process_setup import quiet_environment
from trlm.stages.registry import load_recipe
quiet_environment(load_recipe("offline-smoke", check_files=False))
import accelerate.checkpointing, mlflow.system_metrics.system_metrics_monitor
logging.getLogger("accelerate.checkpointing").info("Scheduler state saved in /x/scheduler.bin")
logging.getLogger("mlflow.system_metrics.system_metrics_monitor").info("Started monitoring system metrics.")
logging.getLogger("accelerate.checkpointing").warning("a warning still shows")
logging.getLogger("trlm.stage").info("our own line")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "a warning still shows" in done.stderr and "our own line" in done.stderr
    assert "Scheduler state saved" not in done.stderr and "Started monitoring" not in done.stderr
