"""The pipeline: its stages in order, and loading a recipe against them.

    from trlm.stages.registry import PIPELINE, load_recipe
    recipe = load_recipe("offline-smoke", ["dpo.beta=0.2"])

Adding a stage is one module in `stages/` that declares `STAGE = Stage(...)` (see `trlm/stage.py`
and `stages/README.md`) and one entry here. The lineage, the flow and the CLI take the pipeline as
a value, so a test (or a user's own project) can run another list of stages through them.
"""

from __future__ import annotations

from trlm.base_model import resolve_source
from trlm.recipe import Recipe, RecipeError
from trlm.recipe import load_recipe as _load_recipe
from trlm.stage import BASE, MODEL, Stage, split_ref
from trlm.stages import data_prep, dpo, evaluate, sft

PIPELINE: tuple[Stage, ...] = (data_prep.STAGE, sft.SFT_GENERAL, sft.SFT_THINK, dpo.STAGE, evaluate.STAGE)


def sections(pipeline: tuple[Stage, ...] = PIPELINE) -> tuple[tuple[str, type], ...]:
    return tuple((s.section, s.config) for s in pipeline if s.section)


def stage_names(pipeline: tuple[Stage, ...] = PIPELINE) -> list[str]:
    return [s.name for s in pipeline]


def get_stage(name: str, pipeline: tuple[Stage, ...] = PIPELINE) -> Stage:
    for stage in pipeline:
        if stage.name == name:
            return stage
    raise RecipeError(f"unknown stage {name!r}; stages are: {', '.join(stage_names(pipeline))}")


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None, check_files: bool = True,
                pipeline: tuple[Stage, ...] = PIPELINE) -> Recipe:
    """Load and validate a recipe for `pipeline`: schema, then the wiring between stages, then
    (check_files) every file it names and each stage's own checks. All before any compute."""
    recipe = _load_recipe(name_or_path, overrides, sections=sections(pipeline))
    check_wiring(recipe, pipeline)
    if check_files:
        resolve_source(recipe.base_model)  # raises RecipeError naming the missing file
        for stage in pipeline:
            if stage.check is not None:
                stage.check(recipe)
    return recipe


def check_wiring(recipe: Recipe, pipeline: tuple[Stage, ...] = PIPELINE) -> None:
    """Every input of a stage names an earlier stage (or the base model) that hands on that part."""
    earlier: dict[str, Stage] = {}
    for stage in pipeline:
        for name, ref in stage.inputs(recipe).items():
            source, part = split_ref(ref)
            where = f"{stage.section or stage.name}: input {name!r} ({ref})"
            if source == BASE:
                if part != MODEL:
                    raise RecipeError(f"{where}: the base model hands on only its {MODEL!r}")
                continue
            if source not in earlier:
                known = ", ".join([BASE, *earlier]) or BASE
                raise RecipeError(f"{where}: {source!r} is not an earlier stage of the pipeline (earlier: {known})")
            upstream = earlier[source]
            if part == MODEL and upstream.hands_on != MODEL:
                raise RecipeError(f"{where}: stage {source!r} hands on no model")
        earlier[stage.name] = stage
