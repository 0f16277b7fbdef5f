"""The recipe: one typed schema for a whole pipeline, validated completely before any compute.

A recipe names the base model, the data mixture of each training stage (a file in `data_specs/`),
the per-stage hyperparameters, the evaluation settings, the work directory and the MLflow store.
Two recipes ship in `trlm/recipes/`: `offline-smoke` (the default) and `trlm-135m` (the published one).

    recipe = load_recipe("offline-smoke", overrides=["dpo.beta=0.2"])

Every problem (unknown key, wrong type, out-of-range value, unknown stage, missing file) becomes a
`RecipeError` whose message names the key or file; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, model_validator

STAGES: tuple[str, ...] = ("data-prep", "sft-general", "sft-think", "dpo", "eval")
TRAINING_STAGES: tuple[str, ...] = ("sft-general", "sft-think", "dpo")
DEFAULT_RECIPE = "offline-smoke"


class RecipeError(ValueError):
    """A recipe (or one of the files it names) is invalid. The message names the key or file."""


class Strict(BaseModel):
    # extra="forbid" turns a typo in a key into an error instead of a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class TrainConfig(Strict):
    epochs: PositiveFloat = 1.0
    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: PositiveInt = Field(description="sequences (or pairs) per micro-batch per device")
    grad_accum_steps: PositiveInt = 1
    learning_rate: PositiveFloat
    lr_scheduler: Literal["constant", "linear", "cosine", "cosine_with_min_lr"] = "cosine"
    min_lr_rate: Annotated[float, NoBool, Field(ge=0, le=1)] = 0.0
    warmup_ratio: Annotated[float, NoBool, Field(ge=0, lt=1)] = 0.0
    weight_decay: NonNegativeFloat = 0.0
    max_grad_norm: PositiveFloat = 1.0
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-pure"] = Field(
        "auto", description="auto = bf16-mixed on GPU, fp32 on CPU; bf16-pure is what the published run did"
    )
    gradient_checkpointing: Bool = False
    seed: Int = 42
    logging_steps: PositiveInt = 1
    save_steps: PositiveInt = 500
    save_total_limit: PositiveInt = 2
    keep_checkpoints: Bool = Field(
        False,
        description="keep checkpoints/ (weights + optimizer state, about 3x the model) once the final model is written; "
        "off: deleted then, since a finished stage never resumes. Not part of the stage's cache key.",
    )
    padding_free: Bool = Field(
        True, description="concatenate a micro-batch's sequences into one row (no padding, no cross-document attention); same loss as padded batches"
    )
    attn_implementation: Literal["packed_sdpa", "sdpa", "flex_attention", "flash_attention_2", "eager"] = Field(
        "packed_sdpa",
        description="attention kernel: packed_sdpa = one SDPA call per packed document (no cross-document FLOPs, no mask); "
        "the others are transformers' (sdpa/eager build a dense [T, T] mask over a packed row)",
    )

    compile: Bool = Field(
        False, description="torch.compile each decoder layer's norms and MLP (GPU: fuses the memory-bound elementwise work; compiling costs a minute)"
    )

    @model_validator(mode="after")
    def _min_lr_only_with_its_schedule(self) -> "TrainConfig":
        if self.min_lr_rate and self.lr_scheduler != "cosine_with_min_lr":
            raise ValueError("min_lr_rate is only used by lr_scheduler 'cosine_with_min_lr'")
        return self


# Settings that change where files are kept, never what a stage computes: left out of the stage's
# cache key and of the resume check, so flipping them neither reruns a stage nor blocks a resume.
NOT_IN_KEY = {"train": {"keep_checkpoints"}}


def output_config(cfg: BaseModel) -> dict[str, Any]:
    """A stage config as JSON, minus NOT_IN_KEY (absent keys are ignored): what the output depends on."""
    return cfg.model_dump(mode="json", exclude=NOT_IN_KEY)


class SFTStageConfig(Strict):
    data: MixtureConfig
    train: TrainConfig
    loss_type: Literal["nll", "dft"] = "nll"
    neftune_alpha: NonNegativeFloat | None = None


class DPOStageConfig(Strict):
    data: MixtureConfig
    train: TrainConfig
    loss_type: Literal["sigmoid", "apo_zero", "ipo", "hinge", "robust"] = "sigmoid"
    beta: PositiveFloat = 0.1
    label_smoothing: Annotated[float, NoBool, Field(ge=0, lt=0.5)] = 0.0
    precompute_ref_logps: Bool = Field(True, description="compute reference log-probs once before training")
    share_prompt: Bool = Field(
        True,
        description="run each pair's common prefix (the prompt) once, not once per side; exact. Applies where "
        "train.padding_free and attn_implementation packed_sdpa; the stage summary says whether it was used",
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> "DPOStageConfig":
        mpl = self.data.max_prompt_length
        if mpl is not None and mpl >= self.data.max_length:
            raise ValueError(f"data.max_prompt_length ({mpl}) must be smaller than data.max_length ({self.data.max_length})")
        return self


class DataPrepConfig(Strict):
    validation_policy: Literal["error", "drop"] = Field(
        "error", description="error: stop before writing anything; drop: drop bad rows, count and report them"
    )
    decontaminate: Bool = Field(True, description="13-gram overlap check of every mixture against the benchmarks")


class EvalConfig(Strict):
    profile: Literal["smoke", "full"] = "smoke"
    tasks: list[str] = Field(
        default_factory=lambda: ["arc_challenge", "arc_easy", "boolq", "piqa", "mmlu", "gsm8k", "bbh", "ifeval"]
    )
    limit: PositiveInt | None = Field(None, description="smoke profile: items per task (seeded subset)")
    max_gen_toks: PositiveInt | None = Field(None, description="cap on generated tokens; None keeps each task's default")
    batch_size: PositiveInt = 8
    seed: Int = 1234
    apply_chat_template: Bool = True
    fewshot_as_multiturn: Bool = True
    models: list[Literal["base", "sft-general", "sft-think", "dpo"]] = Field(
        default_factory=lambda: ["base", "sft-general", "sft-think", "dpo"]
    )
    num_threads: PositiveInt | None = Field(
        None,
        description="torch intra-op threads during evaluation (restored afterwards); None keeps the process setting. "
        "On a CPU shared with other busy processes, 1 thread decodes far faster than 2 (measured 12 vs 0.6 steps/s)",
    )


class Recipe(Strict):
    name: str
    description: str = ""
    base_model: BaseModelConfig
    data_root: str = Field("../shared/data", description="root for local data-spec sources; env TRLM_DATA_ROOT overrides")
    work_dir: str | None = Field(None, description="default: $TRLM_HOME, else ~/.trlm")
    tracking_uri: str | None = Field(None, description="default: sqlite:///<work_dir>/mlflow.db")
    experiment: str = "trlm"
    data_prep: DataPrepConfig = DataPrepConfig()
    sft_general: SFTStageConfig
    sft_think: SFTStageConfig
    dpo: DPOStageConfig
    eval: EvalConfig = EvalConfig()

    # -- resolved locations -------------------------------------------------------------------
    @property
    def work_path(self) -> Path:
        raw = self.work_dir or os.environ.get("TRLM_HOME") or "~/.trlm"
        return Path(raw).expanduser().resolve()

    @property
    def data_path(self) -> Path:
        return Path(os.environ.get("TRLM_DATA_ROOT") or self.data_root).expanduser().resolve()

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.work_path / 'mlflow.db'}"

    def stage_config(self, stage: str) -> BaseModel:
        check_stage(stage)
        return getattr(self, stage.replace("-", "_"))


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise RecipeError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
    return stage


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
    parts = key.strip().replace("-", "_").split(".")
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


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None, check_files: bool = True) -> Recipe:
    """Load, override and validate a recipe; with check_files also every file it names."""
    source = name_or_path or DEFAULT_RECIPE
    path = _recipe_file(source)
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping at the top level")
    for assignment in overrides or []:
        _apply_override(data, assignment)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(str(path), exc)) from None
    if check_files:
        check_recipe_files(recipe)
    return recipe


def check_recipe_files(recipe: Recipe) -> None:
    """Every file the recipe names must exist and parse; runs before any compute."""
    from trlm.base_model import resolve_source
    from trlm.data_spec import load_data_spec

    resolve_source(recipe.base_model)  # raises RecipeError naming the missing file
    for stage in TRAINING_STAGES:
        mixture: MixtureConfig = recipe.stage_config(stage).data
        spec = load_data_spec(mixture.spec)
        expected = "preference" if stage == "dpo" else "sft"
        if spec.kind != expected:
            raise RecipeError(f"{stage.replace('-', '_')}.data.spec: {mixture.spec} is a {spec.kind!r} spec, stage {stage} needs {expected!r}")
        spec.check_sources(recipe.data_path)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")
