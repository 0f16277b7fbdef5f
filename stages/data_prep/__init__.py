"""Stage `data-prep`: data specs -> validated, templated, tokenized, masked, truncated datasets.

For each training stage's mixture (`sft_general.data`, `sft_think.data`, `dpo.data` in the recipe):

1. resolve the spec (`data_specs/*.yaml`): read the sources, take N rows, map columns, transform
   (sources stay inside the data root; a short source is an error unless the spec allows it, and
   every source's rows requested/read are reported in stats.json);
2. validate every row (roles, empty turns, missing columns, undecodable text, chosen == rejected,
   a prompt alone longer than max_length, chat-control token text such as `<|im_end|>` inside a
   content); policy `error` stops before anything is written,
   `drop` drops the rows and counts and reports each one: never silently;
3. render the recipe's chat template exactly as given (the published one has whitespace quirks;
   they are part of what the model is trained on, so they are kept);
4. tokenize with the base tokenizer plus the mixture's special tokens (`<think>`, `</think>`);
5. build labels: `all` tokens (what the published recipe did) or `assistant` turns only, each
   including its closing `<|im_end|>`; preference data always trains on the completion only. Turns
   are located by position in the template's output, never by searching their text
   (stages/data_prep/chat_spans.py); a template that cannot locate them stops the stage under any policy;
6. truncate as configured (SFT keep_start/keep_end; DPO: prompt keeps its last max_prompt_length
   tokens, then the whole sequence is cut to max_length);
7. write `train.parquet`, `tokenizer/`, `stats.json`, `inputs.json` and `fingerprint.json`.

Output layout (one artifact directory):

    <out>/sft-general/{train.parquet, tokenizer/, stats.json, inputs.json, fingerprint.json}
    <out>/sft-think/...   <out>/dpo/...   <out>/decontamination.json   <out>/fingerprint.json

Trade-offs: rows are held in memory (fine for the published ~190k rows); hub sources are streamed.

Usage:
    trlm run --only data-prep            # (the stage reads every training section's mixture of the recipe)
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field
from tqdm.auto import tqdm

from trlm.artifacts import atomic_directory, hash_directory, save_tokenizer, write_fingerprint
from trlm.data_spec import RowError, load_data_spec, resolve_rows
from trlm.recipe import Bool, MixtureConfig, Recipe, Strict, mixtures
from trlm.stage import Stage, StageContext

DATA_ROOT_FILE = "data_root.json"  # where the data came from: the path and which setting won
from trlm.stages.data_prep.validation import DataValidationError, validate_row
from trlm.stages.data_prep.chat_spans import COUNTED, IGNORE, KINDS, Encoding, TemplateError, describe_template  # noqa: F401 - IGNORE re-exported

log = logging.getLogger(__name__)
HISTOGRAM_EDGES = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 30]
MAX_LISTED = 200  # dropped rows listed one by one in stats.json (all of them are counted)


class DataPrepConfig(Strict):
    validation_policy: Literal["error", "drop"] = Field(
        "error", description="error: stop before writing anything; drop: drop bad rows, count and report them"
    )
    decontaminate: Bool = Field(True, description="13-gram overlap check of every mixture against the benchmarks")


# --- rendering and label masks: stages/data_prep/chat_spans.py (turns located by position) ------------------


# --- one mixture -------------------------------------------------------------------------------


def build_tokenizer(base_model_dir: Path, mixture: MixtureConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if mixture.special_tokens:
        # Added as special tokens: each becomes one id (49152, 49153, ...) that BPE never splits.
        # The training stage resizes the embeddings once to match (see stages/sft.py).
        tokenizer.add_special_tokens({"additional_special_tokens": list(mixture.special_tokens)}, replace_extra_special_tokens=False)
    tokenizer.chat_template = mixture.chat_template
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.padding_side = "right"
    return tokenizer


def prepare_mixture(stage: str, mixture: MixtureConfig, *, data_root: Path, base_model_dir: Path, policy: str, out: Path, progress: bool = True, allow_outside_data_root: bool = False) -> dict:
    spec = load_data_spec(mixture.spec)
    tokenizer = build_tokenizer(base_model_dir, mixture)
    kind, enc = KINDS[spec.kind], Encoding.of(tokenizer, mixture)
    template = mixture.chat_template

    errors: list[RowError] = []
    dropped: Counter = Counter()
    records: list[dict] = []
    stats: Counter = Counter()
    sources: dict[str, dict] = {}  # per source: file, rows requested, rows read (filled by resolve_rows)
    rows = list(resolve_rows(spec, data_root, allow_outside_data_root=allow_outside_data_root, report=sources))
    for row in tqdm(rows, desc=f"data-prep {stage}", unit="row", disable=not progress, leave=False):
        stats["rows_in"] += 1
        row_stats: Counter = Counter()  # counted only if the row is kept
        try:
            if isinstance(row, RowError):
                raise row
            validate_row(spec.kind, row)
            rec = kind.encode(enc, row, row_stats)
        except RowError as e:
            errors.append(e)
            dropped[e.kind] += 1
            continue
        except TemplateError as exc:  # the template's fault, not the row's: no policy drops it
            where = RowError(row["_source"], row["_row"], kind.field, str(exc), "chat template cannot locate turns")
            raise DataValidationError([where], f"{stage}: the chat template {describe_template(template)} cannot locate turns by position; nothing was written") from None
        stats.update(row_stats)
        records.append(rec)

    errors.sort(key=lambda e: (e.source, e.row))
    if errors and policy == "error":
        raise DataValidationError(errors)
    lengths = np.array([len(r[kind.column]) for r in records] or [0])
    summary = {
        "stage": stage,
        "spec": spec.name,
        "kind": spec.kind,
        "rows_in": stats["rows_in"],
        "rows_out": len(records),
        "dropped": dict(sorted(dropped.items())),
        "dropped_rows": [{"file": e.source, "row": e.row, "field": e.field, "reason": e.reason} for e in errors[:MAX_LISTED]],
        "dropped_rows_not_listed": max(0, len(errors) - MAX_LISTED),
        "truncated": stats["truncated"],
        **{key: stats[key] if key in kind.counted else None for key in COUNTED},
        "truncated_lost_think_close": stats["lost_think_close"],
        "truncated_lost_end_of_turn": stats["lost_end_of_turn"],
        "reasoning_rows": stats["reasoning_rows"],
        "total_tokens": int(sum(kind.tokens(r) for r in records)),
        "target_tokens": int(sum(kind.targets(r) for r in records)) if kind.targets else None,
        "length_histogram": {f"{lo}-{hi}": int(((lengths >= lo) & (lengths < hi)).sum()) for lo, hi in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:])},
        "max_length": mixture.max_length,
        "loss_mask": kind.loss_mask or mixture.loss_mask,
        "sources": sources,
    }
    if not records:
        raise DataValidationError(
            errors or [RowError(spec.name, 0, "-", "no rows selected")],
            f"{stage}: no rows left after validation and truncation ({len(errors)} dropped); nothing was written",
        )

    out.mkdir(parents=True, exist_ok=True)
    columns = {k: [r[k] for r in records] for k in records[0]}
    types = {k: pa.list_(pa.int32()) if k.endswith(("input_ids", "labels")) else pa.string() if k == "answer" else None for k in columns}
    if "prompt_length" in types:
        types["prompt_length"] = pa.int32()
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in columns.items()})
    pq.write_table(table, out / "train.parquet")
    save_tokenizer(tokenizer, out / "tokenizer")
    (out / "stats.json").write_text(json.dumps(summary, indent=2))
    inputs = {
        "spec": spec.model_dump(mode="json"),
        "source_fingerprints": spec.source_fingerprints(data_root, allow_outside_data_root=allow_outside_data_root),
        "tokenizer": hash_directory(out / "tokenizer"),
        "mixture": _mixture_settings(mixture),
    }
    (out / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True))
    summary["fingerprint"] = write_fingerprint(out)
    return summary


# --- the stage ---------------------------------------------------------------------------------


def _mixture_settings(mixture: MixtureConfig) -> dict:
    """The mixture's settings without the spec's name or path: the spec's content is recorded
    (and hashed) instead, so the same spec reached through another path gives the same key."""
    return mixture.model_dump(mode="json", exclude={"spec"})


def data_prep_config(recipe: Recipe) -> dict:
    """Everything that determines this stage's output (its cache key is a hash of this + inputs)."""
    return {
        "data_prep": recipe.data_prep.model_dump(mode="json"),
        "mixtures": {s: _mixture_settings(m) for s, m in mixtures(recipe).items()},
        "specs": {s: load_data_spec(m.spec).model_dump(mode="json") for s, m in mixtures(recipe).items()},
    }


def source_fingerprints(recipe: Recipe) -> dict[str, str]:
    """Every source file's bytes, by `<stage>/<source name>` (the base model is an ordinary input)."""
    inputs = {}
    for s, mixture in mixtures(recipe).items():
        for name, fp in load_data_spec(mixture.spec).source_fingerprints(recipe.data_path, allow_outside_data_root=recipe.allow_outside_data_root).items():
            inputs[f"{s}/{name}"] = fp
    return inputs


def prepare_data(recipe: Recipe, *, base_model_dir: Path, out_dir: Path, progress: bool = True) -> dict:
    """Run data-prep for all three mixtures into `out_dir` (atomically: complete or absent)."""
    summaries: dict[str, Any] = {}
    with atomic_directory(out_dir) as tmp:
        for stage, mixture in mixtures(recipe).items():
            summaries[stage] = prepare_mixture(
                stage, mixture, data_root=recipe.data_path, base_model_dir=base_model_dir,
                policy=recipe.data_prep.validation_policy, out=tmp / stage, progress=progress,
                allow_outside_data_root=recipe.allow_outside_data_root,
            )
        if recipe.data_prep.decontaminate:
            summaries["decontamination"] = _decontaminate(recipe, tmp)
        # Where the data came from (which of --set / TRLM_DATA_ROOT / the recipe won); at the top level,
        # outside the per-mixture directories whose fingerprints downstream keys use.
        (tmp / DATA_ROOT_FILE).write_text(json.dumps({"data_root": str(recipe.data_path), "origin": recipe.data_root_origin}))
        # data_root.json names a path: left out of the fingerprint, so equal data anywhere gives equal outputs.
        summaries["fingerprint"] = write_fingerprint(tmp, meta={"mixtures": {s: summaries[s]["fingerprint"] for s in mixtures(recipe)}},
                                                     exclude=("checkpoints", DATA_ROOT_FILE))
    return summaries


def _decontaminate(recipe: Recipe, out: Path) -> dict:
    from trlm.stages.data_prep.decontamination import check_overlap

    texts = {}
    for stage in mixtures(recipe):
        table = pq.read_table(out / stage / "train.parquet")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out / stage / "tokenizer")
        col = next(kind.column for kind in KINDS.values() if kind.column in table.column_names)
        texts[stage] = tok.batch_decode(table.column(col).to_pylist(), skip_special_tokens=True)
    report = check_overlap(texts, data_root=recipe.data_path, tasks=list(recipe.eval.tasks))
    (out / "decontamination.json").write_text(json.dumps(report, indent=2))
    return report


# --- the stage declaration -----------------------------------------------------------------------


def _run(ctx: StageContext) -> dict:
    summary = prepare_data(ctx.recipe, base_model_dir=ctx.inputs["base"], out_dir=ctx.out)
    for i, stage in enumerate(mixtures(ctx.recipe)):
        s = summary[stage]
        ctx.on_log({"rows_in": s["rows_in"], "rows_out": s["rows_out"], "total_tokens": s["total_tokens"], "truncated": s["truncated"]}, i)
    # Each consuming stage's dataset is handed on by its own fingerprint.
    return {"_outputs": {stage: summary[stage]["fingerprint"] for stage in mixtures(ctx.recipe)}}


def _headline(out: Path) -> dict[str, float]:
    headline = {}
    for stats_file in sorted(out.glob("*/stats.json")):
        stats = json.loads(stats_file.read_text())
        headline[f"{stats_file.parent.name} rows"] = stats.get("rows_out", 0)
        headline[f"{stats_file.parent.name} tokens"] = stats.get("total_tokens", 0)
    return headline


STAGE = Stage(
    name="data-prep",
    section="data_prep",
    config=DataPrepConfig,
    external_inputs=source_fingerprints,
    key_config=data_prep_config,
    hands_on="parts",
    run=_run,
    headline=_headline,
    libraries=("transformers", "tokenizers", "datasets", "pyarrow"),
    description="validate, render, tokenize, mask and truncate each training stage's mixture",
)
