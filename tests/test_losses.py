"""Tests for `trlm.training.losses`: every loss against hand-computed values, on tiny tensors.

Reading order: log-probs and masking -> SFT losses and the gradient-accumulation rule -> chunked
variants -> DPO losses and metrics -> NEFTune. Everything runs on CPU in well under a second.

Convention reminder: labels are aligned with input_ids, -100 where not trained, and the logits at
position t are scored against labels[t + 1].
"""

from __future__ import annotations

import math

import pytest
import torch

from trlm.training.losses import (
    DPO_LOSS_TYPES,
    LABEL_SMOOTHING_LOSSES,
    attach_neftune,
    chunked_sequence_logps,
    chunked_sft_loss_sum,
    count_target_tokens,
    dpo_loss,
    dpo_metrics,
    neftune_noise,
    sequence_logps,
    sft_token_loss_sum,
    token_accuracy_counts,
)

IGN = -100


# --- small helpers written with plain python math, independent of the code under test ---------


def py_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    log_z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - log_z for x in row]


def py_logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def py_sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def naive_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    """A direct loop over (row, position): the definition of the per-sequence log-prob."""
    sums, counts = [], []
    for b in range(labels.shape[0]):
        total, n = 0.0, 0
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGN:
                continue
            total += py_log_softmax(logits[b, t].tolist())[target]
            n += 1
        sums.append(total)
        counts.append(n)
    return sums, counts


def random_batch(batch: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and labels with a masked prompt and right padding of varying lengths."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    for b in range(batch):
        prompt = 1 + b % 3
        real = length - (b % 4)
        labels[b, :prompt] = IGN
        labels[b, real:] = IGN
    return logits, labels


# --- sequence log-probs and masking ------------------------------------------------------------


def test_sequence_logps_by_hand():
    # One row of 3 tokens over a vocabulary of 3; the first token is the (masked) prompt.
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGN, 2, 0]])
    logps, n = sequence_logps(logits, labels)
    # position 0 predicts labels[1] = 2, position 1 predicts labels[2] = 0; position 2 predicts nothing
    expected = py_log_softmax([1.0, 2.0, 0.5])[2] + py_log_softmax([0.0, -1.0, 3.0])[0]
    assert logps.tolist() == pytest.approx([expected], abs=1e-6)
    assert n.tolist() == [2]
    assert logps.dtype == torch.float32 and n.dtype == torch.int64


def test_sequence_logps_matches_naive_loop():
    logits, labels = random_batch(batch=4, length=6, vocab=7, seed=0)
    logps, n = sequence_logps(logits, labels)
    expected_sums, expected_counts = naive_sequence_logps(logits, labels)
    assert logps.tolist() == pytest.approx(expected_sums, abs=1e-5)
    assert n.tolist() == expected_counts


def test_all_masked_row_gives_zero_and_no_nan():
    logits = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.tensor([[IGN] * 5, [IGN, 1, 2, 3, IGN]])
    logps, n = sequence_logps(logits, labels)
    assert logps[0].item() == 0.0 and n.tolist() == [0, 3]
    logps.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0].abs().sum().item() == 0.0  # the masked row receives no gradient

    loss_sum, n_tok = sft_token_loss_sum(logits[:1], labels[:1])
    assert loss_sum.item() == 0.0 and n_tok.item() == 0


def test_single_target_token():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[IGN, IGN, IGN, 3]])  # only position 2 -> token 3 is scored
    logps, n = sequence_logps(logits, labels)
    assert logps.item() == pytest.approx(py_log_softmax(logits[0, 2].tolist())[3], abs=1e-6)
    assert n.item() == 1


def test_bf16_logits_give_float32_logps():
    logits, labels = random_batch(batch=2, length=5, vocab=6, seed=1)
    logps, _ = sequence_logps(logits.bfloat16(), labels)
    assert logps.dtype == torch.float32
    expected, _ = naive_sequence_logps(logits.bfloat16().float(), labels)
    assert logps.tolist() == pytest.approx(expected, abs=1e-4)


def test_left_and_right_padding_give_the_same_result():
    # A real sequence of 4 tokens: 2 prompt tokens (masked) then 2 completion tokens.
    g = torch.Generator().manual_seed(2)
    vocab, pad = 6, 2
    real_logits = torch.randn(4, vocab, generator=g)
    real_labels = torch.tensor([IGN, IGN, 4, 1])
    junk = torch.randn(pad, vocab, generator=g) * 10  # logits at pad positions must not matter

    right_logits = torch.cat([real_logits, junk])[None]
    right_labels = torch.cat([real_labels, torch.full((pad,), IGN)])[None]
    left_logits = torch.cat([junk, real_logits])[None]
    left_labels = torch.cat([torch.full((pad,), IGN), real_labels])[None]

    right, n_right = sequence_logps(right_logits, right_labels)
    left, n_left = sequence_logps(left_logits, left_labels)
    assert torch.equal(right, left) and torch.equal(n_right, n_left)
    assert sft_token_loss_sum(right_logits, right_labels)[0] == sft_token_loss_sum(left_logits, left_labels)[0]


def test_count_target_tokens_counts_shifted_labels():
    # labels[:, 0] is set but is never a target: it must not be counted (the classic off-by-one).
    labels = torch.tensor([[5, 6, 7, IGN], [IGN, IGN, 3, 4]])
    assert count_target_tokens(labels) == 2 + 2
    assert count_target_tokens(labels) == sequence_logps(torch.zeros(2, 4, 8), labels)[1].sum().item()


# --- SFT losses ----------------------------------------------------------------------------------


def test_sft_nll_and_dft_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGN, 2, 0]])
    lp = [py_log_softmax([1.0, 2.0, 0.5])[2], py_log_softmax([0.0, -1.0, 3.0])[0]]

    nll, n = sft_token_loss_sum(logits, labels, loss_type="nll")
    assert nll.item() == pytest.approx(-(lp[0] + lp[1]), abs=1e-6) and n.item() == 2

    dft, n = sft_token_loss_sum(logits, labels, loss_type="dft")
    assert dft.item() == pytest.approx(-sum(math.exp(x) * x for x in lp), abs=1e-6) and n.item() == 2


def test_dft_gradient_is_probability_weighted_nll_gradient():
    # d/dθ [-sg(p) log p] = p * d/dθ [-log p]: the probability is a constant weight, not differentiated.
    logits = torch.randn(1, 2, 5)
    labels = torch.tensor([[IGN, 3]])
    grads = {}
    for loss_type in ("nll", "dft"):
        x = logits.clone().requires_grad_(True)
        sft_token_loss_sum(x, labels, loss_type=loss_type)[0].backward()
        grads[loss_type] = x.grad
    p = torch.softmax(logits[0, 0], -1)[3]
    assert torch.allclose(grads["dft"], p * grads["nll"], atol=1e-6)


def test_unknown_sft_loss_type_raises():
    with pytest.raises(ValueError, match="nll, dft"):
        sft_token_loss_sum(torch.zeros(1, 2, 3), torch.tensor([[IGN, 1]]), loss_type="mean")


def test_token_accuracy_counts():
    logits = torch.tensor([[[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGN, 1, 2, IGN]])  # pos 0 argmax 1 == 1 (right), pos 1 argmax 0 != 2 (wrong)
    n_correct, n_tokens = token_accuracy_counts(logits, labels)
    assert (n_correct.item(), n_tokens.item()) == (1, 2)


class TinyLM(torch.nn.Module):
    """Embedding + linear head: position-independent, so rows can be split into micro-batches freely."""

    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def grads_of(model: torch.nn.Module) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def test_gradient_accumulation_equivalence():
    torch.manual_seed(0)
    model = TinyLM()
    input_ids = torch.randint(0, 11, (8, 7))
    labels = input_ids.clone()
    for b in range(8):  # very different numbers of target tokens per row
        labels[b, : 1 + b % 3] = IGN
        labels[b, 7 - (b % 5) :] = IGN
    counts = [count_target_tokens(labels[b : b + 1]) for b in range(8)]
    assert len(set(counts)) > 1  # otherwise the buggy mean would coincide with the right one

    # One optimizer step with batch 8 x accumulation 1.
    loss_sum, n = sft_token_loss_sum(model(input_ids), labels)
    (loss_sum / n).backward()
    full_batch = grads_of(model)

    # The same step with batch 1 x accumulation 8: sum per micro-batch, divide by the GLOBAL count.
    n_global = sum(counts)
    assert n_global == n.item()
    for b in range(8):
        loss_sum_b, _ = sft_token_loss_sum(model(input_ids[b : b + 1]), labels[b : b + 1])
        (loss_sum_b / n_global).backward()
    accumulated = grads_of(model)
    assert all(torch.allclose(a, f, atol=1e-6) for a, f in zip(accumulated, full_batch))

    # The classic bug: mean per micro-batch, then averaged over the 8 micro-batches. Not equal.
    for b in range(8):
        loss_sum_b, n_b = sft_token_loss_sum(model(input_ids[b : b + 1]), labels[b : b + 1])
        (loss_sum_b / n_b / 8).backward()
    buggy = grads_of(model)
    assert not all(torch.allclose(g, f, atol=1e-6) for g, f in zip(buggy, full_batch))


# --- chunked variants: same values and gradients without the [B, T, V] logits ---------------------


def chunked_case(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    batch, length, dim, vocab = 3, 7, 5, 13
    hidden = torch.randn(batch, length, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :3] = IGN
    labels[1, 5:] = IGN
    labels[2, :] = IGN  # an all-masked row
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_chunked_sft_loss_equals_unchunked(loss_type, chunk_size):
    hidden, weight, labels = chunked_case()

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logits = h1 @ w1.T
    ref_sum, ref_n = sft_token_loss_sum(logits, labels, loss_type=loss_type)
    ref_correct, _ = token_accuracy_counts(logits, labels)
    ref_sum.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss_sum, n, n_correct = chunked_sft_loss_sum(h2, w2, labels, loss_type=loss_type, chunk_size=chunk_size)
    loss_sum.backward()

    assert loss_sum.item() == pytest.approx(ref_sum.item(), abs=1e-5)
    assert n.item() == ref_n.item() and n_correct.item() == ref_correct.item()
    assert torch.allclose(h2.grad, h1.grad, atol=1e-5)
    assert torch.allclose(w2.grad, w1.grad, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_chunked_sequence_logps_equals_unchunked(chunk_size):
    hidden, weight, labels = chunked_case()
    upstream = torch.tensor([0.3, -1.2, 2.0])  # a non-uniform upstream gradient, as DPO produces

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_logps, ref_n = sequence_logps(h1 @ w1.T, labels)
    (ref_logps * upstream).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logps, n = chunked_sequence_logps(h2, w2, labels, chunk_size=chunk_size)
    (logps * upstream).sum().backward()

    assert torch.allclose(logps, ref_logps, atol=1e-5) and torch.equal(n, ref_n)
    assert logps[2].item() == 0.0 and n[2].item() == 0
    assert torch.allclose(h2.grad, h1.grad, atol=1e-5)
    assert torch.allclose(w2.grad, w1.grad, atol=1e-5)


def test_chunked_loss_saves_no_logits_for_backward():
    # Record every tensor autograd keeps for the backward: the unchunked path keeps [N, V]
    # log-probs; the chunked one keeps only its inputs (hidden rows, weight) and recomputes logits.
    hidden = torch.randn(2, 50, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 50))
    saved_sizes = []

    def record(t: torch.Tensor) -> torch.Tensor:
        saved_sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        chunked_sft_loss_sum(hidden, weight, labels, chunk_size=16)
    assert max(saved_sizes) < 16 * 1000  # smaller than even one chunk of logits
    saved_sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        sft_token_loss_sum(hidden @ weight.T, labels)
    assert max(saved_sizes) >= 2 * 49 * 1000  # the full path keeps the [B, T-1, V] log-probs


def test_one_chunk_is_not_recomputed_and_gives_the_same_gradients(monkeypatch):
    # One chunk runs outside `checkpoint` (no second projection in the backward); several chunks run
    # under it. Both give the same loss and gradients.
    import trlm.training.losses as losses

    calls = []
    real = losses.checkpoint
    monkeypatch.setattr(losses, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    labels = torch.randint(0, 300, (2, 30))
    grads = {}
    for chunk_size in (1024, 16):
        hidden = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        weight = torch.randn(300, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
        calls.clear()
        loss, _, _ = chunked_sft_loss_sum(hidden, weight, labels, chunk_size=chunk_size)
        loss.backward()
        grads[chunk_size] = (len(calls), loss.detach(), hidden.grad, weight.grad)
    assert grads[1024][0] == 0 and grads[16][0] == 4  # 58 targets: one chunk of 1024, four of 16
    for a, b in zip(grads[1024][1:], grads[16][1:]):
        assert torch.allclose(a, b, atol=1e-5)


def test_chunked_all_masked_batch_is_zero_and_backward_works():
    hidden = torch.randn(2, 4, 5, requires_grad=True)
    weight = torch.randn(9, 5, requires_grad=True)
    labels = torch.full((2, 4), IGN)
    loss_sum, n, n_correct = chunked_sft_loss_sum(hidden, weight, labels)
    assert (loss_sum.item(), n.item(), n_correct.item()) == (0.0, 0, 0)
    loss_sum.backward()  # stays attached to the graph, with zero gradients
    assert hidden.grad.abs().sum().item() == 0.0 and weight.grad.abs().sum().item() == 0.0

    logps, n_rows = chunked_sequence_logps(hidden, weight, labels)
    assert logps.tolist() == [0.0, 0.0] and n_rows.tolist() == [0, 0]


# --- DPO -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("sigmoid", lambda beta: math.log(2)),
        ("apo_zero", lambda beta: 1.0),
        ("ipo", lambda beta: 1 / (4 * beta**2)),
        ("hinge", lambda beta: 1.0),
        ("robust", lambda beta: math.log(2)),
    ],
)
def test_dpo_loss_at_initialisation(loss_type, expected):
    # policy == reference: every log-ratio is 0, whatever the log-probs are.
    logps = torch.tensor([-12.0, -3.5, -40.0])
    beta = 0.1
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps, logps - 2, logps, logps - 2, beta=beta, loss_type=loss_type
    )
    assert losses.tolist() == pytest.approx([expected(beta)] * 3, rel=1e-6)
    assert chosen_rewards.tolist() == [0.0] * 3 and rejected_rewards.tolist() == [0.0] * 3


def test_robust_is_ln2_at_initialisation_for_any_smoothing():
    z = torch.zeros(2)
    losses, _, _ = dpo_loss(z, z, z, z, beta=0.1, loss_type="robust", label_smoothing=0.2)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, rel=1e-6)


# Two pairs. Pair 0: lr_c = 1, lr_r = -0.5, Δ = 1.5. Pair 1: lr_c = 0, lr_r = 1, Δ = -1.
PAIRS = dict(
    policy_chosen_logps=torch.tensor([-5.0, -3.0]),
    policy_rejected_logps=torch.tensor([-7.0, -2.0]),
    ref_chosen_logps=torch.tensor([-6.0, -3.0]),
    ref_rejected_logps=torch.tensor([-6.5, -3.0]),
)
LR_C, LR_R, DELTA = [1.0, 0.0], [-0.5, 1.0], [1.5, -1.0]


def expected_dpo(loss_type: str, beta: float, eps: float) -> list[float]:
    out = []
    for lc, lr, d in zip(LR_C, LR_R, DELTA):
        z = beta * d
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * py_logsigmoid(z) - eps * py_logsigmoid(-z))
        elif loss_type == "apo_zero":
            out.append((1 - py_sigmoid(beta * lc)) + py_sigmoid(beta * lr))
        elif loss_type == "ipo":
            out.append((d - 1 / (2 * beta)) ** 2)
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - z))
        elif loss_type == "robust":
            out.append((-(1 - eps) * py_logsigmoid(z) + eps * py_logsigmoid(-z)) / (1 - 2 * eps))
    return out


@pytest.mark.parametrize(
    "loss_type, eps",
    [("sigmoid", 0.0), ("sigmoid", 0.1), ("apo_zero", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.1)],
)
def test_dpo_loss_by_hand(loss_type, eps):
    beta = 0.5
    losses, chosen_rewards, rejected_rewards = dpo_loss(**PAIRS, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert losses.tolist() == pytest.approx(expected_dpo(loss_type, beta, eps), abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([beta * x for x in LR_C])
    assert rejected_rewards.tolist() == pytest.approx([beta * x for x in LR_R])


def test_dpo_gradient_flows_to_policy_and_rewards_are_detached():
    policy_chosen = PAIRS["policy_chosen_logps"].clone().requires_grad_(True)
    pairs = {**PAIRS, "policy_chosen_logps": policy_chosen}
    losses, chosen_rewards, _ = dpo_loss(**pairs, beta=0.5, loss_type="sigmoid")
    assert not chosen_rewards.requires_grad
    losses.sum().backward()
    # d/dπ_c [−log σ(βΔ)] = −β (1 − σ(βΔ))
    assert policy_chosen.grad.tolist() == pytest.approx([-0.5 * (1 - py_sigmoid(0.5 * d)) for d in DELTA], abs=1e-6)


def test_dpo_errors():
    with pytest.raises(ValueError, match="sigmoid, apo_zero, ipo, hinge, robust"):
        dpo_loss(**PAIRS, beta=0.1, loss_type="kto")
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(**PAIRS, beta=0.1, loss_type="sigmoid", label_smoothing=bad)
    assert set(LABEL_SMOOTHING_LOSSES) == {"sigmoid", "robust"} and set(LABEL_SMOOTHING_LOSSES) < set(DPO_LOSS_TYPES)
    for loss_type in DPO_LOSS_TYPES:
        if loss_type in LABEL_SMOOTHING_LOSSES:
            dpo_loss(**PAIRS, beta=0.1, loss_type=loss_type, label_smoothing=0.1)
        else:  # no smoothing term: a setting is never silently ignored
            with pytest.raises(ValueError, match="no effect"):
                dpo_loss(**PAIRS, beta=0.1, loss_type=loss_type, label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(**PAIRS, beta=0.0, loss_type="ipo")


def test_dpo_metrics_by_hand_with_a_tie():
    losses = torch.tensor([0.5, 1.0, 1.5, 2.0])
    chosen_rewards = torch.tensor([0.3, 0.1, -0.2, 0.0])
    rejected_rewards = torch.tensor([0.1, 0.1, 0.4, -0.2])  # pair 1 is a tie: it counts as wrong
    policy_chosen = torch.tensor([-10.0, -20.0, -30.0, -40.0])
    policy_rejected = torch.tensor([-12.0, -22.0, -26.0, -44.0])
    metrics = dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    assert set(metrics) == {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }
    assert metrics["loss"] == pytest.approx(1.25)
    assert metrics["rewards/chosen"] == pytest.approx(0.05)
    assert metrics["rewards/rejected"] == pytest.approx(0.1)
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)  # pairs 0 and 3; the tie counts 0
    assert metrics["rewards/margins"] == pytest.approx((0.2 + 0.0 - 0.6 + 0.2) / 4)
    assert metrics["logps/chosen"] == pytest.approx(-25.0)
    assert metrics["logps/rejected"] == pytest.approx(-26.0)
    assert all(isinstance(v, float) for v in metrics.values())


# --- NEFTune -------------------------------------------------------------------------------------


def test_neftune_noise_bound_per_document():
    # A padding-free packed row with two documents of lengths 3 and 5: each has its own bound.
    alpha, dim = 5.0, 16
    torch.manual_seed(0)
    embeddings = torch.randn(1, 8, dim)
    lengths = torch.tensor([3, 3, 3, 5, 5, 5, 5, 5]).view(1, 8, 1)
    noise = (neftune_noise(embeddings, alpha, lengths) - embeddings).abs()
    for doc, length in ((slice(0, 3), 3), (slice(3, 8), 5)):
        bound = alpha / math.sqrt(length * dim)
        assert noise[0, doc].max().item() <= bound * (1 + 1e-5)
        assert noise[0, doc].max().item() > 0.9 * bound  # uniform noise comes close to its bound
    # The short document's noise exceeds the long one's bound, so its own L was used.
    assert noise[0, :3].max().item() > alpha / math.sqrt(5 * dim)


def test_neftune_hook_train_eval_and_removal():
    torch.manual_seed(0)
    alpha, batch, length = 5.0, 4, 8
    model = TinyLM(vocab=11, dim=16)
    input_ids = torch.randint(0, 11, (batch, length))
    clean = model.embed(input_ids).detach()

    handle = attach_neftune(model, alpha)

    model.train()  # no lengths set: each row's length T is used
    noisy = model.embed(input_ids).detach()
    bound = alpha / math.sqrt(length * 16)
    diff = (noisy - clean).abs()
    assert diff.max().item() <= bound * (1 + 1e-5) and diff.max().item() > 0.9 * bound

    handle.lengths = torch.tensor([2, 8, 8, 8]).view(batch, 1, 1)  # row 0 has 2 real tokens
    diff = (model.embed(input_ids).detach() - clean).abs()
    assert diff[0].max().item() > bound  # the short row gets the larger noise alpha / sqrt(2 d)
    assert diff.max().item() <= alpha / math.sqrt(2 * 16) * (1 + 1e-5)

    model.eval()  # evaluation and generation see clean embeddings
    assert torch.equal(model.embed(input_ids), clean)

    model.train()
    handle.remove()
    assert torch.equal(model.embed(input_ids), clean)
