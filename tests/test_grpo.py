"""The GRPO stage: its loss against a hand computation, its rewards on real and malformed completions,
seeded sampling with the KV cache, and the stage on the tiny model (metrics, samples, exact resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from test_training_support import grpo_config, model_state, write_prompt_answer_dir
from trlm.stages import rewards as R
from trlm.training.policy_gradient import clipped_policy_loss, group_advantages

# --- advantages and the loss, by hand ----------------------------------------------------------


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a, zero = group_advantages(r, "none")
    assert torch.allclose(a, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]))
    assert zero.tolist() == [False, True]
    a, _ = group_advantages(r, "group")
    std = math.sqrt((4 * 0.25) / 3)  # unbiased, as TRL (torch.std)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))


LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
ADV = torch.tensor([1.0, -2.0])


def _per_token(logps, old, adv, eps=0.2, beta=0.0, ref=None):
    """The surrogate written out element by element, in plain Python."""
    out = []
    for i in range(len(logps)):
        row = []
        for t in range(len(logps[0])):
            ratio = math.exp(logps[i][t] - old[i][t])
            term = -min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps) * adv[i])
            if beta:
                d = ref[i][t] - logps[i][t]
                term += beta * (math.exp(d) - d - 1)
            row.append(term)
        out.append(row)
    return out


@pytest.mark.parametrize("normalise", ["sequence", "constant", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_loss_matches_a_hand_computation(normalise, beta):
    old = LOGPS + torch.tensor([[0.3, -0.1, 0.0], [0.05, 0.4, 0.0]])  # reused samples: ratios away from 1
    ref = LOGPS - 0.2
    terms = _per_token(LOGPS.tolist(), old.tolist(), ADV.tolist(), beta=beta, ref=ref.tolist())
    lens = [3, 2]
    if normalise == "sequence":
        want = sum(sum(terms[i][:lens[i]]) / lens[i] for i in range(2)) / 2
    elif normalise == "constant":
        want = sum(sum(terms[i][:lens[i]]) for i in range(2)) / (2 * 4)
    else:
        want = sum(sum(terms[i][:lens[i]]) for i in range(2)) / 5
    loss, stats = clipped_policy_loss(LOGPS, old, ADV, MASK, normalise=normalise, num_sequences=2, num_tokens=5, max_length=4,
                                      epsilon=0.2, beta=beta, ref_logps=ref if beta else None)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["tokens"].item() == 5
    # one clipped token: row 1, t 1 (ratio e^-0.4 = 0.67 < 0.8 with A = -2: the min takes 0.8 A);
    # row 0, t 0 (ratio e^-0.3 = 0.74 < 0.8 with A = 1) keeps the unclipped term
    assert stats["clipped"].item() == 1
    if beta == 0:
        assert stats["kl"].item() == 0


def test_clipping_counts_and_gradient():
    """With the samples fresh (old = logps), the ratio is 1: nothing is clipped and the gradient is
    -A / n per token (token mean); a ratio beyond 1 + eps with A > 0 is clipped: no gradient."""
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, stats = clipped_policy_loss(logps, logps.detach(), torch.tensor([2.0]), torch.tensor([[True, True]]), normalise="token",
                                      num_sequences=1, num_tokens=2, max_length=2)
    loss.backward()
    assert stats["clipped"].item() == 0 and torch.allclose(logps.grad, torch.tensor([[-1.0, -1.0]]))
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0]])  # ratio e^0.5 = 1.65 > 1.2 on token 0
    loss, stats = clipped_policy_loss(logps, old, torch.tensor([2.0]), torch.tensor([[True, True]]), normalise="token",
                                      num_sequences=1, num_tokens=2, max_length=2)
    loss.backward()
    assert stats["clipped"].item() == 1 and logps.grad[0, 0].item() == 0.0


def test_shares_of_micro_batches_add_up_to_the_whole():
    """Each micro-batch's share, with the step's global counts, sums to the loss of the whole batch."""
    old = LOGPS + 0.1
    for normalise in ("sequence", "constant", "token"):
        whole, _ = clipped_policy_loss(LOGPS, old, ADV, MASK, normalise=normalise, num_sequences=2, num_tokens=5, max_length=4)
        parts = sum(clipped_policy_loss(LOGPS[i : i + 1], old[i : i + 1], ADV[i : i + 1], MASK[i : i + 1], normalise=normalise,
                                        num_sequences=2, num_tokens=5, max_length=4)[0] for i in range(2))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


# --- rewards ---------------------------------------------------------------------------------------


GOOD = "<think>\nNatalia sold 48/2 = 24 clips in May.\n48 + 24 = 72\n</think>\n#### 72"


@pytest.mark.parametrize("completion, answer, correct, formatted", [
    (GOOD, "72", 1.0, 1.0),
    ("<think>\nWeng earns 12/60 = 0.2 per minute.\n</think>\nShe earned $10.00.", "10", 1.0, 1.0),  # "$10.00" equals 10 as a number
    ("<think>\nadd them\n</think>\nThe total is 1,234 apples", "1234", 1.0, 1.0),
    ("<think>\n48 + 24 = 72\n</think>\nI cannot tell.", "72", 0.0, 1.0),  # no number after </think>; 72 only inside the block
    ("<think>\n48 + 24 = 72\n</think>\n#### 71", "72", 0.0, 1.0),
    ("48 + 24 = 72", "72", 0.0, 0.0),  # no think block at all
    ("<think>\nfirst\n</think>\n</think>\n#### 72", "72", 0.0, 0.0),  # two </think>
    ("<think>\nnever closed, the answer is 72", "72", 0.0, 0.0),  # truncated inside the block
    ("<think>\n<think>\nx\n</think>\n#### 72", "72", 1.0, 0.0),  # opened twice
    ("<think>\nreasoning\n</think>\n", "72", 0.0, 0.0),  # closed, but nothing after it
    ("Sure! <think>\nx\n</think>\n#### 72", "72", 1.0, 0.0),  # the block does not open the answer
    ("<think>\nx\n</think>\n#### -3", "-3", 1.0, 1.0),
])
def test_gsm8k_and_format_rewards(completion, answer, correct, formatted):
    assert R.gsm8k_correct(completion, answer) == correct
    assert R.think_format(completion, answer) == formatted


def test_weighted_score_and_learnable_rewards():
    total, each = R.score(GOOD, "72", {"gsm8k_correct": 1.0, "think_format": 0.2})
    assert each == {"gsm8k_correct": 1.0, "think_format": 1.0} and total == pytest.approx(1.2)
    assert R.contains_seven("I have 17 apples", "") == 1.0 and R.contains_seven("<think>7</think> none", "") == 0.0
    assert R.short_answer("one two three", "") == 1.0 and R.short_answer("word " * 21, "") == 0.0


def test_unknown_reward_is_a_recipe_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown reward 'gsm8k'"):
        grpo_config(rewards={"gsm8k": 1.0})


# --- sampling --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tiny_model_dir):
    from trlm.training.attention import install_head_forward
    from trlm.training.modeling import load_model

    model = load_model(tiny_model_dir, torch.float32)
    install_head_forward(model)  # as in training: sampling must not need the stock forward
    return model


def test_sampling_is_seeded_per_sample_and_uses_the_cache_correctly(tiny_policy):
    from trlm.training.sampling import sample_group

    prompt = [1, 520, 1300, 42, 7, 99]
    a = sample_group(tiny_policy, prompt, seeds=[11, 12, 13], max_new_tokens=8, eos_id=2)
    threads = torch.get_num_threads()
    b = sample_group(tiny_policy, prompt, seeds=[13, 11], max_new_tokens=8, eos_id=2, num_threads=1)  # threads change no sample
    assert torch.get_num_threads() == threads  # restored
    assert [len(x) for x in a] == [8, 8, 8] and b == [a[2], a[0]]  # a sample depends on its seed only
    assert a[0] != a[1]
    # greedy-like decoding with the cache equals decoding without it (full forward each token)
    greedy = sample_group(tiny_policy, prompt, seeds=[0], max_new_tokens=5, eos_id=2, temperature=1e-4)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            hidden = tiny_policy.model(input_ids=torch.tensor([ids])).last_hidden_state
            ids.append(int(tiny_policy.lm_head(hidden[:, -1]).argmax()))
    assert greedy == ids[len(prompt):]
    assert tiny_policy.config._attn_implementation == "packed_sdpa"  # restored after decoding


def test_groups_sampled_in_parallel_threads_are_the_sequential_ones(tiny_policy, monkeypatch):
    """sample_workers: several prompts' groups decode at once, one thread each; every completion is the
    one sampled alone, and the model's mode, attention kernel and thread count come back as they were."""
    from trlm.training.sampling import sample_group, sample_groups

    prompts = [[1, 520, 1300, 42, 7, 99], [1, 77, 3], [1, 900, 901, 902, 903, 904, 905, 906]]
    seeds = [[11, 12], [5, 6], [7, 8]]
    alone = [sample_group(tiny_policy, p, seeds=s, max_new_tokens=8, eos_id=2, num_threads=1) for p, s in zip(prompts, seeds)]
    threads = torch.get_num_threads()
    tiny_policy.train()
    import threading

    import trlm.training.sampling as sampling

    where, real = set(), sampling._sample
    monkeypatch.setattr(sampling, "_sample", lambda *a, **k: where.add(threading.current_thread().name) or real(*a, **k))
    together = sample_groups(tiny_policy, prompts, seeds=seeds, max_new_tokens=8, eos_id=2, workers=3)
    assert together == alone and together[0] != together[1]
    assert len(where) >= 2 and all(name.startswith("sample") for name in where)  # in worker threads
    assert tiny_policy.training and torch.get_num_threads() == threads
    assert tiny_policy.config._attn_implementation == "packed_sdpa"


def test_each_prompt_once_in_the_loss_forward_changes_no_value(tiny_policy):
    """share_prompt: a group's G samples hold their prompt once in the packed row (the row is
    shorter by (G - 1) x prompt), and the completion log-probs and the gradients equal those of the
    row with every prompt repeated."""
    from trlm.stages.grpo import _token_logps, loss_batch
    from trlm.training.attention import register_packed_sdpa

    register_packed_sdpa()
    prompts, completions = [[1, 520, 1300, 42, 7], [1, 99, 98]], [[5, 6, 7, 2], [8, 2], [9, 10, 11, 12, 13], [14, 2], [15, 16, 2], [17]]
    batch = {"sequences": [], "shares": []}
    for p, prompt in enumerate(prompts):
        for k, completion in enumerate(completions[3 * p : 3 * p + 3]):
            batch["shares"].append((3 * p, len(prompt)) if k else None)
            batch["sequences"].append((prompt + completion, [-100] * len(prompt) + completion))
    out = {}
    for share in (False, True):
        mb = loss_batch(batch, padding_free=True, pad_id=0, share_prompt=share)
        tiny_policy.zero_grad()
        logps = _token_logps(tiny_policy, mb)
        logps.sum().backward()
        out[share] = (mb["input_ids"].shape[1], logps.detach(), {n: p.grad.clone() for n, p in tiny_policy.named_parameters()})
    assert out[True][0] == out[False][0] - 2 * 5 - 2 * 3  # two more copies of each prompt are not in the row
    assert out[True][1].shape == (sum(map(len, completions)),) and torch.allclose(out[True][1], out[False][1], atol=1e-5)
    assert all(torch.allclose(out[True][2][n], out[False][2][n], atol=1e-5) for n in out[True][2])
    tiny_policy.zero_grad()


def test_top_p_keeps_the_nucleus():
    from trlm.training.sampling import filter_top_p

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(filter_top_p(probs, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.equal(filter_top_p(probs, 1.0), probs)


# --- the stage on the tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory, tokenizer_dir):
    return write_prompt_answer_dir(tmp_path_factory.mktemp("grpo-data"), tokenizer_dir, n=8)


class Crash(Exception):
    pass


def run(cfg, model_dir, data_dir, out_dir, crash_at=None):
    from trlm.stages.grpo import train_grpo

    logs = []

    def record(metrics, step):
        logs.append((step, dict(metrics)))
        if crash_at is not None and step == crash_at:
            raise Crash(step)

    return train_grpo(cfg, model_dir=model_dir, data_dir=data_dir, out_dir=out_dir, on_log=record), logs


def test_stage_logs_every_metric_and_writes_samples(tmp_path, tiny_model_dir, grpo_data):
    cfg = grpo_config(max_steps=2, beta=0.05, num_iterations=2, loss_type="grpo", sample_steps=1)
    summary, logs = run(cfg, tiny_model_dir, grpo_data, tmp_path / "out")
    assert [s for s, _ in logs] == [1, 2]
    for _, m in logs:
        for key in ("reward", "reward/contains_seven", "reward/short_answer", "pass_at_1", "pass_at_g", "completion_length", "truncated",
                    "zero_variance", "clipped", "kl", "loss", "samples_per_second", "learning_rate"):
            assert key in m and math.isfinite(m[key]), key
        assert 0 <= m["pass_at_1"] <= m["pass_at_g"] <= 1 and 1 <= m["completion_length"] <= 6
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples" / "step-000001.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 3 and set(samples[0]) == {"prompt", "completion", "reward", "rewards", "advantage"}
    assert not (tmp_path / "out" / "samples" / "step-000002.jsonl").exists()
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file() and summary["steps"] == 2


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_resume_after_crash_is_bit_identical(tmp_path, tiny_model_dir, grpo_data, loss_type, monkeypatch):
    """Killed after step 3 (checkpoint at 2): the resumed run samples the same completions and ends
    with the same weights as an uninterrupted one, bit for bit. (The random tiny model never writes
    a 7: a reward that varies on its output, the parity of the completion's length in characters.)"""
    monkeypatch.setitem(R.REWARDS, "odd_chars", lambda completion, answer: float(len(completion) % 2))
    cfg = grpo_config(rewards={"odd_chars": 1.0}, max_steps=4, save_steps=2, save_total_limit=2, loss_type=loss_type, drop_zero_variance_groups=True)
    _, full_logs = run(cfg, tiny_model_dir, grpo_data, tmp_path / "full")
    with pytest.raises(Crash):
        run(cfg, tiny_model_dir, grpo_data, tmp_path / "resumed", crash_at=3)
    _, resumed_logs = run(cfg, tiny_model_dir, grpo_data, tmp_path / "resumed")
    assert [s for s, _ in resumed_logs] == [3, 4]
    full, resumed = model_state(tmp_path / "full" / "model"), model_state(tmp_path / "resumed" / "model")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    for (_, a), (_, b) in zip(full_logs[2:], resumed_logs):
        assert a["reward"] == b["reward"] and a["loss"] == b["loss"]
    assert any(a["loss"] != 0 for _, a in full_logs)  # it trained


def test_stage_cli_takes_its_declared_inputs(tmp_path, tiny_model_dir, grpo_data, capsys):
    """`python -m trlm.stages.grpo`: one `--<input>-dir` per declared launch input (model, data)."""
    import yaml

    from trlm.stages import grpo

    assert grpo.STAGE.launch_inputs == ("model", "data")
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump(grpo_config(max_steps=1).model_dump(mode="json")))
    with pytest.raises(SystemExit) as info:
        grpo.main(["--config", str(config), "--model-dir", str(tiny_model_dir), "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--data-dir {tmp_path}: no train.parquet there" in err
    grpo.main(["--config", str(config), "--model-dir", str(tiny_model_dir), "--data-dir", str(grpo_data), "--out-dir", str(tmp_path / "out")])
    assert '"steps": 1' in capsys.readouterr().out
