"""SFT stage (`stages/sft.py`) and the shared helpers (`trlm/training/loop.py`, `batching.py`, ...), on a tiny Llama.

Every test runs the real stage code on CPU in fp32 with real GSM8K chats and the real SmolLM2
tokenizer; a stage call takes about a second.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from test_training_support import model_state, sft_config, write_sft_dir
from trlm.stages import sft as sft_stage
from trlm.training.attention import install_head_forward, register_packed_sdpa
from trlm.training.batching import collate, load_ragged, unpack_rows
from trlm.training.checkpoints import CHECKPOINTS
from trlm.training.loop import NonFiniteError
from trlm.training.losses import chunked_sft_loss_sum, count_target_tokens
from trlm.training.modeling import resize_for_tokenizer
from trlm.training.optim import lr_factor
from trlm.stages.sft import train_sft


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, tokenizer_dir) -> Path:
    # Rows of 32..95 tokens (GSM8K chats cut at different lengths): unequal lengths, fast steps.
    return write_sft_dir(tmp_path_factory.mktemp("sft-data"), tokenizer_dir, n=16, vary=True)


@pytest.fixture(scope="module")
def think_data(tmp_path_factory, tokenizer_dir) -> Path:
    return write_sft_dir(tmp_path_factory.mktemp("think-data"), tokenizer_dir, n=8, max_length=160, think=True)


def run(cfg, model_dir, data_dir, out_dir, on_log=None):
    logs: list[tuple[int, dict]] = []

    def record(metrics, step):
        logs.append((step, dict(metrics)))
        if on_log is not None:
            on_log(metrics, step)

    summary = train_sft(cfg, model_dir=model_dir, data_dir=data_dir, out_dir=out_dir, on_log=record)
    return summary, logs


def first_rows(data_dir: Path, n: int):
    data = load_ragged(data_dir / "train.parquet", ["input_ids", "labels"])
    return [(data["input_ids"][i], data["labels"][i]) for i in range(n)]


# --- padding-free batching ----------------------------------------------------------------------


def test_collate_packs_documents_and_masks_their_starts(sft_data):
    seqs = first_rows(sft_data, 3)
    lengths = [len(s[0]) for s in seqs]
    packed = collate(seqs, padding_free=True, pad_id=2)
    padded = collate(seqs, padding_free=False, pad_id=2)
    assert packed["input_ids"].shape == (1, sum(lengths)) and packed["attention_mask"] is None
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert packed["position_ids"][0, starts].tolist() == [0, 0, 0]
    assert packed["position_ids"][0, starts[1] - 1].item() == lengths[0] - 1
    # The last token of document k never predicts the first token of document k+1.
    assert (packed["labels"][0, starts] == -100).all()
    assert packed["doc_lengths"][0, starts].tolist() == lengths
    assert padded["input_ids"].shape == (3, max(lengths)) and padded["attention_mask"].sum() == sum(lengths)
    # Same number of target tokens either way: the divisor of the loss does not depend on packing.
    assert count_target_tokens(packed["labels"]) == count_target_tokens(padded["labels"]) == sum(n - 1 for n in lengths)


@pytest.mark.parametrize("attn", ["packed_sdpa", "sdpa", "eager"])
def test_packed_loss_equals_padded_loss_and_separate_documents(sft_data, attn):
    """Position resets keep packed documents apart: ours (one SDPA call per document) and
    transformers' own kernels (a block-diagonal mask): packed == padded == one document at a time."""
    torch.manual_seed(0)
    register_packed_sdpa()
    model = make_tiny_llama().float()
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    install_head_forward(model)
    seqs = first_rows(sft_data, 4)
    assert len({len(s[0]) for s in seqs}) > 1, "the test needs documents of different lengths"

    def loss_and_grad(batch):
        model.zero_grad()
        head = lambda h, w: chunked_sft_loss_sum(h, w, batch["labels"])  # noqa: E731
        loss_sum, n, _ = model(batch["input_ids"], head=head, position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
        (loss_sum / n).backward()
        return (loss_sum / n).item(), int(n), torch.cat([p.grad.flatten() for p in model.parameters()])

    packed = loss_and_grad(collate(seqs, padding_free=True, pad_id=2))
    padded = loss_and_grad(collate(seqs, padding_free=False, pad_id=2))
    assert packed[1] == padded[1]
    assert packed[0] == pytest.approx(padded[0], abs=1e-5)
    assert torch.allclose(packed[2], padded[2], atol=1e-6), (packed[2] - padded[2]).abs().max()

    # And equal to each document run on its own: no attention across documents.
    sums, count = 0.0, 0
    for s in seqs:
        b = collate([s], padding_free=True, pad_id=2)
        loss_sum, n, _ = model(b["input_ids"], head=lambda h, w: chunked_sft_loss_sum(h, w, b["labels"]), position_ids=b["position_ids"])
        sums, count = sums + loss_sum.item(), count + int(n)
    assert sums / count == pytest.approx(packed[0], abs=1e-5)

    # The stages pass the document lengths down explicitly (no device sync); same result.
    b = collate(seqs, padding_free=True, pad_id=2)
    with torch.no_grad():
        explicit, n, _ = model(b["input_ids"], head=lambda h, w: chunked_sft_loss_sum(h, w, b["labels"]),
                               position_ids=b["position_ids"], packed_lengths=b["packed_lengths"])
    assert explicit.item() / n.item() == pytest.approx(packed[0], abs=1e-5)

    # Control: the same packed row WITHOUT the position resets is plain causal attention over the
    # concatenation, and the loss changes, so the equality above is the mask at work.
    b = collate(seqs, padding_free=True, pad_id=2)
    with torch.no_grad():
        leaky, n, _ = model(b["input_ids"], head=lambda h, w: chunked_sft_loss_sum(h, w, b["labels"]), position_ids=None)
    assert abs(leaky.item() / n.item() - packed[0]) > 1e-3


def test_unpack_rows_roundtrip():
    flat = torch.arange(10).reshape(1, 10, 1).float()
    rows = unpack_rows(flat, [3, 5, 2], -1.0)
    assert rows.shape == (3, 5, 1)
    assert rows[..., 0].tolist() == [[0, 1, 2, -1, -1], [3, 4, 5, 6, 7], [8, 9, -1, -1, -1]]


# --- the trainer --------------------------------------------------------------------------------


def test_gradient_accumulation_and_packing_give_the_same_steps(tmp_path, tiny_model_dir, sft_data):
    """batch 8 x accum 1 == batch 1 x accum 8 == padded batch 4 x accum 2: same loss, same gradient.

    The loss is the token mean over the whole optimizer step; the pre-clip gradient norm being equal
    to 1e-6 (relative) shows the gradients are the same, not just the loss.
    """
    variants = {
        "8x1": dict(batch_size=8, grad_accum_steps=1),
        "1x8": dict(batch_size=1, grad_accum_steps=8),
        "4x2-padded": dict(batch_size=4, grad_accum_steps=2, padding_free=False),
        "8x1-checkpointed": dict(batch_size=8, gradient_checkpointing=True),
    }
    results = {}
    for name, kw in variants.items():
        _, logs = run(sft_config(max_steps=2, max_grad_norm=1e9, **kw), tiny_model_dir, sft_data, tmp_path / name)
        results[name] = (logs, model_state(tmp_path / name / "model"))
    ref_logs, ref_state = results["8x1"]
    for name in ("1x8", "4x2-padded", "8x1-checkpointed"):
        logs, state = results[name]
        for (_, a), (_, b) in zip(ref_logs, logs):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
            assert b["mean_token_accuracy"] == pytest.approx(a["mean_token_accuracy"], abs=1e-9)
        # Two AdamW steps at lr 1e-3: float-rounding differences in the summation order move a
        # weight by < 2% of one step (Adam normalises near-zero gradient components).
        assert max((ref_state[k] - state[k]).abs().max().item() for k in ref_state) < 2e-5


def test_sft_loss_falls(tmp_path, tiny_model_dir, sft_data):
    summary, logs = run(sft_config(max_steps=12, learning_rate=1e-2, lr_scheduler="cosine", warmup_ratio=0.1, batch_size=4), tiny_model_dir, sft_data, tmp_path / "out")
    losses = [m["loss"] for _, m in logs]
    assert len(logs) == 12 and logs[-1][0] == 12
    assert losses[0] == pytest.approx(math.log(49152), abs=0.2)  # a random model: uniform over the vocabulary
    assert sum(losses[-4:]) / 4 < losses[0] - 2.0
    assert logs[0][1]["learning_rate"] == 0.0  # warmup starts at 0, as in transformers
    for _, m in logs:
        assert {"loss", "grad_norm", "learning_rate", "tokens_per_second", "epoch", "mean_token_accuracy"} <= set(m)
        assert m["tokens_per_second"] > 0
    assert logs[-1][1]["epoch"] == pytest.approx(12 * 4 / 16)
    assert summary["loss"] == losses[-1] and summary["steps"] == 12
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [h["step"] for h in saved["history"]] == list(range(1, 13))


def test_neftune_noise_only_in_training_forward_passes(tmp_path, tiny_model_dir, sft_data, monkeypatch):
    """With NEFTune the training forward sees noisy embeddings; eval-mode forwards stay clean; the
    hook is removed when the stage ends."""
    seen = {}
    real_attach = sft_stage.attach_neftune

    def spy_attach(model, alpha):
        handle = real_attach(model, alpha)
        emb = model.get_input_embeddings()
        ids = torch.tensor([[1, 2, 3, 4]])
        model.eval()
        seen["eval_clean"] = torch.equal(emb(ids), emb(ids))
        model.train()
        seen["train_noisy"] = not torch.equal(emb(ids), emb(ids))
        seen["model"] = model
        return handle

    monkeypatch.setattr(sft_stage, "attach_neftune", spy_attach)
    cfg = dict(max_steps=1, batch_size=4)
    _, clean = run(sft_config(**cfg), tiny_model_dir, sft_data, tmp_path / "clean")
    _, noisy = run(sft_config(neftune_alpha=50.0, **cfg), tiny_model_dir, sft_data, tmp_path / "noisy")
    assert seen["eval_clean"] and seen["train_noisy"]
    assert noisy[0][1]["loss"] != pytest.approx(clean[0][1]["loss"], abs=1e-4)  # the training step saw noise
    assert not seen["model"].get_input_embeddings()._forward_hooks  # removed at the end of the stage


def test_special_tokens_resize_embedding_to_piece_means(tmp_path, tiny_model_dir, think_data):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    model = make_tiny_llama()
    old = model.get_input_embeddings().weight.detach().clone()
    tok = AutoTokenizer.from_pretrained(think_data / "tokenizer")
    assert resize_for_tokenizer(model, tok) == 2
    new = model.get_input_embeddings().weight.detach()
    assert new.shape[0] == 49154 and torch.equal(new[:49152], old)
    pieces = {t: tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] for t in ("<think>", "</think>")}
    assert pieces["<think>"] != pieces["</think>"] and all(i < 49152 for p in pieces.values() for i in p)
    assert torch.allclose(new[49152], old[pieces["<think>"]].mean(0), atol=1e-7)
    assert torch.allclose(new[49153], old[pieces["</think>"]].mean(0), atol=1e-7)
    assert not torch.allclose(new[49152], new[49153])  # distinct tokens start distinct
    assert model.lm_head.weight.data_ptr() == new.data_ptr()  # still tied

    # Through the stage (lr ~ 0, so the rows are still at their initial value after one step).
    summary, _ = run(sft_config(max_steps=1, learning_rate=1e-12), tiny_model_dir, think_data, tmp_path / "out")
    out = tmp_path / "out" / "model"
    assert summary["added_tokens"] == 2
    emb = model_state(out)["model.embed_tokens.weight"]
    assert emb.shape == (49154, 64)
    assert torch.allclose(emb[49152], emb[pieces["<think>"]].mean(0), atol=1e-6)
    assert AutoConfig.from_pretrained(out).vocab_size == 49154
    saved = AutoTokenizer.from_pretrained(out)
    think = saved.encode("<think>", add_special_tokens=False)
    assert think == [49152] and saved.encode("</think>", add_special_tokens=False) == [49153]
    assert saved.chat_template and "<|im_start|>" in saved.chat_template
    im_end = saved.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(out).eos_token_id == im_end
    assert AutoConfig.from_pretrained(out).eos_token_id == im_end


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.float32), ("bf16-pure", torch.bfloat16)])
def test_bf16_precisions(tmp_path, tiny_model_dir, sft_data, precision, dtype):
    """bf16 autocast keeps fp32 weights; bf16-pure trains and saves bf16 weights. Step-1 loss within
    bf16 accuracy of the fp32 one (the chunked head computes the logits in fp32 either way)."""
    _, ref = run(sft_config(max_steps=1, batch_size=4), tiny_model_dir, sft_data, tmp_path / "fp32")
    summary, logs = run(sft_config(max_steps=2, batch_size=4, precision=precision), tiny_model_dir, sft_data, tmp_path / precision)
    assert logs[0][1]["loss"] == pytest.approx(ref[0][1]["loss"], abs=0.05)
    assert math.isfinite(summary["loss"]) and summary["loss"] < logs[0][1]["loss"]
    assert model_state(tmp_path / precision / "model")["model.norm.weight"].dtype == dtype


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "fp32")])
def test_bf16_mixed_if_native_follows_the_cpu(monkeypatch, native, expected):
    """bf16-mixed-if-native: bf16 autocast on a CPU that multiplies bf16 in hardware, fp32 on one that
    would emulate it (slower than fp32)."""
    from trlm.training import modeling

    monkeypatch.setattr(modeling, "native_cpu_bf16", lambda: native)
    accelerator, dtype, precision = modeling.make_accelerator("bf16-mixed-if-native")
    assert (precision, dtype) == (expected, torch.float32)
    assert accelerator.mixed_precision == ("bf16" if native else "no")


# --- a non-finite step stops the stage ----------------------------------------------------------


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a non-finite gradient norm under a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_sft_loss(monkeypatch, *, call: int, kind: str) -> None:
    """Make the `call`-th SFT loss head NaN: its loss value ("loss", the gradients stay finite) or its
    gradient ("gradient norm", the loss stays finite)."""
    real, calls = sft_stage.chunked_sft_loss_sum, [0]

    def head(*args, **kwargs):
        loss_sum, n_targets, n_correct = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == call:
            loss_sum = loss_sum + float("nan") if kind == "loss" else NanGradient.apply(loss_sum)
        return loss_sum, n_targets, n_correct

    monkeypatch.setattr(sft_stage, "chunked_sft_loss_sum", head)


@pytest.mark.parametrize("kind", ["loss", "gradient norm"])
def test_non_finite_step_stops_the_stage(tmp_path, tiny_model_dir, sft_data, monkeypatch, kind):
    """A NaN at step 2 raises before that step is applied, naming the step and the last good
    checkpoint; no model/, metrics.json or fingerprint.json is written (the caller marks the run FAILED)."""
    poison_sft_loss(monkeypatch, call=2, kind=kind)  # batch 4, accumulation 1: the 2nd forward is step 2
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as info:
        run(sft_config(max_steps=4, save_steps=1), tiny_model_dir, sft_data, out)
    message = str(info.value)
    assert f"sft: non-finite {kind} nan at step 2" in message
    assert f"Last good checkpoint: {out / CHECKPOINTS / 'step-000001'}" in message
    assert not (out / "model").exists() and not (out / "fingerprint.json").exists() and not (out / "metrics.json").exists()
    assert sorted(p.name for p in (out / CHECKPOINTS).iterdir()) == ["step-000001"]


# --- checkpoints and resume ---------------------------------------------------------------------


class Crash(RuntimeError):
    pass


def crash_at(step_to_crash: int):
    def on_log(metrics, step):
        if step == step_to_crash:
            raise Crash(f"simulated crash at step {step}")

    return on_log


@pytest.mark.parametrize("keep", [False, True])
def test_no_checkpoint_after_the_last_step_unless_kept(tmp_path, tiny_model_dir, sft_data, monkeypatch, keep):
    """The model is written right after the last step: a checkpoint there is only written when kept."""
    from trlm.training import loop

    saved = []
    real = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda accelerator, out_dir, step, *a, **k: saved.append(step) or real(accelerator, out_dir, step, *a, **k))
    run(sft_config(max_steps=4, batch_size=2, save_steps=2, keep_checkpoints=keep), tiny_model_dir, sft_data, tmp_path / "out")
    assert saved == ([2, 4] if keep else [2])
    assert (tmp_path / "out" / "model").is_dir()


@pytest.mark.parametrize("corrupt", [False, True], ids=["clean-crash", "half-written-checkpoints"])
def test_resume_after_crash_is_bit_identical(tmp_path, tiny_model_dir, sft_data, corrupt):
    """Crash at step 5 (checkpoints at 2 and 4), call again: the final weights equal an uninterrupted
    run's exactly. NEFTune is on, so the RNG state must be restored too; accumulation 2 and 1.5
    epochs exercise the data position. A `.tmp-*` directory and a step dir without its completion
    marker (what a kill during a save leaves) are ignored and removed."""
    settings = dict(max_steps=6, batch_size=2, grad_accum_steps=2, save_steps=2, save_total_limit=2, neftune_alpha=5.0, lr_scheduler="cosine", warmup_ratio=0.2)
    cfg = sft_config(**settings)
    _, full_logs = run(cfg, tiny_model_dir, sft_data, tmp_path / "full")
    assert not (tmp_path / "full" / CHECKPOINTS).exists(), "a finished stage drops its checkpoints by default"

    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        run(cfg, tiny_model_dir, sft_data, out, on_log=crash_at(5))
    ckpts = out / CHECKPOINTS
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    assert not (out / "fingerprint.json").exists() and not (out / "model").exists()
    if corrupt:
        tmp = ckpts / ".tmp-step-000006-deadbeef"
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"half")
        fake = ckpts / "step-000005"  # looks newer, but has no COMPLETE marker
        fake.mkdir()
        (fake / "trainer_state.json").write_text(json.dumps({"step": 8}))

    # keep_checkpoints changes no output, so flipping it does not block the resume
    _, resumed_logs = run(sft_config(**settings, keep_checkpoints=True), tiny_model_dir, sft_data, out)
    assert [s for s, _ in resumed_logs] == [5, 6]  # continued after step 4
    full, resumed = model_state(tmp_path / "full" / "model"), model_state(out / "model")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    for (_, a), (_, b) in zip(full_logs[4:], resumed_logs):
        assert a["loss"] == b["loss"] and a["learning_rate"] == b["learning_rate"]
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 7))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000004", "step-000006"]  # kept; save_total_limit=2


def test_finished_stage_returns_saved_summary(tmp_path, tiny_model_dir, sft_data, monkeypatch):
    summary, _ = run(sft_config(max_steps=1), tiny_model_dir, sft_data, tmp_path / "out")
    assert (tmp_path / "out" / "fingerprint.json").is_file()

    def boom(*a, **k):
        raise AssertionError("a finished stage must not train again")

    monkeypatch.setattr(sft_stage, "setup_training", boom)
    again, logs = run(sft_config(max_steps=1), tiny_model_dir, sft_data, tmp_path / "out")
    assert again == json.loads(json.dumps(summary)) and logs == []


def test_resume_refuses_a_different_config(tmp_path, tiny_model_dir, sft_data):
    out = tmp_path / "out"
    with pytest.raises(Crash):
        run(sft_config(max_steps=4, save_steps=1), tiny_model_dir, sft_data, out, on_log=crash_at(2))
    with pytest.raises(ValueError, match="different stage config"):
        run(sft_config(max_steps=4, save_steps=1, learning_rate=5e-4), tiny_model_dir, sft_data, out)


# --- schedules, CLI, several processes ----------------------------------------------------------


def test_lr_schedules():
    kw = dict(total_steps=110, warmup_steps=10)
    assert [lr_factor(s, kind="cosine", **kw) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert lr_factor(60, kind="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(110, kind="cosine", **kw) == pytest.approx(0.0)
    assert lr_factor(60, kind="linear", **kw) == pytest.approx(0.5)
    assert lr_factor(60, kind="constant", **kw) == 1.0
    assert lr_factor(110, kind="cosine_with_min_lr", min_lr_rate=0.1, **kw) == pytest.approx(0.1)
    assert lr_factor(60, kind="cosine_with_min_lr", min_lr_rate=0.1, **kw) == pytest.approx(0.55)


def test_cli_main_with_config_file(tmp_path, tiny_model_dir, sft_data, capsys):
    cfg = tmp_path / "sft.json"
    cfg.write_text(sft_config(max_steps=1).model_dump_json())
    sft_stage.main(["--config", str(cfg), "--model-dir", str(tiny_model_dir), "--data-dir", str(sft_data), "--out-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "fingerprint.json").is_file()
    assert '"steps": 1' in capsys.readouterr().out


def test_stage_subprocess_streams_metrics_to_on_log(tmp_path, tiny_model_dir, sft_data):
    """The flow's multi-GPU path runs the stage CLI in a subprocess (under `accelerate launch`); its
    per-step JSON lines must reach on_log (MLflow) live, and its saved summary must come back."""
    from trlm.flows.launch import run_stage_process

    cfg = tmp_path / "sft.json"
    cfg.write_text(sft_config(max_steps=3, batch_size=2).model_dump_json())
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trlm.stages.sft", "--config", str(cfg), "--model-dir", str(tiny_model_dir),
           "--data-dir", str(sft_data), "--out-dir", str(out)]
    logged, lines = [], []
    summary = run_stage_process(cmd, out, lambda m, step: logged.append((step, m)), lines.append)
    saved = json.loads((out / "metrics.json").read_text())
    assert summary == saved["summary"] and summary["steps"] == 3
    assert [step for step, _ in logged] == [1, 2, 3]
    for (_, m), h in zip(logged, saved["history"]):
        assert m["loss"] == pytest.approx(h["loss"], abs=1e-6) and "step" not in m
    assert any(line.startswith('{"step": 1') for line in lines)
    with pytest.raises(RuntimeError, match="exited with 2"):  # a missing --config file
        run_stage_process([*cmd[:4], str(tmp_path / "missing.json"), *cmd[5:]], tmp_path / "x", lambda m, s: None, lines.append)


def test_stage_cli_rejects_bad_input_before_any_compute(tmp_path, tiny_model_dir, sft_data, capsys):
    good = tmp_path / "sft.json"
    good.write_text(sft_config(max_steps=1).model_dump_json())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(good.read_text()), "train": {**json.loads(good.read_text())["train"], "learning_rate": -1}}))
    dirs = ["--model-dir", str(tiny_model_dir), "--data-dir", str(sft_data), "--out-dir", str(tmp_path / "out")]
    cases = {
        "no such file": ["--config", str(tmp_path / "missing.json"), *dirs],
        "train.learning_rate": ["--config", str(bad), *dirs],
        "no train.parquet": ["--config", str(good), *dirs[:2], "--data-dir", str(tmp_path), *dirs[4:]],
        "no config.json": ["--config", str(good), "--model-dir", str(tmp_path), *dirs[2:]],
        "unknown stage": ["--recipe", "offline-smoke", "--stage", "sft-generale", *dirs],
        "this entry point needs SFTStageConfig": ["--recipe", "offline-smoke", "--stage", "dpo", *dirs],
    }
    for message, argv in cases.items():
        with pytest.raises(SystemExit) as info:
            sft_stage.main(argv)
        assert info.value.code == 2, message
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_stage_cli_rejects_a_duplicate_key_in_a_config_file(tmp_path, tiny_model_dir, sft_data, capsys):
    """A --config file is read like a recipe: a duplicated key is an error, not "the last one wins"."""
    import yaml

    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(json.loads(sft_config(max_steps=1).model_dump_json())) + "loss_type: dft\n")
    argv = ["--config", str(config), "--model-dir", str(tiny_model_dir), "--data-dir", str(sft_data), "--out-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        sft_stage.main(argv)
    assert info.value.code == 2 and "duplicate key 'loss_type'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_packed_sdpa_rejects_lengths_that_do_not_cover_the_row():
    register_packed_sdpa()
    model = make_tiny_llama().float()
    model.set_attn_implementation("packed_sdpa")
    install_head_forward(model)
    ids = torch.randint(0, 100, (1, 10))
    with pytest.raises(ValueError, match="sum to 9 but the row has 10"):
        model(ids, head=lambda h, w: h.sum(), position_ids=torch.arange(10)[None], packed_lengths=[4, 5])


NAN_ON_ONE_RANK_SCRIPT = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_training_support import sft_config
from trlm.stages import sft
from trlm.training.loop import NonFiniteError
real, calls = sft.chunked_sft_loss_sum, [0]
def head(*args, **kwargs):  # rank 1's loss is NaN at step 2, its gradients finite
    loss_sum, *rest = real(*args, **kwargs)
    calls[0] += 1
    return (loss_sum + float("nan") if calls[0] == 2 and os.environ["RANK"] == "1" else loss_sum, *rest)
sft.chunked_sft_loss_sum = head
try:
    sft.train_sft(sft_config(max_steps=3, batch_size=2), model_dir={model!r}, data_dir={data!r}, out_dir={out!r})
except NonFiniteError as exc:
    Path({out!r}, "raised-" + os.environ["RANK"]).write_text(str(exc))
"""


def test_non_finite_loss_on_one_process_stops_every_process(tmp_path, tiny_model_dir, sft_data):
    """2 CPU processes, a NaN loss on rank 1 only (finite gradients, so a finite gradient norm on both):
    the losses are reduced before the check, so both ranks raise at step 2 and none trains on alone."""
    out = tmp_path / "ddp"
    script = tmp_path / "nan.py"
    script.write_text(NAN_ON_ONE_RANK_SCRIPT.format(tests=str(Path(__file__).parent), model=str(tiny_model_dir), data=str(sft_data), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(30500 + os.getpid() % 1000), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in ("0", "1"):
        assert "non-finite loss nan at step 2" in (out / f"raised-{rank}").read_text()
    assert not (out / "model").exists() and not (out / "fingerprint.json").exists()
