"""A new work dir's Prefect database starts as a copy of an empty one migrated once per Prefect version.

Prefect migrates a new SQLite database at its server's start: about 150 migrations, 12 of the 20 s a
temporary server takes to answer on 2 cores, paid by every new work dir's first `trlm run` or `trlm up`.
The migrated, empty database is kept in the user's cache (`$XDG_CACHE_HOME/trlm/`, else `~/.cache/trlm/`),
one file per Prefect version, made by Prefect's own `prefect server database upgrade`; the server then
finds its database at the newest revision and starts at once. Only a work dir's own SQLite database is
seeded, and only while it does not exist: a database the user set (PostgreSQL, another file) is Prefect's.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path


def template_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "trlm" / f"prefect-{version('prefect')}-empty.db"


def _migrate(db: Path) -> None:
    """Prefect's own migrations to the newest revision, in a process of their own (Prefect reads its
    database setting once per process, and this one's points at the work dir)."""
    env = {**os.environ, "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
           "PREFECT_HOME": str(db.parent), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    done = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"Prefect's database migrations failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")


def _copy(src: Path, dst: Path, keep_existing: bool = False) -> bool:
    """A consistent copy through SQLite's backup API, written to a temporary file and then put in
    place whole: a reader never sees half a database. `keep_existing`: never replace a `dst` that
    appeared meanwhile (another process's server may have it open already); False then."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        source, target = sqlite3.connect(src), sqlite3.connect(tmp)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        if not keep_existing:
            os.replace(tmp, dst)  # the template: equal content whoever writes it last
            return True
        try:
            os.link(tmp, dst)  # atomic, and fails if dst exists
        except OSError:  # it exists, or this file system has no hard links: Prefect migrates a new one itself
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def seed_prefect_database(db: Path) -> bool:
    """Make `db` a copy of the migrated empty template when it does not exist yet (True), migrating
    the template first when this Prefect version has none. False when `db` exists already, or was
    made by another process meanwhile (two first runs of one work dir at once)."""
    db = Path(db)
    if db.exists():
        return False
    template = template_path()
    if not template.exists():
        with tempfile.TemporaryDirectory(prefix="trlm-prefect-db-") as scratch:
            fresh = Path(scratch) / "prefect.db"
            _migrate(fresh)
            try:
                _copy(fresh, template)
            except OSError:  # no cache to keep it in (a read-only home): this work dir still gets it
                return _copy(fresh, db, keep_existing=True)
    return _copy(template, db, keep_existing=True)

