"""Load on the shared servers: N pipelines at once against one MLflow server and one Prefect server.

Each pipeline is a `trlm run` process with its own work dir (TRLM_HOME), its own experiment and
recipe name (so no pipeline finds another's stages done), on the tiny test model (2 layers of
width 64 on the real tokenizer, as tests/conftest.py builds it) and the tiny recipe of
tests/test_pipeline.py (`write_tiny_recipe`: 2 steps a stage, a metric row every step). The eval
stage is left out by default (`--stages`): lm-eval in 16 processes on 2 cores would measure the
CPU, not the servers; every training stage runs.

Both servers' stores are of one kind per round: SQLite (MLflow's `--backend-store-uri sqlite:///`,
Prefect's default SQLite database) or PostgreSQL (one throwaway cluster, tests/servers.py; a
database for each server). Servers run as `trlm up` and docker/compose.yaml run them: MLflow with
its default 4 workers and `--serve-artifacts`, Prefect's `prefect server start`. Each N gets fresh
servers on fresh stores.

Counted after every round, from the servers, not from the clients:
  - MLflow: each pipeline's experiment holds its pipeline run and one run per stage, all FINISHED;
    every training stage run has every metric at every step 1..max_steps (the expected keys of a
    stage: the union of the keys any pipeline logged for it; MLflow's `system/` metrics, sampled on
    a timer rather than at steps, are not counted);
  - Prefect: N flow runs, all COMPLETED, and their task runs COMPLETED;
  - errors: lines in each pipeline's console output and run log, and in the servers' logs, that
    match `database is locked`, an HTTP 5xx, a traceback, a lost connection (ERROR_PATTERNS);
  - wall clock from the first launch to the last exit, and the peak memory of all processes.

bench/bench_service_writers.py pushes one MLflow server further with synthetic writers.

Usage (from the project root, in its venv):
    python bench/bench_service.py [--stores sqlite,postgres] [--n 2,4,8,16] [--stages data-prep,sft-general,...]
The table goes to stdout, the details to bench/results/<machine>-<date>-service.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from common import print_table, scratch_dir, write_json  # noqa: E402
from servers import BIN, LOOPBACK, Postgres, Server, free_port, mlflow_server  # noqa: E402

TRAINING = ("sft-general", "sft-think", "dpo", "grpo")
ERROR_PATTERNS = {
    "database is locked": re.compile(r"database is locked", re.I),
    "HTTP 5xx": re.compile(r"(\" 5\d\d\b|\b5\d\d (Internal Server Error|Service Unavailable|Bad Gateway|Gateway Timeout)|status code 5\d\d|"
                           r"INTERNAL_ERROR|TEMPORARILY_UNAVAILABLE|response with retryable status code 5\d\d)", re.I),
    "HTTP 429": re.compile(r"(\" 429\b|429 Too Many Requests|status code 429)", re.I),
    "retried": re.compile(r"(Retrying \(|Another attempt will be made|Retry\(total=)", re.I),
    "connection lost": re.compile(r"(ConnectionError|Connection refused|RemoteProtocolError|ReadTimeout|ConnectTimeout|"
                                  r"too many clients|remaining connection slots|QueuePool limit)", re.I),
    "deadlock": re.compile(r"deadlock detected", re.I),
    "traceback": re.compile(r"Traceback \(most recent call last\)"),
}


def tiny_model(root: Path) -> Path:
    """The 2-layer Llama of tests/conftest.py on the real tokenizer (from the packaged GGUF)."""
    from conftest import make_tiny_llama
    from transformers import AutoTokenizer

    from trlm.base_model import packaged_gguf_path

    out = root / "tiny-llama"
    gguf = packaged_gguf_path()
    make_tiny_llama().save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def base_recipe(root: Path, model: Path, stages: list[str]) -> dict:
    from test_pipeline import write_tiny_recipe

    data = Path(os.environ.get("TRLM_DATA_ROOT", ROOT.parent / "shared" / "data")).resolve()
    doc = yaml.safe_load(write_tiny_recipe(root, model, data).read_text())
    del doc["work_dir"], doc["tracking_uri"]  # each pipeline's TRLM_HOME; the server from --tracking-uri
    sections = {s.replace("-", "_") for s in stages}
    for section in ("sft_general", "sft_think", "dpo", "grpo", "eval"):
        if section not in sections:
            doc.pop(section, None)
    doc["stages"] = stages
    return doc


def prefect_server(root: Path, database: str | None) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"PREFECT_HOME": str(root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_API_HOST": LOOPBACK, "PREFECT_SERVER_API_PORT": str(port), "PREFECT_API_URL": f"http://{LOOPBACK}:{port}/api",
            "PREFECT_UI_API_URL": f"http://{LOOPBACK}:{port}/api", "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK}
    if database:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database
    cmd = [str(BIN / "prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port)]
    return Server("prefect server", cmd, env, port, root / "prefect-server.log", health="/api/health")


class MemorySampler:
    """Peak summed RSS of the given process trees (pipelines and servers), sampled every second."""

    def __init__(self):
        self.roots: list[int] = []
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(1.0):
            total = 0
            for pid in list(self.roots):
                try:
                    proc = psutil.Process(pid)
                    for p in [proc, *proc.children(recursive=True)]:
                        total += p.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def count_errors(paths: list[Path], offsets: dict[Path, int] | None = None) -> tuple[Counter, list[str]]:
    """Lines matching each pattern (a line counts once per pattern), and a few example lines."""
    counts, examples = Counter(), []
    for path in paths:
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            f.seek((offsets or {}).get(path, 0))
            text = f.read().decode("utf-8", errors="replace")
        for line in text.splitlines():
            for name, pattern in ERROR_PATTERNS.items():
                if pattern.search(line):
                    counts[name] += 1
                    if name != "traceback" and len(examples) < 12:
                        examples.append(f"{path.name}: {line.strip()[:300]}")
    return counts, examples


def check_mlflow(url: str, experiments: list[str], stages: list[str], max_steps: int) -> dict:
    """Runs and metric steps found against those expected, read back from the server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    runs_expected = len(experiments) * (1 + len(stages))
    runs_found = runs_finished = 0
    histories: dict[tuple[str, str], set[int]] = {}  # (experiment, stage) -> {(key, step)}
    keys_by_stage: dict[str, set[str]] = {s: set() for s in stages if s in TRAINING}
    problems = []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            problems.append(f"{name}: no experiment")
            continue
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        kinds = Counter(r.data.tags.get("trlm.kind") for r in runs)
        if kinds.get("pipeline", 0) != 1 or kinds.get("stage", 0) != len(stages):
            problems.append(f"{name}: runs by kind {dict(kinds)}")
        wanted = [r for r in runs if r.data.tags.get("trlm.kind") == "pipeline"][:1] + [
            next((r for r in runs if r.data.tags.get("trlm.stage") == s and r.data.tags.get("trlm.kind") == "stage"), None) for s in stages]
        for stage, run in zip(["pipeline", *stages], wanted):
            if run is None:
                problems.append(f"{name}: no {stage} run")
                continue
            runs_found += 1
            runs_finished += run.info.status == "FINISHED"
            if run.info.status != "FINISHED":
                problems.append(f"{name}: {stage} run is {run.info.status}")
            if stage in keys_by_stage:
                # MLflow's system metrics (system/...) are sampled on a timer, not at training steps: not counted
                keys_by_stage[stage] |= {k for k in run.data.metrics if not k.startswith("system/")}
                histories[(name, stage)] = {(key, m.step) for key in run.data.metrics if not key.startswith("system/")
                                            for m in client.get_metric_history(run.info.run_id, key)}
    metrics_expected = sum(len(keys) * max_steps for keys in keys_by_stage.values()) * len(experiments)
    metrics_found = 0
    for name in experiments:
        for stage, keys in keys_by_stage.items():
            got = histories.get((name, stage), set())
            want = {(k, step) for k in keys for step in range(1, max_steps + 1)}
            metrics_found += len(want & got)
            if want - got:
                problems.append(f"{name}: {stage} misses {len(want - got)} metric steps, e.g. {sorted(want - got)[:3]}")
    return {"runs_expected": runs_expected, "runs_found": runs_found, "runs_finished": runs_finished,
            "metrics_expected": metrics_expected, "metrics_found": metrics_found,
            "metric_keys": {s: sorted(k) for s, k in keys_by_stage.items()}, "problems": problems}


def check_prefect(api: str, since: str, n: int) -> dict:
    import requests

    flows = requests.post(f"{api}/flow_runs/filter", json={"flow_runs": {"start_time": {"after_": since}}, "limit": 200}, timeout=60).json()
    tasks = requests.post(f"{api}/task_runs/filter", json={"flow_runs": {"start_time": {"after_": since}}, "limit": 200}, timeout=60).json()
    return {"flow_runs_expected": n, "flow_runs": len(flows), "flow_runs_completed": sum(f["state_type"] == "COMPLETED" for f in flows),
            "flow_states": dict(Counter(f["state_type"] for f in flows)), "task_runs": len(tasks),
            "task_runs_completed": sum(t["state_type"] == "COMPLETED" for t in tasks), "task_states": dict(Counter(t["state_type"] for t in tasks))}


def one_round(store: str, n: int, model: Path, recipe: dict, root: Path, timeout_s: float, pg: Postgres | None) -> dict:
    work = root / f"{store}-n{n}"
    work.mkdir(parents=True)
    mlflow_backend = prefect_db = None
    if pg is not None:
        mlflow_backend = pg.url(pg.database(f"mlflow_n{n}"))
        prefect_db = pg.url(pg.database(f"prefect_n{n}"), driver="asyncpg")
    ml = mlflow_server(work / "mlflow", str(work / "mlflow" / "artifacts"), backend=mlflow_backend, workers=4)
    pf = prefect_server(work / "prefect", prefect_db)
    servers_log = [ml.log, pf.log] + ([pg.log] if pg else [])
    offsets = {p: p.stat().st_size if p.is_file() else 0 for p in servers_log}
    pipelines: list[dict] = []
    try:
        ml.launch(), pf.launch()
        ml.wait_ready(240), pf.wait_ready(240)
        api = f"{pf.url}/api"
        import datetime

        since = datetime.datetime.now(datetime.timezone.utc).isoformat()
        for i in range(n):
            home = work / f"p{i:02d}"
            home.mkdir()
            doc = {**recipe, "name": f"tiny-{i:02d}", "experiment": f"bench-{store}-n{n}-{i:02d}"}
            path = home / "recipe.yaml"
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
            env |= {"TRLM_HOME": str(home / "home"), "PREFECT_API_URL": api, "PREFECT_HOME": str(home / "prefect"),
                    "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            pipelines.append({"i": i, "home": home, "recipe": path, "experiment": doc["experiment"], "log": home / "console.log", "env": env})
        with MemorySampler() as mem:
            mem.roots = [ml.proc.pid, pf.proc.pid]
            t0 = time.monotonic()
            for p in pipelines:
                with open(p["log"], "wb") as log:
                    p["proc"] = subprocess.Popen([str(BIN / "trlm"), "run", "--recipe", str(p["recipe"]), "--tracking-uri", ml.url],
                                                 env=p.pop("env"), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
                mem.roots.append(p["proc"].pid)
            deadline = t0 + timeout_s
            for p in pipelines:
                try:
                    p["rc"] = p["proc"].wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p["rc"] = "timeout"
                    os.killpg(p["proc"].pid, 9)
                    p["proc"].wait()
                p["wall_s"] = round(time.monotonic() - t0, 1)
            wall = time.monotonic() - t0
        max_steps = recipe.get("sft_general", {}).get("train", {}).get("max_steps", 2)
        stages = recipe["stages"]
        found = check_mlflow(ml.url, [p["experiment"] for p in pipelines], stages, max_steps)
        flows = check_prefect(api, since, n)
    finally:
        ml.stop()
        pf.stop()
    client_logs = [p["log"] for p in pipelines] + [f for p in pipelines for f in sorted((p["home"] / "home" / "logs").glob("*.log"))]
    client_errors, client_examples = count_errors(client_logs)
    server_errors, server_examples = count_errors(servers_log, offsets)
    rcs = Counter(str(p.get("rc")) for p in pipelines)
    return {"store": store, "n": n, "wall_s": round(wall, 1), "exit_codes": dict(rcs), "peak_rss_gib": round(mem.peak / 2**30, 2),
            "pipeline_wall_s": [p.get("wall_s") for p in pipelines], **found, **flows,
            "client_errors": dict(client_errors), "server_errors": dict(server_errors),
            "error_examples": client_examples + server_examples, "work": str(work)}


def row(r: dict) -> dict:
    errs = Counter(r["client_errors"]) + Counter(r["server_errors"])
    return {"store": r["store"], "N": r["n"], "wall s": r["wall_s"], "ok/N": f"{r['exit_codes'].get('0', 0)}/{r['n']}",
            "runs found/exp": f"{r['runs_found']}/{r['runs_expected']}", "FINISHED": r["runs_finished"],
            "metric steps found/exp": f"{r['metrics_found']}/{r['metrics_expected']}",
            "flow runs COMPLETED/exp": f"{r['flow_runs_completed']}/{r['flow_runs_expected']}",
            "errors (client; server)": "; ".join(", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"
                                                 for c in (r["client_errors"], r["server_errors"])) if errs else "none",
            "peak RSS GiB": r["peak_rss_gib"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--n", default="2,4,8,16", help="pipelines at once, one round each")
    ap.add_argument("--stages", default="data-prep," + ",".join(TRAINING), help="the recipe's stages (add eval for the whole pipeline)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a round may take before its pipelines are killed")
    ap.add_argument("--stop-after-loss", action="store_true", help="skip a store's larger N once a round lost runs or metrics")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    root = scratch_dir("trlm-bench-service-")
    model = tiny_model(root)
    recipe = base_recipe(root, model, args.stages.split(","))
    results = []
    for store in args.stores.split(","):
        pg = Postgres.start() if store == "postgres" else None
        try:
            for n in [int(x) for x in args.n.split(",")]:
                print(f"[{time.strftime('%H:%M:%S')}] {store}: {n} pipelines at once ...", file=sys.stderr, flush=True)
                r = one_round(store, n, model, recipe, root, args.timeout, pg)
                results.append(r)
                print_table([row(r)], list(row(r)))
                for problem in r["problems"][:10]:
                    print(f"  {problem}")
                for example in r["error_examples"][:6]:
                    print(f"  e.g. {example}")
                sys.stdout.flush()
                lost = r["runs_finished"] < r["runs_expected"] or r["metrics_found"] < r["metrics_expected"]
                if lost and args.stop_after_loss:
                    break
        finally:
            if pg is not None:
                pg.stop()
    print()
    print_table([row(r) for r in results], list(row(results[0])))
    from common import machine

    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cpu-{os.cpu_count()}core-{time.strftime('%Y-%m-%d')}-service.json"
    write_json(out, {"machine": machine(), "command": " ".join(sys.argv), "stages": recipe["stages"], "results": results})


if __name__ == "__main__":
    main()
