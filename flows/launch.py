"""Running a stage's own command line in several processes (torchrun or `accelerate launch`).

A stage that declares `launch` (`trlm/stage.py`; the training stages read `train.num_processes`
and `train.launcher`) runs in-process when that says one process, else the flow starts its module
(`python -m trlm.stages.sft`) under the launcher with its config in a file and its inputs as
`--<name>-dir` arguments. Every output line goes to the Prefect log, the per-step metric lines
(`{"step": N, ...}`) to MLflow live, and the summary the stage saved comes back. When a process
fails, the task fails with the stage's own error (the exception lines of the failed ranks), not
just the launcher's exit code.

    torchrun: python -m torch.distributed.run --standalone --nproc-per-node N -m MODULE ...
    accelerate: python -m accelerate.commands.launch --config_file multi_gpu.yaml (fsdp.yaml for fsdp;
                TRLM_ACCELERATE_CONFIG overrides) --num_processes N --main_process_port FREE -m MODULE ...
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections import deque
from importlib import resources
from pathlib import Path
from typing import Callable

from trlm.stage import Launch, Stage, StageContext

TAIL_LINES = 200  # kept for the error message of a failed launch
# An exception line of a stage process ("ValueError: ...", "trlm.training.distributed.LaunchError: ..."),
# maybe behind torchrun's "[rank1]: " prefix, or argparse's "prog: error: ...".
_ERROR = re.compile(r"^(?:\[(?:rank|default)\d+\]:\s*)?((?:[A-Za-z_][\w.]*(?:Error|Exception|Busy|Interrupt)|[\w.-]+: error): .+)$")
_LAUNCHER_ERRORS = ("ChildFailedError", "SignalException")  # the launcher's own report, not the stage's


def launch_plan(stage: Stage, config) -> Launch | None:
    """How to start `stage` in several processes, or None to run it in-process (one process)."""
    if stage.launch is None or not stage.launch_inputs or config is None:
        return None
    plan = stage.launch(config)
    return plan if plan.num_processes > 1 else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(stage: Stage, ctx: StageContext, config_file: Path) -> list[str]:
    """The launcher's command line for `stage` (its config written to `config_file`)."""
    plan = launch_plan(stage, ctx.config)
    if plan is None:
        raise ValueError(f"{stage.name} runs in one process: nothing to launch")
    config_file.write_text(json.dumps(ctx.config.model_dump(mode="json")))
    inputs = [a for name in stage.launch_inputs for a in (f"--{name}-dir", str(ctx.inputs[name]))]
    stage_args = ["-m", stage.module, "--config", str(config_file), *inputs, "--out-dir", str(ctx.out)]
    n = str(plan.num_processes)
    if plan.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", n, *stage_args]
    shipped = "fsdp.yaml" if plan.distributed == "fsdp" else "multi_gpu.yaml"
    config = os.environ.get("TRLM_ACCELERATE_CONFIG", str(resources.files("trlm") / "accelerate_configs" / shipped))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", n,
            "--main_process_port", str(_free_port()), *stage_args]


def launch_env(num_processes: int) -> dict[str, str]:
    """The children's environment: unbuffered output (metrics stream live) and, unless set, the
    CPU cores shared out between the processes (one process per core on the 2-core machine)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return env


def stage_error(lines: list[str]) -> str:
    """The stage's own error from a failed launch's output: each distinct exception line, in order."""
    found: list[str] = []
    for line in lines:
        match = _ERROR.match(line)
        if match and not any(name in match.group(1) for name in _LAUNCHER_ERRORS) and match.group(1) not in found:
            found.append(match.group(1))
    return "\n".join(found[-3:])


def run_stage_process(cmd: list[str], out: Path, on_log, log_line: Callable[[str], None], env: dict[str, str] | None = None) -> dict:
    """Run a stage's CLI and stream its output: every line goes to `log_line`, and the per-step
    metric lines it prints (`{"step": N, ...}` JSON) go to `on_log`, so MLflow charts the run live
    as in-process runs. Returns the summary the stage saved in `out/metrics.json`; on a failure
    raises RuntimeError with the stage's error lines and the output's last lines."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            text = line.rsplit("\r", 1)[-1].strip()  # a progress bar redraw may share the line
            if text:
                log_line(text)
                tail.append(text)
            if text.startswith('{"step"'):
                try:
                    metrics = json.loads(text)
                except ValueError:
                    continue
                on_log({k: v for k, v in metrics.items() if k != "step"}, int(metrics["step"]))
    if proc.returncode != 0:
        error = stage_error(list(tail)) or "no error line in its output"
        last = "\n".join(list(tail)[-15:])
        raise RuntimeError(f"{error}\n({' '.join(cmd[:6])} ... exited with {proc.returncode}; last lines:\n{last})")
    return json.loads((out / "metrics.json").read_text())["summary"]
