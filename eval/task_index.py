"""lm-eval's TaskManager, indexing only the task folders a run needs.

lm-eval's default TaskManager walks all of its ~15,000 task YAMLs (about 9 s on this machine) in
every process that evaluates. A task's YAML, its group's members and the templates they include live
in one folder under `lm_eval/tasks` (`arc/`, `mmlu/`, `super_glue/`...), so a TaskManager given only
those folders (lm-eval's public `include_path` with `include_defaults=False`) loads the same task
configs from the same files in about 0.4 s. Which folder holds which name is indexed once per
installed lm-eval version and cached (`task_folders`). The full index is used whenever that is not
certain: a tag, a name whose folder is unknown, or a group with a member outside the folders.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

log = logging.getLogger(__name__)
_MANAGERS: dict[tuple[str, ...], Any] = {}
ALL = ("*",)


def _tasks_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _relative_yaml(entry, root: Path) -> str | None:
    """An index entry's YAML relative to lm_eval/tasks; None for tags, generated entries, a user's
    include_path, and lm-eval versions whose index entries are not objects with a `yaml_path`."""
    path = getattr(entry, "yaml_path", None)
    if not path:
        return None
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def task_folders(cache_dir: Path | None = None) -> dict[str, dict]:
    """`{"yamls": {name: relative YAML or None}, "tags": {tag: [member names]}}` for every task, group
    and tag lm-eval knows, from its full index, cached per lm-eval version under `cache_dir` (default:
    `$XDG_CACHE_HOME/trlm` or `~/.cache/trlm`)."""
    from trlm.artifacts import atomic_write_text

    cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trlm"
    cache = Path(cache_dir) / f"lm-eval-{importlib.metadata.version('lm_eval')}-task-folders.json"
    if cache.is_file():
        try:
            index = json.loads(cache.read_text())
            if isinstance(index, dict) and set(index) == {"yamls", "tags"}:
                return index
        except ValueError as err:
            log.warning("rebuilding the damaged lm-eval task cache %s (%s)", cache, err)
    tm = task_manager()
    root = _tasks_root()
    entries = {name: tm.task_index[name] for name in sorted(tm.all_tasks)}
    index = {
        "yamls": {name: _relative_yaml(e, root) for name, e in entries.items()},
        "tags": {name: sorted(e.tags) for name, e in entries.items() if name in tm.all_tags and isinstance(getattr(e, "tags", None), set)},
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(index, indent=0))
    return index


def known_task_names(cache_dir: Path | None = None) -> set[str]:
    """Every task, group and tag name lm-eval knows (from `task_folders`' cache)."""
    return set(task_folders(cache_dir)["yamls"])


def _members(entry) -> list[str]:
    """The task, group and tag names a group's YAML lists (inline task definitions name none)."""
    cfg = getattr(entry, "cfg", None) or {}
    members = cfg.get("task") if "group" in cfg else None  # a task's own `task:` is its name
    names = []
    for member in members if isinstance(members, list) else []:
        name = member if isinstance(member, str) else member.get("task") if isinstance(member, dict) else None
        if isinstance(name, str):
            names.append(name)
    return names


def _folder(relative_yaml: str | None) -> str | None:
    """The folder right under lm_eval/tasks (None for a YAML that lies there itself)."""
    return relative_yaml.split("/")[0] if relative_yaml and "/" in relative_yaml else None


def _missing_folders(tm, names: Iterable[str], index: dict, root: Path) -> set[str] | None:
    """The folders `tm` must also index so that every name that loading `names` reads (the names, their
    groups' members, their tags' members) is what the full index holds; None if no folder set can."""
    need: set[str] = set()
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in index["tags"]:
            members = index["tags"][name]
            entry = tm.task_index.get(name)
            if entry is None or sorted(getattr(entry, "tags", ())) != members:
                need |= {_folder(index["yamls"].get(m)) for m in members}
            todo.extend(members)
            continue
        want = index["yamls"].get(name)
        if _folder(want) is None:
            return None  # a name only the full index can resolve
        entry = tm.task_index.get(name)
        if entry is None:
            need.add(_folder(want))
        elif _relative_yaml(entry, root) != want:
            return None  # the same name in two folders, resolved otherwise than the full index does
        else:
            todo.extend(_members(entry))
    return None if None in need else need


def task_manager(names: Iterable[str] | None = None):
    """A TaskManager that loads `names` as lm-eval's full index would (None: the full index itself),
    one per process and folder set."""
    from lm_eval.tasks import TaskManager

    if not names:
        if ALL not in _MANAGERS:
            _MANAGERS[ALL] = TaskManager()
        return _MANAGERS[ALL]
    names = sorted(names)
    index, root = task_folders(), _tasks_root()
    tm, folders = SimpleNamespace(task_index={}), set()
    for _ in range(8):  # each round adds the folders of one more level of members
        missing = _missing_folders(tm, names, index, root)
        if missing is None or (missing and missing <= folders):
            break  # only the full index resolves these names as the full index does
        if not missing:
            return tm
        folders |= missing
        key = tuple(sorted(folders))
        if key not in _MANAGERS:
            _MANAGERS[key] = TaskManager(include_path=[str(root / f) for f in key], include_defaults=False)
        tm = _MANAGERS[key]
    log.info("lm-eval tasks %s: indexing all of lm-eval's tasks", names)
    return task_manager(None)
