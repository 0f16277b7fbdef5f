"""The offline dataset mirror: lm-eval's standard task names resolve to the shared data, offline."""

from __future__ import annotations

import os

import pytest

from trlm.eval.mirror import BENCHMARKS, MirrorError, build_mirror, mirrored_splits, offline_datasets

# (hub id, config, {split: rows}) as documented in shared/data/README.md
EXPECTED = [
    ("allenai/ai2_arc", "ARC-Challenge", {"train": 1119, "validation": 299, "test": 1172}),
    ("allenai/ai2_arc", "ARC-Easy", {"train": 2251, "validation": 570, "test": 2376}),
    ("openai/gsm8k", "main", {"train": 7473, "test": 1319}),
    ("SaylorTwift/bbh", "snarks", {"test": 178}),
    ("google/IFEval", None, {"train": 541}),
    ("baber/piqa", None, {"validation": 1838}),
    ("aps/super_glue", "boolq", {"validation": 3270}),
    ("cais/mmlu", "abstract_algebra", {"test": 100, "dev": 5}),
]


@pytest.fixture(scope="module")
def mirror(shared_data, tmp_path_factory):
    return build_mirror(shared_data, tmp_path_factory.mktemp("evalwork"))


def test_mirror_layout_uses_symlinks_and_declares_configs(mirror, shared_data):
    import yaml

    arc = mirror / "allenai" / "ai2_arc"
    link = arc / "ARC-Challenge" / "test.jsonl"
    assert link.is_symlink() and link.resolve() == (shared_data / "allenai__ai2_arc" / "ARC-Challenge" / "test.jsonl").resolve()
    header = yaml.safe_load((arc / "README.md").read_text().split("---")[1])
    configs = {c["config_name"]: {f["split"]: f["path"] for f in c["data_files"]} for c in header["configs"]}
    assert configs["ARC-Challenge"] == {s: f"ARC-Challenge/{s}.jsonl" for s in ("train", "validation", "test")}
    # groups: every subject / BBH task is a config; nothing but the README is a regular file
    mmlu = yaml.safe_load((mirror / "cais" / "mmlu" / "README.md").read_text().split("---")[1])["configs"]
    bbh = yaml.safe_load((mirror / "SaylorTwift" / "bbh" / "README.md").read_text().split("---")[1])["configs"]
    assert len([c for c in mmlu if c["config_name"] != "all"]) == 57
    assert len(bbh) == 27
    regular = [p for p in mirror.rglob("*") if p.is_file() and not p.is_symlink() and p.name != "README.md"]
    assert regular == []
    # splits that the data root lacks are not declared (never fabricated)
    assert mirrored_splits(shared_data, "baber/piqa", None) == ["validation"]
    assert mirrored_splits(shared_data, "aps/super_glue", "boolq") == ["validation"]
    # idempotent
    assert build_mirror(shared_data, mirror.parent) == mirror


@pytest.mark.parametrize("hub_id,config,splits", EXPECTED, ids=[f"{h}/{c}" for h, c, _ in EXPECTED])
def test_each_benchmark_loads_offline_by_hub_id(mirror, hub_id, config, splits, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cwd = os.getcwd()
    with offline_datasets(mirror):
        ds = datasets.load_dataset(hub_id, config)
        assert {k: len(v) for k, v in ds.items()} == splits
    assert os.getcwd() == cwd  # restored


def test_standard_lm_eval_tasks_resolve_to_the_mirror(mirror, shared_data):
    from trlm.eval.task_index import task_manager
    from trlm.eval.tasks import load_task

    tm = task_manager()
    with offline_datasets(mirror):
        loaded = tm.load(["arc_challenge", "gsm8k", "ifeval"])
        arc = loaded["tasks"]["arc_challenge"]
        assert arc.config.dataset_path == "allenai/ai2_arc"  # the standard YAML, unchanged
        assert len(arc.eval_docs) == 1172
        assert len(loaded["tasks"]["gsm8k"].eval_docs) == 1319
        assert len(loaded["tasks"]["ifeval"].eval_docs) == 541
        # PIQA's YAML declares a train split that the offline data does not have: the plain task fails...
        with pytest.raises(KeyError):
            tm.load(["piqa"])
        # ...and load_task overrides only that unused split, and records it.
        task, plan, samples = load_task(tm, "piqa", data_root=shared_data, profile="full", limit=None, seed=1)
        assert task.config.training_split is None and task.config.validation_split == "validation"
        assert len(task.eval_docs) == 1838 and samples == {}
        assert plan.split_overrides == {"piqa": {"training_split": ["train", None]}}
        assert any("training_split='train'" in n for n in plan.notes)


def test_missing_benchmark_folder_is_named(tmp_path):
    with pytest.raises(MirrorError, match="allenai__ai2_arc"):
        build_mirror(tmp_path / "empty-data", tmp_path / "work", ["allenai/ai2_arc"])
    assert set(BENCHMARKS) >= {"allenai/ai2_arc", "cais/mmlu", "SaylorTwift/bbh", "google/IFEval"}
