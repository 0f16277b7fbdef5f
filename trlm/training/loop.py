"""The parts of a training stage that SFT and DPO share, as plain functions (no trainer class).

Each stage file (`stages/sft.py`, `stages/dpo.py`) owns its loop body and reads top to bottom:

    if (done := finished_summary(out_dir)) is not None:      # a finished stage is never rerun
        return done
    setup = setup_training(cfg, "sft", model_dir=..., data_dir=..., out_dir=..., columns=[...])
    ...                                                      # the stage's own model changes
    model, optimizer, scheduler = prepare_training(setup)
    step, progress = maybe_resume(setup)
    window = LogWindow(("loss_sum", ...))
    while step < setup.plan.total_steps:
        ...                                                  # micro-batches, forward, backward, window.add
        grad_norm, learning_rate = optimizer_step(setup, model, optimizer, scheduler, step=step + 1, loss=...)
        step += 1
        window.end_step(grad_norm)
        if due(step, train.logging_steps, setup.plan.total_steps):
            sums, shared = window.flush(setup, progress, step, learning_rate)
            log_metrics(setup, progress, step, {...: sums[...], **shared}, on_log)
        save_if_due(setup, step, progress, window.watch)
    return finish(setup, model, progress, {...})             # the stage's own summary entries

Here: `setup_training` / `prepare_training` (accelerator, seed, data, model, optimizer, schedule),
`maybe_resume`, `LogWindow` (the sums between two log lines), `optimizer_step` (clip, the
non-finite check, step), `save_if_due`, `finish` (model/, metrics.json, fingerprint.json). The
command line of both stages is `trlm/training/entry.py`.

Several processes (DDP, FSDP2: `trlm/training/distributed.py`) change only `setup_training` (the launch
checked before any compute), `prepare_training` (the wrapping) and the checkpoints; the loops are
the same in every mode.

A NaN or infinite loss or gradient norm stops the stage (`NonFiniteError`) before that step is
applied: a broken model is never exported, fingerprinted or handed to the next stage.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import set_seed

from trlm.training.attention import install_head_forward
from trlm.training.batching import Ragged, StepPlan, data_fingerprint, load_ragged, plan_steps
from trlm.training.checkpoints import (
    COMPLETE_MARKER,
    export_model,
    finish_stage,
    latest_checkpoint,
    load_checkpoint,
    remove_incomplete,
    save_checkpoint,
    sound_checkpoint,
    trainer_state,
)
from trlm.training.distributed import LaunchError, check_launch, shard_model
from trlm.training.modeling import (
    compile_blocks,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    make_accelerator,
    resize_for_tokenizer,
    set_end_of_turn,
)
from trlm.training.optim import build_optimizer, build_scheduler, clip_gradients

OnLog = Callable[[dict[str, float], int], None]
log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A training step's loss or gradient norm is NaN or infinite; raised before the step is applied."""


# --- setup ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What `setup_training` built: the run's accelerator, data, plan and (unprepared) model."""

    cfg: Any  # SFTStageConfig | DPOStageConfig
    stage: str  # "sft" or "dpo": the progress bar, error messages, the fingerprint's meta
    out_dir: Path
    accelerator: Any
    precision: str
    tokenizer: Any
    data: dict[str, Ragged]
    n_rows: int
    plan: StepPlan
    data_fp: str
    model: torch.nn.Module
    pad_id: int
    added_tokens: int
    # FSDP: (model, optimizer), checkpointed with DCP next to accelerate's files; None when
    # accelerate's save_state covers them (one process, DDP).
    shards: tuple | None = None

    @property
    def train(self):
        return self.cfg.train

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def setup_training(cfg, stage: str, *, model_dir: Path, data_dir: Path, out_dir: Path, columns: list[str]) -> Setup:
    """Accelerator and seed, `out_dir` (minus what a killed run left), the data directory written by
    data-prep (`train.parquet` columns, `tokenizer/`), the step plan, and the starting model with the
    tokenizer's new tokens (`<think>`, `</think>` in stage 2) and eos = pad = `<|im_end|>`.
    A launch that cannot train as the recipe says stops here, before anything is written
    (`distributed.check_launch`)."""
    train = cfg.train
    accelerator, dtype, precision = make_accelerator(train.precision, train.distributed)
    set_seed(train.seed)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    data = load_ragged(data_dir / "train.parquet", columns)
    n_rows = len(data[columns[0]])
    check_launch(train, accelerator, n_rows)
    plan = plan_steps(n_rows, train, accelerator.num_processes)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete(out_dir)  # half-written checkpoints of a killed run are never resumed from
    accelerator.wait_for_everyone()

    model = load_model(model_dir, dtype, train.attn_implementation)
    added_tokens = resize_for_tokenizer(model, tokenizer)
    pad_id = set_end_of_turn(model, tokenizer)
    return Setup(cfg, stage, out_dir, accelerator, precision, tokenizer, data, n_rows, plan, data_fingerprint(data_dir), model, pad_id, added_tokens)


def prepare_training(setup: Setup):
    """Gradient checkpointing and compilation if asked, the loss-head forward, AdamW and the schedule:
    (model, optimizer, scheduler). One process or DDP: all handed to accelerate (DDP wrapping,
    autocast). FSDP: the model is sharded first (`distributed.shard_model`), the optimizer built on
    its shards, and only the schedule goes to accelerate (so it is saved with the RNG states)."""
    train, model = setup.train, setup.model
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if train.compile:
        compile_blocks(model)
    install_head_forward(model)
    sharded = train.distributed == "fsdp"
    if sharded:
        model = shard_model(model, setup.accelerator)
    optimizer = build_optimizer(model, train.learning_rate, train.weight_decay)
    scheduler = build_scheduler(optimizer, train, setup.plan.total_steps)
    if not sharded:
        return setup.accelerator.prepare(model, optimizer, scheduler)
    setup.shards = (model, optimizer)
    return model, optimizer, setup.accelerator.prepare(scheduler)


# --- resume, logging, checkpoints ----------------------------------------------------------------


@dataclass
class Progress:
    """What a checkpoint records besides the step and accelerate's state."""

    history: list[dict[str, Any]] = field(default_factory=list)
    runtime_s: float = 0.0
    total_tokens: float = 0.0
    resumed_from: int | None = None  # the checkpoint's step this call resumed from (None: from the start)


def maybe_resume(setup: Setup) -> tuple[int, Progress]:
    """Restore the newest sound checkpoint in `out_dir/checkpoints/` (model, optimizer, scheduler,
    RNG states) if there is one: (its step, its progress); else (0, nothing done). A damaged newer
    one is named in a warning and skipped (`sound_checkpoint`). Rank 0 picks the checkpoint for
    every process, so that all resume from the same step or none does."""
    checkpoint = sound_checkpoint(setup.out_dir) if setup.is_main else None
    if setup.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        checkpoint = broadcast_object_list([checkpoint])[0]
    if checkpoint is None:
        return 0, Progress()
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise LaunchError(f"process {setup.accelerator.process_index} cannot see {checkpoint}, which rank 0 resumes from: "
                          "out_dir must be on a file system that every machine shares")
    state = load_checkpoint(setup.accelerator, checkpoint, setup.cfg, data_fp=setup.data_fp, shards=setup.shards)
    log.info("%s: resuming from %s (step %d of %d)", setup.stage, checkpoint, state["step"], setup.plan.total_steps)
    return state["step"], Progress(state["history"], state["runtime_s"], state["total_tokens"], resumed_from=state["step"])


def due(step: int, every: int, total: int) -> bool:
    """Log / save after every `every`-th step and after the last."""
    return step % every == 0 or step == total


class Stopwatch:
    """Seconds since `reset()`, minus the time spent inside `with watch.excluded():` (checkpoint writes)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return max(1e-9, time.perf_counter() - self.start - self.paused)

    @contextmanager
    def excluded(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t


def reduce_sums(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Sum scalar accumulators over processes (one all-reduce)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return dict(zip(keys, t.tolist()))


class LogWindow:
    """The sums of the steps since the last log line, timed by a `Stopwatch`.

    `keys`: the stage's own sums, plus "tokens" (non-padding tokens). `rates`: the sums also logged
    per second (`tokens` -> `tokens_per_second`). Processes are summed only when a line is written.
    """

    def __init__(self, keys: tuple[str, ...], rates: tuple[str, ...] = ("tokens",)) -> None:
        self.sums = dict.fromkeys((*keys, "tokens"), 0.0)
        self.rates = rates
        self.steps, self.grad_norm = 0, 0.0
        self.watch = Stopwatch()

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] += float(value)

    def end_step(self, grad_norm: float) -> None:
        self.steps += 1
        self.grad_norm += grad_norm

    def flush(self, setup: Setup, progress: Progress, step: int, learning_rate: float) -> tuple[dict[str, float], dict[str, float]]:
        """Close the window after `step`: (its sums over all processes, the metrics every stage logs:
        grad_norm (mean over the window), learning_rate, <rate>_per_second, epoch, num_tokens). The
        run's token count and runtime grow by the window's; a new window starts."""
        sums = reduce_sums(setup.accelerator, self.sums)
        elapsed = self.watch.elapsed()
        progress.total_tokens += sums["tokens"]
        progress.runtime_s += elapsed
        shared = {
            "grad_norm": self.grad_norm / self.steps,
            "learning_rate": learning_rate,
            **{f"{key}_per_second": sums[key] / elapsed for key in self.rates},
            "epoch": step * setup.train.grad_accum_steps / setup.plan.micro_batches_per_epoch,
            "num_tokens": progress.total_tokens,
        }
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.steps, self.grad_norm = 0, 0.0
        self.watch.reset()
        return sums, shared


def log_metrics(setup: Setup, progress: Progress, step: int, metrics: dict[str, float], on_log: OnLog | None) -> None:
    """Append to the history (saved in checkpoints and metrics.json) and call `on_log` (main process)."""
    progress.history.append({"step": step, **metrics})
    if on_log is not None and setup.is_main:
        on_log(metrics, step)


def progress_bar(setup: Setup, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=setup.plan.total_steps, initial=initial, desc=setup.stage, unit="step", disable=not setup.is_main, dynamic_ncols=True)


def save_if_due(setup: Setup, step: int, progress: Progress, watch: Stopwatch) -> None:
    """Every `save_steps` steps: an atomic checkpoint (its time is not training time). Not after the last
    step unless the checkpoints are kept: `finish` writes the model next, and a crash while it does
    resumes from the checkpoint before (on the smoke recipe this saves a 7 s, 1.6 GB write per stage)."""
    train = setup.train
    last = step == setup.plan.total_steps
    if (step % train.save_steps == 0 and not last) or (last and train.keep_checkpoints):
        with watch.excluded():
            state = trainer_state(setup.cfg, setup.plan, step, data_fp=setup.data_fp, num_processes=setup.accelerator.num_processes, runtime_s=progress.runtime_s,
                                  total_tokens=progress.total_tokens, history=progress.history)
            save_checkpoint(setup.accelerator, setup.out_dir, step, state, keep=train.save_total_limit, shards=setup.shards)


# --- the optimizer step --------------------------------------------------------------------------


def optimizer_step(setup: Setup, model, optimizer, scheduler, *, step: int, loss: float) -> tuple[float, float]:
    """Clip the gradients, stop on a non-finite loss or gradient norm, apply the step, advance the
    schedule. `step` is this step's 1-based number; `loss` this process's loss for the step (only
    its finiteness is used). Returns (gradient norm before clipping, the learning rate this step used)."""
    grad_norm = clip_gradients(model, setup.train.max_grad_norm)
    check_finite(setup, step=step, loss=loss, grad_norm=grad_norm)
    learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, learning_rate


def check_finite(setup: Setup, *, step: int, loss: float, grad_norm: float) -> None:
    """Raise `NonFiniteError` on every process if any process's loss, or the gradient norm, is NaN/inf.

    The gradient norm is the same on every process (of the all-reduced gradients, or reduced over
    FSDP shards); the losses are per process, so they are summed first (NaN and inf survive a sum):
    all processes decide alike, and none waits in a collective that the others left.
    """
    if setup.accelerator.num_processes > 1:
        loss = reduce_sums(setup.accelerator, {"loss": loss})["loss"]
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    found = " and ".join(f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm)) if not math.isfinite(value))
    checkpoint = latest_checkpoint(setup.out_dir)
    raise NonFiniteError(
        f"{setup.stage}: non-finite {found} at step {step}; stopped before the optimizer step, "
        f"no model written to {setup.out_dir}. Last good checkpoint: {checkpoint or 'none: the stage starts over on rerun'}"
    )


# --- the artifact --------------------------------------------------------------------------------


def finish(setup: Setup, model, progress: Progress, extra: dict[str, Any]) -> dict[str, Any]:
    """Write `out_dir/model/`, then `metrics.json` and `fingerprint.json` (main process); return the
    summary: the last logged metrics, the run's totals and the stage's `extra` entries."""
    export_model(setup.accelerator, model, setup.tokenizer, setup.out_dir)
    last = progress.history[-1] if progress.history else {}
    summary = {
        **{k: v for k, v in last.items() if k != "step"},
        "steps": setup.plan.total_steps,
        "train_runtime_s": progress.runtime_s,
        "train_tokens_per_second": progress.total_tokens / max(progress.runtime_s, 1e-9),
        **extra,
        **({"resumed_from_step": progress.resumed_from} if progress.resumed_from is not None else {}),
        "model_dir": str(setup.out_dir / "model"),
    }
    if setup.is_main:
        meta = {"stage": setup.stage, "distributed": setup.train.distributed, **env_summary(setup.accelerator, setup.precision)}
        finish_stage(setup.out_dir, summary, progress.history, meta=meta, keep_checkpoints=setup.train.keep_checkpoints)
    setup.accelerator.wait_for_everyone()
    return summary


def env_summary(accelerator, precision: str) -> dict[str, Any]:
    """Where and how a stage ran (recorded in the fingerprint's meta, not hashed)."""
    return {
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "precision": precision,
        "torch": torch.__version__,
    }
