"""A new work dir's Prefect database is a copy of an empty one, migrated once per Prefect version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import trlm.prefect_db as prefect_db
from trlm.prefect_db import seed_prefect_database, template_path


def _revision(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("select version_num from alembic_version").fetchall()


def _sqlite_head() -> str:
    import prefect.server.database as database
    from alembic.script import ScriptDirectory

    root = Path(database.__file__).parent / "_migrations"
    heads = ScriptDirectory(str(root), version_locations=[str(root / "versions" / "sqlite")]).get_heads()
    assert len(heads) == 1, heads
    return heads[0]


def test_the_template_is_prefects_own_migrations_at_their_newest_revision(tmp_path):
    """The real template (the user cache's, made by `prefect server database upgrade` if missing):
    a server finds its database at the head revision and runs no migration."""
    db = tmp_path / "work" / "prefect" / "prefect.db"
    assert seed_prefect_database(db)
    assert template_path().exists()
    assert _revision(db) == [(_sqlite_head(),)]
    with sqlite3.connect(db) as con:
        tables = {row[0] for row in con.execute("select name from sqlite_master where type = 'table'")}
        assert {"flow", "flow_run", "task_run", "deployment", "work_pool"} <= tables
        assert con.execute("select count(*) from flow_run").fetchone() == (0,)


@pytest.fixture()
def counted_migrations(tmp_path, monkeypatch):
    """A cache of its own, and a stand-in for Prefect's migrations that counts its calls."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []

    def migrate(db: Path) -> None:
        calls.append(db)
        with sqlite3.connect(db) as con:
            con.execute("create table alembic_version (version_num text)")
            con.execute("insert into alembic_version values ('head-of-this-version')")

    monkeypatch.setattr(prefect_db, "_migrate", migrate)
    return calls


def test_migrations_run_once_then_every_new_database_is_a_copy(tmp_path, counted_migrations):
    first, second = tmp_path / "a" / "prefect.db", tmp_path / "b" / "prefect.db"
    assert seed_prefect_database(first) and seed_prefect_database(second)
    assert len(counted_migrations) == 1
    assert template_path() == tmp_path / "cache" / "trlm" / f"prefect-{prefect_db.version('prefect')}-empty.db"
    assert _revision(first) == _revision(second) == [("head-of-this-version",)]
    assert not list(template_path().parent.glob("*.tmp"))  # written to a temporary file, then renamed


def test_an_existing_database_is_never_replaced(tmp_path, counted_migrations):
    db = tmp_path / "prefect.db"
    with sqlite3.connect(db) as con:
        con.execute("create table kept (x int)")
    assert not seed_prefect_database(db)
    with sqlite3.connect(db) as con:
        assert con.execute("select name from sqlite_master").fetchall() == [("kept",)]
    assert counted_migrations == []


def test_without_a_writable_cache_the_work_dir_still_gets_a_migrated_database(tmp_path, counted_migrations, monkeypatch):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    db = tmp_path / "work" / "prefect.db"
    assert seed_prefect_database(db)
    assert _revision(db) == [("head-of-this-version",)]


def test_only_the_work_dirs_own_database_is_seeded(tmp_path, counted_migrations, monkeypatch):
    from trlm.servers import PREFECT_DIR, prefect_database_url, seed_own_prefect_database

    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "postgresql+asyncpg://u@127.0.0.1:1/prefect")
    seed_own_prefect_database(tmp_path)
    assert not (tmp_path / PREFECT_DIR / "prefect.db").exists()
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", prefect_database_url(tmp_path))
    seed_own_prefect_database(tmp_path)
    assert _revision(tmp_path / PREFECT_DIR / "prefect.db") == [("head-of-this-version",)]


def test_a_database_made_meanwhile_by_another_process_is_kept(tmp_path, counted_migrations, monkeypatch):
    """Two first runs of one work dir at once: the second never replaces the file the first one's
    server may have open already."""
    db = tmp_path / "work" / "prefect.db"
    real_copy = prefect_db._copy

    def other_process_first(src, dst, keep_existing=False):
        if dst == db:
            db.parent.mkdir(parents=True, exist_ok=True)
            with sqlite3.connect(db) as con:
                con.execute("create table theirs (x int)")
        return real_copy(src, dst, keep_existing)

    monkeypatch.setattr(prefect_db, "_copy", other_process_first)
    assert not seed_prefect_database(db)
    with sqlite3.connect(db) as con:
        assert con.execute("select name from sqlite_master").fetchall() == [("theirs",)]
    assert [p.name for p in db.parent.iterdir()] == ["prefect.db"], "no temporary file left"


def test_a_first_run_seeds_beside_its_imports_and_reports_a_failure_once(tmp_path, counted_migrations, monkeypatch):
    """`trlm run` starts the seed in a thread and goes on (the migrations take 13 s on a first run); the
    waiter returns when the database is there, and raises the seed's error once. Nothing to seed when a
    server is set."""
    import threading

    import trlm.servers as servers

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", servers.prefect_database_url(tmp_path))
    release = threading.Event()
    real = prefect_db._migrate
    monkeypatch.setattr(prefect_db, "_migrate", lambda db: release.wait(10) and real(db))
    wait = servers.seed_in_background(tmp_path)
    db = tmp_path / servers.PREFECT_DIR / "prefect.db"
    assert not db.exists()  # still migrating: the caller went on
    release.set()
    wait()
    assert _revision(db) == [("head-of-this-version",)] and counted_migrations

    monkeypatch.setattr(servers, "seed_own_prefect_database", lambda work_dir: 1 / 0)
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", servers.prefect_database_url(tmp_path / "other"))
    wait = servers.seed_in_background(tmp_path / "other")
    with pytest.raises(ZeroDivisionError):
        wait()
    wait()  # reported once
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    servers.seed_in_background(tmp_path / "third")()
    assert not (tmp_path / "third").exists()
