"""Leftovers of killed processes are removed by the next run, never while their writer is alive;
concurrent writers of one file, link or directory never clash; credentials are masked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trlm.artifacts import (
    atomic_directory,
    atomic_file,
    atomic_symlink,
    atomic_write_text,
    discard,
    hash_directory,
    mask_secrets,
    mask_uri,
    read_fingerprint,
    remove_leftovers,
    remove_stale_temporaries,
    write_fingerprint,
)


def _writer(code: str) -> tuple[subprocess.Popen, Path]:
    """A live process that is in the middle of writing a temporary; returns it and the temporary."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, "the writer did not start"
    return proc, Path(line)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


def test_a_live_writers_temporary_stays_a_killed_ones_goes(tmp_path):
    run_dir = tmp_path / "mlartifacts" / "1" / "abc" / "artifacts"
    run_dir.mkdir(parents=True)
    proc, tmp = _writer(f"""
        import time
        from trlm.artifacts import atomic_directory
        with atomic_directory({str(run_dir / 'output')!r}) as tmp:
            (tmp / "part.bin").write_bytes(b"x" * 10)
            print(tmp, flush=True)
            time.sleep(120)
    """)
    try:
        assert tmp.name.startswith(".tmp-output-") and tmp.is_dir()
        assert remove_leftovers(tmp_path, min_age_s=0) == []  # its writer holds the lock
        remove_stale_temporaries(run_dir)  # the in-directory variant respects the lock too
        assert tmp.is_dir()
    finally:
        _kill(proc)
    assert remove_leftovers(tmp_path, min_age_s=0) == [tmp]  # kill -9: the OS dropped the lock
    assert not tmp.exists() and run_dir.is_dir()


def test_a_live_file_writer_keeps_its_temporary(tmp_path):
    proc, tmp = _writer(f"""
        import time
        from trlm.artifacts import atomic_file
        with atomic_file({str(tmp_path / 'samples.jsonl')!r}) as f:
            f.write("half")
            f.flush()
            import pathlib
            print(next(p for p in pathlib.Path({str(tmp_path)!r}).iterdir() if p.name.startswith(".tmp-")), flush=True)
            time.sleep(120)
    """)
    try:
        assert remove_leftovers(tmp_path, min_age_s=0) == [] and tmp.is_file()
    finally:
        _kill(proc)
    assert remove_leftovers(tmp_path, min_age_s=0) == [tmp]
    assert not (tmp_path / "samples.jsonl").exists()


def test_every_leftover_kind_anywhere_under_the_root(tmp_path):
    base = tmp_path / "base"
    (base / ".tmp-0123456789abcdef-1a2b3c4d" / "sub").mkdir(parents=True)
    (base / ".tmp-0123456789abcdef-1a2b3c4d" / "sub" / "model.safetensors").write_bytes(b"w")
    (base / "0123456789abcdef").mkdir()
    (base / "0123456789abcdef" / "config.json").write_text("{}")
    out = tmp_path / "mlartifacts" / "1" / "run" / "artifacts" / "output"
    out.mkdir(parents=True)
    (out / ".old-checkpoints-9f8e7d6c" / "step-000004").mkdir(parents=True)  # a finish step killed while deleting
    (out / ".fingerprint.json.0a1b2c3d4e5f").write_text("{")  # legacy temporary name
    (out / ".tmp-reference_logps.pt").write_bytes(b"r")
    (out.parent / ".tmp-output-deadbeef").mkdir()
    (tmp_path / "hf_mirror").mkdir()
    os.symlink("/nonexistent", tmp_path / "hf_mirror" / ".tmp-test.jsonl-12345678")
    (out / "metrics.json").write_text("{}")
    old = time.time() - 3600
    young = out / ".tmp-being-written"
    young.write_text("fresh")
    for p in [base / ".tmp-0123456789abcdef-1a2b3c4d", out / ".fingerprint.json.0a1b2c3d4e5f", out / ".tmp-reference_logps.pt",
              out.parent / ".tmp-output-deadbeef", tmp_path / "hf_mirror" / ".tmp-test.jsonl-12345678"]:
        os.utime(p, (old, old), follow_symlinks=False)
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == sorted([
        ".tmp-0123456789abcdef-1a2b3c4d", ".old-checkpoints-9f8e7d6c", ".fingerprint.json.0a1b2c3d4e5f",
        ".tmp-reference_logps.pt", ".tmp-output-deadbeef", ".tmp-test.jsonl-12345678",
    ])
    # content stays; a temporary changed in the last `min_age_s` may be a writer that holds no lock
    assert (base / "0123456789abcdef" / "config.json").is_file() and (out / "metrics.json").is_file()
    assert young.is_file()
    assert remove_leftovers(tmp_path / "missing") == []


def test_leftovers_are_never_content(tmp_path):
    d = tmp_path / "artifact"
    d.mkdir()
    (d / "a.txt").write_text("a")
    fp = write_fingerprint(d)
    (d / ".tmp-b.txt-12345678").write_text("half")
    (d / ".old-model-12345678").mkdir()
    (d / ".old-model-12345678" / "w.bin").write_bytes(b"w")
    assert hash_directory(d) == {"a.txt": hash_directory(d)["a.txt"]}
    assert write_fingerprint(d) == fp


def test_atomic_directory_publishes_over_a_directory_that_appeared_meanwhile(tmp_path):
    final = tmp_path / "artifact"
    with atomic_directory(final) as tmp:
        (tmp / "v.txt").write_text("mine")
        final.mkdir()  # another process published first: a plain rename would fail "Directory not empty"
        (final / "v.txt").write_text("theirs")
    assert (final / "v.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_file_symlink_and_text(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    with atomic_file(tmp_path / "a.txt") as f:
        f.write("two")
    assert (tmp_path / "a.txt").read_text() == "two"
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "a.txt") as f:
            f.write("three")
            raise RuntimeError
    assert (tmp_path / "a.txt").read_text() == "two"
    with atomic_file(tmp_path / "b.bin", binary=True) as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    (tmp_path / "b.bin").unlink()
    atomic_symlink(tmp_path / "a.txt", tmp_path / "l" / "link")
    atomic_symlink(tmp_path / "a.txt", tmp_path / "l" / "link")  # idempotent
    atomic_symlink(tmp_path / "b.txt", tmp_path / "l" / "link")  # re-pointed in one rename
    assert os.readlink(tmp_path / "l" / "link") == str(tmp_path / "b.txt")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "l", "link"]


def test_base_model_removes_leftovers_before_materializing(tiny_model_dir, tmp_path):
    from trlm.base_model import materialize_base_model
    from trlm.recipe import BaseModelConfig

    stale = tmp_path / "base" / ".tmp-0000000000000000-deadbeef"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    os.utime(stale, (time.time() - 3600,) * 2)
    out = materialize_base_model(BaseModelConfig(source=str(tiny_model_dir)), tmp_path)
    assert read_fingerprint(out) and not stale.exists()
    assert [p.name for p in (tmp_path / "base").iterdir()] == [out.name]


@pytest.mark.parametrize("uri,masked", [
    ("https://user:s3cr3t-token@mlflow.example.com/api", "https://user:***@mlflow.example.com/api"),
    ("https://ghp_abcdef@host:8443/x", "https://***@host:8443/x"),
    ("postgresql+psycopg2://trlm:pw@db:5432/mlflow?sslmode=require", "postgresql+psycopg2://trlm:***@db:5432/mlflow?sslmode=require"),
    ("https://host/path?token=abc&run=1&access_token=x&api_key=k&sig=zz", "https://host/path?token=***&run=1&access_token=***&api_key=***&sig=***"),
    ("https://host/p#access_token=abc", "https://host/p#access_token=***"),
    ("sqlite:////home/u/.trlm/mlflow.db", "sqlite:////home/u/.trlm/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("databricks", "databricks"),
    ("", ""),
])
def test_mask_uri(uri, masked):
    assert mask_uri(uri) == masked
    assert "s3cr3t" not in mask_uri(uri) and "pw@" not in mask_uri(uri)


def test_mask_secrets_in_free_text():
    text = "cannot reach https://bob:hunter2@mlflow.internal/api (status 401); retried http://127.0.0.1:5000/x?access_token=zzz."
    out = mask_secrets(text)
    assert "hunter2" not in out and "zzz" not in out
    assert "https://bob:***@mlflow.internal/api (status 401)" in out and "http://127.0.0.1:5000/x?access_token=***." in out


def test_discard_leaves_only_garbage_by_name(tmp_path, monkeypatch):
    out = tmp_path / "output"
    (out / "checkpoints" / "step-000004").mkdir(parents=True)
    (out / "checkpoints" / "step-000004" / "model.safetensors").write_bytes(b"w" * 100)
    # a kill during the deletion: the rename happened, the rmtree did not finish
    import trlm.artifacts as artifacts

    monkeypatch.setattr(artifacts.shutil, "rmtree", lambda *a, **k: None)
    discard(out / "checkpoints")
    monkeypatch.undo()
    assert not (out / "checkpoints").exists()  # never half-deleted under its own name
    (leftover,) = out.iterdir()
    assert leftover.name.startswith(".old-checkpoints-")
    assert remove_leftovers(tmp_path) == [leftover] and list(out.iterdir()) == []
    discard(out / "missing")  # no error
