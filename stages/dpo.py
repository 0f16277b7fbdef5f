"""Stage `dpo`: preference optimisation (DPO family; the published recipe: apo_zero, beta 0.1).

`train_dpo` starts from the sft-think model with dropout off. The reference is the frozen starting
model; its log-probs are computed once before training (`precompute_ref_logps`, stored in `out_dir`
and reused on resume), so training needs no second model. Each micro-batch runs one forward over
chosen and rejected together, each prompt once (`share_prompt`); the loss is the mean over all pairs
of the optimizer step. It writes `model/`, `metrics.json`, then `fingerprint.json` last. This file
holds what is DPO's own (pair batches, the shared-prompt layout, the reference log-probs, the loop
body); the rest is the training engine (`trlm/training/`). Step by step, trade-offs and
measurements: docs/training.md.

Usage:
    python -m trlm.stages.dpo --recipe offline-smoke --stage dpo         --model-dir SFT_THINK/model --data-dir DATA/dpo --out-dir OUT
    torchrun --nproc-per-node 2 -m trlm.stages.dpo ...
    accelerate launch --config_file trlm/accelerate_configs/single_gpu.yaml -m trlm.stages.dpo ...
    accelerate launch --config_file trlm/accelerate_configs/multi_gpu.yaml  -m trlm.stages.dpo ...  # DDP
    accelerate launch --config_file trlm/accelerate_configs/fsdp.yaml       -m trlm.stages.dpo ...  # FSDP2 (train.distributed: fsdp)
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Annotated, Callable, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from trlm.artifacts import atomic_file, read_fingerprint
from trlm.recipe import Bool, MixtureConfig, NoBool, PositiveFloat, Strict
from trlm.stage import MODEL, Stage, StageContext, section_without_mixture, train_launch, training_check
from trlm.training.attention import install_head_forward
from trlm.training.batching import Ragged, collate, micro_batch_rows, to_device, unpack_rows
from trlm.training.checkpoints import finished_summary
from trlm.training.config import TrainConfig
from trlm.training.distributed import gradient_sync, one_writer, shard_model
from trlm.training.entry import stage_main
from trlm.training.losses import DPO_LOSS_TYPES, IGNORE_INDEX, LABEL_SMOOTHING_LOSSES, chunked_sequence_logps, dpo_loss, dpo_metrics
from trlm.training.loop import (
    LogWindow,
    OnLog,
    due,
    finish,
    log_metrics,
    maybe_resume,
    optimizer_step,
    prepare_training,
    progress_bar,
    save_if_due,
    setup_training,
)
from trlm.training.modeling import disable_dropout

log = logging.getLogger(__name__)

COLUMNS = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
REFERENCE_FILE = "reference_logps.pt"
METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


class DPOStageConfig(Strict):
    data: MixtureConfig
    train: TrainConfig
    loss_type: Literal[DPO_LOSS_TYPES] = "sigmoid"
    beta: PositiveFloat = 0.1
    label_smoothing: Annotated[float, NoBool, Field(ge=0, lt=0.5)] = 0.0
    precompute_ref_logps: Bool = Field(True, description="compute reference log-probs once before training")
    share_prompt: Bool = Field(
        True,
        description="run each pair's common prefix (the prompt) once, not once per side; exact. Applies where "
        "train.padding_free and attn_implementation packed_sdpa; the stage summary says whether it was used",
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> "DPOStageConfig":
        mpl = self.data.max_prompt_length
        if mpl is not None and mpl >= self.data.max_length:
            raise ValueError(f"data.max_prompt_length ({mpl}) must be smaller than data.max_length ({self.data.max_length})")
        if self.label_smoothing and self.loss_type not in LABEL_SMOOTHING_LOSSES:
            raise ValueError(f"label_smoothing is only used by loss_type {' or '.join(LABEL_SMOOTHING_LOSSES)}, not {self.loss_type!r}")
        return self


def pair_batch(data: dict[str, Ragged], rows, *, padding_free: bool, pad_id: int, share_prompt: bool = False) -> dict:
    """B pairs -> one batch of 2B sequences: [chosen_1 .. chosen_B, rejected_1 .. rejected_B].

    share_prompt (padding-free only): the row holds, per pair, the chosen sequence and then only the
    rejected tokens after the two sides' common prefix (the prompt, at least). Labels, lengths and
    the head see the full sequences (`virtual` layout); `to_virtual`/`to_real` map between the two
    (`attention.packed_sdpa_attention`). Exact: under causal attention a prefix's hidden states do
    not depend on what follows it.
    """
    chosen = [data["chosen_input_ids"][i] for i in rows]
    rejected = [data["rejected_input_ids"][i] for i in rows]
    sequences = [(ids, data["chosen_labels"][i]) for ids, i in zip(chosen, rows)]
    sequences += [(ids, data["rejected_labels"][i]) for ids, i in zip(rejected, rows)]
    batch = collate(sequences, padding_free=padding_free, pad_id=pad_id)
    if share_prompt and padding_free:
        batch |= shared_prefix_layout(chosen, rejected, batch)
    return batch


def shares_prompt(cfg: DPOStageConfig) -> bool:
    """Prompt sharing needs a packed row and the attention kernel that understands the layout."""
    return cfg.share_prompt and cfg.train.padding_free and cfg.train.attn_implementation == "packed_sdpa"


def shared_prefix_layout(chosen: list[np.ndarray], rejected: list[np.ndarray], batch: dict) -> dict:
    """The row without each pair's repeated prefix, and the index maps to and from the full layout."""
    b = len(chosen)
    starts = np.cumsum([0, *batch["seq_lengths"][:-1]])  # of each full sequence in the virtual layout
    to_virtual = np.empty(sum(batch["seq_lengths"]), dtype=np.int64)  # virtual position -> row position
    to_real = []  # row position -> virtual position (the chosen copy of a shared token)
    row = 0
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        n = min(len(c), len(r))
        differ = np.flatnonzero(c[:n] != r[:n])
        shared = int(differ[0]) if len(differ) else n
        vc, vr = starts[i], starts[b + i]
        to_virtual[vc : vc + len(c)] = row + np.arange(len(c))
        to_virtual[vr : vr + shared] = row + np.arange(shared)
        to_virtual[vr + shared : vr + len(r)] = row + len(c) + np.arange(len(r) - shared)
        to_real += [vc + np.arange(len(c)), vr + shared + np.arange(len(r) - shared)]
        row += len(c) + len(r) - shared
    to_real = torch.as_tensor(np.concatenate(to_real))
    return {
        "input_ids": batch["input_ids"][:, to_real],
        "position_ids": batch["position_ids"][:, to_real],
        "to_virtual": torch.as_tensor(to_virtual),
        "to_real": to_real,
    }


def sequence_logps_head(batch: dict) -> Callable:
    """The loss head for `install_head_forward`: (hidden, lm_head weight) -> (logps_sum [2B], n_tokens [2B]).

    A packed row is first re-laid out as one row per sequence (hidden states and labels), so the
    sums come out per sequence; only completion tokens are projected onto the vocabulary.
    """
    labels = batch["labels"]

    def head(hidden: torch.Tensor, weight: torch.Tensor):
        if batch["attention_mask"] is None:  # padding-free packed row
            return chunked_sequence_logps(
                unpack_rows(hidden, batch["seq_lengths"], 0.0), weight, unpack_rows(labels, batch["seq_lengths"], IGNORE_INDEX)
            )
        return chunked_sequence_logps(hidden, weight, labels)

    return head


def forward_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over a pair batch: (log-prob sums [2B], completion token counts [2B])."""
    shared = (batch["to_virtual"], batch["to_real"]) if "to_virtual" in batch else None
    return model(batch["input_ids"], head=sequence_logps_head(batch), position_ids=batch["position_ids"],
                 attention_mask=batch["attention_mask"], packed_lengths=batch["packed_lengths"], shared_prefix=shared)


@torch.no_grad()
def compute_reference_logps(accelerator, model, data: dict[str, Ragged], *, batch_size: int, padding_free: bool, pad_id: int, share_prompt: bool = False) -> dict:
    """Log-prob sums and token counts of every pair under `model` (the frozen starting model).

    Each process takes a contiguous share of the rows (every process runs the same number of
    forwards, as FSDP requires; the last share is padded with repeats), then the shares are gathered.
    """
    n = len(data["chosen_input_ids"])
    share = math.ceil(n / accelerator.num_processes)
    start = accelerator.process_index * share
    rows = [min(i, n - 1) for i in range(start, start + share)]
    out = {k: [] for k in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}
    was_training = model.training
    model.eval()
    for i in range(0, share, batch_size):
        chunk = rows[i : i + batch_size]
        batch = to_device(pair_batch(data, chunk, padding_free=padding_free, pad_id=pad_id, share_prompt=share_prompt), accelerator.device)
        logps, tokens = forward_logps(model, batch)
        b = len(chunk)
        out["chosen"].append(logps[:b].float())
        out["rejected"].append(logps[b:].float())
        out["chosen_tokens"].append(tokens[:b])
        out["rejected_tokens"].append(tokens[b:])
    model.train(was_training)
    return {k: accelerator.gather(torch.cat(v)).cpu()[:n] for k, v in out.items()}


def reference_logps(ref_table: dict | None, reference, rows, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen reference's (chosen [B], rejected [B], token counts [2B]) for a pair batch:
    looked up in the precomputed table, or one no-grad forward pass of the frozen copy."""
    device = batch["input_ids"].device
    if ref_table is not None:
        index = torch.as_tensor(rows, dtype=torch.long)
        tokens = torch.cat([ref_table["chosen_tokens"][index], ref_table["rejected_tokens"][index]])
        return ref_table["chosen"][index].to(device), ref_table["rejected"][index].to(device), tokens.to(device)
    with torch.no_grad():
        logps, tokens = forward_logps(reference, batch)
    b = len(rows)
    return logps[:b].float(), logps[b:].float(), tokens


def load_or_compute_reference(accelerator, model, data, cfg: DPOStageConfig, *, key: dict, out_dir: Path, pad_id: int) -> dict:
    """`out_dir/reference_logps.pt` if it was computed for this data and model, else compute and store it.

    Several processes: the main process reads the file and hands it to the others (they all decide
    alike, and need not see its file system); a computation is shared (`compute_reference_logps`)."""
    from accelerate.utils import broadcast_object_list

    path = out_dir / REFERENCE_FILE
    stored = None
    if accelerator.is_main_process and path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated or garbled: the same numbers are computed again
            log.warning("%s is damaged (%s: %s); computing the reference log-probs again", path, type(exc).__name__, exc)
        stored = stored if isinstance(stored, dict) and stored.get("key") == key else None
    if accelerator.num_processes > 1:
        stored = broadcast_object_list([stored])[0]
    if stored is not None:
        return stored
    ref = compute_reference_logps(accelerator, model, data, batch_size=cfg.train.batch_size, padding_free=cfg.train.padding_free, pad_id=pad_id,
                                  share_prompt=shares_prompt(cfg))
    ref["key"] = key
    if accelerator.is_main_process:
        with atomic_file(path, binary=True) as f:
            torch.save(ref, f)
    accelerator.wait_for_everyone()
    return ref


@one_writer  # the writing process holds a lock on out_dir for the whole call (distributed.py)
def train_dpo(cfg: DPOStageConfig, *, model_dir: Path, data_dir: Path, out_dir: Path, on_log: OnLog | None = None) -> dict:
    """Run (or resume, or skip if finished) the DPO stage; return the summary of final metrics."""
    model_dir, data_dir, out_dir = Path(model_dir), Path(data_dir), Path(out_dir)
    if (done := finished_summary(out_dir)) is not None:
        return done
    # (its embedding resize is a no-op after stage 2, which already added <think>)
    setup = setup_training(cfg, "dpo", model_dir=model_dir, data_dir=data_dir, out_dir=out_dir, columns=COLUMNS)
    accelerator, plan, data, train = setup.accelerator, setup.plan, setup.data, cfg.train

    # --- policy (and, without precomputation, a frozen reference copy) ---------------------------
    disable_dropout(setup.model)
    reference = None
    if not cfg.precompute_ref_logps:
        reference = copy.deepcopy(setup.model).requires_grad_(False).eval()
        install_head_forward(reference)
        if train.distributed == "fsdp":
            reference = shard_model(reference, accelerator)
        else:
            reference = accelerator.prepare_model(reference, evaluation_mode=True)
    model, optimizer, scheduler = prepare_training(setup)

    # --- reference log-probs, from the starting weights (so before any resume) --------------------
    ref_table, reference_s = None, 0.0
    if cfg.precompute_ref_logps:
        key = {"data": setup.data_fp, "model": read_fingerprint(model_dir) or str(model_dir.resolve()), "precision": setup.precision}
        started = time.perf_counter()
        ref_table = load_or_compute_reference(accelerator, model, data, cfg, key=key, out_dir=out_dir, pad_id=setup.pad_id)
        reference_s = time.perf_counter() - started
    step, progress = maybe_resume(setup)

    # --- the loop --------------------------------------------------------------------------------
    accum, pairs_per_micro = train.grad_accum_steps, train.batch_size
    share_prompt = shares_prompt(cfg)
    window = LogWindow(("micro_batches", "pairs", *METRIC_KEYS), rates=("tokens", "pairs"))
    bar = progress_bar(setup, step)
    model.train()
    try:
        while step < plan.total_steps:
            step_loss = 0.0
            for i, g in enumerate(range(step * accum, (step + 1) * accum)):
                rows = micro_batch_rows(plan, setup.n_rows, train.batch_size, train.seed, g, accelerator.process_index, accelerator.num_processes)
                batch = pair_batch(data, rows, padding_free=train.padding_free, pad_id=setup.pad_id, share_prompt=share_prompt)
                batch = to_device(batch, accelerator.device)
                with gradient_sync(accelerator, model, last=i == accum - 1):
                    logps, tokens = forward_logps(model, batch)  # chosen and rejected in ONE pass
                    b = len(rows)
                    policy_chosen, policy_rejected = logps[:b], logps[b:]
                    ref_chosen, ref_rejected, ref_tokens = reference_logps(ref_table, reference, rows, batch)
                    if cfg.loss_type == "ipo":  # IPO is defined on per-token averages
                        policy_chosen, policy_rejected = policy_chosen / tokens[:b].clamp(min=1), policy_rejected / tokens[b:].clamp(min=1)
                        ref_chosen, ref_rejected = ref_chosen / ref_tokens[:b].clamp(min=1), ref_rejected / ref_tokens[b:].clamp(min=1)
                    losses, chosen_rewards, rejected_rewards = dpo_loss(
                        policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                        beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                    )
                    # Mean over the step's pairs on this process; DDP averages over processes.
                    accelerator.backward(losses.sum() / (pairs_per_micro * accum))
                # Micro-batches have equal size: the mean of their means is the mean over the pairs.
                metrics = dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
                step_loss += metrics["loss"]
                window.add({**metrics, "micro_batches": 1, "pairs": b, "tokens": sum(batch["seq_lengths"])})

            grad_norm, learning_rate = optimizer_step(setup, model, optimizer, scheduler, step=step + 1, loss=step_loss)
            step += 1
            window.end_step(grad_norm)
            bar.update(1)

            if due(step, train.logging_steps, plan.total_steps):
                sums, shared = window.flush(setup, progress, step, learning_rate)
                metrics = {k: sums[k] / sums["micro_batches"] for k in METRIC_KEYS} | shared
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
                log_metrics(setup, progress, step, metrics, on_log)
            save_if_due(setup, step, progress, window.watch)
    finally:
        bar.close()

    # --- the artifact ----------------------------------------------------------------------------
    extra = {
        "reference_logps_s": reference_s,  # this call's precompute (about 0 when reused on resume)
        "shared_prompt": share_prompt,
        "pairs": setup.n_rows,
    }
    return finish(setup, model, progress, extra)


# --- the stage declaration -----------------------------------------------------------------------


def _run(ctx: StageContext) -> dict:
    return train_dpo(ctx.config, model_dir=ctx.inputs["model"], data_dir=ctx.inputs["data"], out_dir=ctx.out, on_log=ctx.on_log)


STAGE = Stage(
    name="dpo",
    section="dpo",
    config=DPOStageConfig,
    key_config=section_without_mixture("dpo"),
    check=training_check("dpo", "preference"),
    hands_on=MODEL,
    run=_run,
    launch_inputs=("model", "data"),
    launch=train_launch,
    libraries=("torch", "transformers", "tokenizers", "accelerate", "einops"),
    description="preference optimisation on chosen/rejected pairs",
)


def main(argv: list[str] | None = None) -> None:
    stage_main(argv, train_dpo, "Preference optimisation stage (dpo).", (STAGE.name,), DPOStageConfig, inputs=STAGE.launch_inputs)


if __name__ == "__main__":
    main()
