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
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

FINGERPRINT_FILE = "fingerprint.json"
_CHUNK = 1 << 20
# Names that only ever hold a temporary or garbage: never content, removable once their owner is gone.
TMP_PREFIX, OLD_PREFIX, LEGACY_FINGERPRINT_TMP = ".tmp-", ".old-", f".{FINGERPRINT_FILE}."
LEFTOVER_MIN_AGE_S = 30.0


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


def is_leftover_name(name: str) -> bool:
    """A temporary (`.tmp-*`, `.fingerprint.json.*`) or garbage (`.old-*`) name: never content."""
    return name.startswith((TMP_PREFIX, OLD_PREFIX, LEGACY_FINGERPRINT_TMP))


def _content_files(directory: Path, exclude: tuple[str, ...]) -> list[Path]:
    files = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if p.is_file() and rel.parts[0] not in exclude and p.name != FINGERPRINT_FILE and not any(map(is_leftover_name, rel.parts)):
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
    atomic_write_text(directory / FINGERPRINT_FILE, json.dumps(record, indent=2, sort_keys=True))
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
#
# Temporaries are siblings of what they become, named `.tmp-<name>-<random>`. The process writing one
# holds an exclusive flock on it until it is renamed into place (`_new_temporary`): the OS drops the
# lock when the process dies, even on kill -9, so "locked" means "its writer is alive". Replaced
# directories are moved aside as `.old-<name>-<random>`, garbage from that moment on.


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


def _new_temporary(parent: Path, name: str, *, directory: bool) -> tuple[Path, int]:
    """Create `parent/.tmp-<name>-<random>` (a directory or an empty file) and lock it; return it and
    the fd that holds the lock (close it after the rename). Starts over under a new name in the rare
    case that `remove_leftovers` swept it between its creation and the lock."""
    while True:
        tmp = parent / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        if directory:
            tmp.mkdir()
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no flock on this file system: unmarked (sweeps then leave it alone)
            return tmp, fd
        try:
            if os.stat(tmp, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, encoding: str = "utf-8", *, binary: bool = False) -> Iterator[Any]:
    """Yield a file (text, or bytes with `binary`) to write `path` through: a locked, uniquely named
    temporary, fsynced and renamed into place on success (removed on an exception). Readers see the
    old or the new content, never a partial file, and concurrent writers never clash."""
    path = Path(path)
    tmp, fd = _new_temporary(path.parent, path.name, directory=False)
    try:
        # closing the file releases the lock: after the rename
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_file(path, encoding) as f:
        f.write(text)


def atomic_symlink(target: str | Path, link: str | Path) -> None:
    """Point `link` at `target` by renaming a new symlink over it: never absent, never half-made.

    Concurrent callers each rename their own; the last one wins. A symlink cannot be locked, so a
    temporary swept away before its rename is simply made again.
    """
    link = Path(link)
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = link.parent / f"{TMP_PREFIX}{link.name}-{uuid.uuid4().hex[:8]}"
        tmp.symlink_to(target)
        try:
            os.replace(tmp, link)
            return
        except FileNotFoundError:
            continue


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, moving a previous `final` aside (`.old-*`, then deleted).

    `rename` onto a non-empty directory fails instead of merging, so when another process publishes
    the same `final` at the same moment, each retries until its own rename lands: the last one wins,
    and `final` is complete whenever it exists.
    """
    garbage = []
    for _ in range(100):
        try:
            os.rename(tmp, final)
            break
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
        old = final.parent / f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):  # another process moved it aside first
            os.rename(final, old)
            garbage.append(old)
    else:
        raise OSError(errno.EBUSY, f"could not publish {tmp} as {final}: other processes kept replacing it")
    for old in garbage:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync it and rename it to `final`.

    On an exception the temporary directory is removed; after a kill it is left as `.tmp-*` garbage
    that no reader treats as complete and `remove_leftovers` deletes. `final` is only ever absent or
    complete. An existing `final` is replaced (see `_publish` for two processes doing it at once).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _new_temporary(final.parent, final.name, directory=True)
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def discard(path: str | Path) -> None:
    """Delete a directory so that a kill half-way leaves no half-deleted `path`: it is first renamed
    to `.old-<name>-<random>` (one atomic step), then removed; what a kill leaves of it is garbage
    by name, which `remove_leftovers` and `remove_stale_temporaries` delete."""
    path = Path(path)
    doomed = path.parent / f"{OLD_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def work_dir_lock(work_dir: str | Path, name: str) -> Iterator[Path]:
    """Wait for an exclusive flock on `<work_dir>/locks/<name>.lock`: one process at a time through a
    shared first-time step (the others wait, then find its result). The OS releases it when the
    holder exits, even on kill -9. Same scope as `trlm.runs.lineage.stage_lock`: processes sharing a work dir."""
    path = Path(work_dir) / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_if_abandoned(p: Path, min_age_s: float) -> bool:
    """Remove one leftover unless a live process may still own it; True if removed."""
    try:
        st = p.lstat()
    except FileNotFoundError:
        return False
    garbage = p.name.startswith(OLD_PREFIX)  # moved aside after its replacement landed: nobody reads it
    if not garbage and time.time() - st.st_mtime < min_age_s:
        return False
    if p.is_symlink():
        p.unlink(missing_ok=True)
        return True
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        if not garbage:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: its writer is alive; anything else: cannot tell, keep it
                return False
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def remove_leftovers(root: str | Path, min_age_s: float = LEFTOVER_MIN_AGE_S) -> list[Path]:
    """Remove, anywhere under `root`, what killed processes left behind; return what was removed.

    Leftovers are `.tmp-*` (a temporary file, directory or symlink: `.tmp-output-*` of a stage,
    `base/.tmp-*`, `checkpoints/.tmp-step-*`, ...), `.old-*` (a replaced directory moved aside, e.g.
    `.old-checkpoints-*` being deleted by a finished stage) and legacy `.fingerprint.json.*`.

    Ownership is decided by a lock, not by a pid or an age alone: every writer in this module holds
    an flock on its temporary until the rename (`_new_temporary`), and the OS drops it when the
    writer dies, even on kill -9. A pid in the name would be fooled by pid reuse and by other hosts
    sharing the work dir; an age threshold alone would delete a data-prep temporary that is written
    for hours. So a `.tmp-*` entry is removed only when its lock can be taken, AND it has not changed
    for `min_age_s`: the age is a safety net for temporaries written by code that holds no lock
    (stages writing a single file) and for symlinks, which cannot be locked. `.old-*` entries are
    garbage from the moment they are named and are removed at once. Entries whose lock state cannot
    be read (a file system without flock) are kept. Kept entries are not descended into.
    """
    root = Path(root)
    removed: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            if is_leftover_name(name) and _remove_if_abandoned(here / name, min_age_s):
                removed.append(here / name)
        dirnames[:] = [d for d in dirnames if not is_leftover_name(d)]
    return removed


def remove_stale_temporaries(directory: str | Path) -> None:
    """Delete the leftovers directly in `directory` that no live process holds, whatever their age:
    for a caller that owns everything written there (a stage in its own directory, under its lock)."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if is_leftover_name(p.name):
                _remove_if_abandoned(p, 0.0)


# --- credentials -------------------------------------------------------------------------------

_SECRET_PARAM_WORDS = ("token", "key", "secret", "password", "passwd", "pwd", "sig", "credential", "auth", "session")


def _mask_params(query: str) -> str:
    out = []
    for item in query.split("&"):
        name, eq, _ = item.partition("=")
        out.append(f"{name}=***" if eq and any(w in name.lower() for w in _SECRET_PARAM_WORDS) else item)
    return "&".join(out)


def mask_uri(uri: str) -> str:
    """`uri` with its credentials replaced by `***`, for printing and for recording anywhere.

    The password of the user-info part is masked (`https://user:***@host/path`); a user name alone
    may itself be a token and becomes `***@host`. Query and fragment parameters whose names suggest a
    secret (`token`, `access_token`, `api_key`, `sig`, `password`, ...) keep their name, not their
    value (`?token=***`). A URI without credentials comes back unchanged.
    """
    if not uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. a malformed IPv6 host: mask any user-info by pattern
        return re.sub(r"//[^/@]*@", "//***@", uri)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    masked = parts._replace(netloc=netloc, query=_mask_params(parts.query), fragment=_mask_params(parts.fragment))
    return uri if masked == parts else urlunsplit(masked)


def mask_secrets(text: str) -> str:
    """`text` (an error message, a log line) with `mask_uri` applied to every URI in it."""

    def one(m: re.Match) -> str:
        uri = m.group(0).rstrip(".,;:!?")  # sentence punctuation after a URI is not part of it
        return mask_uri(uri) + m.group(0)[len(uri):]

    return re.sub(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+", one, text) if text else text


# How a tokenizer was loaded (offline switches, cache paths, the local flag) is not what it is:
# transformers writes these load-time kwargs into tokenizer_config.json, so an artifact's bytes, and
# every key downstream, would change with HF_HUB_OFFLINE or the machine.
LOAD_TIME_TOKENIZER_KWARGS = ("local_files_only", "is_local", "cache_dir", "token", "use_auth_token", "force_download",
                              "proxies", "revision", "subfolder", "_commit_hash", "trust_remote_code")


def save_tokenizer(tokenizer, path: Path) -> None:
    """`tokenizer.save_pretrained(path)` without the load-time settings (see above)."""
    saved = {k: tokenizer.init_kwargs.pop(k) for k in LOAD_TIME_TOKENIZER_KWARGS if k in tokenizer.init_kwargs}
    try:
        tokenizer.save_pretrained(path)
    finally:
        tokenizer.init_kwargs.update(saved)
