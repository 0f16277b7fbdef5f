"""`trlm`: run, inspect, evaluate and serve the post-training pipeline.

    trlm run [--recipe NAME_OR_PATH] [--only STAGE | --from STAGE] [--force STAGE] [--set key=value]
    trlm status [--recipe ...] [--json]
    trlm eval --model PATH_OR_HUB_ID [--tasks a,b] [--limit N] [--backend trlm|hf] [--json]
    trlm report [--recipe ...]
    trlm up | trlm serve | trlm stages

`trlm stages` lists the pipeline's stages. The recipe is validated completely before any compute;
a bad recipe exits with code 2 and a message naming the key or file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from trlm.artifacts import mask_secrets, mask_uri
from trlm.process_setup import quiet_environment, route_tracebacks
from trlm.recipe import DEFAULT_RECIPE, RecipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0], pretty_exceptions_enable=False)

RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", "-r", help=f"built-in recipe name or YAML path [default: {DEFAULT_RECIPE}]")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe value, e.g. --set dpo.beta=0.2 (repeatable)")]
TrackingOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default: SQLite in the work dir)")]


def _load(recipe: str | None, overrides: list[str] | None, tracking_uri: str | None = None):
    overrides = list(overrides or [])
    if tracking_uri:
        # Through the environment, never as an override: overrides become Prefect flow parameters,
        # deployment parameters and launcher arguments, and a URI may carry credentials.
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        overrides.append("tracking_uri=null")
    from trlm.stages.registry import load_recipe  # imports every stage module (torch): not for --help

    try:
        r = load_recipe(recipe, overrides)
    except RecipeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    from trlm.servers import use_work_dir_servers

    use_work_dir_servers(r.work_path)  # before anything imports Prefect: it reads its settings once
    return r, overrides


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _print_plan(plans, title: str, done_as: str = "done") -> None:
    """One line per stage; `done_as="cached"` when a run found the stage's artifact and skips it."""
    typer.echo(title)
    typer.echo(f"  {'stage':<12} {'state':<8} {'key':<14} artifact, or why it will run")
    for p in plans:
        state = done_as if p.state == "done" else p.state
        typer.echo(f"  {p.stage:<12} {state:<8} {(p.key or '-')[:12]:<14} {p.artifact_path or p.note or '-'}")


def _check_servers(r) -> None:
    """A tracking or Prefect server that does not answer: one error line within seconds."""
    from trlm.servers import server_problem

    if (problem := server_problem(r.resolved_tracking_uri, from_recipe=bool(r.tracking_uri))) is not None:
        _fail(problem)


@app.command()
def run(
    recipe: RecipeOpt = None,
    only: Annotated[Optional[str], typer.Option("--only", help="run just this stage (its upstream must be done)")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="run this stage and everything after it")] = None,
    force: Annotated[Optional[list[str]], typer.Option("--force", help="rerun this stage even if done (repeatable)")] = None,
    set_: SetOpt = None,
    tracking_uri: TrackingOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show tracebacks on the console (they always go to the run's log file)")] = False,
) -> None:
    """Run the pipeline (as a Prefect flow); stages whose key is already done are skipped ("cached")."""
    t0 = time.time()
    r, overrides = _load(recipe, set_, tracking_uri)
    quiet_environment(r)
    _check_servers(r)
    from trlm.servers import seed_in_background
    from trlm.stages.registry import active, get_stage

    try:
        for s in [only, from_stage, *(force or [])]:
            if s:
                get_stage(s, active(r))
        if only and from_stage:
            raise RecipeError("give --only or --from, not both")
    except RecipeError as exc:
        _fail(str(exc))  # before any work: nothing written in the work dir
    seeded = seed_in_background(r.work_path)  # a first run's Prefect migrations, beside the imports below
    try:
        _run(r, overrides, recipe, only, from_stage, force, verbose, t0, seeded)
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own error (or exit) is the one to report
            seeded()
        raise
    seeded()


def _run(r, overrides, recipe, only, from_stage, force, verbose: bool, t0: float, seeded) -> None:
    from trlm.flows.pipeline import selected_stages
    from trlm.runs.lineage import plan
    from trlm.runs.tracking import setup_tracking
    from trlm.stages.registry import active, stage_names

    tracker = setup_tracking(r)
    plans = plan(r, tracker, active(r))
    names = stage_names(active(r))
    wanted = selected_stages(names, only, from_stage)
    by_stage = {p.stage: p for p in plans}
    first = names.index(wanted[0])
    for upstream in names[:first]:
        if by_stage[upstream].state != "done":
            _fail(f"cannot run {wanted[0]}: upstream stage {upstream} is {by_stage[upstream].state} for recipe {r.name} "
                  f"(no finished artifact for the current config and inputs). Run `trlm run --from {upstream}` first.")
    todo = [s for s in wanted if by_stage[s].state != "done" or s in (force or [])]
    if not todo:
        _print_plan([by_stage[s] for s in wanted], f"recipe {r.name}: nothing to do, every selected stage is cached ({time.time() - t0:.1f}s)",
                    done_as="cached")
        _where_to_look(r)
        return
    from trlm.flows.pipeline import pipeline
    from trlm.servers import prefect_target, start_temporary_prefect

    log_file = route_tracebacks(r.work_path, verbose)
    typer.echo(f"Prefect: this run reports to {prefect_target()}")
    typer.echo(f"MLflow:  tracking at {mask_uri(r.resolved_tracking_uri)}")
    recipe_ref = recipe or DEFAULT_RECIPE
    try:
        seeded()
        start_temporary_prefect(r.work_path, lambda line: typer.echo(line, err=True))  # when no server is set; retried
        outcomes = pipeline(recipe=recipe_ref, overrides=overrides, only=only, from_stage=from_stage, force=list(force or []))
    except Exception as exc:  # the flow already marked the MLflow runs FAILED
        typer.echo(f"error: pipeline failed: {mask_secrets(str(exc))}\n(full log with the traceback: {log_file})", err=True)
        raise typer.Exit(1) from None
    _print_plan(plan(r, tracker, active(r)), f"recipe {r.name}: finished in {time.time() - t0:.0f}s")
    for stage, outcome in outcomes.items():
        if outcome.get("reproduced") is not None:  # forced reruns of a finished stage
            verdict = "reproduces the previous run: same output fingerprints" if outcome["reproduced"] else "does NOT reproduce the previous run: output fingerprints differ"
            typer.echo(f"  forced {stage}: {verdict} (MLflow tag trlm.reproduced on run {outcome['run_id']})")
    for outcome in outcomes.values():
        if outcome.get("registry"):
            typer.echo(f"  model registry: {outcome['registry']}")
    _print_report(r, tracker)
    _where_to_look(r)


def _print_report(r, tracker) -> None:
    """Print the report of every finished stage that wrote one (the eval stage's reproduction report)."""
    from trlm.runs.lineage import plan
    from trlm.stages.registry import active

    for p in plan(r, tracker, active(r)):
        if p.state == "done" and p.artifact_path and (Path(p.artifact_path) / "report.md").is_file():
            typer.echo("")
            typer.echo((Path(p.artifact_path) / "report.md").read_text())


def _where_to_look(r) -> None:

    from trlm.servers import live_port, mlflow_ui_base

    typer.echo("\nWhere to look:")
    base = mlflow_ui_base(r.resolved_tracking_uri, r.work_path)
    typer.echo(f"  MLflow UI:  {base}" if base else f"  MLflow UI:  trlm up   (or: mlflow ui --backend-store-uri {mask_uri(r.resolved_tracking_uri)} "
                                                  f"--artifacts-destination {r.work_path / 'mlartifacts'} --host 127.0.0.1)")
    api = os.environ.get("PREFECT_API_URL")
    port = live_port(r.work_path, "prefect")
    typer.echo(f"  Prefect UI: {api.removesuffix('/api')}" if api else f"  Prefect UI: http://127.0.0.1:{port}" if port else "  Prefect UI: trlm up")
    typer.echo(f"  Status:     trlm status --recipe {r.name}")


@app.command()
def status(recipe: RecipeOpt = None, set_: SetOpt = None, tracking_uri: TrackingOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Each stage's key, state (done / stale / missing) and artifact path."""
    r, _ = _load(recipe, set_, tracking_uri)
    quiet_environment(r)
    _check_servers(r)
    from trlm.runs.lineage import plan
    from trlm.runs.tracking import setup_tracking
    from trlm.stages.registry import active

    plans = plan(r, setup_tracking(r), active(r))
    data = {"path": str(r.data_path), "origin": r.data_root_origin}
    if as_json:
        typer.echo(json.dumps({"recipe": r.name, "data_root": data, "stages": [p.as_dict() for p in plans]}, indent=2))
    else:
        _print_plan(plans, f"recipe {r.name} (work dir {r.work_path}, tracking {mask_uri(r.resolved_tracking_uri)})\n"
                           f"  data root: {data['path']} (from {data['origin']})")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option("--model", help="local checkpoint directory or hub id")],
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="comma-separated lm-eval tasks [default: the recipe's]")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="the first N items of each task, as lm-eval's --limit; default: every item")] = None,
    sample: Annotated[Optional[int], typer.Option("--sample", help="a seeded random subset of N items of each task (seed: the recipe's eval.seed)")] = None,
    profile: Annotated[str, typer.Option("--profile", help="full (every item) or smoke")] = "full",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    max_gen_toks: Annotated[Optional[int], typer.Option("--max-gen-toks")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="trlm (shared contexts scored once) or hf (lm-eval's HFLM, the reference) [default: the recipe's]")] = None,
    recipe: RecipeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the results document as JSON on stdout")] = False,
) -> None:
    """Evaluate any checkpoint with the same code and settings as the pipeline's eval stage."""
    r, _ = _load(recipe, None)
    quiet_environment(r)
    if limit is not None and sample is not None:
        _fail("give --limit N (the first N items, as lm-eval) or --sample N (a seeded subset), not both")
    updates: dict = {"profile": profile}
    if limit is not None or sample is not None:  # replaces the recipe's choice: --limit clears its `sample`, and vice versa
        updates["limit"] = limit
        if sample is not None or "sample" in type(r.eval).model_fields:
            updates["sample"] = sample
    if tasks:
        updates["tasks"] = [t.strip() for t in tasks.split(",") if t.strip()]
    for name, value in (("batch_size", batch_size), ("max_gen_toks", max_gen_toks), ("backend", backend)):
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
    typer.echo("backend {backend}, evaluate wall {wall_s} s".format_map({"backend": None, "wall_s": None, **(doc.get("settings") or {})}))


@app.command()
def report(recipe: RecipeOpt = None, set_: SetOpt = None, tracking_uri: TrackingOpt = None,
           out: Annotated[Optional[Path], typer.Option("--out", help="directory for report.md and report.png")] = None) -> None:
    """Write the reproduction report from the evaluations recorded in MLflow (missing stages show as –)."""
    r, _ = _load(recipe, set_, tracking_uri)
    quiet_environment(r)
    from trlm.runs.tracking import setup_tracking
    from trlm.stages.registry import active

    tracker = setup_tracking(r)
    out = out or (r.work_path / "reports" / r.name)
    for stage in active(r):
        if stage.report is None:
            continue

        def lookup(sub: str, stage=stage) -> Path | None:
            run = tracker.latest_done(f"{stage.name}:{sub}", r.name)
            return tracker.resolve(tracker.artifact_uri(run)) if run is not None else None

        md, png = stage.report(r, lookup, out, dict(stage.inputs(r)))
        typer.echo(md.read_text())
        typer.echo(f"\nreport: {md}\nchart:  {png}")


@app.command()
def up(recipe: RecipeOpt = None,
       prefect_port: Annotated[int, typer.Option(help="Prefect server port")] = 4200,
       mlflow_port: Annotated[int, typer.Option(help="MLflow server port")] = 5000,
       timeout: Annotated[int, typer.Option(help="seconds to wait for both servers to answer")] = 180) -> None:
    """Start this work dir's Prefect and MLflow servers (both on 127.0.0.1) in the background.

    Both keep their state in the work dir: Prefect's home and database in `prefect/` (or the database
    of PREFECT_SERVER_DATABASE_CONNECTION_URL), MLflow's runs in the recipe's database store (SQLite
    in the work dir, or PostgreSQL) and its artifacts in `mlartifacts/`, served to clients over HTTP
    (`mlflow-artifacts:/`), so a worker with another work dir fetches through the server. Neither
    server has authentication: they are bound to 127.0.0.1 for that reason.
    """
    import subprocess

    from trlm.servers import (ARTIFACTS_DIR, PREFECT_DIR, is_database_store, port_in_use, record_server, recorded_process,
                              seed_own_prefect_database, wait_for)

    r, _ = _load(recipe, None)
    work = r.work_path
    logs = work / "servers"
    logs.mkdir(parents=True, exist_ok=True)
    ports = {"prefect": prefect_port, "mlflow": mlflow_port}
    for name in ports:  # never overwrite the pid file of a server that is still running
        proc, _why = recorded_process(logs / f"{name}.pid")
        if proc is not None:
            _fail(f"the {name} server started by an earlier `trlm up` is still running (pid {proc.pid}; see {logs / f'{name}.pid'}); "
                  "stop it with `trlm down` first")
    store = r.resolved_tracking_uri
    if not is_database_store(store):
        _fail(f"the tracking store is a server already ({mask_uri(store)}, from MLFLOW_TRACKING_URI or the recipe): "
              "`trlm up` serves a database store (the work dir's SQLite, or PostgreSQL); use that server's UI, or unset the setting")
    busy = [f"{name} port {port}" for name, port in ports.items() if port_in_use(port)]
    if busy:
        _fail(f"already in use on 127.0.0.1: {', '.join(busy)} (another server?); choose other ports with --prefect-port/--mlflow-port")
    bin_dir = Path(sys.executable).parent
    # The store URI goes through the environment, not the command line (visible to every user in ps).
    # The database URL was set for this work dir by `_load` (unless the user set one).
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           # MLflow's job runner (GenAI scorers) starts a dozen consumer processes the pipeline never uses
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_BACKEND_STORE_URI": store, "PREFECT_HOME": str(work / PREFECT_DIR),
           # Prefect 3.8 tells the browser its API address from these settings, not from `--port`:
           # without them the UI of a server on another port calls :4200 (empty, or someone else's runs).
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(prefect_port),
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api", "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
    procs = {
        "prefect": [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        "mlflow": [str(bin_dir / "mlflow"), "server", "--serve-artifacts", "--artifacts-destination", str(work / ARTIFACTS_DIR),
                   "--host", "127.0.0.1", "--port", str(mlflow_port)],
    }
    seed_own_prefect_database(work)  # a new work dir's server starts in seconds, not after 150 migrations
    started = {}
    for name, cmd in procs.items():
        log_file = open(logs / f"{name}.log", "ab")
        started[name] = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        record_server(logs / f"{name}.pid", started[name].pid, cmd, port=ports[name], work_dir=work)
    health = {"prefect": f"http://127.0.0.1:{prefect_port}/api/health", "mlflow": f"http://127.0.0.1:{mlflow_port}/health"}
    try:
        wait_for(health, started, timeout, lambda line: typer.echo(line, err=True))
    except RuntimeError as exc:
        _fail(f"{exc}; see the logs in {logs} (stop the servers with `trlm down`)")
    database = os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL", "")
    typer.echo(f"Prefect UI: http://127.0.0.1:{prefect_port}   (API http://127.0.0.1:{prefect_port}/api; database {mask_uri(database)})")
    typer.echo(f"MLflow UI:  http://127.0.0.1:{mlflow_port}   (store {mask_uri(store)}; artifacts {work / ARTIFACTS_DIR})")
    # Through the server: the experiment exists for the links, with MLflow's training-runs views.
    os.environ["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{mlflow_port}"
    from trlm.runs.tracking import setup_tracking

    experiment_id = setup_tracking(r).experiment_id
    # MLflow 3's UI opens an experiment on its GenAI (traces) view: link the training-runs list directly.
    typer.echo(f"  runs:     http://127.0.0.1:{mlflow_port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
               "   (expand a pipeline run for its stages)")
    typer.echo(f"  registry: http://127.0.0.1:{mlflow_port}/#/models/{r.name}?workflowType=machine_learning")
    typer.echo(f"`trlm run` and `trlm serve` with this work dir use these servers by themselves. Logs and pids: {logs}. Stop: trlm down")


@app.command()
def down(recipe: RecipeOpt = None) -> None:
    """Stop the servers started by `trlm up` (only processes that are still those servers)."""
    from trlm.servers import recorded_process, stop_server

    r, _ = _load(recipe, None)
    failed = False
    for pid_file in sorted((r.work_path / "servers").glob("*.pid")):
        running = recorded_process(pid_file)[0] is not None
        stopped, detail = stop_server(pid_file)  # checks pid, start time and command line before killing
        if stopped:
            typer.echo(f"stopped {pid_file.stem} ({detail}); nothing of it is left running")
        elif running:
            failed = True
            typer.echo(f"error: {pid_file.stem}: {detail}", err=True)
        else:
            typer.echo(f"{pid_file.stem}: nothing stopped: {detail}; removed {pid_file}")
    if failed:
        raise typer.Exit(1)


@app.command()
def serve(recipe: RecipeOpt = None,
          cron: Annotated[str, typer.Option(help="schedule of the pipeline deployment")] = "0 2 * * *",
          set_: SetOpt = None) -> None:
    """Register the pipeline deployments (nightly cron + manual, per-stage parameters) and serve them."""
    r, overrides = _load(recipe, set_)
    quiet_environment(r)
    from prefect import serve as prefect_serve
    from prefect.settings import get_current_settings

    from trlm.servers import prefect_target

    if get_current_settings().api.url is None:
        _fail("no Prefect server: start one with `trlm up` or set PREFECT_API_URL (schedules need a persistent API)")
    typer.echo(f"Prefect: serving the deployments on {prefect_target()}")

    from trlm.flows.pipeline import pipeline

    params = {"recipe": recipe or DEFAULT_RECIPE, "overrides": overrides}
    nightly = pipeline.to_deployment(name=f"{r.name}-nightly", cron=cron, parameters=params, tags=["trlm", r.name],
                                     description="Scheduled run of the whole recipe (cached stages are skipped).")
    manual = pipeline.to_deployment(name=f"{r.name}-manual", parameters=params, tags=["trlm", r.name],
                                    description="Start one stage (only=...) or the pipeline from a stage (from_stage=...), with force=[...].")
    prefect_serve(nightly, manual)


@app.command()
def stages() -> None:
    """List the pipeline's stages in order, with what each consumes."""
    from trlm.stages.registry import PIPELINE, load_recipe

    recipe = load_recipe(check_files=False)
    for s in PIPELINE:
        inputs = ", ".join(f"{k}<-{v}" for k, v in s.inputs(recipe).items()) or "-"
        typer.echo(f"{s.name:<12} {s.description}  [inputs: {inputs}]")


if __name__ == "__main__":
    app()
