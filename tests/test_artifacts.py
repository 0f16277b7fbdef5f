"""Fingerprints, stage keys and crash-safe directories (`trlm.artifacts`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trlm.artifacts import (
    FINGERPRINT_FILE,
    atomic_directory,
    hash_directory,
    hash_file,
    hash_json,
    part_fingerprint,
    read_fingerprint,
    remove_stale_temporaries,
    stage_key,
    verify_fingerprint,
    write_fingerprint,
)


def make_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)))
    return root


# --- hashing -----------------------------------------------------------------------------------


def test_hash_file_is_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "x.bin"
    data = os.urandom(3 << 20)  # several read chunks
    path.write_bytes(data)
    assert hash_file(path) == hashlib.sha256(data).hexdigest()


def test_hash_json_ignores_key_order_but_not_values():
    assert hash_json({"a": 1, "b": {"c": [1, 2], "d": None}}) == hash_json({"b": {"d": None, "c": [1, 2]}, "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})
    assert hash_json({"a": [1, 2]}) != hash_json({"a": [2, 1]})
    assert hash_json({"lr": 1e-4}) != hash_json({"lr": 1e-5})


def test_hash_directory_is_relative_and_skips_fingerprint_and_excludes(tmp_path):
    make_tree(tmp_path / "d")
    (tmp_path / "d" / "checkpoints").mkdir()
    (tmp_path / "d" / "checkpoints" / "step-1.bin").write_bytes(b"state")
    (tmp_path / "d" / FINGERPRINT_FILE).write_text("{}")
    files = hash_directory(tmp_path / "d", exclude=("checkpoints",))
    assert files == {"a.txt": hashlib.sha256(b"alpha\n").hexdigest(), "sub/b.bin": hashlib.sha256(bytes(range(256))).hexdigest()}
    assert "checkpoints/step-1.bin" in hash_directory(tmp_path / "d")


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_round_trip_and_is_location_independent(tmp_path):
    first = make_tree(tmp_path / "one")
    fp = write_fingerprint(first, meta={"note": "x"})
    record = json.loads((first / FINGERPRINT_FILE).read_text())
    assert record["fingerprint"] == fp == read_fingerprint(first)
    assert set(record["files"]) == {"a.txt", "sub/b.bin"}
    assert record["meta"] == {"note": "x"}
    assert verify_fingerprint(first)
    # same content elsewhere (and other meta): same fingerprint
    second = make_tree(tmp_path / "elsewhere" / "two")
    assert write_fingerprint(second, meta={"note": "y"}) == fp
    # no temporary files left next to it
    assert sorted(p.name for p in first.iterdir()) == ["a.txt", FINGERPRINT_FILE, "sub"]


def test_fingerprint_changes_with_content_and_names(tmp_path):
    base = write_fingerprint(make_tree(tmp_path / "a"))
    edited = make_tree(tmp_path / "b")
    (edited / "a.txt").write_text("alpha!\n")
    renamed = make_tree(tmp_path / "c")
    (renamed / "a.txt").rename(renamed / "z.txt")
    assert len({base, write_fingerprint(edited), write_fingerprint(renamed)}) == 3


def test_checkpoints_do_not_change_the_fingerprint(tmp_path):
    d = make_tree(tmp_path / "d")
    fp = write_fingerprint(d)
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "step-5").write_bytes(b"resumable state")
    assert write_fingerprint(d) == fp
    assert verify_fingerprint(d)


def test_read_fingerprint_none_without_or_with_broken_file(tmp_path):
    d = make_tree(tmp_path / "d")
    assert read_fingerprint(d) is None
    assert read_fingerprint(tmp_path / "does-not-exist") is None
    for broken in ("{not json", "[1, 2]", '{"files": {}}', '{"fingerprint": 5}'):
        (d / FINGERPRINT_FILE).write_text(broken)
        assert read_fingerprint(d) is None, broken
        assert verify_fingerprint(d) is False, broken


def test_verify_fingerprint_detects_edits(tmp_path):
    d = make_tree(tmp_path / "d")
    write_fingerprint(d)
    assert verify_fingerprint(d)
    (d / "sub" / "b.bin").write_bytes(bytes(range(255)))  # truncated by one byte
    assert not verify_fingerprint(d)

    d2 = make_tree(tmp_path / "d2")
    write_fingerprint(d2)
    (d2 / "new.txt").write_text("added later")
    assert not verify_fingerprint(d2)

    d3 = make_tree(tmp_path / "d3")
    write_fingerprint(d3)
    (d3 / "a.txt").unlink()
    assert not verify_fingerprint(d3)
    assert not verify_fingerprint(tmp_path / "no-fingerprint-here")


def test_verify_fingerprint_detects_a_forged_record(tmp_path):
    """Editing a file AND its hash in fingerprint.json still fails: the fingerprint covers the list."""
    d = make_tree(tmp_path / "d")
    write_fingerprint(d)
    (d / "a.txt").write_text("tampered\n")
    record = json.loads((d / FINGERPRINT_FILE).read_text())
    record["files"]["a.txt"] = hash_file(d / "a.txt")
    (d / FINGERPRINT_FILE).write_text(json.dumps(record))
    assert not verify_fingerprint(d)


def test_verify_uses_the_recorded_excludes(tmp_path):
    d = make_tree(tmp_path / "d")
    (d / "cache").mkdir()
    (d / "cache" / "x").write_text("1")
    write_fingerprint(d, exclude=("cache",))
    (d / "cache" / "x").write_text("2")
    assert verify_fingerprint(d)
    (d / "a.txt").write_text("changed")
    assert not verify_fingerprint(d)


# --- stage keys --------------------------------------------------------------------------------

KEY_ARGS = ("sft-think", "code-v1", {"train": {"learning_rate": 3e-4, "epochs": 1.0}, "loss": "nll"}, {"model": "m" * 64, "data": "d" * 64})


def test_stage_key_depends_on_every_part():
    key = stage_key(*KEY_ARGS)
    assert len(key) == 64 and int(key, 16) >= 0
    stage, code, config, inputs = KEY_ARGS
    assert stage_key(stage, code, {"loss": "nll", "train": {"epochs": 1.0, "learning_rate": 3e-4}}, dict(reversed(list(inputs.items())))) == key
    variants = [
        stage_key("dpo", code, config, inputs),
        stage_key(stage, "code-v2", config, inputs),
        stage_key(stage, code, {**config, "loss": "dft"}, inputs),
        stage_key(stage, code, config, {**inputs, "data": "e" * 64}),
    ]
    assert key not in variants and len(set(variants)) == 4


def test_stage_key_is_stable_across_processes():
    code = (
        "import json, sys; from trlm.artifacts import stage_key; "
        "a = json.loads(sys.argv[1]); print(stage_key(a[0], a[1], a[2], a[3]))"
    )
    expected = stage_key(*KEY_ARGS)
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code, json.dumps(KEY_ARGS)], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == expected


# --- atomic directories ------------------------------------------------------------------------


def test_atomic_directory_publishes_on_success(tmp_path):
    final = tmp_path / "out" / "artifact"
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".tmp-")
        (tmp / "x.txt").write_text("done")
        assert not final.exists()  # nothing visible until the body finished
    assert (final / "x.txt").read_text() == "done"
    assert [p.name for p in final.parent.iterdir()] == ["artifact"]


def test_atomic_directory_leaves_nothing_when_the_body_raises(tmp_path):
    final = tmp_path / "artifact"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as tmp:
            (tmp / "half.txt").write_text("partial")
            write_fingerprint(tmp)
            raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    assert read_fingerprint(final) is None


def test_atomic_directory_replaces_and_keeps_old_on_failure(tmp_path):
    final = tmp_path / "artifact"
    with atomic_directory(final) as tmp:
        (tmp / "v.txt").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as tmp:
            (tmp / "v.txt").write_text("2")
            raise KeyboardInterrupt
    assert (final / "v.txt").read_text() == "1"  # the complete old version survives
    with atomic_directory(final) as tmp:
        (tmp / "v.txt").write_text("3")
    assert (final / "v.txt").read_text() == "3"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".tmp-x-1234").mkdir()
    (tmp_path / ".old-x-5678").mkdir()
    (tmp_path / ".tmp-file").write_text("x")
    (tmp_path / "keep").mkdir()
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]
    remove_stale_temporaries(tmp_path / "missing")  # no error


def test_part_fingerprint_is_the_sub_directory_alone(tmp_path):
    d = tmp_path / "stage"
    (d / "model").mkdir(parents=True)
    (d / "model" / "weights.bin").write_bytes(b"w")
    (d / "model" / "config.json").write_text("{}")
    (d / "metrics.json").write_text('{"runtime_s": 1.0}')
    write_fingerprint(d)
    alone = tmp_path / "alone"
    shutil.copytree(d / "model", alone)
    assert part_fingerprint(d, "model") == write_fingerprint(alone)
    # timings elsewhere in the stage directory do not change the model's fingerprint
    model_fp, stage_fp = part_fingerprint(d, "model"), read_fingerprint(d)
    (d / "metrics.json").write_text('{"runtime_s": 2.0}')
    assert write_fingerprint(d) != stage_fp and part_fingerprint(d, "model") == model_fp
    (d / "model" / "weights.bin").write_bytes(b"W")
    write_fingerprint(d)
    assert part_fingerprint(d, "model") != model_fp
    assert part_fingerprint(d, "missing") is None and part_fingerprint(tmp_path / "nowhere", "model") is None
