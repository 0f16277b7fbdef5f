"""A stage is one room: a toy stage in a test-only pipeline runs through the unchanged lineage,
flow and CLI code; and every stage's cache key is exact (computed from its import closure)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from trlm.runs.import_graph import import_closure
from trlm.runs.lineage import code_version, plan
from trlm.runs.tracking import setup_tracking
from trlm.stages.registry import PIPELINE, get_stage, load_recipe

TOY_SOURCE = '''"""A toy stage: writes a summary derived from its upstream model's config."""
import json

from trlm.artifacts import write_fingerprint
from trlm.recipe import Strict
from trlm.stage import BASE, MODEL, Stage


class ToyConfig(Strict):
    suffix: str = "!"


def run(ctx):
    config = json.loads((ctx.inputs["model"] / "config.json").read_text())
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "summary.txt").write_text(f"{config['model_type']} width {config['hidden_size']}{ctx.config.suffix}")
    ctx.on_log({"width": config["hidden_size"]}, 0)
    write_fingerprint(ctx.out)
    return {}


STAGE = Stage(name="toy", section="toy", config=ToyConfig, inputs=lambda recipe: {"model": f"{BASE}:{MODEL}"}, run=run)
PIPELINE = (STAGE,)
'''


def test_code_version_is_the_import_closure():
    by_name = {s.name: s for s in PIPELINE}
    assert "trlm.eval.tasks" in code_version(by_name["eval"]).modules, "the smoke subsets shape the evaluation"
    assert "trlm.training.losses" in code_version(by_name["dpo"]).modules
    for stage in PIPELINE:
        modules = code_version(stage).modules
        assert "trlm.cli" not in modules and not [m for m in modules if m.startswith(("trlm.flows", "trlm.runs"))], stage.name
    assert "trlm.stages.data_prep.decontamination" in code_version(by_name["data-prep"]).modules
    assert not [m for m in code_version(by_name["data-prep"]).modules if m.startswith("trlm.eval")]
    assert code_version(by_name["sft-general"]).libraries["torch"]


def test_editing_a_module_in_the_closure_changes_the_key_and_one_outside_does_not(tmp_path, monkeypatch):
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("X = 1\n")
    (pkg / "unrelated.py").write_text("Y = 1\n")
    (pkg / "stage_mod.py").write_text("def run(ctx):\n    from trlm.artifacts import hash_json\n    import probe_pkg.helper\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import trlm.runs.import_graph as graph

    monkeypatch.setattr(graph, "PACKAGE", "probe_pkg")
    assert import_closure("probe_pkg.stage_mod") == ["probe_pkg", "probe_pkg.helper", "probe_pkg.stage_mod"]
    from trlm.stage import Stage

    stage = Stage(name="probe", run=lambda ctx: {})
    before = code_version(stage, "probe_pkg.stage_mod").digest
    (pkg / "unrelated.py").write_text("Y = 2\n")
    assert code_version(stage, "probe_pkg.stage_mod").digest == before
    (pkg / "helper.py").write_text("X = 2\n")
    assert code_version(stage, "probe_pkg.stage_mod").digest != before


def test_the_key_is_the_same_in_another_process_and_folder(tmp_path, tiny_model_dir):
    recipe = load_recipe(check_files=False)
    here = {s.name: code_version(s).digest for s in PIPELINE}
    script = "import json; from trlm.stages.registry import PIPELINE; from trlm.runs.lineage import code_version; print(json.dumps({s.name: code_version(s).digest for s in PIPELINE}))"
    import subprocess

    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == here
    assert recipe.name == "offline-smoke"


@pytest.fixture()
def toy_env(tmp_path, monkeypatch, tiny_model_dir):
    (tmp_path / "toy_pipeline.py").write_text(TOY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_pipeline", None)
    recipe = {"name": "toy", "base_model": {"source": str(tiny_model_dir)}, "work_dir": str(tmp_path / "home"),
              "tracking_uri": f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}", "toy": {"suffix": "!"}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return tmp_path, path


def _toy_plan(path: Path, overrides=()):
    from trlm.flows.pipeline import load_pipeline

    pipeline = load_pipeline("toy_pipeline:PIPELINE")
    recipe = load_recipe(str(path), list(overrides), pipeline=pipeline)
    return plan(recipe, setup_tracking(recipe), pipeline)[0], recipe


def test_a_toy_stage_runs_in_the_flow_is_cached_and_goes_stale(toy_env, prefect_env):
    from trlm.flows.pipeline import pipeline
    from trlm.runs.tracking import TAG_KIND, TAG_STAGE

    root, path = toy_env
    first = pipeline(recipe=str(path), stages="toy_pipeline:PIPELINE")
    assert list(first) == ["toy"] and first["toy"]["cached"] is False
    assert (Path(first["toy"]["path"]) / "summary.txt").read_text() == "llama width 64!"
    recipe = _toy_plan(path)[1]
    tracker = setup_tracking(recipe)
    runs = tracker.client.search_runs([tracker.experiment_id])
    parent = next(r for r in runs if r.data.tags.get(TAG_KIND) == "pipeline")
    child = next(r for r in runs if r.data.tags.get(TAG_STAGE) == "toy")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.data.params["suffix"] == "!"
    assert child.data.metrics["width"] == 64

    second = pipeline(recipe=str(path), stages="toy_pipeline:PIPELINE")
    assert second["toy"]["cached"] is True and second["toy"]["run_id"] == first["toy"]["run_id"]

    stale, _ = _toy_plan(path, ["toy.suffix=x2"])
    assert stale.state == "stale" and stale.note.startswith("config: suffix")
    (root / "toy_pipeline.py").write_text(TOY_SOURCE.replace("width {config", "hidden {config"))
    stale, _ = _toy_plan(path)
    assert stale.state == "stale" and "code: toy_pipeline" in stale.note
    third = pipeline(recipe=str(path), stages="toy_pipeline:PIPELINE", overrides=["toy.suffix=x2"])
    assert third["toy"]["cached"] is False


def test_an_input_naming_no_earlier_stage_is_refused(toy_env):
    from trlm.recipe import RecipeError
    from trlm.stage import Stage

    _, path = toy_env
    import toy_pipeline

    bad = Stage(name="bad", run=toy_pipeline.run, inputs=lambda recipe: {"model": "nowhere:model"})
    with pytest.raises(RecipeError, match="'nowhere' is not an earlier stage"):
        load_recipe(str(path), pipeline=(toy_pipeline.STAGE, bad))
    with pytest.raises(RecipeError, match="hands on no model"):
        load_recipe(str(path), pipeline=(toy_pipeline.STAGE, Stage(name="bad", run=toy_pipeline.run, inputs=lambda r: {"m": "toy:model"})))


def test_unknown_stage_names_are_refused():
    from trlm.recipe import RecipeError

    with pytest.raises(RecipeError, match="unknown stage 'sft'; stages are: data-prep, sft-general"):
        get_stage("sft")


def test_eval_models_must_name_earlier_model_stages():
    from trlm.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"eval: input 'sft-genral' \(sft-genral:model\): 'sft-genral' is not an earlier stage"):
        load_recipe(overrides=["eval.models=[base, sft-genral]"], check_files=False)
    with pytest.raises(RecipeError, match="stage 'data-prep' hands on no model"):
        load_recipe(overrides=["eval.models=[data-prep]"], check_files=False)


# --- the pipeline carries the generality: which stages a recipe runs, which models are evaluated ---


def _smoke_without(tmp_path: Path, drop: tuple[str, ...], stages: list[str]) -> str:
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "trlm" / "recipes" / "offline-smoke.yaml").read_text())
    for section in drop:
        data.pop(section, None)
    data["stages"] = stages
    path = tmp_path / "chosen.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_a_recipe_chooses_its_stages_and_the_eval_models_follow(tmp_path):
    from trlm.stages.registry import active, eval_models

    full = load_recipe(check_files=False)
    assert [s.name for s in active(full)] == [s.name for s in PIPELINE]
    assert eval_models(full) == ["base", *(s.name for s in PIPELINE if s.hands_on == "model")]
    short = load_recipe(_smoke_without(tmp_path, ("sft_think", "dpo", "grpo"), ["data-prep", "sft-general", "eval"]), check_files=False)
    assert [s.name for s in active(short)] == ["data-prep", "sft-general", "eval"]
    assert eval_models(short) == ["base", "sft-general"]
    assert list(get_stage("eval").inputs(short)) == ["base", "sft-general"]
    explicit = load_recipe(overrides=["eval.models=[base, dpo]"], check_files=False)
    assert eval_models(explicit) == ["base", "dpo"]


def test_a_chosen_stage_list_is_validated(tmp_path):
    from trlm.recipe import RecipeError

    with pytest.raises(RecipeError, match="stages: unknown stage 'sft'"):
        load_recipe(overrides=["stages=[data-prep, sft]"], check_files=False)
    with pytest.raises(RecipeError, match="dpo: unknown key"):  # a stage not chosen has no section
        load_recipe(_smoke_without(tmp_path, ("sft_think", "grpo"), ["data-prep", "sft-general", "eval"]), check_files=False)
    with pytest.raises(RecipeError, match="'sft-think' is not an earlier stage"):  # dpo without its upstream
        load_recipe(_smoke_without(tmp_path, ("sft_think", "grpo"), ["data-prep", "sft-general", "dpo", "eval"]), check_files=False)
