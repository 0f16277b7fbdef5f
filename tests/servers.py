"""Real servers on 127.0.0.1 for tests: an MLflow tracking server that serves artifacts (its
destination a local directory or an S3 bucket) and moto's S3 server.

Each runs as the leader of its own process group on a free port, with a bounded start-up (a server
that exits or does not answer in time fails the test with the end of its log), and is stopped with
its children (uvicorn workers) afterwards. Nothing here listens on anything but loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
BIN = Path(sys.executable).parent
# Dummy credentials: moto accepts any; they must never be real ones.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _quiet_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK})
    return env | extra


@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    log: Path
    health: str = "/health"
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 120.0) -> "Server":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "Server":
        """Start the process (the leader of a new session) without waiting: servers start side by side."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()
        return self

    def wait_ready(self, timeout: float = 120.0) -> "Server":
        """Until `health` answers 200, counted from `launch`; stopped, with its log in the error, if not."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer on {self.url} within {timeout:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it if it lingers; wait until the port is free."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # uvicorn's worker may outlive the parent by a moment
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _port_open(self.port):
            time.sleep(0.1)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((LOOPBACK, port)) == 0


def mlflow_server(root: Path, destination: str, env: dict[str, str] | None = None, port: int | None = None) -> Server:
    """`mlflow server --serve-artifacts --artifacts-destination DESTINATION` on a SQLite store in
    `root`, one worker and no job runner (2-core CI). Clients get `mlflow-artifacts:` URIs and
    send every byte through this server: they need its URL and nothing else."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", destination, "--host", LOOPBACK, "--port", str(port), "--workers", "1"]
    server_env = _quiet_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
    return Server("mlflow server", cmd, server_env, port, root / "mlflow-server.log")


def moto_s3_server(root: Path) -> Server:
    """moto's S3 emulator in server mode (its own process: the objects it holds stay out of pytest)."""
    port = free_port()
    cmd = [str(BIN / "moto_server"), "-H", LOOPBACK, "-p", str(port)]
    return Server("moto S3 server", cmd, _quiet_env(S3_CREDENTIALS), port, root / "moto.log", health="/moto-api/")


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"])
    s3.create_bucket(Bucket=bucket)


def s3_objects(endpoint: str, bucket: str) -> dict[str, int]:
    """Key -> size of every object in the bucket."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"])
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out |= {o["Key"]: o["Size"] for o in page.get("Contents", [])}
    return out


def mlflow_on_s3(root: Path, moto: Server, bucket: str = "trlm-artifacts", prefix: str = "mlflow") -> Server:
    """An MLflow server whose artifact destination is `s3://bucket/prefix` on the (running) moto
    server, which gets the bucket. Only the server has the endpoint and the (dummy) credentials."""
    create_bucket(moto.url, bucket)
    env = {"MLFLOW_S3_ENDPOINT_URL": moto.url, **S3_CREDENTIALS}
    return mlflow_server(root, f"s3://{bucket}/{prefix}", env)


def count_downloads(monkeypatch) -> list[str]:
    """Record every artifact download MLflow is asked for (the call `Tracker.resolve` downloads with)."""
    import mlflow

    real, calls = mlflow.artifacts.download_artifacts, []

    def counting(*args, **kwargs):
        if kwargs.get("artifact_uri"):  # not the upload check's read-back of fingerprint.json (by run_id and path)
            calls.append(kwargs["artifact_uri"])
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counting)
    return calls
