"""Declarative data mixtures (`data_specs/*.yaml`): where rows come from and how they become canonical.

A spec lists sources. Each source is a local file (JSONL, JSONL.gz or parquet, relative to the data
root) or a hub dataset (id, config, split). It takes N rows, either the first N (as the published
builder did with `itertools.islice`) or a seeded sample, maps its columns onto one of two canonical
shapes and may apply one named transform:

- `sft`:        {"messages": [{"role", "content"}, ...]}
- `preference`: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
- `prompt_answer`: {"prompt": [messages], "answer": str} (online RL: the reference a reward checks)

A local file must stay inside the data root (no `../` out of it, no absolute path, no symlink out
of it) unless the recipe sets `allow_outside_data_root`. A source that holds fewer rows than its
`rows` is an error unless it sets `allow_fewer_rows`; an empty one always is (naming the file).

The blend is concatenated and shuffled with the spec's seed. Every row keeps its origin (`_source`,
`_row`: file and 1-based line number) so that validation errors can name file, row and field.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import random
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trlm.artifacts import hash_file, hash_json
from trlm.recipe import Bool, Int, RecipeError, load_yaml

log = logging.getLogger(__name__)


class HubSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None


class SourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    path: str | None = Field(None, description="local file relative to the data root")
    hub: HubSource | None = None
    rows: Annotated[Int, Field(gt=0)] | None = Field(None, description="rows to take; None = all")
    sample: Literal["first", "seeded"] = "first"
    columns: dict[str, str] = Field(default_factory=dict, description="canonical name -> source column")
    transform: Literal["gsm8k_think", "hh_rlhf_pairs", "conversation_pairs", "gsm8k_prompt_answer"] | None = None
    allow_fewer_rows: Bool = Field(False, description="accept a source holding fewer rows than `rows` (reported either way)")

    @model_validator(mode="after")
    def _one_location(self) -> "SourceSpec":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` or `hub`")
        return self


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: Literal["sft", "preference", "prompt_answer"]
    description: str = ""
    shuffle_seed: Int = 42
    sources: list[SourceSpec] = Field(min_length=1)

    def check_sources(self, data_root: Path, allow_outside_data_root: bool = False, origin: str | None = None) -> None:
        """Every local source is a file; a missing data root is named as the root, not as its first file.
        `origin`: where the data root was set (`--set`, `TRLM_DATA_ROOT`, `recipe`), for the message."""
        if any(src.path is not None for src in self.sources) and not Path(data_root).is_dir():
            raise RecipeError(f"the data root {data_root}{f' (from {origin})' if origin else ''} is not a directory; data spec "
                              f"{self.name!r} reads its local sources from it. Set it with --set data_root=DIR, TRLM_DATA_ROOT or the recipe's data_root")
        for src in self.sources:
            if src.path is not None and not source_path(self.name, src, data_root, allow_outside_data_root).is_file():
                raise RecipeError(f"data spec {self.name!r}, source {src.name!r}: file not found: {data_root / src.path}")

    def source_fingerprints(self, data_root: Path, allow_outside_data_root: bool = False) -> dict[str, str]:
        """Bytes of local files; id/config/split/revision of hub sources (their rows are hashed after download)."""
        out = {}
        for src in self.sources:
            if src.path is not None:
                out[src.name] = hash_file(source_path(self.name, src, data_root, allow_outside_data_root))
            else:
                out[src.name] = hash_json(src.hub.model_dump())
        return out


def source_path(spec_name: str, src: SourceSpec, data_root: Path, allow_outside_data_root: bool = False) -> Path:
    """The file of a local source, which must lie inside the data root after resolving `..` and
    symlinks: otherwise a spec could read (and fingerprint) any file on the machine, and the outputs
    would depend on data the data root does not hold. Absolute paths count as outside."""
    path = data_root / src.path
    if allow_outside_data_root:
        return path
    root, resolved = data_root.resolve(), path.resolve()
    if Path(src.path).is_absolute() or not resolved.is_relative_to(root):
        what = "is an absolute path" if Path(src.path).is_absolute() else "leaves the data root"
        raise RecipeError(
            f"data spec {spec_name!r}, source {src.name!r}: path {src.path!r} {what} (resolves to {resolved}, data root {root}); "
            "set allow_outside_data_root: true in the recipe to allow it"
        )
    return path


def load_data_spec(name_or_path: str) -> DataSpec:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        candidate = resources.files("trlm.data_specs") / f"{name_or_path.removesuffix('.yaml')}.yaml"
        if not candidate.is_file():
            raise RecipeError(f"data spec not found: {name_or_path!r} (neither a file nor a spec under data_specs/)")
        path = Path(str(candidate))
    try:
        raw = load_yaml(path.read_text())
        return DataSpec.model_validate(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"data spec {path} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise RecipeError(f"invalid data spec {path}: {details}") from None


# --- reading sources ---------------------------------------------------------------------------


class RowError(ValueError):
    """A bad input row; the message names file, row and field.

    `kind` is a short, stable category of the problem ("unknown role", "missing column", ...) under
    which dropped rows are counted; `reason` is the full explanation. It defaults to `reason`.
    """

    def __init__(self, source: str, row: int, field: str, reason: str, kind: str | None = None):
        self.source, self.row, self.field, self.reason = source, row, field, reason
        self.kind = kind or reason
        super().__init__(f"{source}: row {row}: field {field!r}: {reason}")

    def __reduce__(self):  # picklable (Prefect and multiprocessing move exceptions between processes)
        return (type(self), (self.source, self.row, self.field, self.reason, self.kind))


def _iter_local(path: Path, label: str | None = None) -> Iterator[tuple[int, dict | RowError]]:
    """(1-based row number, record) for JSONL/JSONL.gz/parquet; undecodable rows come back as RowError.

    JSONL is read as bytes and decoded line by line, so one bad line names itself instead of
    aborting the whole file inside a library. Errors name the file as `label` (the path relative to
    the data root, as every other row error does: reports and fingerprints never hold the root).
    """
    label = str(path) if label is None else label
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, rec
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a BOM may open the file
                rec = json.loads(text)
            except UnicodeDecodeError as exc:
                yield i, RowError(label, i, "<line>", f"undecodable text (not UTF-8 at byte {exc.start})", "undecodable text")
                continue
            except json.JSONDecodeError as exc:
                yield i, RowError(label, i, "<line>", f"not valid JSON ({exc.msg})", "not valid JSON")
                continue
            if not isinstance(rec, dict):
                yield i, RowError(label, i, "<line>", "a row must be a JSON object", "not a JSON object")
                continue
            yield i, rec


def _iter_hub(src: HubSource) -> Iterator[tuple[int, dict]]:
    from datasets import load_dataset

    ds = load_dataset(src.id, src.config, split=src.split, revision=src.revision, streaming=True)
    for i, rec in enumerate(ds, start=1):
        yield i, rec


def read_source(src: SourceSpec, data_root: Path, seed: int, *, spec_name: str = "?", allow_outside_data_root: bool = False) -> tuple[str, list[tuple[int, dict | RowError]]]:
    """The selected raw rows of one source: first N, or a seeded sample of N (in file order)."""
    if src.path is not None:
        label = src.path
        rows = _iter_local(source_path(spec_name, src, data_root, allow_outside_data_root), label)
    else:
        label = f"hub:{src.hub.id}/{src.hub.config or ''}/{src.hub.split}"
        rows = _iter_hub(src.hub)
    if src.rows is None:
        return label, list(rows)
    if src.sample == "first":
        return label, list(itertools.islice(rows, src.rows))
    every = list(rows)
    chosen = sorted(random.Random(f"{seed}:{src.name}").sample(range(len(every)), min(src.rows, len(every))))
    return label, [every[i] for i in chosen]


# --- transforms into canonical shapes ----------------------------------------------------------

_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_think(rec: dict) -> dict:
    """GSM8K answer "steps <<calc>> ...\\n#### 72" -> assistant "<think>\\nsteps\\n</think>\\n#### 72".

    The calculator annotations are removed (they are tool traces, not reasoning). The final answer
    keeps GSM8K's "#### N" form, which lm-eval's strict-match filter reads.
    """
    msgs = [dict(m) for m in rec["messages"]]
    answer = msgs[-1]["content"]
    if "####" not in answer:
        raise ValueError("assistant answer has no '#### <final answer>' line")
    steps, final = answer.rsplit("####", 1)
    steps = _CALC.sub("", steps).strip()
    msgs[-1]["content"] = f"<think>\n{steps}\n</think>\n#### {final.strip()}"
    return {"messages": msgs}


def gsm8k_prompt_answer(rec: dict) -> dict:
    """GSM8K {"prompt": question, "answer": "steps\n#### 1,234"} -> a user turn and the reference
    "1234": the number after `####`, thousands separators removed."""
    answer = str(rec["answer"])
    if "####" not in answer:
        raise ValueError("answer has no '#### <final answer>' line")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not re.fullmatch(r"-?\d+(\.\d+)?", final):
        raise ValueError(f"the final answer {final!r} is not a number")
    question = rec["prompt"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("empty question")
    return {"prompt": [{"role": "user", "content": question}], "answer": final}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_messages(text: str) -> list[dict]:
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> dict:
    """Longest common message prefix = prompt; the rest are the two completions."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def hh_rlhf_pairs(rec: dict) -> dict:
    """hh-rlhf "\\n\\nHuman: ... \\n\\nAssistant: ..." strings -> shared prompt + one assistant turn each."""
    return _split_shared_prompt(_hh_messages(rec["chosen"]), _hh_messages(rec["rejected"]))


def conversation_pairs(rec: dict) -> dict:
    """chosen/rejected conversations sharing the prompt turns -> shared prompt + completions."""
    return _split_shared_prompt(list(rec["chosen"]), list(rec["rejected"]))


TRANSFORMS: dict[str, Callable[[dict], dict]] = {
    "gsm8k_think": gsm8k_think,
    "hh_rlhf_pairs": hh_rlhf_pairs,
    "conversation_pairs": conversation_pairs,
    "gsm8k_prompt_answer": gsm8k_prompt_answer,
}
CANONICAL_COLUMNS = {"sft": ("messages",), "preference": ("prompt", "chosen", "rejected"), "prompt_answer": ("prompt", "answer")}


def canonical_row(spec: DataSpec, src: SourceSpec, label: str, row: int, rec: dict) -> dict:
    """Map columns, apply the transform; raise RowError naming file, row and field."""
    needed = CANONICAL_COLUMNS[spec.kind]
    if src.transform in ("hh_rlhf_pairs", "conversation_pairs"):
        needed = ("chosen", "rejected")
    out: dict[str, Any] = {}
    for col in needed:
        source_col = src.columns.get(col, col)
        if source_col not in rec:
            raise RowError(label, row, source_col, "missing column", "missing column")
        out[col] = rec[source_col]
    if src.transform:
        try:
            out = TRANSFORMS[src.transform](out)
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            raise RowError(label, row, ",".join(needed), f"transform {src.transform} failed: {exc}", f"transform {src.transform} failed") from None
    out["_source"] = label
    out["_row"] = row
    return out


def _check_row_count(spec: DataSpec, src: SourceSpec, label: str, read: int) -> None:
    """A source with no rows is always an error; fewer rows than `rows` is one unless the source allows it."""
    where = f"data spec {spec.name!r}, source {src.name!r}: {label}"
    if read == 0:
        raise RecipeError(f"{where} has no rows (the file is empty or holds only blank lines)")
    if src.rows is not None and read < src.rows:
        if not src.allow_fewer_rows:
            raise RecipeError(f"{where} has {read} rows, the spec asks for {src.rows} (set allow_fewer_rows: true on the source to accept fewer)")
        log.warning("%s has %d rows, the spec asks for %d; all of them are used (allow_fewer_rows)", where, read, src.rows)
    else:
        log.info("%s: %d rows read", where, read)


def resolve_rows(spec: DataSpec, data_root: Path, *, allow_outside_data_root: bool = False, report: dict | None = None) -> Iterator[dict | RowError]:
    """Every selected row of every source in canonical shape, shuffled with the spec's seed.

    Bad rows come back as RowError objects (not raised) so the caller's policy decides. `report`, if
    given, receives {source name: {file, requested, read}} (rows read count bad lines, not blank ones).
    """
    rows: list[dict | RowError] = []
    for src in spec.sources:
        label, raw = read_source(src, data_root, spec.shuffle_seed, spec_name=spec.name, allow_outside_data_root=allow_outside_data_root)
        _check_row_count(spec, src, label, len(raw))
        if report is not None:
            report[src.name] = {"file": label, "requested": src.rows, "read": len(raw)}
        for row, rec in raw:
            if isinstance(rec, RowError):
                rows.append(rec)
                continue
            try:
                rows.append(canonical_row(spec, src, label, row, rec))
            except RowError as err:
                rows.append(err)
    random.Random(spec.shuffle_seed).shuffle(rows)
    return iter(rows)
