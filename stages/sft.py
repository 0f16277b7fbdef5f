"""Stages `sft-general` and `sft-think`: supervised fine-tuning on data-prep's tokenized mixture.

`train_sft` starts from the previous stage's model, grows the tied embedding for tokens it lacks
(`<think>`, `</think>`), and trains with AdamW. The loss is a token mean over the whole optimizer step
(micro-batches and processes), so batch 8 x accum 1 and batch 1 x accum 8 give the same gradient; the
logits are never materialised. A non-finite loss or gradient stops the stage before the step is
applied; checkpoints are atomic and resume is exact. It writes `model/`, `metrics.json`, then
`fingerprint.json` last. This file holds what is SFT's own (NEFTune, the loop body); the rest is the
training engine (`trlm/training/`). Step by step, trade-offs and measurements: docs/training.md.

Usage:
    python -m trlm.stages.sft --recipe offline-smoke --stage sft-think         --model-dir MODEL --data-dir DATA/sft-think --out-dir OUT
    python -m trlm.stages.sft --config sft.yaml --model-dir ... --data-dir ... --out-dir ...
    torchrun --nproc-per-node 2 -m trlm.stages.sft ...             # 2 processes (GPUs, or CPU with gloo)
    # or accelerate (configs in trlm/accelerate_configs/):
    accelerate launch --config_file trlm/accelerate_configs/single_gpu.yaml -m trlm.stages.sft ...
    accelerate launch --config_file trlm/accelerate_configs/multi_gpu.yaml  -m trlm.stages.sft ...  # DDP
    accelerate launch --config_file trlm/accelerate_configs/fsdp.yaml       -m trlm.stages.sft ...  # FSDP2 (train.distributed: fsdp)
Several machines: README "Several GPUs and several machines".
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Literal

from trlm.recipe import MixtureConfig, NonNegativeFloat, Strict, section_name
from trlm.stage import MODEL, Stage, StageContext, section_without_mixture, train_launch, training_check
from trlm.training.batching import collate, micro_batch_rows, to_device
from trlm.training.checkpoints import finished_summary
from trlm.training.config import TrainConfig
from trlm.training.distributed import gradient_sync, one_writer
from trlm.training.entry import stage_main
from trlm.training.losses import SFT_LOSS_TYPES, attach_neftune, chunked_sft_loss_sum, count_target_tokens
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
    reduce_sums,
    save_if_due,
    setup_training,
)


class SFTStageConfig(Strict):
    data: MixtureConfig
    train: TrainConfig
    loss_type: Literal[SFT_LOSS_TYPES] = "nll"
    neftune_alpha: NonNegativeFloat | None = None


@one_writer  # the writing process holds a lock on out_dir for the whole call (distributed.py)
def train_sft(cfg: SFTStageConfig, *, model_dir: Path, data_dir: Path, out_dir: Path, on_log: OnLog | None = None) -> dict:
    """Run (or resume, or skip if finished) one SFT stage; return the summary of final metrics."""
    model_dir, data_dir, out_dir = Path(model_dir), Path(data_dir), Path(out_dir)
    if (done := finished_summary(out_dir)) is not None:
        return done
    setup = setup_training(cfg, "sft", model_dir=model_dir, data_dir=data_dir, out_dir=out_dir, columns=["input_ids", "labels"])
    accelerator, plan, data, train = setup.accelerator, setup.plan, setup.data, cfg.train
    # NEFTune's hook goes on the model before accelerate wraps it; the loop hands it each
    # micro-batch's per-token document lengths.
    neftune = attach_neftune(setup.model, cfg.neftune_alpha) if cfg.neftune_alpha else None
    model, optimizer, scheduler = prepare_training(setup)
    step, progress = maybe_resume(setup)

    # --- the loop --------------------------------------------------------------------------------
    accum = train.grad_accum_steps
    window = LogWindow(("loss_sum", "targets", "correct"))
    bar = progress_bar(setup, step)
    model.train()
    try:
        while step < plan.total_steps:
            # This step's micro-batches, and its number of target tokens over all processes: the
            # divisor of every micro-batch's loss sum (the gradient-accumulation rule).
            micro_batches = []
            for g in range(step * accum, (step + 1) * accum):
                rows = micro_batch_rows(plan, setup.n_rows, train.batch_size, train.seed, g, accelerator.process_index, accelerator.num_processes)
                sequences = [(data["input_ids"][i], data["labels"][i]) for i in rows]
                micro_batches.append(to_device(collate(sequences, padding_free=train.padding_free, pad_id=setup.pad_id), accelerator.device))
            local_targets = sum(count_target_tokens(mb["labels"]) for mb in micro_batches)
            step_targets = max(1.0, reduce_sums(accelerator, {"n": local_targets})["n"])

            step_loss = 0.0
            for i, mb in enumerate(micro_batches):
                # Several processes: reduce the gradients only once, on the step's last micro-batch.
                with gradient_sync(accelerator, model, last=i == accum - 1):
                    if neftune is not None:
                        neftune.lengths = mb["doc_lengths"]
                    head = partial(chunked_sft_loss_sum, labels=mb["labels"], loss_type=cfg.loss_type)
                    loss_sum, n_targets, n_correct = model(
                        mb["input_ids"], head=head, position_ids=mb["position_ids"], attention_mask=mb["attention_mask"],
                        packed_lengths=mb["packed_lengths"],
                    )
                    # DDP/FSDP average gradients over processes; x num_processes turns that into a sum.
                    accelerator.backward(loss_sum / step_targets * accelerator.num_processes)
                loss = float(loss_sum.detach())
                step_loss += loss
                window.add({"loss_sum": loss, "targets": n_targets, "correct": n_correct, "tokens": sum(mb["seq_lengths"])})  # non-padding tokens

            grad_norm, learning_rate = optimizer_step(setup, model, optimizer, scheduler, step=step + 1, loss=step_loss)
            step += 1
            window.end_step(grad_norm)
            bar.update(1)

            if due(step, train.logging_steps, plan.total_steps):
                sums, shared = window.flush(setup, progress, step, learning_rate)
                metrics = {
                    "loss": sums["loss_sum"] / max(1.0, sums["targets"]),
                    "mean_token_accuracy": sums["correct"] / max(1.0, sums["targets"]),
                    **shared,
                }
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
                log_metrics(setup, progress, step, metrics, on_log)
            save_if_due(setup, step, progress, window.watch)
    finally:
        bar.close()
        if neftune is not None:
            neftune.remove()

    # --- the artifact ----------------------------------------------------------------------------
    return finish(setup, model, progress, {"rows": setup.n_rows, "added_tokens": setup.added_tokens})


# --- the stage declarations: two stages, one recipe section each ---------------------------------

TRAINING_LIBRARIES = ("torch", "transformers", "tokenizers", "accelerate", "einops")


def _run(ctx: StageContext) -> dict:
    return train_sft(ctx.config, model_dir=ctx.inputs["model"], data_dir=ctx.inputs["data"], out_dir=ctx.out, on_log=ctx.on_log)


def _declare(name: str, description: str) -> Stage:
    section = section_name(name)
    return Stage(
        name=name,
        section=section,
        config=SFTStageConfig,
        key_config=section_without_mixture(section),
        check=training_check(section, "sft"),
        hands_on=MODEL,
        run=_run,
        launch_inputs=("model", "data"),
        launch=train_launch,
        libraries=TRAINING_LIBRARIES,
        description=description,
    )


SFT_GENERAL = _declare("sft-general", "general instruction SFT on the base model")
SFT_THINK = _declare("sft-think", "reasoning SFT with <think> traces")


def main(argv: list[str] | None = None) -> None:
    stage_main(argv, train_sft, "Supervised fine-tuning stage (sft-general / sft-think).", (SFT_GENERAL.name, SFT_THINK.name), SFTStageConfig,
               inputs=SFT_GENERAL.launch_inputs)


if __name__ == "__main__":
    main()
