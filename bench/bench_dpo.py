"""DPO speed, ours vs TRL's DPOTrainer, side by side in one process on the same model and pairs.

Both sides train the real SmolLM2-135M-Instruct (the offline base checkpoint) in fp32 on the same
hh-rlhf harmless-base pairs, rendered with the model's chat template: same max length (pairs that
would be truncated are left out, so no truncation rule differs), same batch (pairs x 1), loss on
the completion tokens, sigmoid loss, beta 0.1, AdamW at a constant learning rate.

- TRL runs with its defaults: a reference model forward on every step.
- Ours runs `trlm.stages.dpo.train_dpo`, the stage itself, with its defaults: reference log-probs
  precomputed once before training, and each pair's prompt run through the model once, not once
  per side (`share_prompt`). That pass is NOT free, so our pairs/s charges it: per pair, the training step
  time plus the precompute time (measured) divided by the pairs precomputed.

Phases alternate (ours, TRL, ...). Reported per side: pairs/s (median over steps, the first step
of each phase excluded), peak extra RSS of a phase, and the first-step loss and mean chosen
log-prob on one identical batch (policy == reference there, so the loss is ln 2 for both; the
log-prob agreement is what shows that both score the same tokens). Last line: `ratio=<ours/trl>`.

Usage (needs the bench extra: pip install -e ".[bench]"):
    python bench/bench_dpo.py [--pairs 32] [--max-length 384] [--batch 4] [--steps 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, base_model_dir, data_root, machine, median_rate, print_table, quiet, scratch_dir, write_json  # noqa: E402


def load_pairs(root: Path, tokenizer, n: int, max_length: int) -> list[dict]:
    """hh-rlhf pairs as (prompt text, chosen text, rejected text) and their token ids."""
    from trlm.data_spec import hh_rlhf_pairs

    pairs = []
    with gzip.open(root / "Anthropic__hh-rlhf" / "harmless-base" / "test.jsonl.gz", "rt") as f:
        for line in f:
            try:
                row = hh_rlhf_pairs(json.loads(line))
            except ValueError:
                continue
            if not row["prompt"] or row["chosen"] == row["rejected"] or row["prompt"][-1]["role"] != "user":
                continue
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            texts = {"prompt": prompt}
            for side in ("chosen", "rejected"):
                texts[side] = row[side][0]["content"] + tokenizer.eos_token
            ids = {k: tokenizer(v, add_special_tokens=False)["input_ids"] for k, v in texts.items()}
            if len(ids["prompt"]) + max(len(ids["chosen"]), len(ids["rejected"])) > max_length or not ids["chosen"] or not ids["rejected"]:
                continue
            pairs.append({"text": texts, "ids": ids})
            if len(pairs) == n:
                break
    return pairs


def write_our_data(pairs: list[dict], tokenizer, directory: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "prompt_length")}
    for p in pairs:
        prompt = p["ids"]["prompt"]
        for side in ("chosen", "rejected"):
            cols[f"{side}_input_ids"].append(prompt + p["ids"][side])
            cols[f"{side}_labels"].append([-100] * len(prompt) + p["ids"][side])
        cols["prompt_length"].append(len(prompt))
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: pa.array(v, type=pa.int32() if k == "prompt_length" else pa.list_(pa.int32())) for k, v in cols.items()})
    pq.write_table(table, directory / "train.parquet")
    tokenizer.save_pretrained(directory / "tokenizer")
    return directory


def run_ours(model_dir: Path, data_dir: Path, n_pairs: int, batch: int, steps: int, max_length: int, work: Path) -> dict:
    import trlm.stages.dpo as dpo
    from trlm.recipe import MixtureConfig
    from trlm.stages.dpo import DPOStageConfig
    from trlm.training.config import TrainConfig

    cfg = DPOStageConfig(
        data=MixtureConfig(spec="bench", chat_template="-", max_length=max_length),
        train=TrainConfig(max_steps=steps, batch_size=batch, grad_accum_steps=1, learning_rate=1e-6, lr_scheduler="constant",
                          save_steps=10_000, logging_steps=1, precision="fp32", padding_free=True, max_grad_norm=1.0),
        loss_type="sigmoid", beta=0.1,
    )
    original, precompute = dpo.compute_reference_logps, {"s": 0.0}

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            precompute["s"] += time.perf_counter() - t0

    logs: list[dict] = []
    dpo.compute_reference_logps = timed
    try:
        with quiet(), PeakRSS() as mem:
            dpo.train_dpo(cfg, model_dir=model_dir, data_dir=data_dir, out_dir=Path(tempfile.mkdtemp(dir=work, prefix="ours-")),
                          on_log=lambda m, s: logs.append({"step": s, **m}))
    finally:
        dpo.compute_reference_logps = original
    per_pair_precompute = precompute["s"] / n_pairs
    rates = [1.0 / (1.0 / m["pairs_per_second"] + per_pair_precompute) for m in logs]
    return {"rates": rates, "first_loss": logs[0]["loss"], "first_logps": logs[0]["logps/chosen"], "peak_mib": mem.extra_mib,
            "precompute_s_per_pair": per_pair_precompute}


def run_trl(model_dir: Path, pairs: list[dict], tokenizer, batch: int, steps: int, max_length: int, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.logs, self.t0 = [], [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(logs)

    clock = StepClock()
    args = DPOConfig(
        output_dir=str(Path(tempfile.mkdtemp(dir=work, prefix="trl-"))), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to=[], bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, max_length=max_length,
        loss_type=["sigmoid"], beta=0.1, disable_tqdm=True, seed=42, dataloader_drop_last=True, max_grad_norm=1.0,
    )
    dataset = Dataset.from_list([p["text"] for p in pairs])
    with quiet(), PeakRSS() as mem:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
        trainer.train()
    del trainer, model, ref
    return {"rates": [batch / t for t in clock.times], "first_loss": clock.logs[0]["loss"], "first_logps": clock.logs[0].get("logps/chosen"),
            "peak_mib": mem.extra_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model_dir = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = load_pairs(data_root(), tokenizer, args.pairs, args.max_length)
    work = scratch_dir("trlm-bench-dpo-")
    data_dir = write_our_data(pairs, tokenizer, work / "data")
    agree = pairs[: args.batch]
    agree_dir = write_our_data(agree, tokenizer, work / "agree")
    mean_len = sum(len(p["ids"]["prompt"]) * 2 + len(p["ids"]["chosen"]) + len(p["ids"]["rejected"]) for p in pairs) / len(pairs)
    print(f"machine: {machine()}; model: {model_dir}; {len(pairs)} hh-rlhf pairs, max_length {args.max_length}, "
          f"batch {args.batch} pairs x1, {mean_len:.0f} tokens per pair (chosen+rejected)", flush=True)

    ours_agree = run_ours(model_dir, agree_dir, len(agree), args.batch, 1, args.max_length, work)
    trl_agree = run_trl(model_dir, agree, tokenizer, args.batch, 1, args.max_length, work)

    results = {"ours": [], "trl": []}
    for r in range(args.rounds):
        results["ours"].append(run_ours(model_dir, data_dir, len(pairs), args.batch, args.steps, args.max_length, work))
        print(f"round {r + 1}: ours {median_rate(results['ours'][-1]['rates']):.2f} pairs/s "
              f"(incl. {results['ours'][-1]['precompute_s_per_pair']:.2f} s/pair of reference precompute)", flush=True)
        results["trl"].append(run_trl(model_dir, pairs, tokenizer, args.batch, args.steps, args.max_length, work))
        print(f"round {r + 1}: trl  {median_rate(results['trl'][-1]['rates']):.2f} pairs/s", flush=True)

    summary = {}
    for side, phases in results.items():
        rates = [x for p in phases for x in (p["rates"][1:] if len(p["rates"]) > 1 else p["rates"])]
        summary[side] = {"pairs_per_s": median_rate([0.0, *rates]), "peak_extra_mib": max(p["peak_mib"] for p in phases)}
    rows = [
        {"side": side, "pairs/s": f"{summary[side]['pairs_per_s']:.2f}", "peak extra RSS MiB": f"{summary[side]['peak_extra_mib']:.0f}",
         "first-step loss": f"{a['first_loss']:.6f}", "first-step logps/chosen": f"{a['first_logps']:.4f}"}
        for side, a in (("ours", ours_agree), ("trl", trl_agree))
    ]
    print_table(rows, ["side", "pairs/s", "peak extra RSS MiB", "first-step loss", "first-step logps/chosen"])
    d_loss = abs(ours_agree["first_loss"] - trl_agree["first_loss"])
    d_logps = abs(ours_agree["first_logps"] - trl_agree["first_logps"]) / max(1.0, abs(trl_agree["first_logps"]))
    ok = d_loss < 1e-3 and d_logps < 1e-3
    print(f"loss agreement: |ours - trl| = {d_loss:.2e}, logps/chosen relative difference {d_logps:.2e} ({'OK' if ok else 'MISMATCH'}; fp32, same batch)")
    ratio = summary["ours"]["pairs_per_s"] / summary["trl"]["pairs_per_s"]
    if args.out:
        write_json(args.out, {"machine": machine(), "args": vars(args) | {"out": str(args.out)}, "summary": summary,
                              "first": {"ours": ours_agree, "trl": trl_agree}, "ratio": ratio, "date": time.strftime("%Y-%m-%d")})
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
