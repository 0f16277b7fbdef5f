"""Stage `eval`: every model of the pipeline on the benchmarks, and the reproduction report.

What it does, top to bottom (`run`):

1. For each model the stage consumes (`eval.models` when the recipe lists them; by default the
   base and every stage of the recipe that hands on a model, wired in `stages/registry.py`), in that
   order: evaluate it with lm-evaluation-harness (`trlm.eval.harness.evaluate_checkpoint`) as a
   memoised sub-step with its own tracked run (`eval:<model>`). The sub-step's key is its own
   code (the harness and what it imports: the task subsets, the offline mirror, punkt), the eval
   settings without the model list, and the model's fingerprint: a changed DPO model re-evaluates
   only itself, and a report change re-evaluates nothing.
2. Write `report.md` + `report.png` (published figures, our columns, chance and majority-class
   baselines) and `results.json` (every model's results document) into the stage's directory.

`trlm report` rebuilds the report from the recorded sub-step results (`report` below), with a dash
for every model that has none.

Trade-offs: models are evaluated one after another in this process, on one device, through the
backend `eval.backend` names (`trlm`, the default: `trlm.eval.backend.TrlmLM`, each shared context
scored once; `hf`: lm-eval's HFLM, the reference). Being one process, the models share what does not
depend on them (`trlm.eval.shared`): each task is loaded, and its requests built per tokenizer, once
per stage, not once per model. The backend is an eval setting, so it is in each
sub-step's key and in the recorded settings. The stage's own output is cheap to rebuild, so its key
covers the report code too.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Callable

from pydantic import Field

from trlm.artifacts import write_fingerprint
from trlm.eval.config import EvalConfig
from trlm.eval.harness import evaluate_checkpoint
from trlm.eval.render import write_report
from trlm.eval.report import headline_metrics
from trlm.eval.task_index import known_task_names
from trlm.recipe import RecipeError, output_config
from trlm.stage import MODEL, Stage, StageContext

RESULTS = "results.json"


class EvalStageConfig(EvalConfig):
    """The harness settings (EvalConfig) plus which of the pipeline's models to evaluate."""

    models: list[str] | None = Field(None, description="base and/or training stages, in report column order; "
                                     "None: the base and every stage of the recipe that hands on a model")


def _harness_settings(cfg: EvalStageConfig) -> dict:
    """What one model's results depend on: the eval settings, not which other models are evaluated."""
    settings = output_config(cfg)
    settings.pop("models")
    return settings


def _evaluate_one(path: Path, recipe) -> Callable[[Path, Callable], None]:
    def evaluate(out: Path, on_log) -> None:
        doc = evaluate_checkpoint(str(path), recipe.eval, data_root=recipe.data_path, work_dir=recipe.work_path)
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS).write_text(json.dumps(doc, indent=2, default=str))
        on_log(headline_metrics(doc), 0)
        write_fingerprint(out)

    return evaluate


def run(ctx: StageContext) -> dict:
    recipe = ctx.recipe
    columns = {}
    for model in ctx.inputs:  # the models this stage consumes, in report column order
        out = ctx.cached_step(model, {MODEL: ctx.fingerprints[model]}, _evaluate_one(ctx.inputs[model], recipe),
                              config=_harness_settings(recipe.eval), code_module=evaluate_checkpoint.__module__)
        columns[model] = json.loads((out / RESULTS).read_text())
    md, _ = write_report(columns, ctx.out)
    (ctx.out / RESULTS).write_text(json.dumps(columns, indent=2, default=str))
    for model, doc in columns.items():
        ctx.on_log({f"{model}/{k}": v for k, v in headline_metrics(doc).items()}, 0)
    write_fingerprint(ctx.out)
    return {"report": str(md)}


def check(recipe) -> None:
    """Before any compute: every task name is one lm-eval knows (not after all the training)."""
    known = known_task_names()
    for task in recipe.eval.tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise RecipeError(f"eval.tasks: {task!r} is not an lm-eval task, group or tag{hint}")


def headline(out: Path) -> dict[str, float]:
    results = out / RESULTS
    columns = json.loads(results.read_text()) if results.is_file() else {}
    return {f"{model}/{k}": v for model, doc in columns.items() for k, v in headline_metrics(doc).items() if not k.endswith("/stderr")}


def report(recipe, lookup: Callable[[str], Path | None], out: Path, inputs: dict[str, str]) -> tuple[Path, Path]:
    """The report from recorded results: `lookup(model)` is the output directory of that model's
    latest finished sub-step (None when it was never evaluated: a dash column); `inputs` are the
    stage's inputs for this recipe (one per model)."""
    columns = {}
    for model in inputs:
        found = lookup(model)
        columns[model] = json.loads((found / RESULTS).read_text()) if found is not None else None
    return write_report(columns, out)


STAGE = Stage(
    name="eval",
    section="eval",
    config=EvalStageConfig,
    run=run,
    check=check,
    headline=headline,
    report=report,
    approves="candidate",  # the final model, once evaluated here: `<recipe>@candidate` in the registry
    libraries=("lm_eval", "transformers", "tokenizers", "torch", "datasets"),
    description="every model on the benchmarks, and the reproduction report",
)
