"""Recipe validation: every problem is one RecipeError naming the key or file; the CLI exits with 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from trlm.cli import app
from trlm.data_spec import load_data_spec
from trlm.recipe import Recipe, RecipeError, builtin_recipes, mixtures
from trlm.stages.registry import get_stage, load_recipe, stage_names

STAGES = stage_names()

RECIPES_DIR = Path(__file__).resolve().parents[1] / "trlm" / "recipes"


@pytest.fixture(autouse=True)
def _data_root(monkeypatch, shared_data):
    # Pin the data root for every test (the environment wins over the recipe's data_root)
    monkeypatch.setenv("TRLM_DATA_ROOT", str(shared_data))


def smoke_dict() -> dict:
    return yaml.safe_load((RECIPES_DIR / "offline-smoke.yaml").read_text())


def write_recipe(tmp_path: Path, data: dict, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def recipe_error(*args, **kwargs) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(*args, **kwargs)
    return str(info.value)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


# --- the shipped recipes ---------------------------------------------------------------------


def test_builtin_recipes_listed():
    assert {"offline-smoke", "trlm-135m"} <= set(builtin_recipes())


def test_offline_smoke_validates_with_files(shared_data):
    r = load_recipe("offline-smoke")
    assert isinstance(r, Recipe)
    assert r.name == "offline-smoke"
    assert r.data_path == shared_data
    assert r.sft_think.data.special_tokens == ["<think>", "</think>"]
    assert r.dpo.data.max_prompt_length < r.dpo.data.max_length
    # the default recipe is offline-smoke
    assert load_recipe(None).name == "offline-smoke"


def test_trlm_135m_has_the_published_values():
    r = load_recipe("trlm-135m", check_files=False)
    g, t, d = r.sft_general, r.sft_think, r.dpo
    assert r.base_model.source == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (g.train.epochs, g.loss_type, g.train.learning_rate) == (3, "dft", 3e-4)
    assert (g.train.batch_size, g.train.grad_accum_steps) == (32, 4)
    assert (g.train.warmup_ratio, g.train.weight_decay, g.train.max_grad_norm) == (0.1, 0.01, 1.0)
    assert (g.data.max_length, g.neftune_alpha) == (4096, 0.01)
    assert (t.train.weight_decay, t.neftune_alpha) == (0.02, 0.02)
    assert t.data.special_tokens == ["<think>", "</think>"]
    assert (d.loss_type, d.beta, d.train.learning_rate) == ("apo_zero", 0.1, 1e-5)
    assert (d.train.lr_scheduler, d.train.min_lr_rate, d.train.max_grad_norm) == ("cosine_with_min_lr", 0.1, 0.2)
    assert (d.data.max_prompt_length, d.data.max_length) == (1048, 2048)
    assert {g.train.precision, t.train.precision, d.train.precision} == {"bf16-pure"}
    # its sources are hub ids: validating the files needs no local data
    specs = [load_data_spec(m.spec) for m in mixtures(r).values()]
    assert [s.kind for s in specs] == ["sft", "sft", "preference"]
    assert all(src.hub is not None for spec in specs for src in spec.sources)


# --- schema errors -----------------------------------------------------------------------------


def test_unknown_key_is_named(tmp_path):
    data = smoke_dict()
    data["sft_general"]["train"]["learnin_rate"] = 1e-4
    msg = recipe_error(str(write_recipe(tmp_path, data)))
    assert "sft_general.train.learnin_rate" in msg and "unknown key" in msg
    assert str(tmp_path / "bad.yaml") in msg
    assert len([line for line in msg.splitlines() if line.startswith("  ")]) == 1


def test_misspelled_key_names_the_typo_and_the_missing_key(tmp_path):
    data = smoke_dict()
    data["sft_general"]["train"]["learnin_rate"] = data["sft_general"]["train"].pop("learning_rate")
    msg = recipe_error(str(write_recipe(tmp_path, data)))
    assert "sft_general.train.learnin_rate: unknown key" in msg
    assert "sft_general.train.learning_rate: Field required" in msg


def test_wrong_type_is_named(tmp_path):
    data = smoke_dict()
    data["dpo"]["train"]["batch_size"] = "many"
    msg = recipe_error(str(write_recipe(tmp_path, data)))
    assert "dpo.train.batch_size" in msg and "integer" in msg


def test_wrong_literal_is_named(tmp_path):
    data = smoke_dict()
    data["sft_general"]["data"]["loss_mask"] = "user"
    msg = recipe_error(str(write_recipe(tmp_path, data)))
    assert "sft_general.data.loss_mask" in msg and "'assistant'" in msg


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("sft_general.train.batch_size=true", "sft_general.train.batch_size", "not a boolean"),
        ("sft_general.train.epochs=true", "sft_general.train.epochs", "not a boolean"),
        ("dpo.train.gradient_checkpointing=1", "dpo.train.gradient_checkpointing", "valid boolean"),
        ("data_prep.decontaminate=nope", "data_prep.decontaminate", "valid boolean"),
        ("sft_general.data.max_length=long", "sft_general.data.max_length", "valid integer"),
        ("eval.tasks=gsm8k", "eval.tasks", "valid list"),
    ],
)
def test_values_of_the_wrong_type_are_not_coerced(override, key, words):
    msg = recipe_error("offline-smoke", overrides=[override])
    assert f"{key}: " in msg and words in msg
    assert "Value error," not in msg


def test_yaml_numbers_without_a_dot_are_floats():
    # PyYAML reads `3e-4` as a string; the schema still takes it as the number it means
    assert load_recipe("offline-smoke", overrides=["dpo.train.learning_rate=3e-4"]).dpo.train.learning_rate == 3e-4


def test_duplicate_key_is_named(tmp_path):
    path = tmp_path / "dup.yaml"
    text = (RECIPES_DIR / "offline-smoke.yaml").read_text()
    path.write_text(text.replace("  beta: 0.1\n", "  beta: 0.1\n  beta: 0.5\n"))
    assert path.read_text() != text
    msg = recipe_error(str(path))
    assert "duplicate key 'beta'" in msg and str(path) in msg


def test_yaml_anchors_still_work_without_duplicates():
    from trlm.recipe import load_yaml

    assert load_yaml("base: &b {x: 1, y: 1}\nd:\n  <<: *b\n  x: 2\n")["d"] == {"x": 2, "y": 1}
    with pytest.raises(yaml.YAMLError, match="duplicate key 'x'"):
        load_yaml("d:\n  x: 1\n  y: 2\n  x: 3\n")


def test_negative_learning_rate(tmp_path):
    data = smoke_dict()
    data["sft_think"]["train"]["learning_rate"] = -3e-4
    msg = recipe_error(str(write_recipe(tmp_path, data)))
    assert "sft_think.train.learning_rate" in msg and "greater than 0" in msg


def test_cross_field_rules():
    msg = recipe_error("offline-smoke", overrides=["dpo.data.max_prompt_length=500"])
    assert "max_prompt_length (500)" in msg and "max_length (160)" in msg
    msg = recipe_error("offline-smoke", overrides=["sft_general.train.min_lr_rate=0.1"])
    assert "sft_general.train" in msg and "min_lr_rate" in msg


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "mapping" in recipe_error(str(path))
    path.write_text("name: [unclosed\n")
    assert "not valid YAML" in recipe_error(str(path))


def test_unknown_stage():
    with pytest.raises(RecipeError, match="unknown stage 'nope'"):
        get_stage("nope")
    assert [get_stage(s).name for s in STAGES] == list(STAGES)


# --- missing files -------------------------------------------------------------------------------


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    assert f"recipe file not found: {missing}" in recipe_error(str(missing))
    assert "unknown recipe 'no-such-recipe'" in recipe_error("no-such-recipe")


def test_missing_source_file_under_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TRLM_DATA_ROOT", str(tmp_path))
    msg = recipe_error("offline-smoke")
    assert "file not found" in msg
    assert str(tmp_path / "databricks__databricks-dolly-15k" / "train.jsonl") in msg
    # without file checks the same recipe loads
    assert load_recipe("offline-smoke", check_files=False).data_path == tmp_path.resolve()


def test_missing_gguf(tmp_path):
    gguf = tmp_path / "missing" / "model.gguf"
    msg = recipe_error("offline-smoke", overrides=[f"base_model.source={gguf}"])
    assert "base_model.source" in msg and str(gguf) in msg


def test_missing_data_spec():
    msg = recipe_error("offline-smoke", overrides=["sft_general.data.spec=offline/nope"])
    assert "offline/nope" in msg


def test_spec_of_the_wrong_kind():
    msg = recipe_error("offline-smoke", overrides=["dpo.data.spec=offline/sft-think"])
    assert "dpo.data.spec" in msg and "'preference'" in msg


# --- overrides ---------------------------------------------------------------------------------


def test_overrides_are_applied_and_typed():
    r = load_recipe("offline-smoke", overrides=["dpo.beta=0.2", "sft_general.train.learning_rate=2e-5",
                                                "sft-think.train.max_steps=3", "eval.tasks=[gsm8k, ifeval]"])
    assert r.dpo.beta == 0.2
    assert r.sft_general.train.learning_rate == 2e-5
    assert r.sft_think.train.max_steps == 3
    assert r.eval.tasks == ["gsm8k", "ifeval"]
    assert load_recipe("offline-smoke").dpo.beta == 0.1  # no leak between loads


def test_bad_overrides():
    assert "nosuchkey: unknown key" in recipe_error("offline-smoke", overrides=["nosuchkey=1"])
    assert "dpo.beta: Input should be greater than 0" in recipe_error("offline-smoke", overrides=["dpo.beta=-1"])
    assert "key=value" in recipe_error("offline-smoke", overrides=["dpo.beta"])
    assert "'beta' is not a section" in recipe_error("offline-smoke", overrides=["dpo.beta.x=1"])
    assert "not valid YAML" in recipe_error("offline-smoke", overrides=["dpo.beta=[1"])
    assert "empty key" in recipe_error("offline-smoke", overrides=["dpo..beta=1"])


def test_override_into_an_empty_section(tmp_path):
    data = smoke_dict()
    data["eval"] = None  # `eval:` with nothing under it
    path = write_recipe(tmp_path, data, "empty-eval.yaml")
    assert "eval: Input should be a valid dictionary" in recipe_error(str(path))
    assert load_recipe(str(path), overrides=["eval.batch_size=2"]).eval.batch_size == 2


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_status_bad_recipe_exits_2(tmp_path):
    data = smoke_dict()
    data["sft_general"]["train"]["learnin_rate"] = 1e-4
    result = cli("status", "--recipe", str(write_recipe(tmp_path, data)))
    assert result.exit_code == 2
    assert "sft_general.train.learnin_rate" in result.output and "unknown key" in result.output


def test_cli_negative_learning_rate_exits_2():
    result = cli("status", "--set", "sft_general.train.learning_rate=-1")
    assert result.exit_code == 2
    assert "sft_general.train.learning_rate" in result.output


def test_cli_missing_recipe_file_exits_2(tmp_path):
    result = cli("status", "--recipe", str(tmp_path / "bad.yaml"))
    assert result.exit_code == 2
    assert "recipe file not found" in result.output and "bad.yaml" in result.output


def test_cli_unknown_override_exits_2():
    result = cli("status", "--set", "nosuchkey=1")
    assert result.exit_code == 2
    assert "nosuchkey" in result.output


def test_cli_missing_source_file_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("TRLM_DATA_ROOT", str(tmp_path))
    result = cli("status")
    assert result.exit_code == 2
    assert "databricks__databricks-dolly-15k/train.jsonl" in result.output


def test_cli_unknown_stage_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("TRLM_HOME", str(tmp_path / "home"))
    result = cli("run", "--only", "nope")
    assert result.exit_code == 2
    assert "unknown stage 'nope'" in result.output
    assert not (tmp_path / "home").exists()  # rejected before any work


def test_cli_stages_lists_all():
    result = cli("stages")
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == list(STAGES)


def test_recipe_dump_round_trips(tmp_path):
    """A recipe dumped to YAML loads back to an equal recipe (the run records the resolved recipe)."""
    from trlm.recipe import recipe_to_dict

    r = load_recipe("offline-smoke", overrides=["dpo.beta=0.3"])
    path = write_recipe(tmp_path, recipe_to_dict(r), "dumped.yaml")
    again = load_recipe(str(path))
    assert again == r
    assert json.dumps(recipe_to_dict(again), sort_keys=True) == json.dumps(recipe_to_dict(r), sort_keys=True)


def test_stage_config_in_the_cache_key_ignores_where_checkpoints_are_kept():
    from trlm.runs.lineage import stage_config

    plain = load_recipe("offline-smoke")
    kept = load_recipe("offline-smoke", ["sft_general.train.keep_checkpoints=true"])
    faster = load_recipe("offline-smoke", ["sft_general.train.learning_rate=1e-3"])
    assert kept.sft_general.train.keep_checkpoints and not plain.sft_general.train.keep_checkpoints
    sft = get_stage("sft-general")
    assert stage_config(kept, sft) == stage_config(plain, sft)
    assert "keep_checkpoints" not in stage_config(plain, sft)["train"]
    assert stage_config(faster, sft) != stage_config(plain, sft)


def test_hub_base_model_that_cannot_load_says_what_to_do(tmp_path):
    """Offline (the suite sets HF_HUB_OFFLINE=1) a hub id not in the cache fails at once, naming the fix."""
    from trlm.base_model import materialize_base_model

    recipe = load_recipe("trlm-135m", [f"work_dir={tmp_path}"], check_files=False)
    with pytest.raises(RuntimeError, match=r"HuggingFaceTB/SmolLM2-135M-Instruct.*\(hub id\): cannot load it.*local checkpoint directory or a \.gguf file"):
        materialize_base_model(recipe.base_model, recipe.work_path)
    assert not list((tmp_path / "base").glob("*")), "nothing half-written is left"


def test_hub_reachability_probe(monkeypatch):
    from trlm import process_setup

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # RFC 2606: never resolves
    assert process_setup.hub_reachable(timeout_s=1.0) is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # behind a proxy we cannot tell: assume yes
    assert process_setup.hub_reachable(timeout_s=1.0) is True


def test_trlm_135m_grpo_is_the_published_recipe_plus_a_grpo_stage():
    """trlm-135m runs the published stages only (no grpo section at all); trlm-135m-grpo resolves to
    the same values for every shared setting, plus grpo after dpo, and evaluates a fifth model."""
    from trlm.recipe import recipe_to_dict
    from trlm.stages.registry import active, eval_models

    published, extended = load_recipe("trlm-135m", check_files=False), load_recipe("trlm-135m-grpo", check_files=False)
    pub, ext = recipe_to_dict(published), recipe_to_dict(extended)
    assert "grpo" not in pub and [s.name for s in active(published)] == ["data-prep", "sft-general", "sft-think", "dpo", "eval"]
    assert eval_models(published) == ["base", "sft-general", "sft-think", "dpo"]  # as the published report's columns
    assert {k: v for k, v in ext.items() if k in pub and k not in ("name", "description", "stages")} == \
        {k: v for k, v in pub.items() if k not in ("name", "description", "stages")}
    assert [s.name for s in active(extended)] == ["data-prep", "sft-general", "sft-think", "dpo", "grpo", "eval"]
    assert eval_models(extended)[-1] == "grpo"
    g = extended.grpo
    assert load_data_spec(g.data.spec).kind == "prompt_answer" and g.beta == 0 and g.num_generations == 8
    assert g.data.chat_template == extended.dpo.data.chat_template
