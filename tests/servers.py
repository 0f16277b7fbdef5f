"""Real servers on 127.0.0.1 for tests: an MLflow tracking server that serves artifacts (its
destination a local directory or an S3 bucket, its store SQLite or PostgreSQL), moto's S3 server
and a throwaway PostgreSQL cluster (Debian's `postgresql` package; .ci/run installs it).

Each runs as the leader of its own process group on a free port, with a bounded start-up (a server
that exits or does not answer in time fails the test with the end of its log), and is stopped with
its children (uvicorn workers) afterwards. Nothing here listens on anything but loopback.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


def mlflow_server(root: Path, destination: str, env: dict[str, str] | None = None, port: int | None = None,
                  backend: str | None = None, workers: int = 1) -> Server:
    """`mlflow server --serve-artifacts --artifacts-destination DESTINATION` on `backend` (default: a
    SQLite store in `root`), one worker and no job runner (2-core CI). Clients get `mlflow-artifacts:`
    URIs and send every byte through this server: they need its URL and nothing else."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend or f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", destination, "--host", LOOPBACK, "--port", str(port), "--workers", str(workers)]
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


# --- PostgreSQL -------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The newest of Debian's /usr/lib/postgresql/<version>/bin (initdb and pg_ctl are not on PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3].split(".")[0]))
    return Path(found[-1]).parent if found else None


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust authentication, user `trlm`), its data dir,
    socket and log in one temporary folder. PostgreSQL refuses to run as root, so as root the
    cluster runs as the `postgres` system user, and the folder (outside pytest's root-only
    tmp dir, which that user cannot enter) is given to it."""

    bin: Path
    root: Path
    port: int
    user: str = "trlm"
    created: int = 0

    @classmethod
    def start(cls, timeout: float = 60.0) -> "Postgres":
        pg_bin = postgres_bin()
        if pg_bin is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does it)")
        pg = cls(pg_bin, Path(tempfile.mkdtemp(prefix="trlm-pg-")), free_port())
        if os.geteuid() == 0:
            shutil.chown(pg.root, "postgres")
        try:
            pg._as_owner("initdb", "-D", str(pg.data), "-A", "trust", "-U", pg.user, "-E", "UTF8", "--no-sync", timeout=timeout)
            # fsync off: a test cluster need not survive a power cut, and the shared CI disk is slow.
            opts = f"-p {pg.port} -k {pg.root} -c listen_addresses={LOOPBACK} -c fsync=off -c max_connections=200"
            pg._as_owner("pg_ctl", "-D", str(pg.data), "-o", opts, "-l", str(pg.log), "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            pg.stop()
            raise RuntimeError(f"PostgreSQL did not start on {LOOPBACK}:{pg.port}: {exc}\n{pg.tail()}") from None
        return pg

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def _as_owner(self, tool: str, *args: str, timeout: float) -> str:
        cmd = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
        return done.stdout

    def database(self, name: str) -> str:
        """A new, empty database (each server gets its own, so no test sees another's rows)."""
        self.created += 1
        name = f"{name}_{self.created}"
        self._as_owner("createdb", "-h", LOOPBACK, "-p", str(self.port), "-U", self.user, name, timeout=30)
        return name

    def url(self, database: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@{LOOPBACK}:{self.port}/{database}"

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._as_owner("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop", timeout=40)
        except (RuntimeError, subprocess.TimeoutExpired):
            self._as_owner("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop", timeout=20)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""
