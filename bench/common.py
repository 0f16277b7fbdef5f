"""Shared pieces of the side-by-side benchmarks (ours vs TRL): model, data, memory sampling, printing.

TRL is only imported by the benchmark scripts (optional extra `pip install -e ".[bench]"`), never by
the product.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def scratch_dir(prefix: str) -> Path:
    """A temporary work directory, deleted when the script exits (each run writes GBs of checkpoints)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def base_model_dir(recipe: str | None = None) -> Path:
    """The offline base checkpoint (materialized once from the GGUF, as the pipeline does)."""
    from trlm.base_model import materialize_base_model
    from trlm.stages.registry import load_recipe

    r = load_recipe(recipe)
    return materialize_base_model(r.base_model, r.work_path)


def data_root(recipe: str | None = None) -> Path:
    from trlm.stages.registry import load_recipe

    return load_recipe(recipe).data_path


class PeakRSS:
    """Samples this process's RSS in a thread; `peak - start` is the phase's extra memory."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.proc = interval, psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        import gc

        gc.collect()
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20


@contextmanager
def quiet():
    """Silence the libraries' per-step prints while a phase runs (our results are printed after)."""
    import logging

    level = logging.root.level
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        logging.root.setLevel(level)


def median_rate(step_rates: list[float]) -> float:
    """Median of per-step rates, first step of each phase excluded (allocator and kernel warm-up)."""
    rates = step_rates[1:] if len(step_rates) > 1 else step_rates
    return statistics.median(rates) if rates else float("nan")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(widths[c]) for c in columns))


def machine() -> str:
    import platform

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {'cuda' if torch.cuda.is_available() else 'cpu'}"


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    print(f"results written to {path}", file=sys.stderr)
