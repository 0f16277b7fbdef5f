"""Data-prep: real slices of ../shared/data, label masks, truncation, bad rows, fingerprints, status.

Every run uses the tiny model directory (the real SmolLM2 tokenizer) as the base model, small data
specs written to tmp pointing at a few rows copied from the shared data, and no decontamination.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from trlm.artifacts import hash_file, read_fingerprint, verify_fingerprint
from trlm.data_spec import RowError, gsm8k_think, load_data_spec, resolve_rows
from trlm.recipe import mixtures
from trlm.stages.registry import get_stage, load_recipe

TRAINING_STAGES = ("sft-general", "sft-think", "dpo", "grpo")
from trlm.stages.data_prep import IGNORE, DataValidationError, prepare_data, prepare_mixture

THINK, THINK_CLOSE, IM_END, IM_START = "<think>", "</think>", "<|im_end|>", "<|im_start|>"

# A few rows of each real training file, copied with the same relative paths.
SLICES = {
    "databricks__databricks-dolly-15k/train.jsonl": 5,
    "teknium1__GPTeacher/roleplay.jsonl": 5,
    "teknium1__GPTeacher/codegen.jsonl": 5,
    "openai__gsm8k/messages/train.jsonl": 5,
    "openai__gsm8k/main/train.jsonl": 5,
    "Anthropic__hh-rlhf/harmless-base/test.jsonl.gz": 6,
}
SPECS = {
    "sft-general": {
        "name": "test-sft-general", "kind": "sft", "shuffle_seed": 7,
        "sources": [
            {"name": "dolly", "path": "databricks__databricks-dolly-15k/train.jsonl", "rows": 3},
            {"name": "roleplay", "path": "teknium1__GPTeacher/roleplay.jsonl", "rows": 2, "sample": "seeded"},
            {"name": "codegen", "path": "teknium1__GPTeacher/codegen.jsonl", "rows": 2},
        ],
    },
    "sft-think": {
        "name": "test-sft-think", "kind": "sft",
        "sources": [{"name": "gsm8k", "path": "openai__gsm8k/messages/train.jsonl", "rows": 4, "transform": "gsm8k_think"}],
    },
    "dpo": {
        "name": "test-dpo", "kind": "preference",
        "sources": [{"name": "hh", "path": "Anthropic__hh-rlhf/harmless-base/test.jsonl.gz", "rows": 4, "transform": "hh_rlhf_pairs"}],
    },
    "grpo": {
        "name": "test-grpo", "kind": "prompt_answer",
        "sources": [{"name": "gsm8k", "path": "openai__gsm8k/main/train.jsonl", "rows": 4, "columns": {"prompt": "question"},
                     "transform": "gsm8k_prompt_answer"}],
    },
}
ROWS_SELECTED = {"sft-general": 7, "sft-think": 4, "dpo": 4, "grpo": 4}


def _open(path: Path, mode: str):
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def copy_slices(src_root: Path, dst_root: Path) -> Path:
    for rel, n in SLICES.items():
        (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
        with _open(src_root / rel, "rb") as src, _open(dst_root / rel, "wb") as dst:
            for _ in range(n):
                dst.write(src.readline())
    return dst_root


def write_specs(spec_dir: Path, specs: dict | None = None) -> dict[str, Path]:
    spec_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stage, spec in (specs or SPECS).items():
        paths[stage] = spec_dir / f"{stage}.yaml"
        paths[stage].write_text(yaml.safe_dump(spec, sort_keys=False))
    return paths


def overrides(spec_paths: dict[str, Path], base_dir: Path, *extra: str) -> list[str]:
    sets = [f"{stage.replace('-', '_')}.data.spec={path}" for stage, path in spec_paths.items()]
    return [*sets, "data_prep.decontaminate=false", f"base_model.source={base_dir}", *extra]


def edit_row(path: Path, row: int, old: str, new: str) -> None:
    """Change one row (1-based line) of a JSONL or JSONL.gz file."""
    with _open(path, "rb") as f:
        lines = f.readlines()
    assert old.encode() in lines[row - 1]
    lines[row - 1] = lines[row - 1].replace(old.encode(), new.encode(), 1)
    path.chmod(0o644)
    with _open(path, "wb") as f:
        f.writelines(lines)


def read_table(directory: Path) -> list[dict]:
    return pq.read_table(directory / "train.parquet").to_pylist()


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive trained positions, as token ids."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def load_tok(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def slices_root(tmp_path_factory, shared_data) -> Path:
    return copy_slices(shared_data, tmp_path_factory.mktemp("data-root"))


@pytest.fixture(scope="module")
def spec_paths(tmp_path_factory) -> dict[str, Path]:
    return write_specs(tmp_path_factory.mktemp("specs"))


@pytest.fixture(autouse=True)
def _data_root_env(monkeypatch, slices_root):
    monkeypatch.setenv("TRLM_DATA_ROOT", str(slices_root))


@pytest.fixture(scope="module")
def smoke(spec_paths, tiny_model_dir, slices_root):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRLM_DATA_ROOT", str(slices_root))
        return load_recipe("offline-smoke", overrides=overrides(spec_paths, tiny_model_dir))


@pytest.fixture(scope="module")
def prepared(smoke, tiny_model_dir, slices_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "run-1" / "output"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRLM_DATA_ROOT", str(slices_root))
        summary = prepare_data(smoke, base_model_dir=tiny_model_dir, out_dir=out, progress=False)
    return out, summary


# --- 2. real slices ----------------------------------------------------------------------------


def test_outputs_exist(prepared):
    out, summary = prepared
    assert sorted(p.name for p in out.iterdir()) == ["data_root.json", "dpo", "fingerprint.json", "grpo", "sft-general", "sft-think"]
    assert json.loads((out / "data_root.json").read_text())["origin"] == "TRLM_DATA_ROOT"
    assert sorted(p.name for p in out.parent.iterdir()) == ["output"]  # no temporaries left
    for stage in TRAINING_STAGES:
        d = out / stage
        assert sorted(p.name for p in d.iterdir()) == ["fingerprint.json", "inputs.json", "stats.json", "tokenizer", "train.parquet"]
        assert (d / "tokenizer" / "tokenizer.json").is_file() and (d / "tokenizer" / "tokenizer_config.json").is_file()
        assert read_fingerprint(d) == summary[stage]["fingerprint"]
        assert verify_fingerprint(d)
    assert read_fingerprint(out) == summary["fingerprint"]
    assert verify_fingerprint(out)
    assert json.loads((out / "fingerprint.json").read_text())["meta"]["mixtures"] == {s: summary[s]["fingerprint"] for s in TRAINING_STAGES}


def test_parquet_schema(prepared):
    out, _ = prepared
    sft = pq.read_table(out / "sft-general" / "train.parquet").schema
    assert str(sft.field("input_ids").type) == "list<element: int32>" and str(sft.field("labels").type) == "list<element: int32>"
    dpo = pq.read_table(out / "dpo" / "train.parquet").schema
    for col in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
        assert str(dpo.field(col).type) == "list<element: int32>"
    assert str(dpo.field("prompt_length").type) == "int32"


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_stats_are_consistent(prepared, stage, smoke, slices_root):
    out, summary = prepared
    stats = json.loads((out / stage / "stats.json").read_text())
    assert stats == {k: v for k, v in summary[stage].items() if k != "fingerprint"}
    rows = read_table(out / stage)
    assert stats["rows_in"] == ROWS_SELECTED[stage]
    assert stats["rows_out"] == len(rows)
    assert stats["rows_in"] == stats["rows_out"] + sum(stats["dropped"].values())
    assert len(stats["dropped_rows"]) == sum(stats["dropped"].values())
    assert stats["dropped"] == {} and stats["rows_out"] == ROWS_SELECTED[stage]  # these rows are all valid
    max_length = mixtures(smoke)[stage].max_length
    assert stats["max_length"] == max_length
    if stage == "dpo":
        lengths = [len(r["chosen_input_ids"]) for r in rows]
        assert stats["total_tokens"] == sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
        assert stats["loss_mask"] == "completion"
        assert stats["truncated"] <= sum(1 for r in rows if max_length in (len(r["chosen_input_ids"]), len(r["rejected_input_ids"])))
    elif stage == "grpo":
        lengths = [len(r["prompt_input_ids"]) for r in rows]
        assert stats["total_tokens"] == sum(lengths) and stats["target_tokens"] is None and stats["truncated"] == 0
        assert all(r["answer"].lstrip("-").replace(".", "").isdigit() for r in rows)
    else:
        lengths = [len(r["input_ids"]) for r in rows]
        assert stats["total_tokens"] == sum(lengths)
        assert stats["target_tokens"] == sum(sum(1 for x in r["labels"][1:] if x != IGNORE) for r in rows)
        template = mixtures(smoke)[stage].chat_template
        tokenizer = load_tok(out / stage / "tokenizer")  # with <think>, </think> for sft-think
        full_lengths = []
        for r in rows:
            rec = _source_record(slices_root, r["_source"], r["_row"])
            if stage == "sft-think":
                rec = gsm8k_think(rec)
            text = tokenizer.apply_chat_template(rec["messages"], chat_template=template, tokenize=False)
            full_lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        assert stats["truncated"] == sum(1 for n in full_lengths if n > max_length)
        assert lengths == [min(n, max_length) for n in full_lengths]
    assert all(0 < n <= max_length for n in lengths)
    assert sum(stats["length_histogram"].values()) == stats["rows_out"]
    for bucket, count in stats["length_histogram"].items():
        lo, hi = map(int, bucket.split("-"))
        assert count == sum(1 for n in lengths if lo <= n < hi)
    # each row remembers where it came from; sources keep their row counts
    origin = {}
    for r in rows:
        origin.setdefault(r["_source"], []).append(r["_row"])
    expected = {src["path"]: src["rows"] for src in SPECS[stage]["sources"]}
    assert {k: len(v) for k, v in origin.items()} == expected


def test_inputs_json_records_what_made_the_mixture(prepared, slices_root):
    out, _ = prepared
    inputs = json.loads((out / "sft-think" / "inputs.json").read_text())
    assert inputs["source_fingerprints"] == {"gsm8k": hash_file(slices_root / "openai__gsm8k/messages/train.jsonl")}
    assert inputs["spec"]["name"] == "test-sft-think"
    assert inputs["mixture"]["special_tokens"] == [THINK, THINK_CLOSE]
    assert str(slices_root) not in (out / "sft-think" / "inputs.json").read_text()  # no absolute paths


def _source_record(root: Path, rel: str, row: int) -> dict:
    with _open(root / rel, "rt") as f:
        for i, line in enumerate(f, start=1):
            if i == row:
                return json.loads(line)
    raise AssertionError(f"{rel} has no row {row}")


def test_sft_general_rows_are_the_rendered_template(prepared, smoke, slices_root, tokenizer):
    """loss_mask all: input_ids = tokens of the recipe's template rendered exactly; labels == input_ids."""
    out, _ = prepared
    mixture = smoke.sft_general.data
    tok = load_tok(out / "sft-general" / "tokenizer")
    assert len(tok) == len(tokenizer) == 49152  # no tokens added in stage 1
    for r in read_table(out / "sft-general"):
        messages = _source_record(slices_root, r["_source"], r["_row"])["messages"]
        text = tokenizer.apply_chat_template(messages, chat_template=mixture.chat_template, tokenize=False)
        assert text.startswith("      <|im_start|>system\nYou are a helpful AI assistant named Tiny Reasoning")  # the published quirks
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert r["input_ids"] == full[: mixture.max_length]
        assert r["labels"] == r["input_ids"]


def test_think_tokens_are_single_ids(prepared, slices_root, smoke):
    out, summary = prepared
    for stage in ("sft-think", "dpo"):
        tok = load_tok(out / stage / "tokenizer")
        assert tok.convert_tokens_to_ids([THINK, THINK_CLOSE]) == [49152, 49153]
        assert len(tok) == 49154
        assert tok("a <think>\nx\n</think> b", add_special_tokens=False)["input_ids"].count(49152) == 1
        assert tok.eos_token == tok.pad_token == IM_END
        assert tok.chat_template == mixtures(smoke)[stage].chat_template
    assert summary["sft-think"]["reasoning_rows"] == ROWS_SELECTED["sft-think"]
    tok = load_tok(out / "sft-think" / "tokenizer")
    max_length = smoke.sft_think.data.max_length
    checked = 0
    for r in read_table(out / "sft-think"):
        ids = r["input_ids"]
        # the system prompt mentions <think>...</think> once; the assistant turn opens and closes one
        assert ids.count(49152) == 2
        if len(ids) == max_length:  # truncated (keep_start): the closing tag may be cut off
            assert ids.count(49153) in (1, 2)
            continue
        assert ids.count(49153) == 2
        checked += 1
        answer = _source_record(slices_root, r["_source"], r["_row"])["messages"][-1]["content"]
        steps, final = answer.rsplit("####", 1)
        steps = re.sub(r"<<[^<>]*>>", "", steps).strip()
        expected = f"{THINK}\n{steps}\n{THINK_CLOSE}\n#### {final.strip()}{IM_END}"
        assert expected in tok.decode(ids), "the assistant turn is the GSM8K solution as <think> steps + #### answer"
        # the assistant turn's <think> is a single trained id, never BPE pieces
        assistant = ids[len(ids) - 1 - ids[::-1].index(49152):]
        assert assistant[0] == 49152 and 49153 in assistant
    assert checked > 0, "at least one untruncated reasoning row was compared with its source"


def test_dpo_rows_from_hh_rlhf(prepared, slices_root, smoke):
    """hh-rlhf pairs: each side's labels are -100 exactly on its prompt tokens; the completion is the
    last assistant turn + <|im_end|>. The recipe truncates keep_end (TRL's default, as published): the
    completion is kept and the prompt loses its start, per sequence."""
    out, summary = prepared
    mixture = smoke.dpo.data
    assert mixture.truncation_mode == "keep_end"
    tok = load_tok(out / "dpo" / "tokenizer")
    for r in read_table(out / "dpo"):
        rec = _source_record(slices_root, r["_source"], r["_row"])
        prompts = {}
        for side in ("chosen", "rejected"):
            ids, labels = r[f"{side}_input_ids"], r[f"{side}_labels"]
            pl = next(i for i, label in enumerate(labels) if label != IGNORE)
            assert labels[pl:] == ids[pl:] and len(ids) <= mixture.max_length
            assert pl <= mixture.max_prompt_length
            prompts[side] = ids[:pl]
            last_turn = rec[side].rsplit("\n\nAssistant: ", 1)[1].strip()
            completion = tok.decode(ids[pl:])
            assert (last_turn + IM_END).endswith(completion)
            if pl > 0:
                assert completion == last_turn + IM_END
                assert tok.decode(ids[:pl]).endswith(f"{IM_START}assistant\n")
        assert r["prompt_length"] == len(prompts["chosen"])
        short, long_ = sorted(prompts.values(), key=len)
        assert long_[len(long_) - len(short):] == short  # both keep the END of the same prompt
        if len(r["chosen_input_ids"]) < mixture.max_length and len(r["rejected_input_ids"]) < mixture.max_length:
            assert prompts["chosen"] == prompts["rejected"]
    assert summary["dpo"]["truncated_prompt"] >= 1  # hh-rlhf conversations are long: max_prompt_length 128 bites


# --- 3. label masks and truncation -------------------------------------------------------------

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy.\nIt has been since 1871."},
]
LONG_TEXT = " ".join(f"word{i}" for i in range(120))


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            f.write(b"\n")
    return path


def one_file_spec(tmp_path: Path, root: Path, rel: str, rows: list, kind: str = "sft", **source) -> str:
    write_jsonl(root / rel, rows)
    spec = {"name": f"t-{kind}", "kind": kind, "sources": [{"name": "s", "path": rel, **source}]}
    path = tmp_path / f"spec-{kind}-{Path(rel).stem}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def run_mixture(tmp_path, tiny_model_dir, stage, mixture_updates, rows, *, kind="sft", policy="drop", rel="chat/rows.jsonl", **source):
    root = tmp_path / "root"
    spec = one_file_spec(tmp_path, root, rel, rows, kind, **source)
    recipe = load_recipe("offline-smoke", check_files=False)
    mixture = mixtures(recipe)[stage].model_copy(update={"spec": spec, **mixture_updates})
    out = tmp_path / "out" / stage
    summary = prepare_mixture(stage, mixture, data_root=root, base_model_dir=tiny_model_dir, policy=policy, out=out, progress=False)
    return summary, read_table(out), out, mixture


@pytest.mark.parametrize("stage", ["sft-general", "sft-think"])
def test_assistant_mask_trains_exactly_the_assistant_turns(tmp_path, tiny_model_dir, stage):
    summary, rows, out, mixture = run_mixture(tmp_path, tiny_model_dir, stage, {"loss_mask": "assistant", "max_length": 512}, [{"messages": TWO_TURNS}])
    tok = load_tok(out / "tokenizer")
    (r,) = rows
    ids, labels = r["input_ids"], r["labels"]
    text = tok.apply_chat_template(TWO_TURNS, chat_template=mixture.chat_template, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    runs = trained_runs(ids, labels)
    assert [tok.decode(run) for run in runs] == [TWO_TURNS[1]["content"] + IM_END, TWO_TURNS[3]["content"] + IM_END]
    # what is not trained: system, both user turns (with their <|im_end|>), every header, the blank lines
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert ids.count(im_end) == 5 and sum(1 for t, l in zip(ids, labels) if t == im_end and l != IGNORE) == 2
    untrained = tok.decode([t for t, l in zip(ids, labels) if l == IGNORE])
    for piece in ("<|im_start|>system", TWO_TURNS[0]["content"], TWO_TURNS[2]["content"], "<|im_start|>assistant\n"):
        assert piece in untrained
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert tok.decode(ids[:first]).endswith(f"{IM_START}assistant\n")
    assert labels[-1] == IGNORE  # the blank line after the last <|im_end|>
    assert summary["target_tokens"] == sum(len(run) for run in runs)
    assert summary["loss_mask"] == "assistant"


def test_assistant_mask_with_a_system_turn(tmp_path, tiny_model_dir):
    conv = [{"role": "system", "content": "Answer briefly."}, *TWO_TURNS[:2]]
    _, (r,), out, _ = run_mixture(tmp_path, tiny_model_dir, "sft-general", {"loss_mask": "assistant"}, [{"messages": conv}])
    tok = load_tok(out / "tokenizer")
    assert [tok.decode(run) for run in trained_runs(r["input_ids"], r["labels"])] == [TWO_TURNS[1]["content"] + IM_END]
    text = tok.decode(r["input_ids"])
    assert "Answer briefly." in text and "Tiny Reasoning" not in text  # the template's default system is replaced


def test_all_mask_trains_every_token(tmp_path, tiny_model_dir):
    summary, (r,), _, _ = run_mixture(tmp_path, tiny_model_dir, "sft-general", {"loss_mask": "all"}, [{"messages": TWO_TURNS}])
    assert r["labels"] == r["input_ids"]
    assert summary["target_tokens"] == len(r["input_ids"]) - 1


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_sft_truncation(tmp_path, tiny_model_dir, mode):
    conv = [TWO_TURNS[0], {"role": "assistant", "content": LONG_TEXT}]
    summary, (r,), out, mixture = run_mixture(tmp_path, tiny_model_dir, "sft-general", {"max_length": 64, "truncation_mode": mode, "loss_mask": "assistant"}, [{"messages": conv}])
    tok = load_tok(out / "tokenizer")
    full = tok(tok.apply_chat_template(conv, chat_template=mixture.chat_template, tokenize=False), add_special_tokens=False)["input_ids"]
    assert len(full) > 64
    assert r["input_ids"] == (full[:64] if mode == "keep_start" else full[-64:])
    assert summary["truncated"] == 1
    assert summary["truncated_lost_end_of_turn"] == (1 if mode == "keep_start" else 0)
    trained = tok.decode(trained_runs(r["input_ids"], r["labels"])[0])
    if mode == "keep_start":
        assert LONG_TEXT.startswith(trained)  # the answer's start, without <|im_end|>
    else:
        assert trained.endswith("word119" + IM_END) and r["labels"][-1] == IGNORE


def pair(prompt: str, chosen: str, rejected: str, history: list | None = None) -> dict:
    return {"prompt": [*(history or []), {"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]}


def test_dpo_labels_mask_exactly_the_prompt(tmp_path, tiny_model_dir):
    row = pair("And of Italy?", "Rome.", "I think it is Milan, but I am not sure.", history=TWO_TURNS[:2])
    summary, (r,), out, mixture = run_mixture(tmp_path, tiny_model_dir, "dpo", {}, [row], kind="preference")
    tok = load_tok(out / "tokenizer")
    pl = r["prompt_length"]
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], chat_template=mixture.chat_template, tokenize=False)
    prompt_text = full[: full.index("Rome.")]
    assert r["chosen_input_ids"][:pl] == r["rejected_input_ids"][:pl] == tok(prompt_text, add_special_tokens=False)["input_ids"]
    for side, answer in (("chosen", "Rome."), ("rejected", "I think it is Milan, but I am not sure.")):
        ids, labels = r[f"{side}_input_ids"], r[f"{side}_labels"]
        assert labels == [IGNORE] * pl + ids[pl:]
        assert tok.decode(ids[pl:]) == answer + IM_END
    assert "Paris" in tok.decode(r["chosen_input_ids"][:pl])  # the earlier turns are prompt
    assert summary["truncated"] == 0 and summary["truncated_prompt"] == 0
    assert summary["total_tokens"] == len(r["chosen_input_ids"]) + len(r["rejected_input_ids"])


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_dpo_truncation(tmp_path, tiny_model_dir, mode):
    long_answer = " ".join(f"item{i}" for i in range(40))
    row = pair("Please repeat: " + LONG_TEXT, long_answer, "No.")
    updates = {"max_length": 40, "max_prompt_length": 16, "truncation_mode": mode}
    summary, (r,), out, mixture = run_mixture(tmp_path, tiny_model_dir, "dpo", updates, [row], kind="preference")
    tok = load_tok(out / "tokenizer")
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], chat_template=mixture.chat_template, tokenize=False)
    prompt_ids = tok(full[: full.index(long_answer)], add_special_tokens=False)["input_ids"]
    chosen_ids = tok(long_answer + IM_END, add_special_tokens=False)["input_ids"]
    rejected_ids = tok("No." + IM_END, add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) > 16 and len(chosen_ids) > 24
    kept_prompt = prompt_ids[-16:]  # the prompt keeps its LAST max_prompt_length tokens
    assert summary["truncated_prompt"] == 1 and summary["truncated"] == 1
    assert r["rejected_input_ids"] == kept_prompt + rejected_ids  # fits: not cut further
    if mode == "keep_start":
        assert r["chosen_input_ids"] == (kept_prompt + chosen_ids)[:40]
        assert r["prompt_length"] == 16
        assert r["chosen_input_ids"][:16] == r["rejected_input_ids"][:16]
    else:
        assert r["chosen_input_ids"] == (kept_prompt + chosen_ids)[-40:]
        assert r["chosen_labels"][-1] == chosen_ids[-1]  # the completion's end (<|im_end|>) is kept
        pl = r["prompt_length"]
        assert r["chosen_input_ids"][:pl] == kept_prompt[16 - pl:]
    assert len(r["chosen_input_ids"]) == 40


def test_dpo_prompt_longer_than_max_length_is_reported(tmp_path, tiny_model_dir):
    rows = [pair("Short?", "Yes.", "No."), pair(LONG_TEXT, "Yes.", "No.")]
    summary, out_rows, _, _ = run_mixture(tmp_path, tiny_model_dir, "dpo", {"max_length": 128, "max_prompt_length": None, "truncation_mode": "keep_start"}, rows, kind="preference", rel="p/pairs.jsonl")
    assert summary["rows_in"] == 2 and summary["rows_out"] == 1 and [r["_row"] for r in out_rows] == [1]
    assert summary["dropped"] == {"prompt longer than max_length": 1}
    (d,) = summary["dropped_rows"]
    assert (d["file"], d["row"], d["field"]) == ("p/pairs.jsonl", 2, "prompt") and "max_length 128" in d["reason"]


def test_sft_row_without_target_tokens_after_truncation_is_reported(tmp_path, tiny_model_dir):
    # keep_end with 2 tokens keeps '<|im_end|>' + the untrained blank line: nothing left to learn from
    rows = [{"messages": TWO_TURNS}]
    with pytest.raises(DataValidationError) as info:
        run_mixture(tmp_path, tiny_model_dir, "sft-general", {"max_length": 2, "truncation_mode": "keep_end", "loss_mask": "assistant"}, rows)
    assert "no rows left" in str(info.value) and "chat/rows.jsonl: row 1: field 'messages'" in str(info.value)
    assert not (tmp_path / "out").exists()


# --- 4. bad input rows -------------------------------------------------------------------------

GOOD = {"messages": TWO_TURNS[:2]}
# (row as written, field named, kind counted); each sits on its own line after one good row
BAD_SFT = [
    ({"messages": [TWO_TURNS[0], TWO_TURNS[2], TWO_TURNS[1]]}, "messages[1].role", "roles do not alternate"),
    ({"messages": [TWO_TURNS[0], {"role": "bot", "content": "Beep."}]}, "messages[1].role", "unknown role"),
    ({"messages": [TWO_TURNS[0], {"role": "assistant", "content": "  \n"}]}, "messages[1].content", "empty assistant content"),
    ({"conversation": TWO_TURNS[:2]}, "messages", "missing column"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}, {"role": "assistant", "content": "ok"}]}', "<line>", "undecodable text"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad \\ud800 text"}]}', "messages[1].content", "undecodable text"),
    ({"messages": [{"role": "user", "content": LONG_TEXT * 3}, {"role": "assistant", "content": "Ok."}]}, "messages", "prompt longer than max_length"),
]
GOOD_PAIR = pair("Is water wet?", "Yes, in everyday terms.", "No.")
BAD_DPO = [
    (pair("Same?", "Same answer.", "Same answer."), "chosen", "chosen identical to rejected"),
    (pair(LONG_TEXT * 3, "Yes.", "No."), "prompt", "prompt longer than max_length"),
    ({"prompt": [TWO_TURNS[0]], "chosen": [TWO_TURNS[1]]}, "rejected", "missing column"),
    (pair("Hi?", "Hello.", "Hey \ud800"), "rejected[0].content", "undecodable text"),
]
BAD_CASES = {
    "sft": ("sft-general", "sft", "bad/chats.jsonl", [GOOD, *[b for b, _, _ in BAD_SFT], GOOD], BAD_SFT),
    "dpo": ("dpo", "preference", "bad/pairs.jsonl", [GOOD_PAIR, *[b for b, _, _ in BAD_DPO], GOOD_PAIR], BAD_DPO),
}
UPDATES = {"sft": {"max_length": 128}, "dpo": {"max_length": 128, "max_prompt_length": None, "truncation_mode": "keep_start"}}


def test_bad_test_rows_are_what_they_claim():
    assert b"\xff" in BAD_SFT[4][0] and b"\\ud800" in BAD_SFT[5][0]
    with pytest.raises(UnicodeDecodeError):
        BAD_SFT[4][0].decode("utf-8")
    assert json.loads(BAD_SFT[5][0])["messages"][1]["content"] == "bad \ud800 text"


@pytest.mark.parametrize("which", ["sft", "dpo"])
def test_bad_rows_policy_error(tmp_path, tiny_model_dir, which):
    """Every bad row is named (file, row, field) in ONE DataValidationError; nothing is written."""
    stage, kind, rel, rows, bad = BAD_CASES[which]
    with pytest.raises(DataValidationError) as info:
        run_mixture(tmp_path, tiny_model_dir, stage, UPDATES[which], rows, kind=kind, policy="error", rel=rel)
    errors = info.value.errors
    assert [(e.source, e.row, e.field, e.kind) for e in errors] == [(rel, i + 2, field, reason) for i, (_, field, reason) in enumerate(bad)]
    message = str(info.value)
    assert message.startswith(f"{len(bad)} invalid row(s); nothing was written")
    for i, (_, field, _) in enumerate(bad):
        assert f"{rel}: row {i + 2}: field '{field}'" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["sft", "dpo"])
def test_bad_rows_policy_drop(tmp_path, tiny_model_dir, which):
    """Every bad row is dropped, counted by reason and listed with file, row and field."""
    stage, kind, rel, rows, bad = BAD_CASES[which]
    summary, out_rows, out, _ = run_mixture(tmp_path, tiny_model_dir, stage, UPDATES[which], rows, kind=kind, policy="drop", rel=rel)
    assert (summary["rows_in"], summary["rows_out"]) == (len(rows), 2)
    assert sorted(r["_row"] for r in out_rows) == [1, len(rows)]
    counts: dict[str, int] = {}
    for _, _, reason in bad:
        counts[reason] = counts.get(reason, 0) + 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"] == summary["dropped"] == counts
    assert [(d["file"], d["row"], d["field"]) for d in stats["dropped_rows"]] == [(rel, i + 2, field) for i, (_, field, _) in enumerate(bad)]
    assert all(d["reason"] for d in stats["dropped_rows"]) and stats["dropped_rows_not_listed"] == 0


GSM8K_GOOD = {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "2+3 = <<2+3=5>>5\n#### 5"}]}


def test_transform_failure_names_the_row(tmp_path, tiny_model_dir):
    rows = [{"messages": [TWO_TURNS[0], {"role": "assistant", "content": "no final answer line"}]}, {"messages": []}]
    with pytest.raises(DataValidationError) as info:
        run_mixture(tmp_path, tiny_model_dir, "sft-think", {}, rows + [GSM8K_GOOD], policy="error", rel="g/gsm.jsonl", transform="gsm8k_think")
    assert [(e.row, e.kind) for e in info.value.errors] == [(1, "transform gsm8k_think failed"), (2, "transform gsm8k_think failed")]
    assert "g/gsm.jsonl: row 1: field 'messages'" in str(info.value) and "####" in str(info.value)


def _bad_recipe(tmp_path, tiny_model_dir, policy: str, bad_stage: str = "sft-general"):
    root = tmp_path / "root"
    specs = {}
    for stage in TRAINING_STAGES:
        if stage == "dpo":
            rows = [pair("Is water wet?", "Yes.", "No.")] + ([pair("Same?", "Same.", "Same.")] if bad_stage == "dpo" else [])
            specs[stage] = {"name": stage, "kind": "preference", "sources": [{"name": "p", "path": "bad/pairs.jsonl"}]}
            write_jsonl(root / "bad/pairs.jsonl", rows)
        elif stage == "grpo":
            specs[stage] = {"name": stage, "kind": "prompt_answer", "sources": [{"name": "q", "path": "bad/prompts.jsonl"}]}
            write_jsonl(root / "bad/prompts.jsonl", [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"}])
        else:
            rel = f"bad/{stage}.jsonl"
            rows = [GOOD] + ([BAD_SFT[0][0]] if stage == bad_stage else [])
            specs[stage] = {"name": stage, "kind": "sft", "sources": [{"name": "c", "path": rel}]}
            write_jsonl(root / rel, rows)
    paths = write_specs(tmp_path / "specs", specs)
    return root, overrides(paths, tiny_model_dir, f"data_prep.validation_policy={policy}", f"data_root={root}")


def test_policy_error_leaves_no_output_directory(tmp_path, tiny_model_dir, monkeypatch):
    """The last mixture fails after the first two were written (in the temporary directory): no trace."""
    bad_stage = "dpo"
    root, sets = _bad_recipe(tmp_path, tiny_model_dir, "error", bad_stage)
    monkeypatch.setenv("TRLM_DATA_ROOT", str(root))
    recipe = load_recipe("offline-smoke", overrides=sets)
    out = tmp_path / "work" / "data-prep"
    with pytest.raises(DataValidationError) as info:
        prepare_data(recipe, base_model_dir=tiny_model_dir, out_dir=out, progress=False)
    assert "bad/pairs.jsonl: row 2: field 'chosen'" in str(info.value)
    assert not out.exists()
    assert list((tmp_path / "work").iterdir()) == []  # no temporary directory either

    # the same data under policy drop: written, with the row counted and listed
    recipe = load_recipe("offline-smoke", overrides=[*sets, "data_prep.validation_policy=drop"])
    summary = prepare_data(recipe, base_model_dir=tiny_model_dir, out_dir=out, progress=False)
    assert sum(summary[bad_stage]["dropped"].values()) == 1 and summary[bad_stage]["dropped_rows"][0]["row"] == 2
    assert read_fingerprint(out) == summary["fingerprint"]


def test_cli_exits_non_zero_on_bad_rows(tmp_path, tiny_model_dir, prefect_env):
    """`trlm run --only data-prep` on bad rows, as a user runs it: exit 1, the message naming file,
    row and field, no traceback on the console (it is in the run's log file), no retry, nothing written."""
    from prefect.settings import PREFECT_API_URL

    root, sets = _bad_recipe(tmp_path, tiny_model_dir, "error")
    env = {**os.environ, "TRLM_HOME": str(tmp_path / "home"), "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [sys.executable, "-m", "trlm.cli", "run", "--only", "data-prep", *[a for s in sets for a in ("--set", s)]]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    console = result.stdout + result.stderr
    print(console)
    assert result.returncode == 1, console
    assert "bad/sft-general.jsonl: row 2: field 'messages[1].role'" in result.stderr and "roles do not alternate" in result.stderr
    assert "Traceback" not in console and "Retries are exhausted" not in console and "Retrying" not in console
    log_file = Path(result.stderr.split("full log with the traceback: ")[1].split(")")[0])
    assert "Traceback" in log_file.read_text()
    assert not list((tmp_path / "home" / "mlartifacts").rglob("train.parquet"))
    # a bad recipe value: exit code 2, the key named, before any compute
    result = subprocess.run([*argv, "--set", "dpo.beta=-1"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "dpo.beta" in result.stderr


def test_resolve_rows_keeps_origin_and_errors(tmp_path):
    root = tmp_path / "root"
    write_jsonl(root / "x/a.jsonl", [b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), b"\xff\xfe not json", b"[1, 2]", b"{broken", b"", GOOD])
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "s", "kind": "sft", "sources": [{"name": "a", "path": "x/a.jsonl"}]}))
    rows = list(resolve_rows(load_data_spec(str(spec_path)), root))
    good = [r for r in rows if not isinstance(r, RowError)]
    bad = sorted((e.row, e.kind, e.source) for e in rows if isinstance(e, RowError))
    assert sorted((r["_source"], r["_row"]) for r in good) == [("x/a.jsonl", 1), ("x/a.jsonl", 6)]  # BOM ok, blank line skipped
    assert all(r["messages"] == GOOD["messages"] for r in good)
    assert bad == [(2, "undecodable text", "x/a.jsonl"), (3, "not a JSON object", "x/a.jsonl"), (4, "not valid JSON", "x/a.jsonl")]


# --- 5. fingerprints and stage keys --------------------------------------------------------------


def _data_prep_key(recipe) -> tuple[dict, str]:
    from trlm.runs.lineage import base_fingerprint, compute_key, stage_inputs

    inputs = stage_inputs(recipe, get_stage("data-prep"), {}, base_fingerprint(recipe))
    return inputs, compute_key(recipe, get_stage("data-prep"), inputs)


@pytest.fixture(scope="module")
def edited_root(slices_root, tmp_path_factory) -> Path:
    """A copy of the slices with one row of the GSM8K file changed."""
    root = tmp_path_factory.mktemp("edited") / "data"
    shutil.copytree(slices_root, root)
    edit_row(root / "openai__gsm8k/messages/train.jsonl", 1, "Natalia", "Natasha")
    return root


def test_same_inputs_same_fingerprints_anywhere(prepared, smoke, tiny_model_dir, tmp_path, monkeypatch, slices_root, spec_paths):
    out1, summary1 = prepared
    # the same data at another path, the specs at another path, another output directory
    root2 = tmp_path / "elsewhere" / "data"
    shutil.copytree(slices_root, root2)
    specs2 = {stage: shutil.copy(p, tmp_path / f"copy-{p.name}") for stage, p in spec_paths.items()}
    monkeypatch.setenv("TRLM_DATA_ROOT", str(root2))
    recipe2 = load_recipe("offline-smoke", overrides=overrides({s: Path(p) for s, p in specs2.items()}, tiny_model_dir))
    out2 = tmp_path / "another" / "output"
    summary2 = prepare_data(recipe2, base_model_dir=tiny_model_dir, out_dir=out2, progress=False)
    for stage in TRAINING_STAGES:
        assert summary2[stage]["fingerprint"] == summary1[stage]["fingerprint"]
        assert (out2 / stage / "train.parquet").read_bytes() == (out1 / stage / "train.parquet").read_bytes()
    assert summary2["fingerprint"] == summary1["fingerprint"]
    # and the stage key does not depend on where the data, specs or outputs live
    monkeypatch.setenv("TRLM_DATA_ROOT", str(slices_root))
    inputs1, key1 = _data_prep_key(smoke)
    monkeypatch.setenv("TRLM_DATA_ROOT", str(root2))
    inputs2, key2 = _data_prep_key(recipe2)
    assert inputs1 == inputs2 and key1 == key2


def test_one_changed_row_changes_only_its_mixture(prepared, smoke, tiny_model_dir, tmp_path, monkeypatch, edited_root, slices_root, spec_paths):
    _, summary1 = prepared
    inputs1, key1 = _data_prep_key(smoke)
    monkeypatch.setenv("TRLM_DATA_ROOT", str(edited_root))
    smoke = load_recipe("offline-smoke", overrides=overrides(spec_paths, tiny_model_dir))  # data_root resolves at load
    summary2 = prepare_data(smoke, base_model_dir=tiny_model_dir, out_dir=tmp_path / "out", progress=False)
    assert summary2["sft-think"]["fingerprint"] != summary1["sft-think"]["fingerprint"]
    assert summary2["sft-general"]["fingerprint"] == summary1["sft-general"]["fingerprint"]
    assert summary2["dpo"]["fingerprint"] == summary1["dpo"]["fingerprint"]
    assert summary2["fingerprint"] != summary1["fingerprint"]
    inputs2, key2 = _data_prep_key(smoke)
    assert key2 != key1
    assert {k for k in inputs1 if inputs1[k] != inputs2[k]} == {"file:sft-think/gsm8k"}


def test_data_prep_key_is_stable_across_processes(smoke, tiny_model_dir, spec_paths, slices_root):
    _, key = _data_prep_key(smoke)
    code = (
        "import sys; from trlm.stages.registry import get_stage, load_recipe; from trlm.runs.lineage import base_fingerprint, compute_key, stage_inputs; "
        "r = load_recipe('offline-smoke', overrides=sys.argv[1:]); "
        "s = get_stage('data-prep'); print(compute_key(r, s, stage_inputs(r, s, {}, base_fingerprint(r))))"
    )
    env = {**os.environ, "TRLM_DATA_ROOT": str(slices_root), "PYTHONHASHSEED": "99"}
    out = subprocess.run([sys.executable, "-c", code, *overrides(spec_paths, tiny_model_dir)], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == key


def test_data_prep_key_follows_the_config(smoke, tiny_model_dir, spec_paths):
    _, key = _data_prep_key(smoke)
    for change in ("dpo.data.max_prompt_length=64", "sft_think.data.loss_mask=assistant", "data_prep.validation_policy=error"):
        other = load_recipe("offline-smoke", overrides=overrides(spec_paths, tiny_model_dir, change))
        assert _data_prep_key(other)[1] != key, change
    # training settings are not data-prep's business
    other = load_recipe("offline-smoke", overrides=overrides(spec_paths, tiny_model_dir, "dpo.beta=0.3"))
    assert _data_prep_key(other)[1] == key


# --- 6. `trlm status` after a data-prep run ----------------------------------------------------------


def test_status_done_then_stale(tmp_path, monkeypatch, tiny_model_dir, spec_paths, slices_root):
    from typer.testing import CliRunner

    from trlm.cli import app
    from trlm.runs.lineage import base_fingerprint, code_version, compute_key, stage_config, stage_inputs
    from trlm.runs.tracking import setup_tracking
    from trlm.runs.runner import Work, run_stage

    root = tmp_path / "data"
    shutil.copytree(slices_root, root)
    monkeypatch.setenv("TRLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TRLM_DATA_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sets = overrides(spec_paths, tiny_model_dir)
    recipe = load_recipe("offline-smoke", overrides=sets)
    tracker = setup_tracking(recipe)
    inputs = stage_inputs(recipe, get_stage("data-prep"), {}, base_fingerprint(recipe))
    key = compute_key(recipe, get_stage("data-prep"), inputs)

    def execute(out: Path, on_log) -> dict:
        summary = prepare_data(recipe, base_model_dir=tiny_model_dir, out_dir=out, progress=False)
        return {"_outputs": {s: summary[s]["fingerprint"] for s in TRAINING_STAGES}}

    prep_stage = get_stage("data-prep")
    work = Work("data-prep", key, inputs, stage_config(recipe, prep_stage), code_version(prep_stage), prep_stage.hands_on)
    outcome = run_stage(tracker, recipe, work, execute, parent_run_id=None)
    assert not outcome.cached

    def status() -> dict:
        result = CliRunner().invoke(app, ["status", "--json", *[a for s in sets for a in ("--set", s)]])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["recipe"] == "offline-smoke"
        return {s["stage"]: s for s in doc["stages"]}

    stages = status()
    prep = stages["data-prep"]
    assert prep["state"] == "done" and prep["key"] == key and prep["run_id"] == outcome.run_id
    path = Path(prep["artifact_path"])
    assert path == Path(outcome.path) and str(path).startswith(str(tmp_path / "home"))
    for stage in TRAINING_STAGES:
        assert (path / stage / "train.parquet").is_file()
        assert json.loads((path / stage / "stats.json").read_text())["rows_out"] == ROWS_SELECTED[stage]
        assert prep["outputs"][stage] == read_fingerprint(path / stage)
    assert verify_fingerprint(path) and prep["outputs"]["all"] == read_fingerprint(path)
    assert [stages[s]["state"] for s in ("sft-general", "sft-think", "dpo", "eval")] == ["missing"] * 4
    # a second run is a cache hit
    assert run_stage(tracker, recipe, work, execute, parent_run_id=None).cached

    edit_row(root / "Anthropic__hh-rlhf/harmless-base/test.jsonl.gz", 3, "Human:", "Human: Hey,")
    stages = status()
    assert stages["data-prep"]["state"] == "stale"
    assert stages["data-prep"]["key"] != key and stages["data-prep"]["artifact_path"] is None


# --- the third kind: prompts with a reference answer (GSM8K for online RL) ---------------------


def test_prompt_answer_rows_from_gsm8k(tmp_path, tiny_model_dir, shared_data):
    """GSM8K's question becomes the prompt, rendered exactly as a preference prompt is; the answer
    is the number after ####, commas removed; a row without #### is dropped and named."""
    lines = (shared_data / "openai__gsm8k/main/train.jsonl").read_text().splitlines()[:3]
    rows = [json.loads(line) for line in lines]
    rows.append({"question": "What is 1,000 + 234?", "answer": "1000 + 234 = 1234\n#### 1,234"})
    rows.append({"question": "No final answer here?", "answer": "it is 5"})
    summary, table, out, mixture = run_mixture(tmp_path, tiny_model_dir, "dpo", {"max_prompt_length": None}, rows, kind="prompt_answer",
                                               columns={"prompt": "question"}, transform="gsm8k_prompt_answer")
    assert summary["kind"] == "prompt_answer" and summary["rows_out"] == 4
    assert [d["row"] for d in summary["dropped_rows"]] == [5] and "####" in summary["dropped_rows"][0]["reason"]
    assert sorted(r["answer"] for r in table) == sorted([*(r["answer"].rsplit("####", 1)[1].strip() for r in rows[:3]), "1234"])
    tok = load_tok(out / "tokenizer")
    by_answer = {r["answer"]: r for r in table}
    question = "What is 1,000 + 234?"
    full = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": "Z"}],
                                   chat_template=mixture.chat_template, tokenize=False)
    assert by_answer["1234"]["prompt_input_ids"] == tok(full[: full.rindex("Z")], add_special_tokens=False)["input_ids"]
    assert summary["total_tokens"] == sum(len(r["prompt_input_ids"]) for r in table)
    assert summary["truncated_prompt"] == 0 and summary["target_tokens"] is None
