"""`trlm`: run, inspect, evaluate and serve the post-training pipeline.

    trlm run [--recipe NAME_OR_PATH] [--only STAGE | --from STAGE] [--force STAGE] [--set key=value]
    trlm status [--recipe ...] [--json]
    trlm eval --model PATH_OR_HUB_ID [--tasks a,b] [--limit N] [--json]
    trlm report [--recipe ...]
    trlm up | trlm serve

Stages: data-prep, sft-general, sft-think, dpo, eval. The recipe is validated completely before any
compute; a bad recipe exits with code 2 and a message naming the key or file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from trlm.recipe import DEFAULT_RECIPE, STAGES, RecipeError, check_stage, load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0], pretty_exceptions_enable=False)

RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", "-r", help=f"built-in recipe name or YAML path [default: {DEFAULT_RECIPE}]")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe value, e.g. --set dpo.beta=0.2 (repeatable)")]
TrackingOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default: SQLite in the work dir)")]


def _quiet_environment(recipe) -> None:
    """Offline-friendly defaults; a recipe with hub sources keeps the network usable."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    uses_hub = recipe is not None and _uses_hub(recipe)
    offline = not uses_hub
    if uses_hub and "HF_HUB_OFFLINE" not in os.environ and not _hub_reachable():
        # Without this, every hub lookup retries for about 50 s before it falls back to the cache.
        typer.echo("note: the Hugging Face Hub is unreachable; hub ids resolve from the local cache only (HF_HUB_OFFLINE=1)", err=True)
        offline = True
    if offline:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "alembic", "mlflow", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub's host? Assumed yes behind a proxy (we cannot tell)."""
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _uses_hub(recipe) -> bool:
    from trlm.base_model import resolve_source
    from trlm.data_spec import load_data_spec

    if resolve_source(recipe.base_model)[0] == "hub":
        return True
    return any(src.hub is not None for s in ("sft-general", "sft-think", "dpo") for src in load_data_spec(recipe.stage_config(s).data.spec).sources)


def _load(recipe: str | None, overrides: list[str] | None, tracking_uri: str | None = None):
    overrides = list(overrides or [])
    if tracking_uri:
        overrides.append(f"tracking_uri={tracking_uri}")
    try:
        return load_recipe(recipe, overrides), overrides
    except RecipeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _print_plan(plans, title: str, done_as: str = "done") -> None:
    """One line per stage; `done_as="cached"` when a run found the stage's artifact and skips it."""
    typer.echo(title)
    typer.echo(f"  {'stage':<12} {'state':<8} {'key':<14} artifact")
    for p in plans:
        state = done_as if p.state == "done" else p.state
        typer.echo(f"  {p.stage:<12} {state:<8} {(p.key or '-')[:12]:<14} {p.artifact_path or p.note or '-'}")


def _prefect_server_up(url: str = "127.0.0.1", port: int = 4200) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((url, port)) == 0


@app.command()
def run(
    recipe: RecipeOpt = None,
    only: Annotated[Optional[str], typer.Option("--only", help="run just this stage (its upstream must be done)")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="run this stage and everything after it")] = None,
    force: Annotated[Optional[list[str]], typer.Option("--force", help="rerun this stage even if done (repeatable)")] = None,
    set_: SetOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Run the pipeline (as a Prefect flow); stages whose key is already done are skipped ("cached")."""
    t0 = time.time()
    r, overrides = _load(recipe, set_, tracking_uri)
    _quiet_environment(r)
    try:
        for s in [only, from_stage, *(force or [])]:
            if s:
                check_stage(s)
        if only and from_stage:
            raise RecipeError("give --only or --from, not both")
    except RecipeError as exc:
        _fail(str(exc))
    from trlm.flows.pipeline import selected_stages
    from trlm.lineage import plan, setup_tracking

    tracker = setup_tracking(r)
    plans = plan(r, tracker)
    wanted = selected_stages(only, from_stage)
    by_stage = {p.stage: p for p in plans}
    first = STAGES.index(wanted[0])
    for upstream in STAGES[:first]:
        if by_stage[upstream].state != "done":
            _fail(f"cannot run {wanted[0]}: upstream stage {upstream} is {by_stage[upstream].state} for recipe {r.name} "
                  f"(no finished artifact for the current config and inputs). Run `trlm run --from {upstream}` first.")
    todo = [s for s in wanted if by_stage[s].state != "done" or s in (force or [])]
    if not todo:
        _print_plan([by_stage[s] for s in wanted], f"recipe {r.name}: nothing to do, every selected stage is cached ({time.time() - t0:.1f}s)",
                    done_as="cached")
        _where_to_look(r)
        return
    if "PREFECT_API_URL" not in os.environ and _prefect_server_up():
        os.environ["PREFECT_API_URL"] = "http://127.0.0.1:4200/api"
    from trlm.flows.pipeline import pipeline

    recipe_ref = recipe or DEFAULT_RECIPE
    try:
        outcomes = pipeline(recipe=recipe_ref, overrides=overrides, only=only, from_stage=from_stage, force=list(force or []))
    except Exception as exc:  # the flow already marked the MLflow runs FAILED
        typer.echo(f"error: pipeline failed: {exc}", err=True)
        raise typer.Exit(1) from None
    _print_plan(plan(r, tracker), f"recipe {r.name}: finished in {time.time() - t0:.0f}s")
    for stage, outcome in outcomes.items():
        if outcome.get("reproduced") is not None:  # forced reruns of a finished stage
            verdict = "reproduces the previous run: same output fingerprints" if outcome["reproduced"] else "does NOT reproduce the previous run: output fingerprints differ"
            typer.echo(f"  forced {stage}: {verdict} (MLflow tag trlm.reproduced on run {outcome['run_id']})")
    _print_report(r, tracker)
    _where_to_look(r)


def _print_report(r, tracker) -> None:
    from trlm.lineage import plan

    ev = {p.stage: p for p in plan(r, tracker)}["eval"]
    if ev.state == "done" and ev.artifact_path and (Path(ev.artifact_path) / "report.md").is_file():
        typer.echo("")
        typer.echo((Path(ev.artifact_path) / "report.md").read_text())


def _where_to_look(r) -> None:
    typer.echo("\nWhere to look:")
    typer.echo(f"  MLflow UI:  mlflow ui --backend-store-uri {r.resolved_tracking_uri} --host 127.0.0.1 --port 5000   (or: trlm up)")
    typer.echo("  Prefect UI: prefect server start --host 127.0.0.1   (or: trlm up), then http://127.0.0.1:4200")
    typer.echo(f"  Status:     trlm status --recipe {r.name}")


@app.command()
def status(recipe: RecipeOpt = None, set_: SetOpt = None, tracking_uri: TrackingOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Each stage's key, state (done / stale / missing) and artifact path."""
    r, _ = _load(recipe, set_, tracking_uri)
    _quiet_environment(r)
    from trlm.lineage import plan, setup_tracking

    plans = plan(r, setup_tracking(r))
    if as_json:
        typer.echo(json.dumps({"recipe": r.name, "stages": [p.as_dict() for p in plans]}, indent=2))
    else:
        _print_plan(plans, f"recipe {r.name} (work dir {r.work_path}, tracking {r.resolved_tracking_uri})")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option("--model", help="local checkpoint directory or hub id")],
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="comma-separated lm-eval tasks [default: the recipe's]")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="items per task (seeded subset); default: every item")] = None,
    profile: Annotated[str, typer.Option("--profile", help="full (every item) or smoke")] = "full",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    max_gen_toks: Annotated[Optional[int], typer.Option("--max-gen-toks")] = None,
    recipe: RecipeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the results document as JSON on stdout")] = False,
) -> None:
    """Evaluate any checkpoint with the same code and settings as the pipeline's eval stage."""
    r, _ = _load(recipe, None)
    _quiet_environment(r)
    updates = {"profile": profile}
    if tasks:
        updates["tasks"] = [t.strip() for t in tasks.split(",") if t.strip()]
    for name, value in (("limit", limit), ("batch_size", batch_size), ("max_gen_toks", max_gen_toks)):
        if value is not None:
            updates[name] = value
    try:
        cfg = type(r.eval).model_validate({**r.eval.model_dump(), **updates})
    except Exception as exc:  # pydantic ValidationError
        _fail(f"invalid eval settings: {exc}")
    from trlm.eval.harness import evaluate_checkpoint

    doc = evaluate_checkpoint(model, cfg, data_root=r.data_path, work_dir=r.work_path)
    if as_json:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")
        return
    for task, metrics in doc["results"].items():
        for metric, m in metrics.items():
            stderr = f" ± {m['stderr']:.4f}" if m.get("stderr") is not None else ""
            typer.echo(f"{task:<28} {metric:<36} {m['value']:.4f}{stderr}  (n={m.get('n')})")


@app.command()
def report(recipe: RecipeOpt = None, set_: SetOpt = None, tracking_uri: TrackingOpt = None,
           out: Annotated[Optional[Path], typer.Option("--out", help="directory for report.md and report.png")] = None) -> None:
    """Write the reproduction report from the evaluations recorded in MLflow (missing stages show as –)."""
    r, _ = _load(recipe, set_, tracking_uri)
    _quiet_environment(r)
    from trlm.eval.report import write_report
    from trlm.lineage import TAG_RECIPE, TAG_STAGE, setup_tracking

    tracker = setup_tracking(r)
    columns: dict[str, dict | None] = {}
    for model in ("base", "sft-general", "sft-think", "dpo"):
        runs = tracker._search(f"tags.`{TAG_STAGE}` = 'eval:{model}' and tags.`{TAG_RECIPE}` = '{r.name}' and attributes.status = 'FINISHED'", 1)
        columns[model] = json.loads((tracker.resolve(f"runs:/{runs[0].info.run_id}/output") / "results.json").read_text()) if runs else None
    out = out or (r.work_path / "reports" / r.name)
    md, png = write_report(columns, out)
    typer.echo(md.read_text())
    typer.echo(f"\nreport: {md}\nchart:  {png}")


@app.command()
def up(recipe: RecipeOpt = None,
       prefect_port: Annotated[int, typer.Option(help="Prefect server port")] = 4200,
       mlflow_port: Annotated[int, typer.Option(help="MLflow server port")] = 5000) -> None:
    """Start a local Prefect server and a local MLflow server (both on 127.0.0.1) in the background."""
    import subprocess

    r, _ = _load(recipe, None)
    logs = r.work_path / "servers"
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = {
        "prefect": [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        "mlflow": [str(bin_dir / "mlflow"), "server", "--backend-store-uri", r.resolved_tracking_uri,
                   "--default-artifact-root", (r.work_path / "mlartifacts").as_uri(), "--host", "127.0.0.1", "--port", str(mlflow_port)],
    }
    for name, cmd in procs.items():
        log_file = open(logs / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        (logs / f"{name}.pid").write_text(str(proc.pid))
    deadline = time.time() + 90
    pending = {"prefect": prefect_port, "mlflow": mlflow_port}
    while pending and time.time() < deadline:
        for name, port in list(pending.items()):
            if _prefect_server_up(port=port):
                pending.pop(name)
        time.sleep(0.5)
    if pending:
        _fail(f"server(s) did not start within 90 s: {', '.join(pending)}; see logs in {logs}")
    typer.echo(f"Prefect UI: http://127.0.0.1:{prefect_port}   (API http://127.0.0.1:{prefect_port}/api)")
    typer.echo(f"MLflow UI:  http://127.0.0.1:{mlflow_port}   (store {r.resolved_tracking_uri})")
    # MLflow 3's UI opens an experiment on its GenAI (traces) view: link the training-runs list directly.
    from mlflow import MlflowClient

    experiment = MlflowClient(r.resolved_tracking_uri).get_experiment_by_name(r.experiment)
    if experiment is not None:
        typer.echo(f"  runs:     http://127.0.0.1:{mlflow_port}/#/experiments/{experiment.experiment_id}/runs   (expand a pipeline run for its stages)")
        typer.echo(f"  registry: http://127.0.0.1:{mlflow_port}/#/models/{r.name}")
    typer.echo(f"`trlm run` finds the Prefect server on port 4200 by itself. Logs and pids: {logs}. Stop: trlm down")


@app.command()
def down(recipe: RecipeOpt = None) -> None:
    """Stop the servers started by `trlm up`."""
    import signal

    r, _ = _load(recipe, None)
    for pid_file in (r.work_path / "servers").glob("*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            typer.echo(f"stopped {pid_file.stem}")
        except (ProcessLookupError, ValueError):
            pass
        pid_file.unlink()


@app.command()
def serve(recipe: RecipeOpt = None,
          cron: Annotated[str, typer.Option(help="schedule of the pipeline deployment")] = "0 2 * * *",
          set_: SetOpt = None) -> None:
    """Register the pipeline deployments (nightly cron + manual, per-stage parameters) and serve them."""
    r, overrides = _load(recipe, set_)
    _quiet_environment(r)
    if "PREFECT_API_URL" not in os.environ:
        if not _prefect_server_up():
            _fail("no Prefect server: start one with `trlm up` (schedules need a persistent API)")
        os.environ["PREFECT_API_URL"] = "http://127.0.0.1:4200/api"
    from prefect import serve as prefect_serve

    from trlm.flows.pipeline import pipeline

    params = {"recipe": recipe or DEFAULT_RECIPE, "overrides": overrides}
    nightly = pipeline.to_deployment(name=f"{r.name}-nightly", cron=cron, parameters=params, tags=["trlm", r.name],
                                     description="Scheduled run of the whole recipe (cached stages are skipped).")
    manual = pipeline.to_deployment(name=f"{r.name}-manual", parameters=params, tags=["trlm", r.name],
                                    description="Start one stage (only=...) or the pipeline from a stage (from_stage=...), with force=[...].")
    prefect_serve(nightly, manual)


@app.command()
def stages() -> None:
    """List the stage names in pipeline order."""
    for s in STAGES:
        typer.echo(s)


if __name__ == "__main__":
    app()
