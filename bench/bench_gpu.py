"""GPU throughput and MFU of our SFT and DPO stages at the published shape, and a projection of the
published recipe's wall-clock. Not a test: it prints figures.

It runs the stages themselves (`trlm.stages.sft.train_sft`, `trlm.stages.dpo.train_dpo`) for a few
optimizer steps on synthetic token ids of the published shape:
  * SFT: micro-batch of 32 sequences of up to 4,096 tokens, gradient checkpointing, bf16 (pure, as
    published; `--precision bf16-mixed` for fp32 master weights);
  * DPO: micro-batch of 32 pairs, prompt + completion up to 2,048 tokens per side, precomputed
    reference log-probs (timed separately), gradient checkpointing.
Random token ids cost exactly what real text costs (same shapes, every position is a target), and a
random-init SmolLM2-135M (built from a config.json) costs what the real weights cost; use
`--model-dir` to time a real checkpoint instead.

Variants are attention kernels x batching: `packed_sdpa` (ours, the default: one flash SDPA call per
document of a padding-free row), `flex_attention` on padding-free rows (block-sparse per-document
mask, compiled), `sdpa` on padded rows (flash kernel, compute spent on padding). Lengths: `full` (every sequence at the maximum:
the published shape's worst case per token) and `mixed` (uniform 10%..100% of the maximum).

MFU = model FLOPs / s / peak bf16 FLOP/s (989 TFLOP/s dense for an H100 SXM; `--peak-tflops`).
Model FLOPs per trained token = 6 N + 12 L d c (N = 134.5M matmul parameters incl. the tied LM
head, L = 30 layers, d = 576, c = the token's causal context); gradient-checkpoint recompute is
not counted (the convention), so hardware utilisation is higher than MFU.

Usage (on a GPU machine, after `pip install -e .`):
    python bench/bench_gpu.py --config-dir DIR_WITH_config.json_AND_tokenizer [--steps 6] [--out results.json]
    python bench/bench_gpu.py --model-dir /path/to/base_checkpoint
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Published sizes (../shared/notes and the issues): tokens per SFT stage and DPO pairs.
PUBLISHED = {"sft-general_tokens": 1.2e8, "sft-think_tokens": 2.5e8, "dpo_pairs": 50_000}


def matmul_params(config) -> int:
    d, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    return L * per_layer + config.vocab_size * d  # + LM head (tied to the embedding; the lookup is free)


def flops_per_step(config, lengths: list[int], *, train: bool) -> float:
    """Model FLOPs of one pass over documents of `lengths` (x3 for forward + backward)."""
    n, d, L = matmul_params(config), config.hidden_size, config.num_hidden_layers
    tokens = sum(lengths)
    causal_context = sum(t * (t + 1) / 2 for t in lengths)  # sum over tokens of their context
    forward = 2 * n * tokens + 4 * L * d * causal_context
    return forward * (3 if train else 1)


def sample_lengths(kind: str, count: int, maximum: int, rng: np.random.Generator) -> list[int]:
    if kind == "full":
        return [maximum] * count
    return [int(x) for x in rng.integers(maximum // 10, maximum + 1, size=count)]


def write_sft_data(directory: Path, tokenizer_dir: Path, lengths: list[int], vocab: int, rng) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    ids = [rng.integers(0, vocab, size=n, dtype=np.int32) for n in lengths]
    col = pa.array([x.tolist() for x in ids], type=pa.list_(pa.int32()))
    pq.write_table(pa.table({"input_ids": col, "labels": col}), directory / "train.parquet")
    shutil.copytree(tokenizer_dir, directory / "tokenizer")
    return directory


def write_dpo_data(directory: Path, tokenizer_dir: Path, lengths: list[int], vocab: int, rng) -> Path:
    """Pairs whose chosen and rejected sides are each `length` tokens: first half prompt, second completion."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    cols = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
    for n in lengths:
        prompt = rng.integers(0, vocab, size=n // 2).tolist()
        for side in ("chosen", "rejected"):
            completion = rng.integers(0, vocab, size=n - n // 2).tolist()
            cols[f"{side}_input_ids"].append(prompt + completion)
            cols[f"{side}_labels"].append([-100] * len(prompt) + completion)
    table = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in cols.items()})
    pq.write_table(table, directory / "train.parquet")
    shutil.copytree(tokenizer_dir, directory / "tokenizer")
    return directory


def prepare_model(args, work: Path) -> tuple[Path, Path]:
    """(model_dir, tokenizer_dir): the given checkpoint, or a random-init model from a config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.model_dir:
        return args.model_dir, args.model_dir
    config = AutoConfig.from_pretrained(args.config_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = work / "random-init"
    model.save_pretrained(out)
    return out, args.config_dir


def run_variant(stage: str, variant: dict, *, model_dir: Path, tokenizer_dir: Path, config, args, work: Path, rng) -> dict:
    from trlm.recipe import MixtureConfig
    from trlm.stages.dpo import DPOStageConfig
    from trlm.stages.sft import SFTStageConfig
    from trlm.training.config import TrainConfig

    batch, maximum = 32, (4096 if stage == "sft" else 2048)
    steps = args.steps
    lengths = sample_lengths(variant["lengths"], batch * steps, maximum, rng)
    train = TrainConfig(
        max_steps=steps, batch_size=batch, grad_accum_steps=1, learning_rate=1e-5, lr_scheduler="constant",
        save_steps=10**6, save_total_limit=1, logging_steps=1, precision=args.precision, gradient_checkpointing=True,
        padding_free=variant["padding_free"], attn_implementation=variant["attn"], compile=variant["compile"],
    )
    data = MixtureConfig(spec="bench", chat_template="-", max_length=maximum)
    name = f"{stage}-{variant['attn']}-{'packed' if variant['padding_free'] else 'padded'}-{variant['lengths']}{'-compiled' if variant['compile'] else ''}"
    out = work / name
    logs: list[dict] = []
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        if stage == "sft":
            from trlm.stages.sft import train_sft

            data_dir = write_sft_data(work / f"data-{name}", tokenizer_dir, lengths, config.vocab_size, rng)
            summary = train_sft(SFTStageConfig(data=data, train=train), model_dir=model_dir, data_dir=data_dir, out_dir=out,
                                on_log=lambda m, s: logs.append({"step": s, **m}))
        else:
            from trlm.stages.dpo import train_dpo

            data_dir = write_dpo_data(work / f"data-{name}", tokenizer_dir, lengths, config.vocab_size, rng)
            summary = train_dpo(DPOStageConfig(data=data, train=train, loss_type="apo_zero", beta=0.1), model_dir=model_dir,
                                data_dir=data_dir, out_dir=out, on_log=lambda m, s: logs.append({"step": s, **m}))
    except Exception as exc:  # one kernel failing (e.g. OOM on a dense mask) must not hide the others
        return {"name": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    wall = time.perf_counter() - started
    # Steady state: drop the first two steps (compilation, allocator warm-up).
    steady = [m for m in logs if m["step"] > 2] or logs
    tok_s = statistics.median([m["tokens_per_second"] for m in steady])
    per_step_lengths = [lengths[i * batch:(i + 1) * batch] for i in range(steps)]
    mean_flops = statistics.mean(flops_per_step(config, ls if stage == "sft" else ls * 2, train=True) for ls in per_step_lengths)
    tokens_per_step = statistics.mean(sum(ls) * (1 if stage == "sft" else 2) for ls in per_step_lengths)
    seconds_per_step = tokens_per_step / tok_s
    result = {
        "name": name, "tokens_per_s": tok_s, "seconds_per_step": seconds_per_step,
        "mfu": mean_flops / seconds_per_step / (args.peak_tflops * 1e12),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "wall_s": wall, "first_loss": logs[0]["loss"],
    }
    if stage == "dpo":
        result["pairs_per_s"] = statistics.median([m["pairs_per_second"] for m in steady])
        pairs = len(lengths)
        result["reference_pairs_per_s"] = pairs / max(summary["reference_logps_s"], 1e-9)
        ref_flops = sum(flops_per_step(config, [n, n], train=False) for n in lengths)
        result["reference_mfu"] = ref_flops / summary["reference_logps_s"] / (args.peak_tflops * 1e12)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-dir", type=Path, help="config.json + tokenizer files of SmolLM2-135M (random-init weights)")
    parser.add_argument("--model-dir", type=Path, help="a real checkpoint instead")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per variant (the first 2 are warm-up)")
    parser.add_argument("--precision", default="bf16-pure", choices=["bf16-pure", "bf16-mixed"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--variants", default="sft:packed_sdpa:packed:full,sft:sdpa:padded:full,sft:packed_sdpa:packed:mixed,"
                        "sft:sdpa:padded:mixed,dpo:packed_sdpa:packed:full,dpo:sdpa:padded:full,sft:flex_attention:packed:full",
                        help="stage:attn_implementation:packed|padded:full|mixed[:compile], comma-separated")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not (args.config_dir or args.model_dir):
        parser.error("give --config-dir or --model-dir")
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    from transformers import AutoConfig

    work = Path(tempfile.mkdtemp(prefix="trlm-bench-gpu-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the model and data written below
    model_dir, tokenizer_dir = prepare_model(args, work)
    config = AutoConfig.from_pretrained(model_dir)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; precision {args.precision}; "
          f"matmul params {matmul_params(config) / 1e6:.1f}M; peak {args.peak_tflops} TFLOP/s", flush=True)
    rng = np.random.default_rng(0)
    results = []
    for spec in args.variants.split(","):
        stage, attn, batching, lengths, *rest = spec.split(":")
        variant = {"attn": attn, "padding_free": batching == "packed", "lengths": lengths, "compile": rest == ["compile"]}
        r = run_variant(stage, variant, model_dir=model_dir, tokenizer_dir=tokenizer_dir, config=config, args=args, work=work, rng=rng)
        results.append(r)
        print(json.dumps(r), flush=True)

    print(f"\n{'variant':40s} {'tok/s':>9s} {'pairs/s':>8s} {'MFU':>6s} {'peak GiB':>8s}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:40s} {r['error']}")
            continue
        pairs = f"{r['pairs_per_s']:.1f}" if "pairs_per_s" in r else ""
        print(f"{r['name']:40s} {r['tokens_per_s']:9.0f} {pairs:>8s} {100 * r['mfu']:5.1f}% {r['peak_gib']:8.1f}")

    ok = [r for r in results if "error" not in r]
    best = {s: max((r for r in ok if r["name"].startswith(s) and "-full" in r["name"]), key=lambda r: r["tokens_per_s"], default=None)
            for s in ("sft", "dpo")}
    if best["sft"] and best["dpo"]:
        sft_s = (PUBLISHED["sft-general_tokens"] + PUBLISHED["sft-think_tokens"]) / best["sft"]["tokens_per_s"]
        dpo_s = PUBLISHED["dpo_pairs"] / best["dpo"]["pairs_per_s"] + PUBLISHED["dpo_pairs"] / best["dpo"]["reference_pairs_per_s"]
        projection = {"sft_s": sft_s, "dpo_s": dpo_s, "sft_variant": best["sft"]["name"], "dpo_variant": best["dpo"]["name"]}
        print(f"projection (full-length rates, the per-token worst case): SFT stages 1+2 {sft_s / 60:.1f} min, "
              f"DPO incl. reference pass {dpo_s / 60:.1f} min, training total {(sft_s + dpo_s) / 60:.1f} min")
        results.append({"projection": projection})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
