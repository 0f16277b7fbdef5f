"""GRPO speed, ours vs TRL's GRPOTrainer, side by side on the same model, prompts, G and reward.

Both sides train the real SmolLM2-135M-Instruct (the offline base checkpoint) in fp32 on the CPU on
the first GSM8K train questions (the model's chat template), with the same group size G, the same
completion length cap, temperature 1, the same reward ("the answer contains the digit 7",
`stages/rewards.py`), beta 0 (no reference model), loss_type dapo, one update per batch of samples,
AdamW at a constant learning rate, the same seed and the same number of steps. One step = the same
work on both sides: `--batch-prompts` prompts x G completions, sampled, scored and trained on in
one optimizer step (TRL: per_device_train_batch_size = prompts x G, one generation per step).

- TRL runs `GRPOTrainer` with its defaults otherwise: transformers `generate` (KV cache) over the
  prompts repeated G times and left-padded, then a padded forward of prompt + completion per sample.
- Ours runs `trlm.stages.grpo.train_grpo`, the stage itself: KV-cache sampling with the prompt run
  once per group, then padding-free packed forwards.

Each side runs in its own process (`--side`), one after the other, so that each peak RSS is its
own: `peak_rss_mib` is the process's high-water mark (VmHWM: interpreter, libraries, model,
optimizer), `peak_extra_mib` the sampled peak over the RSS just before the model is loaded.
completions/s is the median over steps (the first step of each phase excluded); the samples of
the two sides differ, so their mean length and truncated fraction are printed beside it.
Last line: `ratio=<ours/trl>` of completions/s.

Usage (needs the bench extra: pip install -e ".[bench]"):
    python bench/bench_grpo.py [--prompts 4] [--batch-prompts 2] [--generations 4] [--completion-length 32] [--steps 4] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, base_model_dir, data_root, machine, median_rate, print_table, quiet, scratch_dir, write_json  # noqa: E402

COLUMNS = ["side", "completions_per_s", "mean_length", "truncated", "mean_reward", "train_s", "peak_rss_mib", "peak_extra_mib"]


def questions(root: Path, n: int) -> list[str]:
    out = []
    with open(root / "openai__gsm8k" / "main" / "train.jsonl") as f:
        for line in f:
            out.append(json.loads(line)["question"])
            if len(out) == n:
                break
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run_ours(model_dir: Path, qs: list[str], args, work: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from trlm.stages.grpo import GRPOStageConfig, train_grpo

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for q in qs]
    pq.write_table(pa.table({"prompt_input_ids": pa.array(ids, pa.list_(pa.int32())), "answer": pa.array(["7"] * len(ids))}), data / "train.parquet")
    tok.save_pretrained(data / "tokenizer")
    cfg = GRPOStageConfig.model_validate({
        "data": {"spec": "bench", "chat_template": "-", "max_length": 1024},
        "train": {"batch_size": args.batch_prompts, "max_steps": args.steps, "learning_rate": 1e-6, "lr_scheduler": "constant",
                  "precision": "fp32", "seed": args.seed, "save_steps": 10_000, "logging_steps": 1},
        "rewards": {"contains_seven": 1.0}, "loss_type": "dapo", "beta": 0.0, "num_generations": args.generations, "temperature": 1.0,
        "max_completion_length": args.completion_length, "sample_steps": 0, "sample_threads": args.sample_threads,
    })
    per_step = args.batch_prompts * args.generations
    rates, logs, last = [], [], [0.0]

    def on_log(metrics, step):  # called once per step (logging_steps 1): the interval is one whole step
        now = time.perf_counter()
        rates.append(per_step / (now - last[0]))
        last[0] = now
        logs.append(metrics)

    with quiet(), PeakRSS() as rss:
        last[0] = t0 = time.perf_counter()
        train_grpo(cfg, model_dir=model_dir, data_dir=data, out_dir=work / "ours", on_log=on_log)
    return {"rates": rates, "train_s": time.perf_counter() - t0, "peak_extra_mib": rss.extra_mib, "mean_length": _mean([m["completion_length"] for m in logs]),
            "truncated": _mean([m["truncated"] for m in logs]), "mean_reward": _mean([m["reward"] for m in logs])}


def run_trl(model_dir: Path, qs: list[str], args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trlm.stages.rewards import contains_seven

    def reward(completions, **kwargs):  # conversational prompts: each completion is [{"role": "assistant", "content": ...}]
        return [contains_seven(c[0]["content"] if isinstance(c, list) else c, "7") for c in completions]

    per_step = args.batch_prompts * args.generations
    rates, history, last = [], [], [0.0]

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            rates.append(per_step / (now - last[0]))
            last[0] = now

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                history.append(logs)

    config = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=per_step, gradient_accumulation_steps=1, num_generations=args.generations,
        max_completion_length=args.completion_length, temperature=1.0, beta=0.0, loss_type="dapo", num_iterations=1, learning_rate=1e-6,
        lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_tqdm=True, max_grad_norm=1.0,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in qs])
    with quiet(), PeakRSS() as rss:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset, processing_class=tok, callbacks=[Clock()])
        last[0] = time.perf_counter()
        trainer.train()
    return {"rates": rates, "train_s": time.perf_counter() - t0, "peak_extra_mib": rss.extra_mib,
            "mean_length": _mean([m["completions/mean_length"] for m in history]), "truncated": _mean([m["completions/clipped_ratio"] for m in history]),
            "mean_reward": _mean([m["reward"] for m in history])}


def run_side(args) -> None:
    """Child process: one side, its result as one JSON line on stdout (the last line)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = scratch_dir(f"bench-grpo-{args.side}-")
    qs = questions(data_root(), args.prompts)
    result = (run_ours if args.side == "ours" else run_trl)(base_model_dir(), qs, args, work)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="GSM8K train questions, cycled through")
    parser.add_argument("--batch-prompts", type=int, default=2, help="prompts per step (each gives G completions)")
    parser.add_argument("--generations", type=int, default=4, help="G")
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per phase (the first is excluded from the rate)")
    parser.add_argument("--rounds", type=int, default=1, help="phases per side, alternating ours, TRL, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on both sides (default: torch's)")
    parser.add_argument("--sample-threads", type=int, default=None, help="ours only: threads while sampling (default: as training)")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    if args.side:
        return run_side(args)

    base_model_dir()  # materialize once, before the timed children
    child = [sys.executable, __file__] + [a for a in sys.argv[1:]]
    phases: dict[str, list[dict]] = {"ours": [], "trl": []}
    for r in range(args.rounds):
        for side in phases:
            proc = subprocess.run([*child, "--side", side], stdout=subprocess.PIPE, text=True, check=True)
            phases[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {side} {median_rate(phases[side][-1]['rates']):.3f} completions/s", flush=True)
    rows = []
    for side, runs in phases.items():
        rates = [x for p in runs for x in p["rates"][1:]]  # first step of each phase excluded
        rows.append({"side": side, "completions_per_s": round(median_rate([0.0, *rates]), 3), "rates": rates,
                     **{k: round(_mean([p[k] for p in runs]), 3) for k in ("mean_length", "truncated", "mean_reward", "train_s")},
                     **{k: round(max(p[k] for p in runs)) for k in ("peak_rss_mib", "peak_extra_mib")}})
    print(f"machine: {machine()}; {args.prompts} GSM8K questions, {args.batch_prompts} prompts x G={args.generations} per step, "
          f"completion length {args.completion_length}, {args.steps} steps x {args.rounds} rounds per side, fp32")
    print_table(rows, COLUMNS)
    ratio = rows[0]["completions_per_s"] / rows[1]["completions_per_s"]
    if args.out:
        write_json(args.out, {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()},
                              "rows": rows, "ratio": ratio})
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
