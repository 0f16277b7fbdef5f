"""Content fingerprints and crash-safe directories: the seams between stages.

Every stage writes one artifact directory and, last of all, a `fingerprint.json` in it: the SHA-256
of every file's bytes (path-relative, so moving the directory keeps the fingerprint). A directory
without `fingerprint.json` is incomplete by definition: that file is written only after everything
else, so a crash can never leave a directory that looks complete.

Stage keys (`stage_key`) hash the stage's code version, its resolved config and the fingerprints of
its inputs, never paths, timestamps or run ids, so they are stable across processes and machines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

FINGERPRINT_FILE = "fingerprint.json"
_CHUNK = 1 << 20


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """Hash of a JSON-able object with sorted keys: equal content, equal hash, in any process."""
    return hash_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def _content_files(directory: Path, exclude: tuple[str, ...]) -> list[Path]:
    files = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if p.is_file() and rel.parts[0] not in exclude and p.name != FINGERPRINT_FILE:
            files.append(p)
    return files


def hash_directory(directory: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Per-file SHA-256 of a directory, keyed by relative path (top-level names in `exclude` skipped)."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): hash_file(p) for p in _content_files(directory, exclude)}


def write_fingerprint(directory: str | Path, meta: dict[str, Any] | None = None, exclude: tuple[str, ...] = ("checkpoints",)) -> str:
    """Hash the directory's content, write `fingerprint.json` last (atomically), return the fingerprint.

    Intermediate training checkpoints are excluded: they are resumable state, not the artifact.
    """
    directory = Path(directory)
    files = hash_directory(directory, exclude)
    fingerprint = hash_json(files)
    record = {"fingerprint": fingerprint, "files": files, "exclude": list(exclude), **({"meta": meta} if meta else {})}
    tmp = directory / f".{FINGERPRINT_FILE}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    _fsync_file(tmp)
    os.replace(tmp, directory / FINGERPRINT_FILE)
    _fsync_dir(directory)
    return fingerprint


def read_fingerprint(directory: str | Path) -> str | None:
    """The fingerprint of a complete artifact directory, or None if it is missing or incomplete."""
    path = Path(directory) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        fingerprint = json.loads(path.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return fingerprint if isinstance(fingerprint, str) else None


def part_fingerprint(directory: str | Path, part: str) -> str | None:
    """The fingerprint of the sub-directory `part` of a complete artifact directory, from its record.

    Equal to `write_fingerprint` of that sub-directory alone. Stages hand on `model/`'s fingerprint,
    not the whole directory's: `metrics.json` holds timings, so a rerun that reproduces the weights
    bit for bit would otherwise look like a new model and invalidate every downstream stage.
    """
    path = Path(directory) / FINGERPRINT_FILE
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    prefix = part.rstrip("/") + "/"
    inside = {k.removeprefix(prefix): v for k, v in files.items() if k.startswith(prefix)}
    return hash_json(inside) if inside else None


def verify_fingerprint(directory: str | Path) -> bool:
    """Re-hash the directory and compare with its recorded fingerprint (detects edits and truncation)."""
    path = Path(directory) / FINGERPRINT_FILE
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
        files, fingerprint = record["files"], record["fingerprint"]
        exclude = tuple(record.get("exclude", ("checkpoints",)))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    # the record must be self-consistent (an edited fingerprint.json) and match the bytes on disk
    return hash_json(files) == fingerprint and hash_directory(directory, exclude) == files


def stage_key(stage: str, code_version: str, config: Any, input_fingerprints: dict[str, str]) -> str:
    """The cache key of one stage run: what it runs, with what settings, on what inputs."""
    return hash_json({"stage": stage, "code": code_version, "config": config, "inputs": input_fingerprints})


# --- crash safety ------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            _fsync_file(p)
    for p in [directory, *[d for d in directory.rglob("*") if d.is_dir()]]:
        _fsync_dir(p)


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync it and rename it to `final`.

    On an exception (or a kill) the temporary directory is removed or left as `.tmp-*` garbage that
    no reader treats as complete; `final` is only ever absent or complete. An existing `final` is
    replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory: str | Path) -> None:
    """Delete `.tmp-*`/`.old-*` leftovers of a killed process (never complete, safe to remove)."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
