"""Stage `data-prep`: data specs -> validated, templated, tokenized, masked, truncated datasets.

For each training stage's mixture (`sft_general.data`, `sft_think.data`, `dpo.data` in the recipe):

1. resolve the spec (`data_specs/*.yaml`): read the sources, take N rows, map columns, transform;
2. validate every row (roles, empty turns, missing columns, undecodable text, chosen == rejected,
   a prompt alone longer than max_length); policy `error` stops before anything is written,
   `drop` drops the rows and counts and reports each one: never silently;
3. render the recipe's chat template exactly as given (the published one has whitespace quirks;
   they are part of what the model is trained on, so they are kept);
4. tokenize with the base tokenizer plus the mixture's special tokens (`<think>`, `</think>`);
5. build labels: `all` tokens (what the published recipe did) or `assistant` turns only, each
   including its closing `<|im_end|>`; preference data always trains on the completion only;
6. truncate as configured (SFT keep_start/keep_end; DPO: prompt keeps its last max_prompt_length
   tokens, then the whole sequence is cut to max_length);
7. write `train.parquet`, `tokenizer/`, `stats.json`, `inputs.json` and `fingerprint.json`.

Output layout (one artifact directory):

    <out>/sft-general/{train.parquet, tokenizer/, stats.json, inputs.json, fingerprint.json}
    <out>/sft-think/...   <out>/dpo/...   <out>/decontamination.json   <out>/fingerprint.json

Trade-offs: rows are held in memory (fine for the published ~190k rows); hub sources are streamed.

Usage:
    python -m trlm.stages.data_prep --recipe offline-smoke --base-model DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from trlm.artifacts import atomic_directory, hash_directory, write_fingerprint
from trlm.data_spec import RowError, load_data_spec, resolve_rows
from trlm.recipe import TRAINING_STAGES, MixtureConfig, Recipe, RecipeError, load_recipe

log = logging.getLogger(__name__)
IGNORE = -100
ROLES = {"system", "user", "assistant"}
HISTOGRAM_EDGES = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 30]
MAX_LISTED = 200  # dropped rows listed one by one in stats.json (all of them are counted)


class DataValidationError(ValueError):
    """Bad rows under policy `error`. `errors` holds every RowError found (file, row, field)."""

    def __init__(self, errors: list[RowError], headline: str | None = None):
        self.errors = errors
        self.headline = headline
        shown = "\n".join(f"  {e}" for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        head = headline or f"{len(errors)} invalid row(s); nothing was written (validation_policy=error)"
        super().__init__(f"{head}:\n{shown}{more}")

    def __reduce__(self):  # picklable with its errors (Prefect moves exceptions between processes)
        return (type(self), (self.errors, self.headline))


# --- validation --------------------------------------------------------------------------------


def _check_text(err, field: str, value: Any) -> None:
    if not isinstance(value, str):
        raise err(field, f"expected text, got {type(value).__name__}", "not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise err(field, "undecodable text (lone surrogate escape)", "undecodable text") from None


def _check_messages(err, field: str, messages: Any, *, must_end_with: str | None) -> None:
    if not isinstance(messages, list) or not messages:
        raise err(field, "expected a non-empty list of messages", "not a message list")
    expected = None
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise err(where, "a message needs 'role' and 'content'", "malformed message")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise err(f"{where}.role", f"unknown role {role!r} (expected one of {sorted(ROLES)})", "unknown role")
        if role == "system" and i != 0:
            raise err(f"{where}.role", "a system message may only come first", "misplaced system message")
        _check_text(err, f"{where}.content", m["content"])
        if role == "assistant" and not m["content"].strip():
            raise err(f"{where}.content", "empty assistant content", "empty assistant content")
        if role != "system":
            if expected is not None and role != expected:
                raise err(f"{where}.role", f"roles do not alternate: {role!r} follows {role!r}", "roles do not alternate")
            expected = "assistant" if role == "user" else "user"
    if must_end_with and messages[-1]["role"] != must_end_with:
        raise err(f"{field}[{len(messages) - 1}].role", f"the last message must be {must_end_with!r}", f"last message not {must_end_with}")


def validate_row(kind: str, row: dict) -> None:
    def err(field: str, reason: str, category: str | None = None) -> RowError:
        return RowError(row["_source"], row["_row"], field, reason, category)

    if kind == "sft":
        _check_messages(err, "messages", row["messages"], must_end_with="assistant")
        first = next(m["role"] for m in row["messages"] if m["role"] != "system")
        if first != "user":
            raise err("messages[0].role", "the conversation must start with a user turn", "first turn not user")
        return
    if not row["prompt"]:
        raise err("prompt", "empty prompt (chosen and rejected share no turns)", "empty prompt")
    _check_messages(err, "prompt", row["prompt"], must_end_with="user")
    for side in ("chosen", "rejected"):
        _check_messages(err, side, row[side], must_end_with="assistant")
        if row[side][0]["role"] != "assistant":
            raise err(f"{side}[0].role", "the completion must start with an assistant turn", "completion not assistant")
    if row["chosen"] == row["rejected"]:
        raise err("chosen", "chosen is identical to rejected", "chosen identical to rejected")


# --- rendering and label masks -----------------------------------------------------------------


def render(tokenizer, template: str, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


def assistant_spans(tokenizer, template: str, messages: list[dict], end_token: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn's content through its closing end token.

    The template is rendered for growing prefixes of the conversation; turn i occupies the text
    between the renderings of messages[:i] and messages[:i+1]. Inside it the content is located and
    the span extended through the next `end_token` (`<|im_end|>`), so the model learns to stop.
    Generation prompts are not used: the published template's generation prompt is not a prefix of
    its training rendering (different indentation, extra newline).
    """
    spans, previous = [], ""
    for i, message in enumerate(messages):
        current = render(tokenizer, template, messages[: i + 1])
        if not current.startswith(previous):
            raise ValueError("chat template is not prefix-stable; loss_mask 'assistant' cannot locate turns")
        if message["role"] == "assistant":
            start = current.find(message["content"], len(previous))
            end = current.find(end_token, start + len(message["content"]))
            if start < 0 or end < 0:
                raise ValueError(f"cannot locate assistant turn {i} in the rendered template")
            spans.append((start, end + len(end_token)))
        previous = current
    return spans


def tokenize_with_mask(tokenizer, text: str, spans: list[tuple[int, int]] | None) -> tuple[list[int], list[int]]:
    """Token ids and labels; with spans, only tokens overlapping a span are trained."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
    ids = list(enc["input_ids"])
    if spans is None:
        return ids, list(ids)
    labels = []
    for token, (tok_start, tok_end) in zip(ids, enc["offset_mapping"]):
        inside = any(tok_start < span_end and span_start < tok_end for span_start, span_end in spans)
        labels.append(token if inside else IGNORE)
    return ids, labels


def _truncate(seq: list[int], max_length: int, mode: str) -> list[int]:
    return seq[:max_length] if mode == "keep_start" else seq[-max_length:]


def _prompt_length_sft(tokenizer, template: str, messages: list[dict]) -> int:
    """Tokens before the first assistant turn's content: the part that can never be trained."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = render(tokenizer, template, messages[: first + 1])
    cut = text.find(messages[first]["content"], len(render(tokenizer, template, messages[:first])))
    if cut < 0:
        raise ValueError(f"cannot locate assistant turn {first} in the rendered template")
    return len(tokenizer(text[:cut], add_special_tokens=False)["input_ids"])


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


def prepare_mixture(stage: str, mixture: MixtureConfig, *, data_root: Path, base_model_dir: Path, policy: str, out: Path, progress: bool = True) -> dict:
    spec = load_data_spec(mixture.spec)
    tokenizer = build_tokenizer(base_model_dir, mixture)
    template, end_token = mixture.chat_template, tokenizer.eos_token
    think_close = "</think>" if "</think>" in mixture.special_tokens else None
    think_close_id = tokenizer.convert_tokens_to_ids(think_close) if think_close else None
    eos_id = tokenizer.convert_tokens_to_ids(end_token)

    errors: list[RowError] = []
    dropped: Counter = Counter()
    records: list[dict] = []
    stats: Counter = Counter()
    rows = list(resolve_rows(spec, data_root))
    for row in tqdm(rows, desc=f"data-prep {stage}", unit="row", disable=not progress, leave=False):
        stats["rows_in"] += 1
        row_stats: Counter = Counter()  # counted only if the row is kept
        try:
            if isinstance(row, RowError):
                raise row
            validate_row(spec.kind, row)
            if spec.kind == "sft":
                rec = _encode_sft(tokenizer, template, end_token, mixture, row, row_stats, think_close_id, eos_id)
            else:
                rec = _encode_preference(tokenizer, template, end_token, mixture, row, row_stats)
        except RowError as e:
            errors.append(e)
            dropped[e.kind] += 1
            continue
        stats.update(row_stats)
        records.append(rec)

    errors.sort(key=lambda e: (e.source, e.row))
    if errors and policy == "error":
        raise DataValidationError(errors)
    lengths = np.array([len(r["input_ids"] if spec.kind == "sft" else r["chosen_input_ids"]) for r in records] or [0])
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
        "truncated_prompt": stats["truncated_prompt"] if spec.kind == "preference" else None,
        "truncated_lost_think_close": stats["lost_think_close"],
        "truncated_lost_end_of_turn": stats["lost_end_of_turn"],
        "reasoning_rows": stats["reasoning_rows"],
        "total_tokens": int(sum(len(r["input_ids"]) for r in records) if spec.kind == "sft" else sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in records)),
        "target_tokens": int(sum(sum(1 for x in r["labels"][1:] if x != IGNORE) for r in records)) if spec.kind == "sft" else None,
        "length_histogram": {f"{lo}-{hi}": int(((lengths >= lo) & (lengths < hi)).sum()) for lo, hi in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:])},
        "max_length": mixture.max_length,
        "loss_mask": mixture.loss_mask if spec.kind == "sft" else "completion",
    }
    if not records:
        raise DataValidationError(
            errors or [RowError(spec.name, 0, "-", "no rows selected")],
            f"{stage}: no rows left after validation and truncation ({len(errors)} dropped); nothing was written",
        )

    out.mkdir(parents=True, exist_ok=True)
    columns = {k: [r[k] for r in records] for k in records[0]}
    types = {k: pa.list_(pa.int32()) if k.endswith(("input_ids", "labels")) else None for k in columns}
    if "prompt_length" in types:
        types["prompt_length"] = pa.int32()
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in columns.items()})
    pq.write_table(table, out / "train.parquet")
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "stats.json").write_text(json.dumps(summary, indent=2))
    inputs = {
        "spec": spec.model_dump(mode="json"),
        "source_fingerprints": spec.source_fingerprints(data_root),
        "tokenizer": hash_directory(out / "tokenizer"),
        "mixture": _mixture_settings(mixture),
    }
    (out / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True))
    summary["fingerprint"] = write_fingerprint(out)
    return summary


def _encode_sft(tokenizer, template, end_token, mixture, row, stats, think_close_id, eos_id) -> dict:
    messages = row["messages"]
    text = render(tokenizer, template, messages)
    try:
        spans = assistant_spans(tokenizer, template, messages, end_token) if mixture.loss_mask == "assistant" else None
        prompt_len = _prompt_length_sft(tokenizer, template, messages)
    except ValueError as exc:
        raise RowError(row["_source"], row["_row"], "messages", str(exc), "template cannot locate turns") from None
    ids, labels = tokenize_with_mask(tokenizer, text, spans)
    if prompt_len >= mixture.max_length and mixture.truncation_mode == "keep_start":
        raise RowError(row["_source"], row["_row"], "messages", f"prompt alone ({prompt_len} tokens) is longer than max_length {mixture.max_length}", "prompt longer than max_length")
    reasoning = any("<think>" in m["content"] for m in messages if m["role"] == "assistant")
    stats["reasoning_rows"] += reasoning
    if len(ids) > mixture.max_length:
        stats["truncated"] += 1
        kept = _truncate(ids, mixture.max_length, mixture.truncation_mode)
        if reasoning and think_close_id is not None and think_close_id in ids and think_close_id not in kept:
            stats["lost_think_close"] += 1
        if eos_id in ids and kept[-1] != eos_id and mixture.truncation_mode == "keep_start":
            stats["lost_end_of_turn"] += 1
        ids, labels = kept, _truncate(labels, mixture.max_length, mixture.truncation_mode)
    if not any(x != IGNORE for x in labels[1:]):
        raise RowError(row["_source"], row["_row"], "messages", f"no target tokens left after truncation to max_length {mixture.max_length}", "no target tokens after truncation")
    return {"input_ids": ids, "labels": labels, "_source": row["_source"], "_row": row["_row"]}


def _encode_preference(tokenizer, template, end_token, mixture, row, stats) -> dict:
    """prompt ids (shared) + completion ids; labels -100 on the prompt; truncation as published."""
    sides = {}
    prompt_text = None
    prompt_only = render(tokenizer, template, row["prompt"])
    for side in ("chosen", "rejected"):
        full = render(tokenizer, template, row["prompt"] + row[side])
        start = full.find(row[side][0]["content"], len(prompt_only))
        end = full.rfind(end_token)
        if not full.startswith(prompt_only) or start < 0 or end < start:
            raise RowError(row["_source"], row["_row"], side, "cannot locate the completion in the rendered template", "template cannot locate turns")
        p_text, c_text = full[:start], full[start : end + len(end_token)]
        if prompt_text is not None and p_text != prompt_text:
            raise RowError(row["_source"], row["_row"], "prompt", "chosen and rejected render different prompts", "template cannot locate turns")
        prompt_text = p_text
        sides[side] = tokenizer(c_text, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if mixture.max_prompt_length is None and len(prompt_ids) >= mixture.max_length:
        raise RowError(row["_source"], row["_row"], "prompt", f"prompt alone ({len(prompt_ids)} tokens) is longer than max_length {mixture.max_length}", "prompt longer than max_length")
    if mixture.max_prompt_length is not None and len(prompt_ids) > mixture.max_prompt_length:
        prompt_ids = prompt_ids[-mixture.max_prompt_length :]
        stats["truncated_prompt"] += 1
    rec: dict[str, Any] = {}
    truncated = False
    for side, completion in sides.items():
        ids = prompt_ids + completion
        labels = [IGNORE] * len(prompt_ids) + completion
        if len(ids) > mixture.max_length:
            truncated = True
            ids, labels = _truncate(ids, mixture.max_length, mixture.truncation_mode), _truncate(labels, mixture.max_length, mixture.truncation_mode)
        if not any(x != IGNORE for x in labels[1:]):
            raise RowError(row["_source"], row["_row"], side, f"completion entirely cut off by truncation to max_length {mixture.max_length}", "completion cut off by truncation")
        rec[f"{side}_input_ids"], rec[f"{side}_labels"] = ids, labels
    stats["truncated"] += truncated
    rec["prompt_length"] = next(i for i, x in enumerate(rec["chosen_labels"]) if x != IGNORE)
    rec["_source"], rec["_row"] = row["_source"], row["_row"]
    return rec


# --- the stage ---------------------------------------------------------------------------------


def _mixture_settings(mixture: MixtureConfig) -> dict:
    """The mixture's settings without the spec's name or path: the spec's content is recorded
    (and hashed) instead, so the same spec reached through another path gives the same key."""
    return mixture.model_dump(mode="json", exclude={"spec"})


def data_prep_config(recipe: Recipe) -> dict:
    """Everything that determines this stage's output (its cache key is a hash of this + inputs)."""
    return {
        "data_prep": recipe.data_prep.model_dump(mode="json"),
        "mixtures": {s: _mixture_settings(recipe.stage_config(s).data) for s in TRAINING_STAGES},
        "specs": {s: load_data_spec(recipe.stage_config(s).data.spec).model_dump(mode="json") for s in TRAINING_STAGES},
    }


def data_prep_inputs(recipe: Recipe, base_fingerprint: str) -> dict[str, str]:
    """Input fingerprints: base tokenizer/model and every source file's bytes."""
    inputs = {"base_model": base_fingerprint}
    for s in TRAINING_STAGES:
        for name, fp in load_data_spec(recipe.stage_config(s).data.spec).source_fingerprints(recipe.data_path).items():
            inputs[f"{s}/{name}"] = fp
    return inputs


def prepare_data(recipe: Recipe, *, base_model_dir: Path, out_dir: Path, progress: bool = True) -> dict:
    """Run data-prep for all three mixtures into `out_dir` (atomically: complete or absent)."""
    summaries: dict[str, Any] = {}
    with atomic_directory(out_dir) as tmp:
        for stage in TRAINING_STAGES:
            mixture = recipe.stage_config(stage).data
            summaries[stage] = prepare_mixture(
                stage, mixture, data_root=recipe.data_path, base_model_dir=base_model_dir,
                policy=recipe.data_prep.validation_policy, out=tmp / stage, progress=progress,
            )
        if recipe.data_prep.decontaminate:
            summaries["decontamination"] = _decontaminate(recipe, tmp)
        summaries["fingerprint"] = write_fingerprint(tmp, meta={"mixtures": {s: summaries[s]["fingerprint"] for s in TRAINING_STAGES}})
    return summaries


def _decontaminate(recipe: Recipe, out: Path) -> dict:
    from trlm.eval.decontamination import check_overlap

    texts = {}
    for stage in TRAINING_STAGES:
        table = pq.read_table(out / stage / "train.parquet")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out / stage / "tokenizer")
        col = "input_ids" if "input_ids" in table.column_names else "chosen_input_ids"
        texts[stage] = tok.batch_decode(table.column(col).to_pylist(), skip_special_tokens=True)
    report = check_overlap(texts, data_root=recipe.data_path, tasks=list(recipe.eval.tasks))
    (out / "decontamination.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=None, help="recipe name or YAML path (default offline-smoke)")
    parser.add_argument("--set", action="append", default=[], help="override key=value")
    parser.add_argument("--base-model", required=True, type=Path, help="base checkpoint directory (tokenizer)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        recipe = load_recipe(args.recipe, args.set)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        summary = prepare_data(recipe, base_model_dir=args.base_model, out_dir=args.out)
    except DataValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
