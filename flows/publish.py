"""What a stage shows in the Prefect UI: a markdown summary, a metrics table, curves, a link to MLflow.

Generic over stages: the headline numbers come from the stage's `headline(out)` hook, or else from
the last logged step of the `metrics.json` history that training stages write; a stage that writes
`report.md` gets it published as the run's report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from trlm.tracking import Tracker
from trlm.stage_runs import StageOutcome
from trlm.stage import Stage

MLFLOW_UI = os.environ.get("TRLM_MLFLOW_UI", "http://127.0.0.1:5000")


def run_link(tracker: Tracker, run_id: str) -> str:
    return f"{MLFLOW_UI}/#/experiments/{tracker.experiment_id}/runs/{run_id}"


def history(out: Path) -> list[dict]:
    """The per-step history a training stage saved in `metrics.json` ([] for other stages)."""
    path = out / "metrics.json"
    doc = json.loads(path.read_text()) if path.is_file() else []
    doc = doc.get("history", []) if isinstance(doc, dict) else doc
    return doc if isinstance(doc, list) else []


def headline(stage: Stage, out: Path) -> dict[str, float]:
    if stage.headline is not None:
        return stage.headline(out)
    last = (history(out) or [{}])[-1]
    return {k: v for k, v in last.items() if isinstance(v, (int, float)) and k != "step"}


def plot_curves(steps: list[dict], out_png: Path, title: str) -> Path | None:
    keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "mean_token_accuracy") if any(k in h for h in steps)]
    if not steps or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
        pts = [(h["step"], h[k]) for h in steps if k in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def publish(tracker: Tracker, stage: Stage, outcome: StageOutcome, recipe_name: str, work_dir: Path) -> None:
    """Prefect UI artifacts for one stage outcome (and the curves plot into its MLflow run)."""
    out = Path(outcome.path) if outcome.path else None
    numbers = headline(stage, out) if out is not None else {}
    png = None
    if out is not None and not outcome.cached:
        png = plot_curves(history(out), work_dir / "plots" / outcome.run_id / f"{stage.name}-curves.png", f"{recipe_name}: {stage.name}")
        if png is not None:
            tracker.client.log_artifact(outcome.run_id, str(png), "plots")
    key = stage.name.replace("_", "-")
    link = run_link(tracker, outcome.run_id)
    state = "cached" if outcome.cached else "ran"
    if outcome.reproduced is not None:  # a forced rerun
        state += ", forced: " + ("reproduces the previous run bit for bit" if outcome.reproduced else "output DIFFERS from the previous run")
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in numbers.items())
    curves = f"\n\nLoss/reward curves: [{png.name}]({link}) (MLflow run artifacts, `plots/`)" if png else ""
    create_markdown_artifact(
        key=f"{key}-summary",
        markdown=f"### {stage.name} ({state})\n\nMLflow run: [{outcome.run_id}]({link})  \nkey: `{outcome.key[:16]}`  \n"
        f"artifact: `{outcome.artifact_uri}`\n\n| metric | value |\n|---|---|\n{rows}{curves}",
        description=f"{stage.name} summary",
    )
    create_table_artifact(key=f"{key}-metrics", table=[{"metric": k, "value": float(v)} for k, v in numbers.items()] or [{"metric": "-", "value": 0.0}])
    create_link_artifact(key=f"{key}-mlflow", link=link, link_text=f"MLflow run of {stage.name}")
    if out is not None and (out / "report.md").is_file():
        create_markdown_artifact(key=f"{key}-report", markdown=(out / "report.md").read_text(), description=f"{stage.name} report")
