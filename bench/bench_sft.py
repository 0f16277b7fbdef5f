"""SFT speed, ours vs TRL's SFTTrainer, side by side in one process on the same model and data.

Both sides train the real SmolLM2-135M-Instruct (the offline base checkpoint) in fp32 on the same
GSM8K chats, tokenized once and fed to both as token ids: same max length, same batch (8 x 1),
loss on all tokens, AdamW at a constant learning rate, no gradient checkpointing. TRL runs with
its defaults otherwise (padded batches, its chunked NLL). Ours runs `trlm.stages.sft.train_sft`,
the stage itself (padding-free rows, chunked CE that never materialises full logits).

Phases alternate (ours, TRL, ours, TRL, ...) so that machine noise hits both. Reported per side:
median non-padding tokens/s over the steps of all its phases (the first step of each phase
excluded), peak extra RSS of a phase (model + optimizer + activations), and the first-step loss on
an identical batch, which must agree within 1e-3 in fp32. The last line is `ratio=<ours/trl>`.

Usage (needs the bench extra: pip install -e ".[bench]"):
    python bench/bench_sft.py [--rows 64] [--max-length 512] [--batch 8] [--steps 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, base_model_dir, data_root, machine, median_rate, print_table, quiet, scratch_dir, write_json  # noqa: E402


def load_chats(root: Path, rows: int) -> list[list[dict]]:
    chats = []
    with open(root / "openai__gsm8k" / "messages" / "train.jsonl") as f:
        for line in f:
            chats.append(json.loads(line)["messages"])
            if len(chats) == rows:
                break
    return chats


def tokenize(tokenizer, chats: list[list[dict]], max_length: int) -> list[list[int]]:
    out = []
    for messages in chats:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        out.append(list(ids)[:max_length])
    return out


def write_our_data(sequences: list[list[int]], tokenizer, directory: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    col = pa.array(sequences, type=pa.list_(pa.int32()))
    pq.write_table(pa.table({"input_ids": col, "labels": col}), directory / "train.parquet")
    tokenizer.save_pretrained(directory / "tokenizer")
    return directory


def run_ours(model_dir: Path, data_dir: Path, batch: int, steps: int, max_length: int, work: Path) -> dict:
    from trlm.recipe import MixtureConfig
    from trlm.stages.sft import SFTStageConfig
    from trlm.training.config import TrainConfig
    from trlm.stages.sft import train_sft

    cfg = SFTStageConfig(
        data=MixtureConfig(spec="bench", chat_template="-", max_length=max_length),
        train=TrainConfig(max_steps=steps, batch_size=batch, grad_accum_steps=1, learning_rate=1e-5, lr_scheduler="constant",
                          save_steps=10_000, logging_steps=1, precision="fp32", padding_free=True),
        loss_type="nll",
    )
    logs: list[dict] = []
    out = Path(tempfile.mkdtemp(dir=work, prefix="ours-"))
    with quiet(), PeakRSS() as mem:
        train_sft(cfg, model_dir=model_dir, data_dir=data_dir, out_dir=out, on_log=lambda m, s: logs.append({"step": s, **m}))
    return {"rates": [m["tokens_per_second"] for m in logs], "first_loss": logs[0]["loss"], "peak_mib": mem.extra_mib}


def run_trl(model_dir: Path, sequences: list[list[int]], tokenizer, batch: int, steps: int, max_length: int, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.pending, self.t0, self.losses = [], [], 0, None, []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.tokens.append(self.pending)
            self.pending = 0

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    clock = StepClock()
    args = SFTConfig(
        output_dir=str(Path(tempfile.mkdtemp(dir=work, prefix="trl-"))), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to=[], bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        max_length=max_length, packing=False, padding_free=False, disable_tqdm=True, seed=42, dataloader_drop_last=True,
    )
    with quiet(), PeakRSS() as mem:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": sequences}), processing_class=tokenizer, callbacks=[clock])
        original = trainer.compute_loss

        def counting_compute_loss(model, inputs, *a, **kw):
            clock.pending += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(inputs["input_ids"].numel())
            return original(model, inputs, *a, **kw)

        trainer.compute_loss = counting_compute_loss
        trainer.train()
    del trainer, model
    return {"rates": [n / t for n, t in zip(clock.tokens, clock.times)], "first_loss": clock.losses[0], "peak_mib": mem.extra_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per phase")
    parser.add_argument("--rounds", type=int, default=2, help="alternating ours/TRL phase pairs")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model_dir = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sequences = tokenize(tokenizer, load_chats(data_root(), args.rows), args.max_length)
    work = scratch_dir("trlm-bench-sft-")
    data_dir = write_our_data(sequences, tokenizer, work / "data")
    agree_dir = write_our_data(sequences[: args.batch], tokenizer, work / "agree")
    print(f"machine: {machine()}; model: {model_dir}; {len(sequences)} GSM8K chats, max_length {args.max_length}, "
          f"batch {args.batch}x1, mean length {sum(map(len, sequences)) / len(sequences):.0f} tokens", flush=True)

    # First-step loss on one identical batch (all rows of a batch-sized dataset), before any update.
    ours_first = run_ours(model_dir, agree_dir, args.batch, 1, args.max_length, work)["first_loss"]
    trl_first = run_trl(model_dir, sequences[: args.batch], tokenizer, args.batch, 1, args.max_length, work)["first_loss"]

    results = {"ours": [], "trl": []}
    for r in range(args.rounds):
        results["ours"].append(run_ours(model_dir, data_dir, args.batch, args.steps, args.max_length, work))
        print(f"round {r + 1}: ours {median_rate(results['ours'][-1]['rates']):.1f} tok/s", flush=True)
        results["trl"].append(run_trl(model_dir, sequences, tokenizer, args.batch, args.steps, args.max_length, work))
        print(f"round {r + 1}: trl  {median_rate(results['trl'][-1]['rates']):.1f} tok/s", flush=True)

    summary = {}
    for side, phases in results.items():
        rates = [x for p in phases for x in (p["rates"][1:] if len(p["rates"]) > 1 else p["rates"])]
        summary[side] = {"tokens_per_s": median_rate([0.0, *rates]), "peak_extra_mib": max(p["peak_mib"] for p in phases)}
    rows = [
        {"side": "ours", "non-pad tokens/s": f"{summary['ours']['tokens_per_s']:.1f}", "peak extra RSS MiB": f"{summary['ours']['peak_extra_mib']:.0f}", "first-step loss": f"{ours_first:.6f}"},
        {"side": "trl", "non-pad tokens/s": f"{summary['trl']['tokens_per_s']:.1f}", "peak extra RSS MiB": f"{summary['trl']['peak_extra_mib']:.0f}", "first-step loss": f"{trl_first:.6f}"},
    ]
    print_table(rows, ["side", "non-pad tokens/s", "peak extra RSS MiB", "first-step loss"])
    diff = abs(ours_first - trl_first)
    print(f"loss agreement: |ours - trl| = {diff:.2e} ({'OK' if diff < 1e-3 else 'MISMATCH'}; fp32, same batch, loss on all tokens)")
    ratio = summary["ours"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
    if args.out:
        write_json(args.out, {"machine": machine(), "args": vars(args) | {"out": str(args.out)}, "summary": summary,
                              "first_loss": {"ours": ours_first, "trl": trl_first}, "ratio": ratio, "date": time.strftime("%Y-%m-%d")})
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
