"""The pipeline: its stages in order, what each consumes, and loading a recipe against them.

    from trlm.stages.registry import PIPELINE, load_recipe
    recipe = load_recipe("offline-smoke", ["dpo.beta=0.2"])

This is the pipeline's DAG, in one place. A stage module says what its stage does (`STAGE =
Stage(...)`, see `trlm/stage.py` and `stages/README.md`); the entry here says what it consumes:
`{local name: "stage:part"}`, where `base:model` is the base checkpoint and `data-prep:<stage>`
the prepared mixture of that stage. The lineage, the flow and the CLI take the pipeline as a value,
so a test (or a user's own project) can run another list of stages through them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

from trlm.base_model import resolve_source
from trlm.recipe import Recipe, RecipeError
from trlm.recipe import load_recipe as _load_recipe
from trlm.recipe import read_stage_choice
from trlm.stage import BASE, MODEL, Stage, split_ref
from trlm.stages import data_prep, dpo, evaluate, grpo, sft


def consumes(stage: Stage, inputs: Mapping[str, str] | Callable[[Any], Mapping[str, str]]) -> Stage:
    """`stage` with its inputs: a fixed mapping, or a function of the recipe."""
    return replace(stage, inputs=inputs if callable(inputs) else lambda recipe: dict(inputs))


PIPELINE: tuple[Stage, ...] = (
    consumes(data_prep.STAGE, {"base": "base:model"}),
    consumes(sft.SFT_GENERAL, {"model": "base:model", "data": "data-prep:sft-general"}),
    consumes(sft.SFT_THINK, {"model": "sft-general:model", "data": "data-prep:sft-think"}),
    consumes(dpo.STAGE, {"model": "sft-think:model", "data": "data-prep:dpo"}),
    consumes(grpo.STAGE, {"model": "dpo:model", "data": "data-prep:grpo"}),
    consumes(evaluate.STAGE, lambda recipe: {model: f"{model}:{MODEL}" for model in eval_models(recipe)}),
)


def chosen(names: list[str] | None, pipeline: tuple[Stage, ...] = PIPELINE) -> tuple[Stage, ...]:
    """The stages a recipe runs (its `stages:` list, in pipeline order); None: all of them."""
    if names is None:
        return pipeline
    known = stage_names(pipeline)
    for name in names:
        if name not in known:
            raise RecipeError(f"stages: unknown stage {name!r}; declared stages are: {', '.join(known)}")
    return tuple(s for s in pipeline if s.name in names)


def active(recipe: Recipe, pipeline: tuple[Stage, ...] = PIPELINE) -> tuple[Stage, ...]:
    """The stages this recipe runs."""
    return chosen(recipe.stages, pipeline)


def eval_models(recipe: Recipe, pipeline: tuple[Stage, ...] = PIPELINE) -> list[str]:
    """The models the eval stage evaluates: `eval.models` if the recipe lists them, else the base and
    every stage the recipe runs that hands on a model, in pipeline order (a new training stage is a
    new report column without naming it anywhere)."""
    if recipe.eval.models is not None:
        return list(recipe.eval.models)
    return [BASE, *(s.name for s in active(recipe, pipeline) if s.hands_on == MODEL)]


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
    """Load and validate a recipe for the stages of `pipeline` it chooses (`stages:`): schema, then
    the wiring between stages, then (check_files) every file it names and each stage's own checks.
    All before any compute."""
    pipeline = chosen(read_stage_choice(name_or_path, overrides), pipeline)
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
