"""Stages `sft-general` and `sft-think`: supervised fine-tuning on a tokenized data directory.

What it does, top to bottom (`train_sft`):

1. If `out_dir/fingerprint.json` exists the stage is finished: return the saved summary.
2. Load the data directory written by data-prep (`train.parquet` with `input_ids`/`labels`,
   `tokenizer/`) and the starting model (`model_dir`, a standard HF checkpoint).
3. If the tokenizer has tokens the model lacks (`<think>`, `</think>` in stage 2), grow the tied
   embedding once, each new row = the mean of its text pieces' rows (see training.resize_for_tokenizer). eos = pad = `<|im_end|>`.
4. AdamW (no decay on biases/norm gains), warmup + constant/linear/cosine/cosine_with_min_lr,
   optional gradient checkpointing and NEFTune (training forward passes only).
5. Resume from the newest complete checkpoint in `out_dir/checkpoints/` if there is one.
6. The loop: each optimizer step takes `grad_accum_steps` micro-batches of `batch_size` sequences
   per process. The loss is the per-token NLL (or DFT) SUMMED over the step's micro-batches and
   processes and divided by the number of target tokens of the WHOLE step, so batch 8 x accum 1
   and batch 1 x accum 8 give the same gradient. The logits are never materialised: the backbone
   gives hidden states and `chunked_sft_loss_sum` projects only target positions, in fp32 chunks.
   Gradients are clipped to `max_grad_norm`. Every `logging_steps`: `on_log(metrics, step)` with
   loss, mean_token_accuracy, grad_norm, learning_rate, tokens_per_second, epoch. Every
   `save_steps` and at the end: an atomic checkpoint (model, optimizer, scheduler, RNG, data
   position).
7. Write `out_dir/model/` (HF safetensors + tokenizer + generation config), `metrics.json`, then
   `fingerprint.json` last; then delete `checkpoints/` unless `keep_checkpoints`.

Trade-offs:
* Padding-free batching (default) packs a micro-batch into one row: no compute on padding, the
  same loss as a padded batch (tested to 1e-5 in fp32). The default attention kernel
  (`training.packed_sdpa_attention`) attends within each document only: varlen flash attention on
  a GPU, one SDPA call per document on a CPU. transformers' `sdpa` would compute every
  cross-document block of a dense [T, T] mask (28% of the CPU step time at batch 8 x ~226 tokens).
* `compile: true` compiles each layer's norms and MLP: +26% tokens/s on an H100 (97k -> 123k at
  32 x 4,096 tokens). Off by default: compiling costs time up front, and its gain was only measured
  on the GPU; the published recipe turns it on.
* The loss is a token mean over the whole optimizer step (the transformers >= 4.46 rule the
  published run used), not a mean of per-sequence means: long sequences weigh more.
* Resume is exact (bit-identical on CPU in fp32: same data order, RNG, optimizer state).
* `bf16-pure` halves memory and follows the published run, at the cost of rounding small updates.

Usage:
    python -m trlm.stages.sft --recipe offline-smoke --stage sft-think \
        --model-dir MODEL --data-dir DATA/sft-think --out-dir OUT
    python -m trlm.stages.sft --config sft.yaml --model-dir ... --data-dir ... --out-dir ...
    # GPUs (configs in trlm/accelerate_configs/):
    accelerate launch --config_file trlm/accelerate_configs/single_gpu.yaml -m trlm.stages.sft ...
    accelerate launch --config_file trlm/accelerate_configs/multi_gpu.yaml  -m trlm.stages.sft ...  # DDP
    accelerate launch --config_file trlm/accelerate_configs/fsdp.yaml       -m trlm.stages.sft ...  # FSDP2
On CPU it runs in-process and single-process; `batch_size` is per process, so the global batch is
batch_size x grad_accum_steps x num_processes. (Several CPU processes, gloo DDP, for testing:
`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m trlm.stages.sft ...`.)
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable

from accelerate.utils import set_seed

from trlm.recipe import SFTStageConfig
from trlm.stages.losses import attach_neftune, chunked_sft_loss_sum, count_target_tokens
from trlm.stages.training import (
    Stopwatch,
    build_optimizer,
    build_scheduler,
    remove_incomplete,
    clip_gradients,
    compile_blocks,
    collate,
    data_fingerprint,
    enable_gradient_checkpointing,
    env_summary,
    export_model,
    finish_stage,
    finished_summary,
    install_head_forward,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    load_ragged,
    load_tokenizer,
    make_accelerator,
    micro_batch_rows,
    parse_stage_args,
    plan_steps,
    progress_bar,
    reduce_sums,
    resize_for_tokenizer,
    save_checkpoint,
    set_end_of_turn,
    to_device,
    trainer_state,
)

OnLog = Callable[[dict[str, float], int], None]


def train_sft(cfg: SFTStageConfig, *, model_dir: Path, data_dir: Path, out_dir: Path, on_log: OnLog | None = None) -> dict:
    """Run (or resume, or skip if finished) one SFT stage; return the summary of final metrics."""
    model_dir, data_dir, out_dir = Path(model_dir), Path(data_dir), Path(out_dir)
    if (done := finished_summary(out_dir)) is not None:
        return done
    train = cfg.train
    accelerator, dtype, precision = make_accelerator(train.precision)
    is_main = accelerator.is_main_process
    set_seed(train.seed)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete(out_dir)  # half-written checkpoints of a killed run are never resumed from
    accelerator.wait_for_everyone()

    # --- data ------------------------------------------------------------------------------------
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    data = load_ragged(data_dir / "train.parquet", ["input_ids", "labels"])
    n_rows = len(data["input_ids"])
    plan = plan_steps(n_rows, train, accelerator.num_processes)
    data_fp = data_fingerprint(data_dir)

    # --- model -----------------------------------------------------------------------------------
    model = load_model(model_dir, dtype, train.attn_implementation)
    added_tokens = resize_for_tokenizer(model, tokenizer)  # <think>, </think> in stage 2
    pad_id = set_end_of_turn(model, tokenizer)
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if train.compile:
        compile_blocks(model)
    base = model  # the unwrapped model: NEFTune reads its per-token document lengths from it
    neftune = attach_neftune(base, cfg.neftune_alpha) if cfg.neftune_alpha else None
    install_head_forward(model)
    optimizer = build_optimizer(model, train.learning_rate, train.weight_decay)
    scheduler = build_scheduler(optimizer, train, plan.total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # --- resume ----------------------------------------------------------------------------------
    step, history, runtime_s, total_tokens = 0, [], 0.0, 0.0
    if (checkpoint := latest_checkpoint(out_dir)) is not None:
        state = load_checkpoint(accelerator, checkpoint, cfg, data_fp=data_fp)
        step, history, runtime_s, total_tokens = state["step"], state["history"], state["runtime_s"], state["total_tokens"]

    # --- the loop --------------------------------------------------------------------------------
    accum = train.grad_accum_steps
    window = {"loss_sum": 0.0, "targets": 0.0, "correct": 0.0, "tokens": 0.0}
    window_steps, window_grad_norm = 0, 0.0
    watch = Stopwatch()
    bar = progress_bar(plan.total_steps, step, "sft", is_main)
    model.train()
    try:
        while step < plan.total_steps:
            # This step's micro-batches, and its number of target tokens over all processes: the
            # divisor of every micro-batch's loss sum (the gradient-accumulation rule).
            micro_batches = []
            for g in range(step * accum, (step + 1) * accum):
                rows = micro_batch_rows(plan, n_rows, train.batch_size, train.seed, g, accelerator.process_index, accelerator.num_processes)
                sequences = [(data["input_ids"][i], data["labels"][i]) for i in rows]
                micro_batches.append(to_device(collate(sequences, padding_free=train.padding_free, pad_id=pad_id), accelerator.device))
            local_targets = sum(count_target_tokens(mb["labels"]) for mb in micro_batches)
            step_targets = max(1.0, reduce_sums(accelerator, {"n": local_targets})["n"])

            for i, mb in enumerate(micro_batches):
                # DDP: all-reduce the gradients only once, on the step's last micro-batch.
                with accelerator.no_sync(model) if i < accum - 1 else nullcontext():
                    base._neftune_seq_lengths = mb["doc_lengths"]
                    head = partial(chunked_sft_loss_sum, labels=mb["labels"], loss_type=cfg.loss_type)
                    loss_sum, n_targets, n_correct = model(
                        mb["input_ids"], head=head, position_ids=mb["position_ids"], attention_mask=mb["attention_mask"],
                        packed_lengths=mb["packed_lengths"],
                    )
                    # DDP/FSDP average gradients over processes; x num_processes turns that into a sum.
                    accelerator.backward(loss_sum / step_targets * accelerator.num_processes)
                window["loss_sum"] += float(loss_sum.detach())
                window["targets"] += float(n_targets)
                window["correct"] += float(n_correct)
                window["tokens"] += float(sum(mb["seq_lengths"]))  # non-padding tokens

            grad_norm = clip_gradients(accelerator, model, train.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            window_grad_norm += grad_norm
            bar.update(1)

            if step % train.logging_steps == 0 or step == plan.total_steps:
                sums = reduce_sums(accelerator, window)
                elapsed = watch.elapsed()
                total_tokens += sums["tokens"]
                metrics = {
                    "loss": sums["loss_sum"] / max(1.0, sums["targets"]),
                    "mean_token_accuracy": sums["correct"] / max(1.0, sums["targets"]),
                    "grad_norm": window_grad_norm / window_steps,
                    "learning_rate": learning_rate,
                    "tokens_per_second": sums["tokens"] / elapsed,
                    "epoch": step * accum / plan.micro_batches_per_epoch,
                    "num_tokens": total_tokens,
                }
                history.append({"step": step, **metrics})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
                window = dict.fromkeys(window, 0.0)
                window_steps, window_grad_norm = 0, 0.0
                runtime_s += elapsed
                watch.reset()
                if on_log is not None and is_main:
                    on_log(metrics, step)

            if step % train.save_steps == 0 or step == plan.total_steps:
                with watch.excluded():
                    state = trainer_state(cfg, plan, step, data_fp=data_fp, runtime_s=runtime_s, total_tokens=total_tokens, history=history)
                    save_checkpoint(accelerator, out_dir, step, state, keep=train.save_total_limit)
    finally:
        bar.close()
        if neftune is not None:
            neftune.remove()
        base._neftune_seq_lengths = None

    # --- the artifact ----------------------------------------------------------------------------
    export_model(accelerator, model, tokenizer, out_dir)
    last = history[-1] if history else {}
    summary = {
        **{k: v for k, v in last.items() if k != "step"},
        "steps": plan.total_steps,
        "train_runtime_s": runtime_s,
        "train_tokens_per_second": total_tokens / max(runtime_s, 1e-9),
        "rows": n_rows,
        "added_tokens": added_tokens,
        "model_dir": str(out_dir / "model"),
    }
    if is_main:
        finish_stage(out_dir, summary, history, meta={"stage": "sft", **env_summary(accelerator, precision)}, keep_checkpoints=train.keep_checkpoints)
    accelerator.wait_for_everyone()
    return summary


def main(argv: list[str] | None = None) -> None:
    from tqdm.auto import tqdm

    args, cfg = parse_stage_args(argv, "Supervised fine-tuning stage (sft-general / sft-think).", "sft-general", SFTStageConfig)

    def print_metrics(metrics: dict[str, float], step: int) -> None:
        tqdm.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in metrics.items()}}))

    summary = train_sft(cfg, model_dir=args.model_dir, data_dir=args.data_dir, out_dir=args.out_dir, on_log=print_metrics)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch, once
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
