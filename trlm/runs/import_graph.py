"""The package's own import graph, read from source with `ast` (no module is executed).

Two users:
- a stage's code version (`trlm.runs.lineage.code_version`) hashes the source of every module of this
  package that the stage's module imports, transitively, so editing any of them (a loss, the
  smoke subsets in `eval/tasks.py`) makes the stage and everything downstream stale, and editing
  anything outside the closure (the CLI, a bench script, a test) changes no key;
- the layer test (`tests/test_layers.py`) walks the same graph to refuse cycles and imports that go
  against the layers.

Every import statement counts, including those inside functions and `if TYPE_CHECKING:` blocks: a
lazily imported module shapes the stage's output as much as one imported at the top. Locating a
submodule's file asks Python's import system (`importlib.util.find_spec`), which imports the parent
packages; ours (`trlm`, `trlm.stages`, `trlm.stages.data_prep`, ...) are part of the closure too.
Module names are hashed with their source (`source_hash`): moving a module makes its stages stale.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

PACKAGE = "trlm"


@lru_cache(maxsize=None)
def module_file(name: str) -> Path | None:
    """The source file of module `name`, or None when no such module exists."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent is not a package, or `name` is malformed
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _owning_module(name: str) -> str | None:
    """`trlm.training.losses.IGNORE_INDEX` -> `trlm.training.losses`: the deepest prefix that is a module.

    Walks down from the package and stops at the first plain module: asking for a name inside a
    plain module would make Python import (execute) that module."""
    parts, owner = name.split("."), None
    for end in range(1, len(parts) + 1):
        candidate = ".".join(parts[:end])
        path = module_file(candidate)
        if path is None:
            break
        owner = candidate
        if path.name != "__init__.py":
            break
    return owner


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def direct_imports(name: str) -> frozenset[str]:
    """Modules of this package that module `name` imports (anywhere in its source), and their parent packages."""
    path = module_file(name)
    if path is None:
        raise ModuleNotFoundError(f"no module {name!r}")
    tree = ast.parse(path.read_bytes(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` / `from ..recipe import y`
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            if _is_ours(candidate) and (owner := _owning_module(candidate)) is not None:
                targets.add(owner)
    targets |= {p for t in targets for p in _parents(t)}
    targets.discard(name)
    return frozenset(targets)


def import_closure(name: str) -> list[str]:
    """`name`, its parent packages and every module of this package it imports, transitively (sorted)."""
    seen = {name, *_parents(name)}
    todo = list(seen)
    while todo:
        for target in direct_imports(todo.pop()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return sorted(seen)


def source_hash(modules: list[str]) -> str:
    """SHA-256 over (module name, source bytes) of each module, in the given order."""
    h = hashlib.sha256()
    for name in modules:
        path = module_file(name)
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes() if path is not None else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def package_modules(entry: str = f"{PACKAGE}.cli") -> list[str]:
    """Every module of the installed package: what `entry` reaches by imports, plus every module in
    the folder of each package met on the way (the folders are mapped one by one in an editable
    install, so walking `trlm/` alone would miss `stages/`, `flows/` and `eval/`)."""
    found: set[str] = set()
    todo = [entry, PACKAGE]
    while todo:
        name = todo.pop()
        if name in found or module_file(name) is None:
            continue
        found.add(name)
        todo.extend(direct_imports(name))
        if module_file(name).name == "__init__.py":
            for folder in importlib.util.find_spec(name).submodule_search_locations or []:
                for child in sorted(Path(folder).iterdir()):
                    if child.suffix == ".py" and child.stem != "__init__":
                        todo.append(f"{name}.{child.stem}")
                    elif child.is_dir() and (child / "__init__.py").is_file():
                        todo.append(f"{name}.{child.name}")
    return sorted(found)
