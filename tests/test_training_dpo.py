"""DPO stage (`stages/dpo.py`) on a tiny Llama, CPU, fp32, real GSM8K-based pairs."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_training_support import dpo_config, model_state, write_dpo_dir
from trlm.stages import dpo as dpo_stage
from trlm.stages.dpo import REFERENCE_FILE, pair_batch, train_dpo
from trlm.training.batching import load_ragged
from trlm.training.loop import NonFiniteError

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
           "grad_norm", "learning_rate", "tokens_per_second", "pairs_per_second", "epoch")


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory, tokenizer_dir) -> Path:
    return write_dpo_dir(tmp_path_factory.mktemp("dpo-data"), tokenizer_dir, n=8, max_length=80)


def run(cfg, model_dir, data_dir, out_dir, on_log=None):
    logs: list[tuple[int, dict]] = []

    def record(metrics, step):
        logs.append((step, dict(metrics)))
        if on_log is not None:
            on_log(metrics, step)

    summary = train_dpo(cfg, model_dir=model_dir, data_dir=data_dir, out_dir=out_dir, on_log=record)
    return summary, logs


def test_pair_batch_layout(dpo_data):
    data = load_ragged(dpo_data / "train.parquet", dpo_stage.COLUMNS)
    batch = pair_batch(data, [0, 3], padding_free=True, pad_id=2)
    lengths = [len(data["chosen_input_ids"][0]), len(data["chosen_input_ids"][3]), len(data["rejected_input_ids"][0]), len(data["rejected_input_ids"][3])]
    assert batch["seq_lengths"] == lengths and batch["input_ids"].shape == (1, sum(lengths))
    padded = pair_batch(data, [0, 3], padding_free=False, pad_id=2)
    assert padded["input_ids"].shape == (4, max(lengths))


def test_shared_prompt_layout(dpo_data):
    """The row holds each prompt once; gathering it back gives exactly the unshared packed row."""
    data = load_ragged(dpo_data / "train.parquet", dpo_stage.COLUMNS)
    full = pair_batch(data, [0, 3], padding_free=True, pad_id=2)
    shared = pair_batch(data, [0, 3], padding_free=True, pad_id=2, share_prompt=True)
    prompts = sum(int(data["prompt_length"][i]) for i in (0, 3)) if "prompt_length" in data else None
    saved = full["input_ids"].shape[1] - shared["input_ids"].shape[1]
    assert saved >= (prompts or 1)
    assert torch.equal(shared["input_ids"][:, shared["to_virtual"]], full["input_ids"])
    assert torch.equal(shared["position_ids"][:, shared["to_virtual"]], full["position_ids"])
    assert torch.equal(full["input_ids"][:, shared["to_real"]], shared["input_ids"])
    assert torch.equal(shared["to_virtual"][shared["to_real"]], torch.arange(shared["input_ids"].shape[1]))
    for key in ("labels", "seq_lengths", "packed_lengths"):  # the head and the kernel see the full sequences
        assert (torch.equal(shared[key], full[key]) if key == "labels" else shared[key] == full[key])


def _pairs(*pairs):
    cols = {k: [] for k in dpo_stage.COLUMNS}
    for prompt, chosen, rejected in pairs:
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            cols[f"{side}_input_ids"].append(np.array(prompt + completion))
            cols[f"{side}_labels"].append(np.array([-100] * len(prompt) + completion))
    return cols


def test_shared_prompt_forward_and_backward_are_exact():
    """Log-probs and every parameter gradient equal the unshared forward's (fp32), including pairs
    whose completions start alike, a pair with identical sides and one without a common prefix."""
    from conftest import make_tiny_llama
    from trlm.training.attention import install_head_forward, register_packed_sdpa

    register_packed_sdpa()
    torch.manual_seed(0)
    model = make_tiny_llama().float()
    model.set_attn_implementation("packed_sdpa")
    install_head_forward(model)
    g = torch.Generator().manual_seed(1)
    r = lambda n: torch.randint(5, 500, (n,), generator=g).tolist()  # noqa: E731
    p, same = r(12), r(6)
    data = _pairs((p, r(7), r(9)), (r(20), same + r(3), same + r(5)), (r(4), same, same), ([], r(6), r(8)))
    rows = list(range(4))
    results = {}
    for share in (False, True):
        model.zero_grad()
        batch = pair_batch(data, rows, padding_free=True, pad_id=2, share_prompt=share)
        logps, tokens = dpo_stage.forward_logps(model, batch)
        (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
        results[share] = (logps.detach(), tokens, {n: q.grad.clone() for n, q in model.named_parameters()}, batch["input_ids"].shape[1])
    (a, ta, ga, na), (b, tb, gb, nb) = results[False], results[True]
    assert nb == na - (12 + (20 + 6) + (4 + 6) + 0)  # each pair's common prefix once
    assert torch.equal(ta, tb)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "loss_type, expected, precompute, padding_free",
    [
        ("apo_zero", 1.0, True, True),
        ("sigmoid", math.log(2), True, True),
        ("apo_zero", 1.0, False, False),
        ("sigmoid", math.log(2), False, True),
    ],
    ids=["apo_zero-precomputed-packed", "sigmoid-precomputed-packed", "apo_zero-live-ref-padded", "sigmoid-live-ref-packed"],
)
def test_loss_at_initialisation(tmp_path, tiny_model_dir, dpo_data, loss_type, expected, precompute, padding_free):
    """Step 1 (before any update): policy == reference, so apo_zero = 1 and sigmoid = ln 2."""
    cfg = dpo_config(max_steps=1, batch_size=2, grad_accum_steps=2, loss_type=loss_type, precompute_ref_logps=precompute, padding_free=padding_free)
    _, logs = run(cfg, tiny_model_dir, dpo_data, tmp_path / "out")
    first = logs[0][1]
    assert first["loss"] == pytest.approx(expected, abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5) and first["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert first["grad_norm"] > 0
    assert (tmp_path / "out" / REFERENCE_FILE).is_file() == precompute


def test_every_metric_logged_at_every_step(tmp_path, tiny_model_dir, dpo_data):
    cfg = dpo_config(max_steps=4, batch_size=2, loss_type="apo_zero", learning_rate=1e-3)
    summary, logs = run(cfg, tiny_model_dir, dpo_data, tmp_path / "out")
    assert [s for s, _ in logs] == [1, 2, 3, 4]
    for _, m in logs:
        assert set(METRICS) <= set(m)
        assert all(math.isfinite(m[k]) for k in METRICS)
        assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-6)
        assert 0.0 <= m["rewards/accuracies"] <= 1.0
        assert m["logps/chosen"] < 0 and m["logps/rejected"] < 0
    assert logs[1][1]["rewards/chosen"] != 0.0  # the policy moved away from the reference
    assert summary["steps"] == 4 and summary["model_dir"].endswith("model")
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and set(METRICS) <= set(history[0])


def test_dpo_learns_a_repeated_preference(tmp_path, tiny_model_dir, tokenizer_dir):
    data = write_dpo_dir(tmp_path / "data", tokenizer_dir, n=2, max_length=80)
    _, logs = run(dpo_config(max_steps=5, batch_size=2, loss_type="sigmoid", learning_rate=1e-3), tiny_model_dir, data, tmp_path / "out")
    losses = [m["loss"] for _, m in logs]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert logs[-1][1]["rewards/accuracies"] == 1.0 and logs[-1][1]["rewards/margins"] > 0


def test_gradient_accumulation_and_packing_give_the_same_steps(tmp_path, tiny_model_dir, dpo_data):
    """4 pairs x 1 == 1 pair x 4 == padded 2 x 2: the loss is the mean over the step's pairs."""
    results = {}
    variants = {
        "4x1": dict(batch_size=4),
        "1x4": dict(batch_size=1, grad_accum_steps=4),
        "2x2-padded": dict(batch_size=2, grad_accum_steps=2, padding_free=False),
        "4x1-prompt-per-side": dict(batch_size=4, share_prompt=False),
    }
    for name, kw in variants.items():
        summary, logs = run(dpo_config(max_steps=2, loss_type="sigmoid", max_grad_norm=1e9, **kw), tiny_model_dir, dpo_data, tmp_path / name)
        results[name] = logs
        assert summary["shared_prompt"] == (kw.get("padding_free", True) and kw.get("share_prompt", True))
    for name in ("1x4", "2x2-padded", "4x1-prompt-per-side"):
        for (_, a), (_, b) in zip(results["4x1"], results[name]):
            for k in ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (name, k)


def test_reference_computed_once_and_resume_is_bit_identical(tmp_path, tiny_model_dir, dpo_data, monkeypatch, caplog):
    """Crash at step 3, call again: the stored reference log-probs (from the STARTING model) are
    reused, not recomputed from the resumed weights, and the final weights equal an uninterrupted
    run's."""
    cfg = dpo_config(max_steps=5, batch_size=2, save_steps=2, loss_type="apo_zero", learning_rate=1e-3, lr_scheduler="cosine_with_min_lr", min_lr_rate=0.1, warmup_ratio=0.2)
    run(cfg, tiny_model_dir, dpo_data, tmp_path / "full")

    out = tmp_path / "resumed"

    def crash(metrics, step):
        if step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, tiny_model_dir, dpo_data, out, on_log=crash)
    stored = torch.load(out / REFERENCE_FILE, weights_only=True)
    assert stored["chosen"].shape == (8,) and stored["key"]["data"]

    # A truncated reference file is computed again (with a warning), never a stage blocked for good.
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    (damaged / REFERENCE_FILE).write_bytes((damaged / REFERENCE_FILE).read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="trlm.stages.dpo"):
        _, logs = run(cfg, tiny_model_dir, dpo_data, damaged)
    assert [s for s, _ in logs] == [3, 4, 5]
    assert any(r.getMessage().startswith(f"{damaged / REFERENCE_FILE} is damaged") for r in caplog.records)
    full, repaired = model_state(tmp_path / "full" / "model"), model_state(damaged / "model")
    assert all(torch.equal(full[k], repaired[k]) for k in full)

    def must_not_recompute(*a, **k):
        raise AssertionError("reference log-probs must be reused on resume")

    monkeypatch.setattr(dpo_stage, "compute_reference_logps", must_not_recompute)
    _, logs = run(cfg, tiny_model_dir, dpo_data, out)
    assert [s for s, _ in logs] == [3, 4, 5]
    full, resumed = model_state(tmp_path / "full" / "model"), model_state(out / "model")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert torch.equal(torch.load(tmp_path / "full" / REFERENCE_FILE, weights_only=True)["chosen"], stored["chosen"])


def test_non_finite_loss_stops_the_stage(tmp_path, tiny_model_dir, dpo_data, monkeypatch):
    """A NaN DPO loss at step 2 (before any checkpoint): NonFiniteError before the update, saying the
    stage starts over; no model/, metrics.json or fingerprint.json."""
    real, calls = dpo_stage.dpo_loss, [0]

    def loss(*args, **kwargs):
        losses, chosen_rewards, rejected_rewards = real(*args, **kwargs)
        calls[0] += 1
        return (losses * float("nan") if calls[0] == 2 else losses), chosen_rewards, rejected_rewards

    monkeypatch.setattr(dpo_stage, "dpo_loss", loss)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match="dpo: non-finite loss nan and gradient norm nan at step 2.*Last good checkpoint: none: the stage starts over on rerun"):
        run(dpo_config(max_steps=3, batch_size=2, loss_type="sigmoid"), tiny_model_dir, dpo_data, out)
    assert not (out / "model").exists() and not (out / "fingerprint.json").exists() and not (out / "metrics.json").exists()
