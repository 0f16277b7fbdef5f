"""SFT speed on the CPU: 1 process x 2 threads vs 2 processes x 1 thread, side by side.

Both sides run the SFT stage's own command line (`python -m trlm.stages.sft`) on the real
SmolLM2-135M-Instruct (the offline base checkpoint), fp32, on the same GSM8K chats with the same
global batch (`--batch` sequences per step: one process takes all of them, each of two processes
half, under `torchrun --standalone`, gloo, `--distributed ddp` or `fsdp`). Reported per side: the
median of the stage's logged non-padding tokens/s over the steps of all its phases (the first
step of each phase excluded; checkpoint and export time are not training time), and the first
step's loss (the two sides must agree to about 1e-5: same global batch). Phases alternate
(1 process, 2 processes, 1, 2, ...) so that machine noise hits both. The last line is
`ratio=<2 processes / 1 process>`.

On a 2-core machine the question is whether two single-threaded processes (each a whole forward,
backward and optimizer step on half the batch, plus a gradient all-reduce of 135M floats per
step) beat one process whose matmuls use both cores. Not a test: the figures depend on machine
load; run it on a quiet machine.

Usage:
    python bench/bench_distributed.py [--rows 64] [--max-length 512] [--batch 8] [--steps 5] [--rounds 2] [--distributed ddp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import load_chats, tokenize, write_our_data  # noqa: E402
from common import base_model_dir, data_root, machine, median_rate, print_table, scratch_dir, write_json  # noqa: E402


def run_stage(processes: int, config: dict, model_dir: Path, data_dir: Path, work: Path) -> dict:
    """One phase: the stage CLI in `processes` processes sharing the 2 cores; its logged steps."""
    threads = max(1, (os.cpu_count() or 2) // processes)
    batch = config["train"]["batch_size"] // processes
    cfg_file = work / f"sft-{processes}p-{time.monotonic_ns()}.json"
    cfg_file.write_text(json.dumps({**config, "train": {**config["train"], "batch_size": batch}}))
    out = work / cfg_file.stem
    stage = ["-m", "trlm.stages.sft", "--config", str(cfg_file), "--model-dir", str(model_dir), "--data-dir", str(data_dir), "--out-dir", str(out)]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *launcher, *stage], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"step"')]
    return {"threads": threads, "rates": [s["tokens_per_second"] for s in steps], "first_loss": steps[0]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per optimizer step)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per phase")
    parser.add_argument("--rounds", type=int, default=2, help="alternating 1-process / 2-process phase pairs")
    parser.add_argument("--distributed", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_dir = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sequences = tokenize(tokenizer, load_chats(data_root(), args.rows), args.max_length)
    work = scratch_dir("trlm-bench-dist-")
    data_dir = write_our_data(sequences, tokenizer, work / "data")
    config = {
        "data": {"spec": "bench", "chat_template": "-", "max_length": args.max_length},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": 1e-5, "lr_scheduler": "constant",
                  "save_steps": 10_000, "logging_steps": 1, "precision": "fp32", "distributed": args.distributed},
    }
    print(f"machine: {machine()}; model: {model_dir}; {len(sequences)} GSM8K chats, max_length {args.max_length}, "
          f"global batch {args.batch}, {args.steps} steps per phase, {args.distributed}", flush=True)

    results: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(args.rounds):
        for processes in (1, 2):
            if processes == 1 and args.distributed == "fsdp":
                config["train"]["distributed"] = "ddp"  # one process: no sharding (the reference side)
            results[processes].append(run_stage(processes, config, model_dir, data_dir, work))
            config["train"]["distributed"] = args.distributed
            print(f"round {r + 1}: {processes} process(es) {median_rate(results[processes][-1]['rates']):.1f} tok/s", flush=True)

    summary = {}
    for processes, phases in results.items():
        rates = [x for p in phases for x in (p["rates"][1:] if len(p["rates"]) > 1 else p["rates"])]
        summary[processes] = {"tokens_per_s": median_rate([0.0, *rates]), "threads": phases[0]["threads"], "first_loss": phases[0]["first_loss"]}
    rows = [{"setup": f"{p} process(es) x {s['threads']} thread(s)", "non-pad tokens/s": f"{s['tokens_per_s']:.1f}",
             "first-step loss": f"{s['first_loss']:.6f}"} for p, s in summary.items()]
    print_table(rows, ["setup", "non-pad tokens/s", "first-step loss"])
    diff = abs(summary[1]["first_loss"] - summary[2]["first_loss"])
    print(f"loss agreement: |1p - 2p| = {diff:.2e} ({'OK' if diff < 1e-4 else 'MISMATCH'}; same global batch)")
    ratio = summary[2]["tokens_per_s"] / summary[1]["tokens_per_s"]
    if args.out:
        write_json(args.out, {"machine": machine(), "args": vars(args) | {"out": str(args.out)}, "summary": summary,
                              "ratio": ratio, "date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg()})
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
