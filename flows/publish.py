"""What a stage shows in the Prefect UI: a markdown summary, a metrics table, curves, a link to MLflow.

Generic over stages: the headline numbers come from the stage's `headline(out)` hook, or else from
the last logged step of the `metrics.json` history that training stages write; a stage that writes
`report.md` gets it published as the run's report.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from trlm.runs.tracking import OUTPUT, Tracker
from trlm.runs.runner import StageOutcome
from trlm.servers import mlflow_ui_base
from trlm.stage import Stage


class Links:
    """Links into the MLflow UI that shows this store, built when the stage publishes (the tracking
    server in use, or the one `trlm up` started), never a fixed port. None: no UI is known."""

    def __init__(self, tracker: Tracker):
        self.base = mlflow_ui_base(tracker.tracking_uri, tracker.work_dir)
        self.experiment = tracker.experiment_id

    def run(self, run_id: str) -> str | None:
        # `workflowType`: MLflow 3 shows a run under its GenAI "Evaluation runs" view without it
        return f"{self.base}/#/experiments/{self.experiment}/runs/{run_id}?workflowType=machine_learning" if self.base else None

    def runs(self) -> str | None:
        # MLflow 3 opens an experiment on its GenAI (traces) view; this selects the training runs.
        return f"{self.base}/#/experiments/{self.experiment}/runs?workflowType=machine_learning" if self.base else None

    def artifact_view(self, run_id: str, path: str) -> str | None:
        """A run's artifact shown in MLflow's artifact browser (an image inline, not downloaded)."""
        return f"{self.base}/#/experiments/{self.experiment}/runs/{run_id}/artifacts/{path}" if self.base else None

    def file(self, run_id: str, path: str) -> str | None:
        """A run's artifact file itself (an image shows inline in a markdown artifact)."""
        return f"{self.base}/get-artifact?path={quote(path, safe='')}&run_uuid={run_id}" if self.base else None


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
            tracker.log_file(outcome.run_id, png, "plots")
    key = stage.name.replace("_", "-")
    links = Links(tracker)
    link = links.run(outcome.run_id)
    state = "cached" if outcome.cached else "ran"
    if outcome.reproduced is not None:  # a forced rerun
        state += ", forced: " + ("reproduces the previous run bit for bit" if outcome.reproduced else "output DIFFERS from the previous run")
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in numbers.items())
    run_ref = f"[{outcome.run_id}]({link}) ([all training runs]({links.runs()}))" if link else f"`{outcome.run_id}` (no MLflow UI known: `trlm up` starts one)"
    curves = ""
    if png is not None:
        image = links.file(outcome.run_id, f"plots/{png.name}")
        curves = f"\n\n![loss and reward curves]({image})" if image else f"\n\nCurves: `plots/{png.name}` in the MLflow run's artifacts"
    samples = short_table(stage.tables(out)) if stage.tables is not None and out is not None else ""
    create_markdown_artifact(
        key=f"{key}-summary",
        markdown=f"### {stage.name} ({state})\n\nMLflow run: {run_ref}  \nkey: `{outcome.key[:16]}`  \n"
        f"artifact: `{outcome.artifact_uri}`\n\n| metric | value |\n|---|---|\n{rows}{curves}{samples}",
        description=f"{stage.name} summary",
    )
    create_table_artifact(key=f"{key}-metrics", table=[{"metric": k, "value": float(v)} for k, v in numbers.items()] or [{"metric": "-", "value": 0.0}])
    if link:
        create_link_artifact(key=f"{key}-mlflow", link=link, link_text=f"MLflow run of {stage.name}")
    report = next((out / name for name in ("report-ui.md", "report.md") if out is not None and (out / name).is_file()), None)
    if report is not None:  # the compact form where the stage writes one: it fits the artifact pane
        full = links.artifact_view(outcome.run_id, f"{OUTPUT}/report.md")
        markdown = embed_images(report, links, outcome.run_id) + (f"\n\n[The full report in MLflow]({full})" if full else "")
        create_markdown_artifact(key=f"{key}-report", markdown=markdown, description=f"{stage.name} report")


def short_table(tables: dict[str, list[dict]], rows: int = 4, width: int = 60) -> str:
    """The first rows of the stage's first table as markdown, each cell one line of at most `width`
    characters (a prompt keeps its end, where the question is); the whole tables are in MLflow."""
    name, table = next(((n, t) for n, t in tables.items() if t), (None, None))
    if table is None:
        return ""

    def cell(column: str, value) -> str:
        text = f"{value:.3g}" if isinstance(value, float) else " ".join(str(value).split()).replace("|", "\\|")
        if len(text) > width:
            text = "…" + text[-width:] if column == "prompt" else text[:width] + "…"
        # as written: `<think>` is no HTML tag, `6*50` no emphasis (seen in Prefect's UI)
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*").replace("_", "\\_")

    columns = list(table[0])
    lines = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}", *(f"| {' | '.join(cell(c, r.get(c, '')) for c in columns)} |" for r in table[:rows])]
    return f"\n\n**{name}** (first {min(rows, len(table))} of {len(table)}; all in the MLflow run's `tables/`)\n\n" + "\n".join(lines)


def embed_images(report: Path, links: Links, run_id: str) -> str:
    """The report's relative images (`![scores](report.png)`, next to it in the artifact) as absolute
    links to the run's artifact files, so they show in the Prefect UI; dropped when no UI is known."""
    import re

    def absolute(match: re.Match) -> str:
        url = links.file(run_id, f"{OUTPUT}/{match.group(2)}")
        view = links.artifact_view(run_id, f"{OUTPUT}/{match.group(2)}")
        # (Prefect's markdown shows no image inside a link: the image, then a link that opens it in MLflow)
        return f"![{match.group(1)}]({url})\n\n[{match.group(2)} in MLflow]({view})" if url else f"({match.group(2)}: in the MLflow run's artifacts)"

    return re.sub(r"!\[([^\]]*)\]\((?!https?:)([^)]+)\)", absolute, report.read_text())
