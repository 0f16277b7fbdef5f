"""The Prefect flow + MLflow lineage end to end, on the tiny model and a few rows of real data.

One module-scoped pipeline run is shared by the assertions: a full run, a rerun that runs nothing,
a DPO-beta change that reruns only dpo, grpo and eval, and the lineage recorded in MLflow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trlm.stages.registry import PIPELINE, load_recipe, stage_names

STAGES = stage_names()

SFT_SPEC = """
name: tiny-{name}
kind: sft
shuffle_seed: 1
sources:
  - {{name: src, path: {path}, rows: 8, sample: seeded{transform}}}
"""
DPO_SPEC = """
name: tiny-dpo
kind: preference
sources:
  - {name: hh, path: Anthropic__hh-rlhf/harmless-base/test.jsonl.gz, rows: 8, transform: hh_rlhf_pairs}
"""
GRPO_SPEC = """
name: tiny-grpo
kind: prompt_answer
sources:
  - {name: gsm8k, path: openai__gsm8k/main/train.jsonl, rows: 4, columns: {prompt: question}, transform: gsm8k_prompt_answer}
"""


def _work():
    """A unit of tracked work for the lineage tests (the code version is that of a real stage)."""
    from trlm.runs.lineage import code_version
    from trlm.runs.runner import Work

    return Work("eval:test", "k" * 64, {"model": "m"}, {}, code_version(PIPELINE[0]))


def write_tiny_recipe(root: Path, base_model: Path, data_root: Path) -> Path:
    """A recipe with every stage of the real one, sized for seconds on the tiny model."""
    specs = root / "specs"
    specs.mkdir(parents=True, exist_ok=True)
    (specs / "sft-general.yaml").write_text(SFT_SPEC.format(name="general", path="databricks__databricks-dolly-15k/train.jsonl", transform=""))
    (specs / "sft-think.yaml").write_text(SFT_SPEC.format(name="think", path="openai__gsm8k/messages/train.jsonl", transform=", transform: gsm8k_think"))
    (specs / "dpo.yaml").write_text(DPO_SPEC)
    (specs / "grpo.yaml").write_text(GRPO_SPEC)
    smoke = yaml.safe_load((Path(__file__).parents[1] / "trlm" / "recipes" / "offline-smoke.yaml").read_text())
    train = {"max_steps": 2, "batch_size": 2, "learning_rate": 1.0e-3, "warmup_ratio": 0.0, "save_steps": 1, "logging_steps": 1}
    recipe = {
        "name": "tiny",
        "base_model": {"source": str(base_model)},
        "data_root": str(data_root),
        "work_dir": str(root / "home"),
        "tracking_uri": f"sqlite:///{root / 'home' / 'mlflow.db'}",
        "data_prep": {"validation_policy": "drop", "decontaminate": False},
        "sft_general": {"data": {**smoke["sft_general"]["data"], "spec": str(specs / "sft-general.yaml"), "max_length": 256}, "train": train},
        "sft_think": {"data": {**smoke["sft_think"]["data"], "spec": str(specs / "sft-think.yaml"), "max_length": 256}, "train": train, "neftune_alpha": 5.0},
        "dpo": {"data": {**smoke["dpo"]["data"], "spec": str(specs / "dpo.yaml"), "max_length": 96, "max_prompt_length": 48},
                "train": train, "loss_type": "apo_zero", "beta": 0.1},
        "grpo": {"data": {**smoke["grpo"]["data"], "spec": str(specs / "grpo.yaml"), "max_length": 160, "max_prompt_length": 128},
                 "train": {**train, "learning_rate": 1.0e-4, "weight_decay": 0.01}, "num_generations": 2, "max_completion_length": 4, "sample_steps": 1},
        # no `models`: the base and every training stage, from the pipeline (five columns)
        "eval": {"profile": "smoke", "tasks": ["arc_easy"], "limit": 2, "batch_size": 2, "max_gen_toks": 8},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory, tiny_model_dir, shared_data) -> Path:
    return write_tiny_recipe(tmp_path_factory.mktemp("pipeline"), tiny_model_dir, shared_data)


def _stage_runs(recipe_path: Path):
    from trlm.runs.tracking import TAG_KIND, setup_tracking

    tracker = setup_tracking(load_recipe(str(recipe_path)))
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=500)
    return tracker, runs, [r for r in runs if r.data.tags.get(TAG_KIND) == "stage"]


@pytest.fixture(scope="module")
def first_run(prefect_env, tiny_recipe):
    from trlm.flows.pipeline import pipeline

    return pipeline(recipe=str(tiny_recipe), overrides=[])


def test_full_flow_runs_every_stage(first_run, tiny_recipe):
    assert list(first_run) == list(STAGES)
    assert not any(o["cached"] for o in first_run.values())
    for stage, outcome in first_run.items():
        out = Path(outcome["path"])
        assert (out / "fingerprint.json").is_file(), stage
    assert (Path(first_run["dpo"]["path"]) / "model" / "model.safetensors").is_file()
    report = Path(first_run["eval"]["path"]) / "report.md"
    assert report.is_file() and all(model in report.read_text() for model in ("base", "sft-general", "sft-think", "dpo", "grpo"))
    samples = Path(first_run["grpo"]["path"]) / "samples" / "step-000001.jsonl"
    assert len(samples.read_text().splitlines()) == 2 * 2  # 2 prompts x 2 samples, step 1 only


def _prefect_markdown(key: str) -> str:
    """The latest markdown artifact under `key` in the test's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[-1].data if found else ""


def test_mlflow_lineage(first_run, tiny_recipe):
    from trlm.runs.tracking import TAG_KEY, TAG_KIND

    tracker, runs, stage_runs = _stage_runs(tiny_recipe)
    parents = [r for r in runs if r.data.tags.get(TAG_KIND) == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_stage = {r.data.tags["trlm.stage"]: r for r in stage_runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(by_stage) == set(STAGES), "one child run per stage under the pipeline run"
    sft = by_stage["sft-general"]
    assert sft.data.params["train.learning_rate"] == "0.001"
    assert sft.data.tags[TAG_KEY] == first_run["sft-general"]["key"]
    assert "trlm.input.model" in sft.data.tags and "trlm.input.data" in sft.data.tags
    assert sft.data.tags.get("prefect.flow_run_id"), "the Prefect flow-run id is recorded"
    history = tracker.client.get_metric_history(sft.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    dpo = by_stage["dpo"]
    assert {"rewards/accuracies", "rewards/margins", "loss"} <= set(dpo.data.metrics)
    grpo = by_stage["grpo"]
    assert {"reward", "pass_at_1", "pass_at_g", "completion_length", "truncated", "zero_variance", "clipped"} <= set(grpo.data.metrics)
    assert grpo.data.tags["trlm.input.model"] == dpo.data.tags["trlm.output_fingerprint.model"]
    table = json.loads((tracker.local_artifact_dir(grpo) / "tables" / "samples-step-1.json").read_text())
    assert len(table["data"]) == 4 and {"prompt", "completion", "reward", "advantage", "reward/gsm8k_correct"} <= set(table["columns"])
    assert json.loads(grpo.data.tags["mlflow.loggedArtifacts"]) == [{"path": "tables/samples-step-1.json", "type": "table"}]
    summary = _prefect_markdown("grpo-summary")
    assert "**samples-step-1** (first 4 of 4" in summary and "| step | prompt | completion | reward | advantage |" in summary
    # The final model (GRPO's, the pipeline's last training stage) is registered as `candidate`.
    version = tracker.client.get_model_version_by_alias("tiny", "candidate")
    assert version.run_id == grpo.info.run_id
    # The hand-off went through MLflow: the next stage's input fingerprint is the previous output's.
    think = by_stage["sft-think"]
    assert think.data.tags["trlm.input.model"] == sft.data.tags["trlm.output_fingerprint.model"]


def test_second_run_runs_nothing(first_run, tiny_recipe):
    from trlm.flows.pipeline import pipeline

    _, _, before = _stage_runs(tiny_recipe)
    again = pipeline(recipe=str(tiny_recipe), overrides=[])
    assert all(o["cached"] for o in again.values())
    _, _, after = _stage_runs(tiny_recipe)
    assert len(after) == len(before), "a cached rerun creates no stage run"


def test_status_says_why_a_stage_is_stale(first_run, tiny_recipe, monkeypatch):
    """An edit of the smoke subsets (eval/tasks.py, in eval's import closure) makes eval stale, and
    only eval; a config change names the key. Simulated by changing that module's source hash."""
    from typer.testing import CliRunner

    import trlm.runs.lineage as lineage  # code versions are computed there
    from trlm.cli import app

    real = lineage.source_hash
    monkeypatch.setattr(lineage, "source_hash", lambda names: "edited" if names == ["trlm.eval.tasks"] else real(names))
    result = CliRunner().invoke(app, ["status", "--recipe", str(tiny_recipe)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.strip().split()[:1] and line.split()[0] in STAGES}
    assert [rows[s].split()[1] for s in STAGES] == ["done"] * 5 + ["stale"]
    assert "code: trlm.eval.tasks" in rows["eval"]
    monkeypatch.setattr(lineage, "source_hash", real)
    result = CliRunner().invoke(app, ["status", "--recipe", str(tiny_recipe), "--set", "dpo.beta=0.3", "--json"])
    stages = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    assert stages["dpo"]["state"] == "stale" and stages["dpo"]["note"] == "config: beta"
    assert stages["grpo"]["note"].startswith("input: waits for dpo")


def test_cli_rerun_reports_every_stage_cached(first_run, tiny_recipe):
    from typer.testing import CliRunner

    from trlm.cli import app

    _, _, before = _stage_runs(tiny_recipe)
    result = CliRunner().invoke(app, ["run", "--recipe", str(tiny_recipe)])
    assert result.exit_code == 0, result.output
    assert "nothing to do, every selected stage is cached" in result.output
    states = {line.split()[0]: line.split()[1] for line in result.output.splitlines() if line.strip().split()[:1] and line.split()[0] in STAGES}
    assert states == dict.fromkeys(STAGES, "cached")
    _, _, after = _stage_runs(tiny_recipe)
    assert len(after) == len(before)


def test_changing_dpo_beta_reruns_only_dpo_and_downstream(first_run, tiny_recipe):
    from trlm.flows.pipeline import pipeline

    again = pipeline(recipe=str(tiny_recipe), overrides=["dpo.beta=0.2"])
    assert {s for s, o in again.items() if not o["cached"]} == {"dpo", "grpo", "eval"}
    assert again["sft-think"]["run_id"] == first_run["sft-think"]["run_id"]


def test_candidate_moves_only_once_the_model_is_evaluated(first_run, tiny_recipe):
    """A training-only run registers the new final model without the alias; the eval stage moves it.
    (The random tiny model earns no GSM8K reward, so GRPO's gradient is 0 here; its weight decay
    is what makes another learning rate another model.)"""
    from typer.testing import CliRunner

    from trlm.cli import app

    tracker, _, _ = _stage_runs(tiny_recipe)
    evaluated = tracker.client.get_model_version_by_alias("tiny", "candidate").version
    trained = CliRunner().invoke(app, ["run", "--recipe", str(tiny_recipe), "--only", "grpo", "--set", "grpo.train.learning_rate=2e-4"])
    assert trained.exit_code == 0, trained.output
    new = max(int(v.version) for v in tracker.client.search_model_versions("name = 'tiny'"))
    assert f"registered tiny version {new} from grpo; not evaluated yet, so no alias" in trained.output
    assert tracker.client.get_model_version_by_alias("tiny", "candidate").version == evaluated
    judged = CliRunner().invoke(app, ["run", "--recipe", str(tiny_recipe), "--only", "eval", "--set", "grpo.train.learning_rate=2e-4"])
    assert judged.exit_code == 0, judged.output
    assert f"tiny@candidate is version {new} (moved there: evaluated by eval)" in judged.output
    assert int(tracker.client.get_model_version_by_alias("tiny", "candidate").version) == new


def test_forced_rerun_reproduces_and_keeps_downstream_cached(first_run, tiny_recipe):
    """`--force sft-think` retrains it; on CPU in fp32 the weights come out bit for bit the same, so
    the run is tagged reproduced and dpo/eval (keyed by the model's fingerprint) stay cached."""
    from typer.testing import CliRunner

    from trlm.cli import app
    from trlm.runs.tracking import TAG_REPRODUCED, TAG_RERUN_OF

    _, _, before = _stage_runs(tiny_recipe)
    result = CliRunner().invoke(app, ["run", "--recipe", str(tiny_recipe), "--force", "sft-think"])
    assert result.exit_code == 0, result.output
    assert "forced sft-think: reproduces the previous run" in result.output
    tracker, _, after = _stage_runs(tiny_recipe)
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    assert [r.data.tags["trlm.stage"] for r in new] == ["sft-think"], "only the forced stage ran"
    rerun = new[0]
    assert rerun.data.tags[TAG_REPRODUCED] == "true"
    assert rerun.data.tags[TAG_RERUN_OF] == first_run["sft-think"]["run_id"]
    previous = next(r for r in before if r.info.run_id == first_run["sft-think"]["run_id"])
    assert rerun.data.tags["trlm.output_fingerprint.model"] == previous.data.tags["trlm.output_fingerprint.model"]
    # the fingerprint handed on is the model directory's, while the stage directories differ (timings)
    assert json.loads((tracker.local_artifact_dir(rerun) / "output" / "fingerprint.json").read_text())["fingerprint"] != \
        json.loads((Path(first_run["sft-think"]["path"]) / "fingerprint.json").read_text())["fingerprint"]
    assert not (Path(first_run["sft-think"]["path"]) / "checkpoints").exists(), "finished stages drop their checkpoints"


def test_cache_key_is_stable_across_processes(first_run, tiny_recipe):
    code = (
        "import json,sys; from trlm.stages.registry import PIPELINE, load_recipe; from trlm.runs.lineage import plan; from trlm.runs.tracking import setup_tracking;"
        f"r=load_recipe({str(tiny_recipe)!r}); print(json.dumps([p.key for p in plan(r, setup_tracking(r), PIPELINE)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    keys = json.loads(out.stdout.strip().splitlines()[-1])
    assert keys == [first_run[s]["key"] for s in STAGES]


def test_only_dpo_without_upstream_fails_clearly(tmp_path, tiny_model_dir, shared_data):
    from typer.testing import CliRunner

    from trlm.cli import app

    recipe = write_tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    result = CliRunner().invoke(app, ["run", "--recipe", str(recipe), "--only", "dpo"])
    assert result.exit_code == 2
    assert "sft-think" in result.output or "data-prep" in result.output
    assert "trlm run --from" in result.output


def test_resumed_stage_run_does_not_log_replayed_steps_twice(tiny_recipe, tmp_path):
    """A killed stage resumes from its last checkpoint and replays the steps after it; MLflow keeps
    one point per step (the first), and the resumed run finishes in the same MLflow run."""
    from trlm.runs.tracking import Tracker
    from trlm.runs.runner import run_stage

    recipe = load_recipe(str(tiny_recipe))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "resume-test", tmp_path)
    calls = []

    def execute(out: Path, on_log) -> dict:
        calls.append(out)
        first = len(calls) == 1
        for step in (1, 2, 3) if first else (2, 3, 4):  # the retry resumes from a checkpoint at step 1
            on_log({"loss": 10.0 - step - (0.5 if not first else 0.0)}, step)
            if first and step == 3:
                raise RuntimeError("killed")
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text("{}")
        from trlm.artifacts import write_fingerprint

        write_fingerprint(out)
        return {}

    with pytest.raises(RuntimeError, match="killed"):
        run_stage(tracker, recipe, _work(), execute, parent_run_id=None)
    outcome = run_stage(tracker, recipe, _work(), execute, parent_run_id=None)
    assert calls[0] == calls[1], "the retry continues in the same artifact directory"
    history = tracker.client.get_metric_history(outcome.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 5.5)]
    assert tracker.client.get_run(outcome.run_id).info.status == "FINISHED"


def test_a_stage_already_executing_elsewhere_is_not_entered(tiny_recipe, tmp_path):
    """Two processes on one work dir (a nightly run overlapping a manual one) must not resume the
    same stage run into the same directory at once: the second stops with a clear error."""
    from trlm.runs.tracking import Tracker
    from trlm.runs.runner import StageBusy, run_stage, stage_lock

    recipe = load_recipe(str(tiny_recipe))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "lock-test", tmp_path)

    def execute(out: Path, on_log) -> dict:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text("{}")
        from trlm.artifacts import write_fingerprint

        write_fingerprint(out)
        return {}

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from trlm.runs.runner import stage_lock\n"
        f"with stage_lock(Path({str(tmp_path)!r}), 'eval:test', {'k' * 64!r}):\n"
        "    print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StageBusy, match=r"eval:test \(key kkkk.*\) is being executed by pid \d+ on .* since .*run again"):
            run_stage(tracker, recipe, _work(), execute, parent_run_id=None)
        assert tracker.client.search_runs([tracker.experiment_id]) == [], "the refused process creates no MLflow run"
    finally:
        holder.kill()
        holder.wait()
    # the holder died (as a killed process would): its lock is gone with it
    outcome = run_stage(tracker, recipe, _work(), execute, parent_run_id=None)
    assert not outcome.cached
    with stage_lock(tmp_path, "eval:test", "k" * 64):  # released after the stage ran
        pass
