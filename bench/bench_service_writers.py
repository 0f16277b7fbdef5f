"""One MLflow server under synthetic writers: W processes each logging `--steps` batches of 10 metrics
as fast as they can (no training, no Prefect), past the load that pipelines on 2 cores reach
(bench_service.py). Counted: metric steps found on the server against those sent, runs FINISHED,
the errors the writers got (`database is locked`, HTTP 5xx, lost connections) and the server's log.
The writers use the product's client policy (trlm/runs/mlflow_http.py: only 429/503 retried).

Usage (from the project root, in its venv):
    python bench/bench_service_writers.py [--stores sqlite,postgres] [--writers 16,64] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import ROOT, Postgres, count_errors, mlflow_server  # noqa: E402
from common import scratch_dir, write_json  # noqa: E402


def _writer(url: str, experiment: str, steps: int, keys: int, out) -> None:
    """One synthetic client: a run, `steps` log_batch calls of `keys` metrics as fast as it can, the end."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from trlm.runs.mlflow_http import retry_only_when_told

    retry_only_when_told()  # the product's client policy
    client, errors, run_id = MlflowClient(url), Counter(), None

    def kind(exc: Exception) -> str:
        text = str(exc)
        if "database is locked" in text:
            return "database is locked"
        return next((f"HTTP {c}" for c in ("500", "502", "503", "504", "429") if f" {c}" in text or f"{c} " in text), type(exc).__name__)

    try:
        run_id = client.create_run(client.create_experiment(experiment)).info.run_id
        for step in range(1, steps + 1):
            try:
                client.log_batch(run_id, metrics=[Metric(f"m{k}", float(step), int(time.time() * 1000), step) for k in range(keys)], synchronous=True)
            except Exception as exc:  # noqa: BLE001 - counted, and the writer goes on
                errors[kind(exc)] += 1
        client.set_terminated(run_id)
    except Exception as exc:  # noqa: BLE001
        errors[kind(exc)] += 1
    out.put({"experiment": experiment, "run_id": run_id, "errors": dict(errors)})


def stress_round(store: str, writers: int, steps: int, keys: int, root: Path, pg: Postgres | None) -> dict:
    """`writers` processes writing metrics as fast as they can to one MLflow server (no training, no
    Prefect): where the store itself stops holding, beyond what pipelines on 2 cores can reach."""
    import multiprocessing

    from mlflow.tracking import MlflowClient

    work = root / f"stress-{store}-w{writers}"
    backend = pg.url(pg.database(f"stress_w{writers}")) if pg is not None else None
    ml = mlflow_server(work, str(work / "artifacts"), backend=backend, workers=4)
    try:
        ml.start(240)
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(ml.url, f"stress-{store}-w{writers}-{i:03d}", steps, keys, out)) for i in range(writers)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        done = [out.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join()
        wall = time.monotonic() - t0
        client = MlflowClient(ml.url)
        found = finished = 0
        for d in done:
            if d["run_id"] is None:
                continue
            run = client.get_run(d["run_id"])
            finished += run.info.status == "FINISHED"
            found += sum(len({m.step for m in client.get_metric_history(d["run_id"], f"m{k}")} & set(range(1, steps + 1))) for k in range(keys))
    finally:
        ml.stop()
    client_errors = sum((Counter(d["errors"]) for d in done), Counter())
    server_errors, examples = count_errors([ml.log])
    return {"store": store, "writers": writers, "wall_s": round(wall, 1), "runs_finished": finished, "metrics_expected": writers * steps * keys,
            "metrics_found": found, "requests_per_s": round(writers * (steps + 3) / wall, 1), "client_errors": dict(client_errors),
            "server_errors": dict(server_errors), "error_examples": examples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--writers", default="16,64")
    ap.add_argument("--steps", type=int, default=50, help="log_batch calls per writer")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = scratch_dir("trlm-bench-writers-")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow  # noqa: F401 - imported once, before the writers fork

    results = []
    for store in args.stores.split(","):
        pg = Postgres.start() if store == "postgres" else None
        try:
            for w in [int(x) for x in args.writers.split(",")]:
                print(f"[{time.strftime('%H:%M:%S')}] {store}: {w} synthetic writers at once ...", file=sys.stderr, flush=True)
                r = stress_round(store, w, args.steps, 10, root, pg)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "error_examples"}), flush=True)
                for example in r["error_examples"][:4]:
                    print(f"  e.g. {example}", flush=True)
        finally:
            if pg is not None:
                pg.stop()
    from common import machine

    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cpu-{os.cpu_count()}core-{time.strftime('%Y-%m-%d')}-service-writers.json"
    write_json(out, {"machine": machine(), "command": " ".join(sys.argv), "results": results})


if __name__ == "__main__":
    main()
