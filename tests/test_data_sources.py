"""Data-spec sources: they stay inside the data root, a short source is an error unless allowed (and is
reported either way), an empty file is named. Every data root here is a tmp_path."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
import yaml

from trlm.artifacts import hash_file
from trlm.data_spec import load_data_spec, resolve_rows
from trlm.recipe import MixtureConfig, Recipe, RecipeError
from trlm.stages.data_prep import prepare_mixture

ROW = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
RECIPE = yaml.safe_load((Path(__file__).resolve().parents[1] / "trlm" / "recipes" / "offline-smoke.yaml").read_text())


def write_rows(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(ROW) + "\n" for _ in range(n)))
    return path


def make_spec(tmp_path: Path, path: str, **source):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "src-spec", "kind": "sft", "sources": [{"name": "s", "path": path, **source}]}))
    return load_data_spec(str(spec))


def refusals(spec, root: Path) -> list[str]:
    """The error of each entry point that resolves source paths; all must refuse."""
    messages = []
    for call in (lambda: spec.check_sources(root), lambda: spec.source_fingerprints(root), lambda: list(resolve_rows(spec, root))):
        with pytest.raises(RecipeError) as info:
            call()
        messages.append(str(info.value))
    return messages


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def outside(tmp_path) -> Path:
    return write_rows(tmp_path / "elsewhere" / "rows.jsonl", 2)


# --- sources stay inside the data root ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_source_outside_the_data_root_is_refused_unless_allowed(tmp_path, root, outside, kind):
    if kind == "dotdot":
        path = "../elsewhere/rows.jsonl"
    elif kind == "absolute":
        path = str(outside)
    else:
        (root / "link.jsonl").symlink_to(outside)
        path = "link.jsonl"
    spec = make_spec(tmp_path, path)
    for message in refusals(spec, root):
        assert "data spec 'src-spec', source 's'" in message and str(outside.resolve()) in message
        assert "allow_outside_data_root" in message
    # allowed: read and fingerprinted as any other source
    spec.check_sources(root, allow_outside_data_root=True)
    assert spec.source_fingerprints(root, allow_outside_data_root=True) == {"s": hash_file(outside)}
    assert len(list(resolve_rows(spec, root, allow_outside_data_root=True))) == 2


def test_absolute_path_inside_the_root_is_refused_too(tmp_path, root):
    """The spec schema says 'relative to the data root': an absolute path ties the spec to one machine."""
    inside = write_rows(root / "a" / "rows.jsonl", 1)
    assert all("absolute path" in m for m in refusals(make_spec(tmp_path, str(inside)), root))


@pytest.mark.parametrize("path", ["a/../b/rows.jsonl", "b/link.jsonl"])
def test_paths_that_stay_inside_are_fine(tmp_path, root, path):
    target = write_rows(root / "b" / "rows.jsonl", 2)
    (root / "b" / "link.jsonl").symlink_to(target)
    (root / "a").mkdir()
    spec = make_spec(tmp_path, path)
    spec.check_sources(root)
    assert spec.source_fingerprints(root) == {"s": hash_file(target)}
    assert len(list(resolve_rows(spec, root))) == 2


def test_the_recipe_field_defaults_to_refusing():
    assert Recipe.model_fields["allow_outside_data_root"].default is False


# --- short and empty sources ------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", ["first", "seeded"])
def test_fewer_rows_than_asked_is_an_error_naming_the_file(tmp_path, root, sample):
    write_rows(root / "x" / "three.jsonl", 3)
    spec = make_spec(tmp_path, "x/three.jsonl", rows=5, sample=sample)
    with pytest.raises(RecipeError) as info:
        list(resolve_rows(spec, root))
    message = str(info.value)
    assert "data spec 'src-spec', source 's': x/three.jsonl has 3 rows, the spec asks for 5" in message and "allow_fewer_rows" in message


@pytest.mark.parametrize("sample", ["first", "seeded"])
def test_fewer_rows_allowed_is_reported_and_logged(tmp_path, root, sample, caplog):
    write_rows(root / "x" / "three.jsonl", 3)
    spec = make_spec(tmp_path, "x/three.jsonl", rows=5, sample=sample, allow_fewer_rows=True)
    report: dict = {}
    with caplog.at_level(logging.WARNING, logger="trlm.data_spec"):
        rows = list(resolve_rows(spec, root, report=report))
    assert len(rows) == 3
    assert report == {"s": {"file": "x/three.jsonl", "requested": 5, "read": 3}}
    assert any("x/three.jsonl has 3 rows, the spec asks for 5" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("rows", "requested", "read"), [(2, 2, 2), (None, None, 3)])
def test_sources_with_enough_rows_are_reported(tmp_path, root, rows, requested, read):
    write_rows(root / "x" / "three.jsonl", 3)
    report: dict = {}
    list(resolve_rows(make_spec(tmp_path, "x/three.jsonl", **({"rows": rows} if rows else {})), root, report=report))
    assert report == {"s": {"file": "x/three.jsonl", "requested": requested, "read": read}}


# gzip's header holds the time unless mtime is given; that would make the test's id differ between
# xdist workers that collect in different seconds, and xdist then refuses to run at all.
@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.jsonl", b""), ("blank.jsonl", b"\n\n   \n\t\n"), ("empty.jsonl.gz", gzip.compress(b"", mtime=0))],
    ids=["empty", "blank", "empty-gz"],
)
@pytest.mark.parametrize("rows", [None, 4])
def test_empty_file_names_the_file(tmp_path, root, name, content, rows):
    (root / "x").mkdir()
    (root / "x" / name).write_bytes(content)
    spec = make_spec(tmp_path, f"x/{name}", **({"rows": rows, "allow_fewer_rows": True} if rows else {}))
    with pytest.raises(RecipeError) as info:
        list(resolve_rows(spec, root))
    assert f"data spec 'src-spec', source 's': x/{name} has no rows (the file is empty or holds only blank lines)" in str(info.value)


def test_stats_json_lists_every_source(tmp_path, root, tokenizer_dir):
    write_rows(root / "x" / "three.jsonl", 3)
    write_rows(root / "x" / "ten.jsonl", 10)
    spec = tmp_path / "spec.yaml"
    sources = [{"name": "short", "path": "x/three.jsonl", "rows": 5, "allow_fewer_rows": True}, {"name": "long", "path": "x/ten.jsonl", "rows": 4}]
    spec.write_text(yaml.safe_dump({"name": "src-spec", "kind": "sft", "sources": sources}))
    mixture = MixtureConfig.model_validate({**RECIPE["sft_general"]["data"], "spec": str(spec)})
    out = tmp_path / "out"
    summary = prepare_mixture("sft-general", mixture, data_root=root, base_model_dir=tokenizer_dir, policy="error", out=out, progress=False)
    expected = {"short": {"file": "x/three.jsonl", "requested": 5, "read": 3}, "long": {"file": "x/ten.jsonl", "requested": 4, "read": 4}}
    assert summary["sources"] == expected and json.loads((out / "stats.json").read_text())["sources"] == expected
    assert summary["rows_out"] == 7


def test_prepare_mixture_refuses_a_source_outside_the_root(tmp_path, root, outside, tokenizer_dir):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "src-spec", "kind": "sft", "sources": [{"name": "s", "path": "../elsewhere/rows.jsonl"}]}))
    mixture = MixtureConfig.model_validate({**RECIPE["sft_general"]["data"], "spec": str(spec)})
    kwargs = {"data_root": root, "base_model_dir": tokenizer_dir, "policy": "error", "progress": False}
    with pytest.raises(RecipeError, match="leaves the data root"):
        prepare_mixture("sft-general", mixture, out=tmp_path / "out1", **kwargs)
    summary = prepare_mixture("sft-general", mixture, out=tmp_path / "out2", allow_outside_data_root=True, **kwargs)
    assert summary["rows_out"] == 2 and summary["sources"]["s"]["file"] == "../elsewhere/rows.jsonl"


@pytest.mark.parametrize("name", ["sft-general", "sft-think", "dpo"])
def test_offline_specs_get_every_row_they_ask_for(shared_data, name):
    """The smoke recipe's specs need no allow_fewer_rows: every source holds the rows it asks for."""
    report: dict = {}
    list(resolve_rows(load_data_spec(f"offline/{name}"), shared_data, report=report))
    assert report and all(r["requested"] in (None, r["read"]) for r in report.values())
