"""The recipe: one typed schema for a whole pipeline, validated completely before any compute.

A recipe names the base model, the data mixture of each training stage (a file in `data_specs/`),
the per-stage settings, the work directory and the MLflow store. This module holds the shared
settings and the assembly; each stage's section schema lives with its stage (`SFTStageConfig` in
`stages/sft.py`, `EvalConfig` in `eval/config.py`, ...) and the pipeline adds them (`recipe_model`).
Two recipes ship in `trlm/recipes/`: `offline-smoke` (the default) and `trlm-135m` (the published one).

    recipe = load_recipe("offline-smoke", overrides=["dpo.beta=0.2"])

Every problem (unknown key, wrong type, out-of-range value, unknown stage, missing file) becomes a
`RecipeError` whose message names the key or file; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StrictBool, ValidationError, create_model

DEFAULT_RECIPE = "offline-smoke"
# The one rule between a stage's name and its recipe section (and `--set` keys): `sft-general` <-> `sft_general`.
def section_name(stage: str) -> str:
    return stage.replace("-", "_")


def stage_name(section: str) -> str:
    return section.replace("_", "-")


class RecipeError(ValueError):
    """A recipe (or one of the files it names) is invalid. The message names the key or file."""


class Strict(BaseModel):
    # extra="forbid" turns a typo in a key into an error instead of a silently ignored setting;
    # allow_inf_nan=False: `.inf` or `.nan` in any float (a learning rate, beta, epochs) cannot train.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode turns `true` into 1 / 1.0: a YAML boolean where a number belongs is a mistake.
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


NoBool = BeforeValidator(_not_bool)
Int = Annotated[int, NoBool]
Float = Annotated[float, NoBool]
PositiveInt = Annotated[int, NoBool, Field(gt=0)]
PositiveFloat = Annotated[float, NoBool, Field(gt=0)]
NonNegativeFloat = Annotated[float, NoBool, Field(ge=0)]
# StrictBool: "yes", 1 or "no" where a boolean belongs are errors, not silently converted.
Bool = StrictBool


class BaseModelConfig(Strict):
    source: str = Field(
        description="Hub id (org/name), local HF directory, path to a .gguf file, or "
        "'package:<distribution>/<file>' for a file shipped inside an installed package."
    )
    revision: str | None = None
    trust_remote_code: Bool = False


class MixtureConfig(Strict):
    """How one training stage's data is built: which spec, which template, how long."""

    spec: str = Field(description="data_specs file: a name like 'offline/sft-general' or a path to a YAML")
    chat_template: str = Field(description="Jinja chat template, used exactly as given")
    special_tokens: list[str] = Field(default_factory=list)
    max_length: PositiveInt
    max_prompt_length: PositiveInt | None = Field(None, description="preference data only: keep the prompt's last N tokens")
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"
    loss_mask: Literal["all", "assistant"] = Field(
        "all", description="SFT: 'all' trains on every token (what the published recipe did); 'assistant' only on assistant turns incl. <|im_end|>"
    )


# Settings that change where files are kept or how processes are started, never what a stage
# computes: left out of the stage's cache key and of the resume check, so flipping them neither
# reruns a stage nor blocks a resume. (num_processes is in the key: it sets the global batch.)
NOT_IN_KEY = {"train": {"keep_checkpoints", "launcher"}}


def output_config(cfg: BaseModel) -> dict[str, Any]:
    """A stage config as JSON, minus NOT_IN_KEY (absent keys are ignored): what the output depends on."""
    return cfg.model_dump(mode="json", exclude=NOT_IN_KEY)


class Recipe(Strict):
    """The settings every pipeline shares. The stage sections (`sft_general:`, `dpo:`, ...) are
    added per pipeline from the stages' declarations (`recipe_model`): a recipe is validated
    against exactly the stages that will run it."""

    name: str
    description: str = ""
    base_model: BaseModelConfig
    data_root: str = Field(
        "../shared/data",
        description="root for local data-spec sources. Precedence: --set data_root=..., then env TRLM_DATA_ROOT, then "
        "the recipe. A relative path resolves against the recipe file's folder (built-in recipes: the project "
        "folder holding trlm/); from --set or the environment, against the current directory",
    )
    allow_outside_data_root: Bool = Field(False, description="allow data-spec sources outside data_root (../, absolute paths, symlinks out of it)")
    work_dir: str | None = Field(None, description="default: $TRLM_HOME, else ~/.trlm")
    tracking_uri: str | None = Field(None, description="default: sqlite:///<work_dir>/mlflow.db")
    experiment: str = "trlm"
    stages: list[str] | None = Field(
        None, description="the declared stages this recipe runs (pipeline order is kept); None: every declared stage. "
        "Only the chosen stages' sections belong in the recipe",
    )
    # Where data_root came from ("--set", "TRLM_DATA_ROOT" or "recipe") and the resolved path, set by load_recipe.
    _data_root_origin: str = PrivateAttr("recipe")
    _data_path: Path | None = PrivateAttr(None)

    # -- resolved locations -------------------------------------------------------------------
    @property
    def work_path(self) -> Path:
        raw = self.work_dir or os.environ.get("TRLM_HOME") or "~/.trlm"
        return Path(raw).expanduser().resolve()

    @property
    def data_path(self) -> Path:
        return self._data_path or Path(self.data_root).expanduser().resolve()

    @property
    def data_root_origin(self) -> str:
        return self._data_root_origin

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.work_path / 'mlflow.db'}"


def recipe_model(sections: tuple[tuple[str, type[BaseModel]], ...]) -> type[Recipe]:
    """The full recipe schema for a pipeline: the shared settings plus one section per stage.

    A section whose schema has defaults for everything may be left out of the recipe file."""
    return _recipe_model(tuple(sections))


@lru_cache(maxsize=None)
def _recipe_model(sections: tuple[tuple[str, type[BaseModel]], ...]) -> type[Recipe]:
    fields: dict[str, Any] = {}
    for name, schema in sections:
        try:
            default: Any = schema()
        except ValidationError:
            default = ...  # required: the section has required keys
        fields[name] = (schema, default)
    return create_model("Recipe", __base__=Recipe, **fields)


def mixtures(recipe: Recipe) -> dict[str, "MixtureConfig"]:
    """Every section's data mixture, by stage name (section `sft_general` -> `sft-general`)."""
    found = {}
    for name in type(recipe).model_fields:
        data = getattr(getattr(recipe, name), "data", None)
        if isinstance(data, MixtureConfig):
            found[stage_name(name)] = data
    return found


# --- loading ---------------------------------------------------------------------------------


def builtin_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("trlm.recipes").iterdir() if p.name.endswith(".yaml"))


def _recipe_file(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        return path
    builtin = resources.files("trlm.recipes") / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise RecipeError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(builtin_recipes())}, or give a path to a YAML file")
    return Path(str(builtin))


def _apply_override(data: dict, assignment: str) -> None:
    """`--set dpo.beta=0.2`: the value is parsed as YAML, so numbers, bools and lists work."""
    if "=" not in assignment:
        raise RecipeError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = section_name(key.strip()).split(".")
    if not all(parts):
        raise RecipeError(f"--set {key}: empty key")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`eval:` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by explicit keys
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(text: str):
    """YAML with duplicate keys rejected (a duplicated setting is as silent as a misspelled one)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _read_recipe(name_or_path: str | None, overrides: list[str] | None) -> tuple[Path, dict, bool]:
    """The recipe file, its data with the overrides applied, and whether it is a built-in one."""
    path = _recipe_file(name_or_path or DEFAULT_RECIPE)
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping at the top level")
    for assignment in overrides or []:
        _apply_override(data, assignment)
    builtin = path.resolve().parent == Path(str(resources.files("trlm.recipes"))).resolve()
    return path, data, builtin


def _resolve_data_root(path: Path, data: dict, overrides: list[str], builtin: bool) -> tuple[Path | None, str]:
    """data_root by precedence: --set, then TRLM_DATA_ROOT, then the recipe (relative to its folder)."""
    if any(section_name(o.split("=", 1)[0].strip()) == "data_root" for o in overrides):
        raw, origin, anchor = data.get("data_root"), "--set", Path.cwd()
    elif os.environ.get("TRLM_DATA_ROOT"):
        raw, origin, anchor = os.environ["TRLM_DATA_ROOT"], "TRLM_DATA_ROOT", Path.cwd()
    else:
        raw, origin = data.get("data_root", Recipe.model_fields["data_root"].default), "recipe"
        # A built-in recipe lives in trlm/recipes/: its relative paths mean the project folder.
        anchor = path.resolve().parents[2] if builtin else path.resolve().parent
    if not isinstance(raw, str):
        return None, origin  # validation reports the type
    return (anchor / Path(raw).expanduser()).resolve(), origin


def read_stage_choice(name_or_path: str | None, overrides: list[str] | None) -> list[str] | None:
    """The recipe's `stages:` list (after overrides), read before the schema: it picks the sections."""
    path, data, _ = _read_recipe(name_or_path, list(overrides or []))
    choice = data.get("stages")
    if choice is not None and not (isinstance(choice, list) and all(isinstance(n, str) for n in choice)):
        raise RecipeError(f"invalid recipe {path}:\n  stages: a list of stage names, got {choice!r}")
    return choice


def load_recipe(
    name_or_path: str | None = None,
    overrides: list[str] | None = None,
    *,
    sections: tuple[tuple[str, type[BaseModel]], ...],
) -> Recipe:
    """Load a recipe, apply `--set` overrides, validate it against the pipeline's sections.

    Callers above the stages use `trlm.stages.registry.load_recipe`, which supplies the sections
    and also checks every file the recipe names."""
    overrides = list(overrides or [])
    path, data, builtin = _read_recipe(name_or_path, overrides)
    try:
        recipe = recipe_model(sections).model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(str(path), exc)) from None
    recipe._data_path, recipe._data_root_origin = _resolve_data_root(path, data, overrides, builtin)
    return recipe


def load_section(name_or_path: str | None, overrides: list[str] | None, section: str, schema: type[BaseModel]) -> BaseModel:
    """One stage's section of a recipe (for a stage's own command line, which knows only itself)."""
    path, data, _ = _read_recipe(name_or_path, overrides)
    if section not in data:
        raise RecipeError(f"recipe {path} has no section {section!r}")
    try:
        return schema.model_validate(data[section])
    except ValidationError as exc:
        raise RecipeError(format_validation_error(f"{path} ({section})", exc)) from None


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")
