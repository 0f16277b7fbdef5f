"""What a stage is: one small frozen declaration that everything around the stages reads.

Each stage module in `stages/` ends with `STAGE = Stage(...)` (the SFT module declares two), and
`stages/registry.py` lists them in pipeline order. The lineage (keys, skip-if-done), the flow, the
CLI and the report iterate over that list; none of them names a stage.

A declaration says:
- `name`, and `section`: the recipe section holding its config (`sft_general:`) with `config` its
  pydantic schema; the section's content is part of the stage's key (`key_config` narrows it);
- `inputs(recipe)`: what it consumes, `{local name: "stage:part"}`, set where the stage enters
  the pipeline (`stages/registry.py`: the DAG in one place). A part is what an upstream
  stage hands on: `model` (the `model/` directory of a training stage) or a named part (data-prep
  hands on one prepared dataset per consuming stage). The pseudo-stage `base` is the base model;
- `hands_on`: what downstream keys are computed from: `model` (the fingerprint of `model/`, so a
  rerun that reproduces the weights keeps downstream cached), `parts` (the run returns them) or
  `all` (the whole output directory);
- `run(ctx)`: paths and config in, one artifact directory (`ctx.out`) out. It never imports
  Prefect, MLflow, the lineage or the flow: what it needs from them comes through `ctx`;
- optional hooks: `check(recipe)` (validation before any compute), `headline(out)` (numbers for the
  UIs), `tables(out)` (named tables of rows, e.g. GRPO's sample completions: MLflow tables and a short
  one in the Prefect summary), `report(recipe, lookup, out, inputs)` (rebuild a report from recorded results; `inputs` are the
  stage's inputs for the recipe), `external_inputs`
  (fingerprints of files it reads directly), `libraries` (distributions whose version shapes its
  output, part of its code version), `approves` (the alias this stage gives the pipeline's final model once it has consumed it: the
  eval stage sets `@candidate` on the model it evaluated),
  `launch_inputs` (input names passed as `--<name>-dir` when the flow starts its module under a
  multi-process launcher) and `launch(config)` (a `Launch`: how many processes, which launcher; the
  flow starts the module under it when that is more than one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import BaseModel

from trlm.data_spec import load_data_spec
from trlm.recipe import RecipeError, output_config

# The label of a position that is not trained (PyTorch's cross-entropy default): the contract between
# data-prep, which writes labels, and the trainers and losses, which skip it. Defined once, here.
IGNORE_INDEX = -100
BASE = "base"  # the pseudo-stage whose `model` part is the provisioned base checkpoint
MODEL = "model"  # the part a training stage hands on: its `model/` directory

OnLog = Callable[[dict[str, float], int], None]


@dataclass
class StageContext:
    """What a stage's run function gets: its config, resolved inputs, where to write, how to log."""

    recipe: Any  # the validated Recipe
    config: BaseModel | None  # the stage's own recipe section
    out: Path  # the one artifact directory the stage writes (and ends with fingerprint.json)
    inputs: dict[str, Path]  # local input name -> resolved local path
    fingerprints: dict[str, str]  # local input name -> content fingerprint
    on_log: OnLog  # per-step metrics (MLflow, live)
    # A memoised sub-step with its own tracked run, keyed by its own code, config and inputs:
    # cached_step(name, fingerprints, fn(out_dir, on_log) -> None, code_module) -> its output dir.
    cached_step: Callable[..., Path] | None = None


def _no_inputs(recipe: Any) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    section: str | None = None
    config: type[BaseModel] | None = None
    inputs: Callable[[Any], Mapping[str, str]] = _no_inputs
    hands_on: str = "all"  # model | parts | all
    key_config: Callable[[Any], Any] | None = None  # default: the section minus settings that change no output
    external_inputs: Callable[[Any], Mapping[str, str]] | None = None
    check: Callable[[Any], None] | None = None
    headline: Callable[[Path], dict[str, float]] | None = None
    tables: Callable[[Path], dict[str, list[dict]]] | None = None
    report: Callable[..., Any] | None = None
    libraries: tuple[str, ...] = ()
    approves: str | None = None
    launch_inputs: tuple[str, ...] = ()
    launch: Callable[[BaseModel], "Launch"] | None = None  # None: in-process; else how many processes, under which launcher
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        """The module that declares the stage: the root of its code version's import closure."""
        return self.run.__module__

    def config_of(self, recipe: Any) -> BaseModel | None:
        return getattr(recipe, self.section) if self.section else None


def split_ref(ref: str) -> tuple[str, str]:
    """`"sft-general:model"` -> ("sft-general", "model"); a bare stage name means its whole output."""
    stage, _, part = ref.partition(":")
    return stage, part or "all"


# --- helpers for stages that train on a data-prep mixture ---------------------------------------


def section_without_mixture(section: str) -> Callable[[Any], dict]:
    """Key config of a training stage: its section minus `data` (data-prep's key covers the mixture,
    and the prepared data's fingerprint is an input) and minus settings that change no output.
    `train.num_processes: auto` is keyed by the number it stands for here: it sets the global batch."""

    def key_config(recipe: Any) -> dict:
        cfg = output_config(getattr(recipe, section))
        cfg.pop("data", None)
        if "num_processes" in cfg.get("train", {}):
            cfg["train"]["num_processes"] = getattr(recipe, section).train.world_size()
        return cfg

    return key_config


def training_check(section: str, kind: str) -> Callable[[Any], None]:
    """Validation before any compute: the section's data spec exists, is of `kind` and its sources
    are there; FSDP gets at least 2 processes on this machine."""

    def check(recipe: Any) -> None:
        cfg = getattr(recipe, section)
        spec = load_data_spec(cfg.data.spec)
        if spec.kind != kind:
            raise RecipeError(f"{section}.data.spec: {cfg.data.spec} is a {spec.kind!r} spec, this stage needs {kind!r}")
        spec.check_sources(recipe.data_path, allow_outside_data_root=recipe.allow_outside_data_root, origin=recipe.data_root_origin)
        if cfg.train.distributed == "fsdp" and cfg.train.world_size() < 2:
            raise RecipeError(f"{section}.train.distributed: fsdp needs at least 2 processes, and num_processes "
                              f"{cfg.train.num_processes!r} means 1 here; set {section}.train.num_processes=N or use ddp")

    return check


@dataclass(frozen=True)
class Launch:
    """How the flow starts a stage that runs in several processes: N processes under a launcher."""

    num_processes: int
    launcher: str  # torchrun | accelerate
    distributed: str  # ddp | fsdp: picks the accelerate config


def train_launch(config: Any) -> Launch:
    """`Stage.launch` of the training stages: read from their `train:` section."""
    train = config.train
    return Launch(train.world_size(), train.launcher, train.distributed)


def final_model(pipeline: tuple[Stage, ...]) -> str | None:
    """The pipeline's final model: its last stage that hands on a model (registered when it runs)."""
    models = [s.name for s in pipeline if s.hands_on == MODEL]
    return models[-1] if models else None
