"""The pid files of the servers `trlm up` starts, and how `trlm down` knows a pid is still one of them.

A bare pid is not an identity: once the server has exited, the kernel hands the same number to any
later process, and `trlm down` would kill that one. So `<work_dir>/servers/<name>.pid` records, as
JSON, the pid, the process's start time (psutil's `create_time`: fixed at fork, unchanged by exec)
and a SHA-256 of the arguments it was started with (not the arguments themselves: they could carry
a credential). A pid is "our server" only while all three still match.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import psutil

CREATE_TIME_TOLERANCE_S = 0.05


def _argv_digest(args: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(args)).encode()).hexdigest()


def record_server(pid_file: Path, pid: int, cmd: list[str], *, port: int | None = None) -> dict:
    """Write the identity of a just-started server (its process must still exist)."""
    rec = {
        "pid": pid,
        "create_time": psutil.Process(pid).create_time(),
        # The executable may be a script run through its interpreter (cmdline: python, script, args...),
        # so the arguments after the program are what is compared.
        "args_sha256": _argv_digest(cmd[1:]),
        "n_args": len(cmd) - 1,
        "program": Path(cmd[0]).name,
        "port": port,
    }
    Path(pid_file).write_text(json.dumps(rec))
    return rec


def read_record(pid_file: Path) -> dict | None:
    """The record, or None for a missing, unreadable or pre-JSON (bare pid) file."""
    try:
        rec = json.loads(Path(pid_file).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("pid"), int) else None


def recorded_process(pid_file: Path) -> tuple[psutil.Process | None, str]:
    """The live process the pid file describes, or (None, why not)."""
    rec = read_record(pid_file)
    if rec is None:
        try:
            said = Path(pid_file).read_text().strip()[:20]
        except OSError:
            said = ""
        return None, f"the pid file ({said or 'empty'}) is not a record of this version of `trlm up`, so the process cannot be verified"
    try:
        proc = psutil.Process(rec["pid"])
        create_time, cmdline = proc.create_time(), proc.cmdline()
    except psutil.NoSuchProcess:
        return None, f"process {rec['pid']} has exited"
    except psutil.AccessDenied:
        return None, f"process {rec['pid']} belongs to another user"
    if abs(create_time - float(rec.get("create_time", -1))) > CREATE_TIME_TOLERANCE_S:
        return None, f"pid {rec['pid']} now belongs to a different process (started at another time)"
    n = int(rec.get("n_args", 0))
    if n > len(cmdline) or _argv_digest(cmdline[len(cmdline) - n:]) != rec.get("args_sha256"):
        return None, f"pid {rec['pid']} is running a different command"
    return proc, "running"


def stop_server(pid_file: Path) -> tuple[bool, str]:
    """SIGTERM the server's process group if the pid file still describes it; remove the pid file."""
    proc, why = recorded_process(pid_file)
    try:
        if proc is None:
            return False, why
        pid = proc.pid
        if os.getpgid(pid) != pid:  # `up` starts each server as the leader of a new session
            return False, f"process {pid} is not a process group leader"
        os.killpg(pid, signal.SIGTERM)
        return True, f"pid {pid}"
    except ProcessLookupError:
        return False, "it has exited"
    finally:
        Path(pid_file).unlink(missing_ok=True)


# --- where the running servers are ---------------------------------------------------------------


def live_port(work_dir: Path, name: str) -> int | None:
    """The port of the server `name` ("prefect" / "mlflow") that `trlm up` started for this work dir,
    while that very process still runs; None otherwise. Never a guess at a default port: another
    server there would be someone else's."""
    pid_file = Path(work_dir) / "servers" / f"{name}.pid"
    proc, _ = recorded_process(pid_file)
    rec = read_record(pid_file) if proc is not None else None
    return int(rec["port"]) if rec and rec.get("port") else None


def mlflow_ui_base(tracking_uri: str, work_dir: Path) -> str | None:
    """The MLflow UI that shows this tracking store, for links: `TRLM_MLFLOW_UI` if set, else the
    tracking server itself (credentials stripped), else the server `trlm up` started; None when no
    UI is known (a local store with no server running)."""
    from urllib.parse import urlparse, urlunparse

    if os.environ.get("TRLM_MLFLOW_UI"):
        return os.environ["TRLM_MLFLOW_UI"].rstrip("/")
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https"):
        host = parsed.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parsed.port}" if parsed.port else ""
        return urlunparse((parsed.scheme, netloc, parsed.path.rstrip("/"), "", "", ""))
    port = live_port(work_dir, "mlflow")
    return f"http://127.0.0.1:{port}" if port else None
