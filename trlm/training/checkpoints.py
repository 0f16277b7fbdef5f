"""Checkpoints, resume, and the stage's final artifact.

* `save_checkpoint` (atomic, every process saves its RNG state, under FSDP its shards; the newest
  `keep` are kept), `trainer_state` (step, data position, world size, metrics history),
  `latest_checkpoint`, `sound_checkpoint` (the newest one whose files match its manifest; each
  damaged newer one named in a warning), `load_checkpoint` (refuses a checkpoint of a different
  stage config, data or number of processes), `remove_incomplete` (what a kill leaves behind).
* `export_model` (`out_dir/model/`, a standard HF checkpoint), `finish_stage` (`metrics.json`, then
  `fingerprint.json` last), `finished_summary` (a finished stage is never run again).

Layout: `out_dir/checkpoints/step-<6 digits>/` holding accelerate's state, under FSDP `sharded/`
(torch.distributed.checkpoint: model and optimizer, one file per process plus `.metadata`),
`trainer_state.json` and, written last, `COMPLETE`. A checkpoint is complete only when every
process has written its part (barrier before the marker), so a kill of any rank leaves a `.tmp-*`.

`COMPLETE` is also the checkpoint's manifest: the SHA-256 of every other file in it. A complete
checkpoint can still be damaged later (a full disk, a truncating copy, an edit), and resuming from
one fails on every rerun, `--force` included. So a resume re-hashes the newest checkpoint first and,
when it does not match, warns with the file and falls back to the previous one (`save_total_limit`
keeps 2 by default), or to the start: the same steps are trained again, bit for bit on a CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from trlm.artifacts import atomic_directory, atomic_write_text, discard, hash_directory, hash_json, read_fingerprint, remove_stale_temporaries, save_tokenizer, write_fingerprint
from trlm.recipe import output_config
from trlm.training.batching import StepPlan
from trlm.training.distributed import full_state_dict, is_sharded, load_sharded, save_sharded

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "COMPLETE"  # written last inside a checkpoint, before the atomic rename
TRAINER_STATE = "trainer_state.json"
SHARDED = "sharded"  # FSDP: the DCP checkpoint of model and optimizer inside a step directory

log = logging.getLogger(__name__)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A directory without the completion marker is not one."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def remove_incomplete(out_dir: Path) -> None:
    """Remove what a killed process can leave behind: `.tmp-*`/`.old-*` (a half-written checkpoint,
    model export or reference file) and step directories without their completion marker."""
    root = Path(out_dir) / CHECKPOINTS
    remove_stale_temporaries(out_dir)
    remove_stale_temporaries(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and not (p / COMPLETE_MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def write_manifest(checkpoint: Path, step: int) -> None:
    """`COMPLETE`, written last (atomically): the step and the SHA-256 of every file in the checkpoint."""
    record = {"step": step, "files": hash_directory(checkpoint)}
    atomic_write_text(checkpoint / COMPLETE_MARKER, json.dumps(record, indent=1, sort_keys=True))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed from: the first file that is missing, extra or
    differs from the manifest (None when every file matches)."""
    marker = checkpoint / COMPLETE_MARKER
    try:
        files = json.loads(marker.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its manifest {marker} is unreadable ({type(exc).__name__}: {exc})"
    now = hash_directory(checkpoint)
    now.pop(COMPLETE_MARKER, None)
    for rel in sorted(set(files) | set(now)):
        path = checkpoint / rel
        if rel not in now:
            return f"{path} is missing"
        if rel not in files:
            return f"{path} is not in its manifest"
        if now[rel] != files[rel]:
            return f"{path} differs from its manifest ({path.stat().st_size} bytes; truncated or damaged)"
    return None


def survey_checkpoints(out_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint whose files match its manifest or None, [(each newer damaged
    one, why)]). Only as many are hashed as it takes to find a sound one."""
    damaged = []
    for checkpoint in reversed(complete_checkpoints(out_dir)):
        if (problem := checkpoint_problem(checkpoint)) is None:
            return checkpoint, damaged
        damaged.append((checkpoint, problem))
    return None, damaged


def sound_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint to resume from (`survey_checkpoints`); each damaged newer one is named in a
    warning and left in place (the save of its step replaces it). None: start over."""
    sound, damaged = survey_checkpoints(out_dir)
    for checkpoint, problem in damaged:
        log.warning("checkpoint %s is damaged and skipped: %s", checkpoint.name, problem)
    if damaged:
        if sound is not None:
            log.warning("resuming from %s instead", sound)
        else:
            log.warning("no sound checkpoint in %s: the stage starts over from step 0", Path(out_dir) / CHECKPOINTS)
    return sound


def save_checkpoint(accelerator, out_dir: Path, step: int, state: dict[str, Any], keep: int, shards: tuple | None = None) -> Path:
    """Atomically write `out_dir/checkpoints/step-<6-digit step>/` and keep only the newest `keep`.

    Contents: accelerate's `save_state` (model.safetensors, optimizer.bin, scheduler.bin and the RNG
    states of every process: python, numpy, torch, cuda) plus `trainer_state.json` (step, epoch,
    micro-batch index, metrics history) and, last, the `COMPLETE` manifest. Everything is written to a
    `.tmp-*` sibling, fsynced and renamed (`trlm.artifacts.atomic_directory`), so a killed process
    never leaves a directory that looks complete. All processes must call this (each saves its own
    RNG state, FSDP its shards); the main process owns the temporary directory. `shards`: FSDP's
    (model, optimizer), written with DCP (accelerate then saves the schedule and RNG states only).
    """
    from accelerate.utils import broadcast_object_list

    final = Path(out_dir) / CHECKPOINTS / checkpoint_name(step)
    with atomic_directory(final) if accelerator.is_main_process else nullcontext(None) as tmp:
        tmp = Path(broadcast_object_list([str(tmp) if tmp else None])[0])
        accelerator.save_state(str(tmp))
        if shards is not None:
            save_sharded(*shards, tmp / SHARDED)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
            write_manifest(tmp, step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for old in complete_checkpoints(out_dir)[:-keep]:
            discard(old)  # renamed first: a kill never leaves a "complete" step with files missing
    accelerator.wait_for_everyone()
    return final


def trainer_state(cfg, plan: StepPlan, step: int, *, data_fp: str, num_processes: int, runtime_s: float, total_tokens: float,
                  history: list) -> dict[str, Any]:
    """What a checkpoint records besides accelerate's state: the data position, the world size (the
    row order per process and the shards depend on it) and the history."""
    epoch, index = plan.position(step, cfg.train.grad_accum_steps)
    return {
        "step": step,
        "epoch": epoch,
        "micro_batch_in_epoch": index,
        "total_steps": plan.total_steps,
        "config_hash": config_hash(cfg),
        "data_fingerprint": data_fp,
        "num_processes": num_processes,
        "runtime_s": runtime_s,
        "total_tokens": total_tokens,
        "history": history,
    }


def load_checkpoint(accelerator, checkpoint: Path, cfg, *, data_fp: str, shards: tuple | None = None) -> dict[str, Any]:
    """Check that `checkpoint` belongs to this run (same stage config, data and number of processes),
    restore model, optimizer, scheduler and RNG states (FSDP: `shards` from DCP), and return its
    trainer state (step, data position, history)."""
    state = read_json(checkpoint / TRAINER_STATE)
    if state.get("config_hash") != config_hash(cfg) or state.get("data_fingerprint") != data_fp:
        raise ValueError(
            f"{checkpoint} was written by a run with a different stage config or data; "
            "resume needs the same settings (use a fresh out_dir, or delete its checkpoints/)"
        )
    if state.get("num_processes", 1) != accelerator.num_processes:
        raise ValueError(
            f"{checkpoint} was written by {state.get('num_processes', 1)} process(es), this run has {accelerator.num_processes}: "
            "the global batch and the data order per process differ; resume with the same number (or a fresh out_dir)"
        )
    accelerator.load_state(str(checkpoint))
    if shards is not None:
        load_sharded(*shards, checkpoint / SHARDED)
    return state


def read_json(path: Path) -> Any:
    """A JSON file's content; an error names the file (json's own names only a line and column)."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def config_hash(cfg) -> str:
    return hash_json(output_config(cfg))


# --- final artifact ------------------------------------------------------------------------------


def export_model(accelerator, model, tokenizer, out_dir: Path) -> Path:
    """`out_dir/model/`: a standard HF checkpoint (safetensors, config, generation config with
    eos = <|im_end|>) plus the training tokenizer (added special tokens, chat template). Atomic."""
    final = Path(out_dir) / "model"
    # The whole state dict (gathered from the shards under FSDP); every process takes part.
    state_dict = full_state_dict(model) if is_sharded(model) else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True  # turned off for gradient checkpointing; generation wants it
        with atomic_directory(final) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            save_tokenizer(tokenizer, tmp)
    accelerator.wait_for_everyone()
    return final


def finish_stage(out_dir: Path, summary: dict[str, Any], history: list[dict[str, Any]], meta: dict[str, Any], *, keep_checkpoints: bool) -> None:
    """Write `metrics.json` (summary + full history), then `fingerprint.json` LAST (main process).

    Then, unless `keep_checkpoints`, delete `checkpoints/`: a finished stage never resumes, and its
    optimizer state is about twice the model (GBs per stage even for the smoke run). The
    fingerprint never covers checkpoints, so a kill during the deletion leaves a finished stage.
    """
    out_dir = Path(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    write_fingerprint(out_dir, meta=meta)
    if not keep_checkpoints:
        discard(out_dir / CHECKPOINTS)  # renamed first: a kill never leaves a half-deleted checkpoints/


def finished_summary(out_dir: Path) -> dict[str, Any] | None:
    """The saved summary of a finished stage (fingerprint.json present), else None."""
    if read_fingerprint(out_dir) is None:
        return None
    path = Path(out_dir) / "metrics.json"
    return read_json(path)["summary"] if path.is_file() else {}
