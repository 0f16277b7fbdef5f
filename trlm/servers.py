"""The pid files of the servers `trlm up` starts, and how `trlm down` knows a pid is still one of them.

A bare pid is not an identity: once the server has exited, the kernel hands the same number to any
later process, and `trlm down` would kill that one. So `<work_dir>/servers/<name>.pid` records, as
JSON, the pid, the process's start time (psutil's `create_time`: fixed at fork, unchanged by exec)
and a SHA-256 of the arguments it was started with (not the arguments themselves: they could carry
a credential). A pid is "our server" only while all three still match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
from pathlib import Path

import psutil

CREATE_TIME_TOLERANCE_S = 0.05


def _argv_digest(args: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(args)).encode()).hexdigest()


def record_server(pid_file: Path, pid: int, cmd: list[str], *, port: int | None = None, work_dir: Path | None = None) -> dict:
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
        # a copied work dir carries these files: its commands must not take the original's servers
        "work_dir": str(Path(work_dir).resolve()) if work_dir is not None else None,
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


def stop_server(pid_file: Path, timeout_s: float = 30.0) -> tuple[bool, str]:
    """Stop the server the pid file still describes, with every process it started, and wait for them.

    SIGTERM goes to the server's process group and to each descendant (a worker such as MLflow's
    huey consumers may have left the group); whatever still runs after `timeout_s` gets SIGKILL.
    Returns (stopped, what happened); the pid file is removed either way."""
    proc, why = recorded_process(pid_file)
    try:
        if proc is None:
            return False, why
        pid = proc.pid
        if os.getpgid(pid) != pid:  # `up` starts each server as the leader of a new session
            return False, f"process {pid} is not a process group leader"
        family = {proc.pid: proc}
        family.update({p.pid: p for p in proc.children(recursive=True)})
        family.update({p.pid: p for p in _group_members(pid)})
        os.killpg(pid, signal.SIGTERM)
        for p in family.values():
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(list(family.values()), timeout=timeout_s)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        _, left = psutil.wait_procs(alive, timeout=5)
        detail = f"pid {pid}" + (f" and {len(family) - 1} child process(es)" if len(family) > 1 else "")
        if alive:
            detail += f"; {len(alive)} did not stop within {timeout_s:.0f} s and were killed"
        if left:
            detail += f"; STILL RUNNING: pids {', '.join(str(p.pid) for p in left)}"
        return not left, detail
    except ProcessLookupError:
        return False, "it has exited"
    finally:
        Path(pid_file).unlink(missing_ok=True)


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if p.pid != pgid and os.getpgid(p.pid) == pgid:
                members.append(p)
    return members


# --- where the running servers are ---------------------------------------------------------------


def live_port(work_dir: Path, name: str) -> int | None:
    """The port of the server `name` ("prefect" / "mlflow") that `trlm up` started for this work dir,
    while that very process still runs; None otherwise. Never a guess at a default port: another
    server there would be someone else's."""
    pid_file = Path(work_dir) / "servers" / f"{name}.pid"
    proc, _ = recorded_process(pid_file)
    rec = read_record(pid_file) if proc is not None else None
    if not rec or not rec.get("port") or rec.get("work_dir") != str(Path(work_dir).resolve()):
        return None
    return int(rec["port"])


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


# --- pointing a command at this work dir's servers ------------------------------------------------

PREFECT_DIR = "prefect"  # the Prefect home (and database) of a work dir's servers, temporary ones too
ARTIFACTS_DIR = "mlartifacts"  # what the work dir's MLflow server serves as `mlflow-artifacts:/`
_DB_VARS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
_applied: dict[str, str] = {}  # setting -> value this process set from `trlm up`'s records


# MLflow's database stores (mlflow.store.db.db_types), `postgresql+psycopg2://` and the like included
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def is_database_store(tracking_uri: str) -> bool:
    """A store the client opens itself (no tracking server): its artifacts are this work dir's."""
    return tracking_uri.split(":", 1)[0].split("+", 1)[0] in _DB_SCHEMES


def prefect_database_url(work_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{Path(work_dir) / PREFECT_DIR / 'prefect.db'}"


def seed_own_prefect_database(work_dir: Path) -> None:
    """A new work dir's own Prefect database starts migrated (`trlm/prefect_db.py`); a database the
    user set is left to Prefect."""
    from trlm.prefect_db import seed_prefect_database

    if os.environ.get(_DB_VARS[0]) == prefect_database_url(work_dir):
        seed_prefect_database(Path(work_dir) / PREFECT_DIR / "prefect.db")


def seed_in_background(work_dir: Path):
    """Start `seed_own_prefect_database` in a thread when this run will start the temporary server (no
    server set): a machine's first seed migrates the template in a subprocess (13 s on 2 cores) while
    this process imports the flow and opens MLflow. Returns the function that waits for it and raises
    its error; call it before the server starts."""
    if "PREFECT_API_URL" in os.environ or os.environ.get(_DB_VARS[0]) != prefect_database_url(work_dir):
        return lambda: None
    failed: list[BaseException] = []

    def seed() -> None:
        try:
            seed_own_prefect_database(work_dir)
        except BaseException as exc:  # raised by the waiter, in the calling thread
            failed.append(exc)

    thread = threading.Thread(target=seed, name="prefect-db-seed", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed.pop()  # once

    return wait


def own_mlflow_url(work_dir: Path) -> str | None:
    """The URL of the MLflow server `trlm up` started for this work dir, while it runs."""
    port = live_port(work_dir, "mlflow")
    return f"http://127.0.0.1:{port}" if port else None


def use_work_dir_servers(work_dir: Path) -> None:
    """Point this process, and every process it starts, at the servers of this work dir.

    Must run before Prefect is imported: Prefect reads its settings once, at import. What the user
    set wins (`PREFECT_API_URL`, `MLFLOW_TRACKING_URI`, a database URL); else the servers `trlm up`
    started for this work dir, while they run. Without a Prefect server, the temporary one that
    Prefect starts for a flow run keeps its runs in this work dir's database too (the one `trlm up`
    shows later), never in the user's global `~/.prefect`."""
    work_dir = Path(work_dir)
    if "PREFECT_API_URL" not in os.environ and (port := live_port(work_dir, "prefect")):
        _applied["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    if "MLFLOW_TRACKING_URI" not in os.environ and (url := own_mlflow_url(work_dir)):
        _applied["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"] = url
    # Prefect gives its temporary server 20 s to start, which a loaded 2-core machine can miss.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # `trlm serve`'s deployment runs beat as often as prefect.yaml's (flows/heartbeats.py): a server's
    # zombie automation crashes a deployment run of this pipeline after 3 missed heartbeats of 30 s.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    if not any(v in os.environ for v in _DB_VARS):  # its folder is made when a flow starts (`trlm run`)
        os.environ[_DB_VARS[0]] = prefect_database_url(work_dir)


def prefect_target() -> str:
    """Where this process's flow runs report, in words; raises if Prefect was imported before
    `use_work_dir_servers` (then its settings would silently disagree with the environment)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    wanted = os.environ.get("PREFECT_API_URL")
    if wanted and url != wanted:
        raise RuntimeError(f"Prefect reads PREFECT_API_URL={url!r}, not {wanted!r}: it was imported before the setting was made")
    if url is None:
        return "a temporary Prefect server for this run (start `trlm up` for one that stays; this work dir keeps the runs)"
    origin = "the server `trlm up` started for this work dir" if _applied.get("PREFECT_API_URL") == url else (
        "PREFECT_API_URL" if wanted else "your Prefect profile")
    return f"{url.removesuffix('/api')} ({origin})"


EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def start_temporary_prefect(work_dir: Path, say, tries: int = 3, timeout_s: int | None = None) -> None:
    """Start Prefect's temporary server (its database in `work_dir`) before the flow does, when no
    server is set, retrying a start that timed out: on a loaded machine one run in about 50 failed
    so, never retried (the flow would start it itself, once). A failed attempt's process is stopped;
    the flow then finds the server running. Any other error is raised at once. `say`: one line per retry."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url is not None or not settings.server.ephemeral.enabled:
        return
    (Path(work_dir) / PREFECT_DIR).mkdir(parents=True, exist_ok=True)
    seed_own_prefect_database(work_dir)
    for attempt in range(1, tries + 1):
        server = SubprocessASGIServer()
        try:
            server.start(timeout=timeout_s)
            return
        except RuntimeError as exc:
            if EPHEMERAL_TIMEOUT not in str(exc) or attempt == tries:
                raise
            server.stop()  # the next attempt gets a new process on a new port
            say(f"note: Prefect's temporary server did not answer in time (attempt {attempt} of {tries}); starting it again")


# --- is a server there ----------------------------------------------------------------------------


def server_problem(tracking_uri: str, from_recipe: bool) -> str | None:
    """Why the MLflow tracking server or the Prefect server in use does not answer, in one line that
    names the server (credentials masked) and the setting to check; None when both answer (or are
    not servers). Checked at once: MLflow's own client would retry for minutes first."""
    from trlm.artifacts import mask_uri

    if tracking_uri.startswith(("http://", "https://")) and (why := unreachable(tracking_uri.rstrip("/") + "/health")):
        setting = "the recipe's tracking_uri" if from_recipe else "--tracking-uri / MLFLOW_TRACKING_URI"
        return f"the MLflow tracking server {mask_uri(tracking_uri)} does not answer ({why}): start it, or check {setting}"
    api = os.environ.get("PREFECT_API_URL")
    if api and (why := unreachable(api.rstrip("/") + "/health")):
        return f"the Prefect server {mask_uri(api)} does not answer ({why}): start it (`trlm up`), or check PREFECT_API_URL"
    return None


def unreachable(url: str, timeout_s: float = 5.0, tries: int = 2) -> str | None:
    """Why `url` does not answer 200 (None when it does); credentials in the URL are sent, never shown."""
    import time

    import requests

    why = ""
    for attempt in range(tries):
        try:
            response = requests.get(url, timeout=timeout_s)
            if response.status_code == 200:
                return None
            why = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            why = type(exc).__name__
        if attempt + 1 < tries:
            time.sleep(1.0)
    return why


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_for(health: dict[str, str], started: dict, timeout_s: float, say) -> None:
    """Until every server started (`started`: name -> Popen) answers its health URL, saying every 15 s
    what it still waits for; RuntimeError when one exits or `timeout_s` passes."""
    import time

    t0 = said = time.time()
    pending = dict(health)
    while pending and time.time() - t0 < timeout_s:
        for name, url in list(pending.items()):
            if started[name].poll() is not None:
                raise RuntimeError(f"the {name} server exited while starting (code {started[name].returncode})")
            if unreachable(url, timeout_s=2.0, tries=1) is None:  # answering, and still our process
                pending.pop(name)
        if pending and time.time() - said > 15:
            said = time.time()
            say(f"  waiting for {', '.join(pending)} ({time.time() - t0:.0f} s)...")
        time.sleep(0.5)
    if pending:
        raise RuntimeError(f"server(s) did not answer within {timeout_s:.0f} s: {', '.join(pending)}")
