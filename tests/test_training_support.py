"""Helpers (no tests) for the training-stage tests: data directories in the data-prep format.

SFT dir: train.parquet (input_ids, labels: list<int32>), tokenizer/, stats.json, fingerprint.json.
DPO dir: train.parquet (chosen_/rejected_ input_ids/labels, prompt_length: int32), tokenizer/, ...
Built from real GSM8K chats with the real SmolLM2 tokenizer and its chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trlm.artifacts import write_fingerprint

IGNORE = -100
GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "openai__gsm8k"


def gsm8k_chats(n: int, offset: int = 0, split_file: str = "messages/train.jsonl") -> list[list[dict]]:
    rows = []
    with open(GSM8K / split_file) as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if len(rows) == n:
                break
            rows.append(json.loads(line)["messages"])
    return rows


def think_chat(messages: list[dict]) -> list[dict]:
    """GSM8K answer 'reasoning\\n#### 42' -> '<think>\\nreasoning\\n</think>\\n#### 42'."""
    user, assistant = messages
    reasoning, _, answer = assistant["content"].rpartition("####")
    return [user, {"role": "assistant", "content": f"<think>\n{reasoning.strip()}\n</think>\n#### {answer.strip()}"}]


def make_tokenizer(tokenizer_dir: Path, special_tokens: tuple[str, ...] = ()):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(special_tokens)}, replace_extra_special_tokens=False)
    tok.eos_token = tok.pad_token = "<|im_end|>"
    return tok


def _finish(out: Path, table: pa.Table, tok, stats: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "train.parquet")
    tok.save_pretrained(out / "tokenizer")
    (out / "stats.json").write_text(json.dumps(stats))
    write_fingerprint(out)
    return out


def write_sft_dir(
    out: Path, tokenizer_dir: Path, *, n: int = 16, max_length: int = 96, offset: int = 0, think: bool = False, vary: bool = False, assistant_only: bool = False
) -> Path:
    """vary=True truncates row i to 32 + (17 i mod 64) tokens: short rows of unequal lengths, so
    that token-weighted and per-micro-batch averaging differ (and tests stay fast).
    assistant_only=True masks the prompt (system + user + assistant header) with -100."""
    tok = make_tokenizer(tokenizer_dir, ("<think>", "</think>") if think else ())
    ids_col, lab_col = [], []
    for i, messages in enumerate(gsm8k_chats(n, offset)):
        if think:
            messages = think_chat(messages)
        cap = min(max_length, 32 + (17 * i) % 64) if vary else max_length
        ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"][:cap]
        ids_col.append(ids)
        if assistant_only:
            prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
            lab_col.append([IGNORE] * min(n_prompt, len(ids)) + list(ids[n_prompt:]))
        else:
            lab_col.append(list(ids))  # loss on all tokens, like the published recipe
    table = pa.table({"input_ids": pa.array(ids_col, pa.list_(pa.int32())), "labels": pa.array(lab_col, pa.list_(pa.int32()))})
    return _finish(Path(out), table, tok, {"rows_out": n})


def write_dpo_dir(out: Path, tokenizer_dir: Path, *, n: int = 8, max_length: int = 96, offset: int = 0) -> Path:
    """chosen = the GSM8K answer, rejected = the answer of another question; prompt masked."""
    tok = make_tokenizer(tokenizer_dir)
    chats = gsm8k_chats(n + 1, offset)
    cols: dict[str, list] = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "prompt_length")}
    for i in range(n):
        prompt = tok(tok.apply_chat_template(chats[i][:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        prompt = prompt[-(max_length // 2) :]
        for side, answer in (("chosen", chats[i][1]["content"]), ("rejected", chats[i + 1][1]["content"])):
            completion = tok(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
            ids = (prompt + completion)[:max_length]
            cols[f"{side}_input_ids"].append(ids)
            cols[f"{side}_labels"].append(([IGNORE] * len(prompt) + completion)[:max_length])
        cols["prompt_length"].append(len(prompt))
    types = {k: pa.list_(pa.int32()) for k in cols}
    types["prompt_length"] = pa.int32()
    table = pa.table({k: pa.array(v, types[k]) for k, v in cols.items()})
    return _finish(Path(out), table, tok, {"rows_out": n})


def sft_config(**train):
    from trlm.stages.sft import SFTStageConfig

    neftune = train.pop("neftune_alpha", None)
    loss_type = train.pop("loss_type", "nll")
    base = dict(batch_size=4, learning_rate=1e-3, lr_scheduler="constant", max_steps=2, precision="fp32", seed=0, save_steps=100)
    data = {"spec": "test", "chat_template": "x", "max_length": 96}
    return SFTStageConfig.model_validate({"data": data, "train": {**base, **train}, "neftune_alpha": neftune, "loss_type": loss_type})


def dpo_config(**train):
    from trlm.stages.dpo import DPOStageConfig

    extra = {k: train.pop(k) for k in ("loss_type", "beta", "precompute_ref_logps", "label_smoothing", "share_prompt") if k in train}
    base = dict(batch_size=2, learning_rate=1e-3, lr_scheduler="constant", max_steps=2, precision="fp32", seed=0, save_steps=100)
    data = {"spec": "test", "chat_template": "x", "max_length": 96}
    return DPOStageConfig.model_validate({"data": data, "train": {**base, **train}, **extra})


def model_state(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def write_prompt_answer_dir(out: Path, tokenizer_dir: Path, *, n: int = 8, think: bool = True) -> Path:
    """GSM8K questions as prompts (up to the assistant header) and their reference numbers (kind prompt_answer)."""
    tok = make_tokenizer(tokenizer_dir, ("<think>", "</think>") if think else ())
    prompts, answers = [], []
    for messages in gsm8k_chats(n):
        prompts.append(tok(tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
        answers.append(messages[1]["content"].rsplit("####", 1)[1].strip().replace(",", ""))
    table = pa.table({"prompt_input_ids": pa.array(prompts, pa.list_(pa.int32())), "answer": pa.array(answers, pa.string())})
    return _finish(Path(out), table, tok, {"rows_out": n})


def grpo_config(**settings):
    from trlm.stages.grpo import GRPOStageConfig

    train_keys = ("batch_size", "learning_rate", "lr_scheduler", "max_steps", "precision", "seed", "save_steps", "save_total_limit", "grad_accum_steps")
    train = {k: settings.pop(k) for k in train_keys if k in settings}
    base = dict(batch_size=2, learning_rate=1e-3, lr_scheduler="constant", max_steps=2, precision="fp32", seed=0, save_steps=100)
    data = {"spec": "test", "chat_template": "x", "max_length": 96}
    extra = dict(num_generations=3, max_completion_length=6, rewards={"contains_seven": 1.0, "short_answer": 0.5})
    return GRPOStageConfig.model_validate({"data": data, "train": {**base, **train}, **{**extra, **settings}})
