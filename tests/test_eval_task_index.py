"""eval/task_index.py: a TaskManager over only the folders of the requested tasks loads what the full
index loads, from the same YAMLs; where that is not certain, the full index is used."""

from __future__ import annotations

import pytest

from trlm.eval.config import EvalConfig
from trlm.eval.task_index import ALL, _MANAGERS, _members, task_folders, task_manager

DEFAULT_TASKS = EvalConfig().tasks


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
    yield
    mp.undo()


def _closure(tm, names):
    """Every name that loading `names` reads from the index: the names, their groups' and tags' members."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            entry = tm.task_index[name]
            todo.extend(_members(entry) + sorted(getattr(entry, "tags", ()) if name in tm.all_tags else ()))
    return seen


def test_the_default_tasks_are_indexed_from_the_same_yamls_in_their_folders(cache):
    yamls = task_folders()["yamls"]
    assert yamls["mmlu"].startswith("mmlu/") and yamls["boolq"].startswith("super_glue/") and yamls["arc_challenge"].startswith("arc/")
    small = task_manager(DEFAULT_TASKS)
    full = task_manager(None)
    assert small is not full and len(small.all_tasks) < len(full.all_tasks) / 10
    names = _closure(full, DEFAULT_TASKS)
    assert len(names) >= 90  # mmlu's and bbh's subtasks and subgroups
    for name in sorted(names):
        # lm-eval loads a task from its index entry: the same YAML file, parsed with its includes; a tag
        # is its member list
        assert small.task_index[name] == full.task_index[name], name


def test_members_in_other_folders_add_their_folders(cache):
    full = task_manager(None)
    # openllm (benchmarks/) lists arc_challenge, gsm8k, mmlu... from their own folders
    openllm = task_manager(["openllm"])
    assert openllm is not full and {"benchmarks", "arc", "gsm8k", "mmlu"} <= set(_key_of(openllm))
    for name in _closure(full, ["openllm"]):
        assert openllm.task_index[name] == full.task_index[name], name
    # a tag whose members lie in one folder
    arc = task_manager(["ai2_arc"])
    assert _key_of(arc) == ("arc",) and arc.task_index["ai2_arc"] == full.task_index["ai2_arc"]
    # a tag whose members lie in two folders: lm-eval indexes each include_path folder on its own, and a
    # later folder's tag replaces an earlier one's (one member instead of two), so only the full index
    # holds the whole tag
    assert task_manager(["self_consistency"]) is full


def test_an_unknown_name_or_another_resolution_uses_the_full_index(cache, monkeypatch):
    full = task_manager(None)
    assert task_manager(["no-such-task"]) is full
    index = task_folders()
    # The full index read arc_easy from another file (as for a name defined in two folders)
    moved = {"yamls": {**index["yamls"], "arc_easy": "arc/elsewhere.yaml"}, "tags": index["tags"]}
    monkeypatch.setattr("trlm.eval.task_index.task_folders", lambda: moved)
    assert task_manager(["arc_easy"]) is full
    assert task_manager(["arc_challenge"]) is not full


def _key_of(tm):
    return next(key for key, value in _MANAGERS.items() if value is tm)


def test_the_folder_cache_is_per_lm_eval_version_and_rebuilt_when_damaged(cache, tmp_path):
    first = task_folders(tmp_path)
    (cached,) = tmp_path.glob("lm-eval-*-task-folders.json")
    cached.write_text("{not json")
    assert task_folders(tmp_path) == first
