"""Numbers that cannot train, names that do not exist and data roots are refused or resolved before any compute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trlm.recipe import RecipeError
from trlm.stages.registry import load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, key", [
    ("sft_general.train.learning_rate=.inf", "sft_general.train.learning_rate"),
    ("sft_think.train.epochs=.inf", "sft_think.train.epochs"),
    ("dpo.beta=.inf", "dpo.beta"),
    ("dpo.beta=.nan", "dpo.beta"),
    ("dpo.train.max_grad_norm=.inf", "dpo.train.max_grad_norm"),
    ("sft_general.neftune_alpha=.nan", "sft_general.neftune_alpha"),
    ("dpo.label_smoothing=.nan", "dpo.label_smoothing"),
])
def test_non_finite_numbers_are_refused(override, key, shared_data, monkeypatch):
    monkeypatch.setenv("TRLM_DATA_ROOT", str(shared_data))
    with pytest.raises(RecipeError) as info:
        load_recipe(overrides=[override], check_files=False)
    assert key in str(info.value) and "finite" in str(info.value)


def test_label_smoothing_only_with_a_loss_that_uses_it(shared_data, monkeypatch):
    monkeypatch.setenv("TRLM_DATA_ROOT", str(shared_data))
    with pytest.raises(RecipeError, match="label_smoothing is only used by loss_type sigmoid or robust, not 'apo_zero'"):
        load_recipe(overrides=["dpo.loss_type=apo_zero", "dpo.label_smoothing=0.1"], check_files=False)
    assert load_recipe(overrides=["dpo.loss_type=robust", "dpo.label_smoothing=0.1"], check_files=False).dpo.label_smoothing == 0.1


def test_unknown_eval_tasks_are_refused_at_validation(shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("TRLM_DATA_ROOT", str(shared_data))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(RecipeError, match=r"eval.tasks: 'arc_chalenge' is not an lm-eval task.*did you mean 'arc_challenge'"):
        load_recipe(overrides=["eval.tasks=[arc_easy, arc_chalenge]"])
    assert load_recipe(overrides=["eval.tasks=[arc_easy, bbh]"]).eval.tasks == ["arc_easy", "bbh"]
    assert list((tmp_path / "trlm").glob("lm-eval-*-task-folders.json")), "the task list is cached per lm-eval version"


def test_limit_and_sample_are_exclusive(shared_data, monkeypatch):
    monkeypatch.setenv("TRLM_DATA_ROOT", str(shared_data))
    with pytest.raises(RecipeError, match="give limit .* or sample .*, not both"):
        load_recipe(overrides=["eval.limit=5", "eval.sample=5"], check_files=False)


# --- where the data comes from -------------------------------------------------------------------


def _recipe_in(folder: Path, data_root: str) -> Path:
    doc = yaml.safe_load((REPO / "trlm" / "recipes" / "offline-smoke.yaml").read_text())
    doc["data_root"] = data_root
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mine.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_data_root_precedence_and_anchor(tmp_path, monkeypatch):
    monkeypatch.delenv("TRLM_DATA_ROOT", raising=False)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = _recipe_in(tmp_path / "recipes", "../data")
    r = load_recipe(str(path), check_files=False)
    assert (r.data_path, r.data_root_origin) == ((tmp_path / "data").resolve(), "recipe"), "relative to the recipe file's folder"
    monkeypatch.setenv("TRLM_DATA_ROOT", "env-data")
    r = load_recipe(str(path), check_files=False)
    assert (r.data_path, r.data_root_origin) == ((elsewhere / "env-data").resolve(), "TRLM_DATA_ROOT")
    r = load_recipe(str(path), ["data_root=set-data"], check_files=False)
    assert (r.data_path, r.data_root_origin) == ((elsewhere / "set-data").resolve(), "--set"), "--set wins over the environment"


def test_builtin_recipe_resolves_against_the_project_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("TRLM_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    r = load_recipe("offline-smoke", check_files=False)
    assert r.data_path == (REPO / ".." / "shared" / "data").resolve()


def test_status_works_from_another_folder_and_names_the_data_root(tmp_path, shared_data):
    env = {k: v for k, v in os.environ.items() if k != "TRLM_DATA_ROOT"}
    env["TRLM_HOME"] = str(tmp_path / "home")
    if shared_data != (REPO / ".." / "shared" / "data").resolve():
        pytest.skip("the offline data is not at the project's default location")
    result = subprocess.run([sys.executable, "-m", "trlm.cli", "status"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"data root: {shared_data} (from recipe)" in result.stdout


@pytest.mark.parametrize("how", ["--set", "TRLM_DATA_ROOT"])
def test_a_missing_data_root_is_named_as_the_root(tmp_path, monkeypatch, how):
    missing = tmp_path / "nonexistent"
    monkeypatch.delenv("TRLM_DATA_ROOT", raising=False)
    if how == "--set":
        overrides = [f"data_root={missing}"]
    else:
        overrides = []
        monkeypatch.setenv("TRLM_DATA_ROOT", str(missing))
    with pytest.raises(RecipeError) as err:
        load_recipe("offline-smoke", overrides)
    assert str(err.value).startswith(f"the data root {missing} (from {how}) is not a directory; data spec ")
    assert "file not found" not in str(err.value)
