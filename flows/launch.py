"""Running a stage's own command line in child processes (several GPUs: under `accelerate launch`).

The flow starts the stage module (`python -m trlm.stages.sft`) with its config in a file and its
inputs as `--<name>-dir` arguments, streams every output line to the Prefect log, forwards the
per-step metric lines (`{"step": N, ...}`) to MLflow live, and returns the summary the stage saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Callable

from trlm.stage import Stage, StageContext


def wants_launcher(stage: Stage) -> bool:
    """Several visible GPUs and a stage that has a command line: one process per GPU."""
    import torch

    return bool(stage.launch_inputs) and torch.cuda.is_available() and torch.cuda.device_count() > 1


def launch_command(stage: Stage, ctx: StageContext, config_file: Path) -> list[str]:
    config = os.environ.get("TRLM_ACCELERATE_CONFIG", str(resources.files("trlm") / "accelerate_configs" / "multi_gpu.yaml"))
    config_file.write_text(json.dumps(ctx.config.model_dump(mode="json")))
    inputs = [a for name in stage.launch_inputs for a in (f"--{name}-dir", str(ctx.inputs[name]))]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "-m", stage.module,
            "--config", str(config_file), *inputs, "--out-dir", str(ctx.out)]


def run_stage_process(cmd: list[str], out: Path, on_log, log_line: Callable[[str], None]) -> dict:
    """Run a stage's CLI and stream its output: every line goes to `log_line`, and the per-step
    metric lines it prints (`{"step": N, ...}` JSON) go to `on_log`, so MLflow charts the run live
    as in-process runs. Returns the summary the stage saved in `out/metrics.json`."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            text = line.rsplit("\r", 1)[-1].strip()  # a progress bar redraw may share the line
            if text:
                log_line(text)
            if text.startswith('{"step"'):
                try:
                    metrics = json.loads(text)
                except ValueError:
                    continue
                on_log({k: v for k, v in metrics.items() if k != "step"}, int(metrics["step"]))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}")
    return json.loads((out / "metrics.json").read_text())["summary"]
