"""Evaluation speed, the trlm backend vs lm-eval's HFLM, side by side in one process on the same items.

Both sides run `trlm.eval.harness.evaluate` (lm-eval's tasks, prompts, filters and metrics) on the
real SmolLM2-135M base model, with the same settings except `backend`:

- `smoke`: the smoke profile of the 8 default tasks (its seeded items, generation capped at 64 tokens);
- `slice`: 200 ARC-Challenge, 100 MMLU (25 items in each of the smoke profile's 4 subjects), 20 GSM8K
  and 20 IFEval items (seeded subsets, generation capped at 64 tokens).

For every task the two backends run one after the other (hf first), so a change in the machine's
load hits both. Each side starts cold: the per-process caches (tasks, built requests, token encodings;
eval/shared.py) are cleared before it, so the times are one model's, task loading included. Printed per task: items, seconds and items/s of each side, then whether the two
agree: the largest per-request log-likelihood difference, is_greedy flags, generations, metrics.
Last lines: the wall clock of each side over the slice and `ratio=<hf wall / trlm wall>`.

Usage:
    python bench/bench_eval.py [--only smoke|slice] [--threads 1] [--batch 8] [--gen-batch N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_model_dir, data_root, machine, print_table, quiet, scratch_dir, write_json  # noqa: E402

SLICE = [("arc_challenge", "smoke", 200), ("mmlu", "smoke", 25), ("gsm8k", "smoke", 20), ("ifeval", "smoke", 20)]
BACKENDS = ("hf", "trlm")


def _samples(doc) -> dict:
    rows = [json.loads(line) for line in open(doc["settings"]["samples_file"])]
    return {(r["task"], r["doc_id"]): r["resps"] for r in rows}


def agreement(docs: dict) -> dict:
    """How the two backends' outputs compare, request by request and metric by metric."""
    a, b = _samples(docs["hf"]), _samples(docs["trlm"])
    worst, flags, gens, gens_same = 0.0, 0, 0, 0
    for key, resps in a.items():
        for x, y in zip(resps, b[key]):
            x, y = x[0], y[0]
            if isinstance(x, str):
                gens += 1
                gens_same += x == y
            else:
                worst = max(worst, abs(x[0] - y[0]))
                flags += x[1] != y[1]
    same_items = set(a) == set(b)
    metrics_equal = all(docs["hf"][p] == docs["trlm"][p] for p in ("results", "subtask_results"))
    return {"same_items": same_items, "max_ll_diff": worst, "greedy_flag_diffs": flags, "generations": gens,
            "generations_identical": gens_same, "metrics_equal": metrics_equal}


def run_part(model, tok, name: str, task: str, profile: str, sample: int | None, args, work: Path) -> list[dict]:
    from trlm.eval import backend as trlm_backend
    from trlm.eval import shared
    from trlm.eval.config import EvalConfig
    from trlm.eval.harness import evaluate

    docs, rows = {}, {}
    for backend in BACKENDS:
        cfg = EvalConfig(profile=profile, tasks=[task] if task else EvalConfig().tasks, sample=sample, batch_size=args.batch,
                         num_threads=args.threads, backend=backend,
                         **({"gen_batch_size": args.gen_batch} if args.gen_batch else {}))
        shared.clear()  # each side cold, as one model alone: nothing built by the other side is reused
        trlm_backend._ENCODINGS.clear()
        t0 = time.time()
        with quiet():
            docs[backend] = evaluate(model, tok, cfg, data_root=data_root(), work_dir=work / f"{name}-{backend}",
                                     model_fingerprint=f"bench-{name}-{backend}", progress=False)
        wall = time.time() - t0
        calls: dict[str, list[dict]] = {}  # tasks evaluated in one lm-eval call (the generative ones) share a row
        for t, s in docs[backend]["settings"]["tasks"].items():
            calls.setdefault("+".join(s.get("evaluated_together") or [t]), []).append(s)
        for t, members in calls.items():
            items, wall_s = sum(s["n_evaluated"] for s in members), members[0]["wall_s"]
            row = rows.setdefault(t, {"part": name, "task": t, "items": items})
            row[f"{backend}_s"] = wall_s
            row[f"{backend}_items/s"] = round(items / wall_s, 2) if wall_s else None
        print(f"  {name} {task or 'all tasks'} {backend}: {wall:.1f} s", file=sys.stderr, flush=True)
    agree = agreement(docs)
    for row in rows.values():
        row.update(agree)
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["smoke", "slice"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides (1 on a shared CPU)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tasks", help="slice: only these tasks (comma-separated), e.g. gsm8k,ifeval")
    ap.add_argument("--gen-batch", type=int, help="trlm side: rows per decode batch (default: eval.gen_batch_size's default)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trlm.eval.config import EvalConfig

    path = base_model_dir()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    work = scratch_dir("bench-eval-")
    print(f"machine: {machine()}; model {path}; batch {args.batch}; gen batch (trlm) {args.gen_batch or EvalConfig().gen_batch_size}; "
          f"threads {args.threads}; load {os.getloadavg()}", flush=True)
    rows: list[dict] = []
    if args.only in (None, "smoke"):
        rows += run_part(model, tok, "smoke", "", "smoke", None, args, work)
    if args.only in (None, "slice"):
        for task, profile, n in SLICE:
            if args.tasks and task not in args.tasks.split(","):
                continue
            rows += run_part(model, tok, "slice", task, profile, n, args, work)
    cols = ["part", "task", "items", "hf_s", "hf_items/s", "trlm_s", "trlm_items/s", "max_ll_diff", "greedy_flag_diffs",
            "generations", "generations_identical", "metrics_equal"]
    for r in rows:
        r["max_ll_diff"] = f"{r['max_ll_diff']:.1e}"
    print_table(rows, cols)
    summary = {}
    for part in ("smoke", "slice"):
        sel = [r for r in rows if r["part"] == part]
        if sel:
            hf, tr = sum(r["hf_s"] for r in sel), sum(r["trlm_s"] for r in sel)
            summary[part] = {"hf_wall_s": round(hf, 1), "trlm_wall_s": round(tr, 1), "ratio": round(hf / tr, 2)}
            print(f"{part}: hf {hf:.1f} s, trlm {tr:.1f} s, ratio={hf / tr:.2f}")
    print(f"load at the end: {os.getloadavg()}")
    if args.out:
        write_json(args.out, {"machine": machine(), "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
