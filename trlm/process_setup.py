"""What each command sets up in its own process: offline switches, quiet libraries, where the log
records (with their tracebacks) go, and credentials masked in everything it prints or logs."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

import typer

from trlm.artifacts import mask_secrets
from trlm.recipe import mixtures


class MaskedStream:
    """A text stream that masks credentials in URIs written through it (`mask_secrets`)."""

    def __init__(self, inner):
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(mask_secrets(text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def mask_output() -> None:
    """Credentials in URIs (`--tracking-uri http://user:password@...`) never reach the console or a
    log file, whoever writes them: MLflow's own errors (`API request to http://user:...`), Prefect's
    task-failure lines, uncaught tracebacks. Every log record is masked when it is made (message and
    traceback, so every handler gets the masked text), and stdout/stderr become masked streams before
    any handler takes them. Idempotent."""
    if not isinstance(sys.stdout, MaskedStream):
        sys.stdout = MaskedStream(sys.stdout)
    if not isinstance(sys.stderr, MaskedStream):
        sys.stderr = MaskedStream(sys.stderr)
    factory = logging.getLogRecordFactory()
    if getattr(factory, "trlm_masked", False):
        return

    def masked_record(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: logging reports it at format time
            return record
        record.msg, record.args = mask_secrets(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_secrets(logging.Formatter().formatException(record.exc_info))
        return record

    masked_record.trlm_masked = True
    logging.setLogRecordFactory(masked_record)


def quiet_environment(recipe) -> None:
    """Offline-friendly defaults; a recipe with hub sources keeps the network usable. Credentials
    masked in all output first (`mask_output`), before any log handler takes stdout/stderr."""
    mask_output()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow prints "View run ... at: <tracking URI>" with any credential in it; we print masked links.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow configures its own loggers at import (INFO: "Started monitoring system metrics", ...).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hub = recipe is not None and uses_hub(recipe)
    offline = not hub
    if hub and "HF_HUB_OFFLINE" not in os.environ and not hub_reachable():
        # Without this, every hub lookup retries for about 50 s before it falls back to the cache.
        typer.echo("note: the Hugging Face Hub is unreachable; hub ids resolve from the local cache only (HF_HUB_OFFLINE=1)", err=True)
        offline = True
    if offline:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "alembic", "mlflow", "urllib3", "filelock", "accelerate"):  # accelerate: a line per checkpoint file saved
        logging.getLogger(noisy).setLevel(logging.WARNING)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub's host? Assumed yes behind a proxy (we cannot tell)."""
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def uses_hub(recipe) -> bool:
    """Does the recipe name a hub model or hub data (then the network stays usable)?"""
    from trlm.base_model import resolve_source
    from trlm.data_spec import load_data_spec

    if resolve_source(recipe.base_model)[0] == "hub":
        return True
    return any(src.hub is not None for m in mixtures(recipe).values() for src in load_data_spec(m.spec).sources)


class NoTraceback(logging.Formatter):
    """Console formatting without tracebacks: one clean line per failure on the screen, while the
    run's log file keeps every traceback (`trlm run --verbose` shows them on the console too)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        return text.split("Traceback (most recent call last)")[0].rstrip()


def route_tracebacks(work_dir: Path, verbose: bool) -> Path:
    """Every log record (with tracebacks) to `<work_dir>/logs/run-*.log`; the console without them."""
    from prefect.logging import configuration

    if not configuration.PROCESS_LOGGING_CONFIG:
        configuration.setup_logging()  # Prefect's console handler goes on the root logger: wrap it once it is there
    logs = work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "trlm_run_log", False)]:  # an earlier run in this process
        root.removeHandler(old)
        old.close()
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.trlm_run_log = True
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            inner = handler.formatter.inner if isinstance(handler.formatter, NoTraceback) else handler.formatter
            handler.setFormatter(inner if verbose else NoTraceback(inner))
    return path
