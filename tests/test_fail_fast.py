"""A server that does not answer is one clear line within seconds, never minutes of retries, and never
shows a credential (issue: a stopped MLflow server took 255 s and 142 lines of stderr to fail)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

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
