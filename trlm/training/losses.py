"""Training losses and metrics for SFT and DPO, written from the math (no `trl`).

Everything here is a pure function (tensors in, tensors out), except `attach_neftune`, which
registers a hook on a model. Nothing here owns a model, an optimizer or a file.

Label convention, used by every function
-----------------------------------------
`labels` has the shape of `input_ids` [B, T]: `labels[b, t] = input_ids[b, t]` where the token is
trained and `ignore_index` (-100) elsewhere (prompt, padding, the first token of a packed document).
The logits at position t predict the token at t + 1, so the scored pairs are

    logits[:, :-1]  <->  labels[:, 1:]

and `labels[:, 0]` is never a target (it has no predecessor). With LEFT padding the first real
token of a row has a pad position before it: it must carry `ignore_index` (it does whenever the
prompt is masked; for plain language-model rows the collator masks it explicitly).

SFT normalisation (the gradient-accumulation rule)
--------------------------------------------------
The SFT functions return a SUM over target tokens and a COUNT, never a mean. The training loop
divides every micro-batch's sum by the number of target tokens of the whole optimizer step
(all gradient-accumulation micro-batches, summed over all processes):

    L = sum_{processes} sum_{micro-batches} sum_{t: target} loss_t  /  N_global
    N_global = sum over the same micro-batches of count_target_tokens(labels)

so that batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same gradient. (A mean per
micro-batch, then averaged over micro-batches, weights the tokens of short micro-batches more: the
classic gradient-accumulation bug.) Under DDP, which averages gradients over the W processes, the
loop multiplies by W: `(loss_sum / N_global * W).backward()`.

Memory
------
`sequence_logps`, `sft_token_loss_sum` and `token_accuracy_counts` take full logits [B, T, V].
The `chunked_*` variants take the final hidden state and the lm_head weight instead and never hold
the [B, T, V] float32 logits (V = 49,152 for SmolLM2): only the target positions are projected,
`chunk_size` rows at a time, each chunk under activation checkpointing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch.utils.checkpoint import checkpoint

from trlm.stage import IGNORE_INDEX  # re-exported: the one definition of an untrained position's label

# The loss families, defined once: the stage configs accept exactly what is implemented here.
SFT_LOSS_TYPES: tuple[str, ...] = ("nll", "dft")
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "apo_zero", "ipo", "hinge", "robust")
LABEL_SMOOTHING_LOSSES: tuple[str, ...] = ("sigmoid", "robust")  # the DPO losses with a label-smoothing term

__all__ = [
    "IGNORE_INDEX",
    "SFT_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "LABEL_SMOOTHING_LOSSES",
    "NEFTune",
    "sequence_logps",
    "count_target_tokens",
    "sft_token_loss_sum",
    "token_accuracy_counts",
    "chunked_sft_loss_sum",
    "chunked_sequence_logps",
    "chunked_token_logps",
    "dpo_loss",
    "dpo_metrics",
    "neftune_noise",
    "attach_neftune",
]


# ---------------------------------------------------------------------------------------------
# Per-token log-probabilities from full logits
# ---------------------------------------------------------------------------------------------


def _shifted_targets(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [B, T-1] (`labels[:, 1:]`) with masked entries replaced by 0, and the mask.

    The replacement makes the index safe for `gather` (-100 is not a vocabulary index); the
    masked positions are zeroed out afterwards and never contribute a value or a gradient.
    """
    targets = labels[:, 1:]
    mask = targets != ignore_index
    safe_targets = targets.masked_fill(~mask, 0)
    return safe_targets, mask


def _token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_{t+1} | x_{<=t}) for every position, in float32: ([B, T-1] with 0 where masked, mask [B, T-1])."""
    safe_targets, mask = _shifted_targets(labels, ignore_index)
    logprobs = logits[:, :-1].float().log_softmax(dim=-1)  # [B, T-1, V], float32 even for bf16 logits
    picked = logprobs.gather(-1, rearrange(safe_targets, "b t -> b t 1"))
    picked = rearrange(picked, "b t 1 -> b t")
    # `where`, not a multiplication by the mask: it can never turn a masked value into NaN.
    return torch.where(mask, picked, torch.zeros_like(picked)), mask


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of the log-probabilities of the target tokens (the DPO "log-prob" of a completion).

        logps_sum[b] = sum_{t : labels[b, t+1] != ignore} log softmax(logits[b, t])[labels[b, t+1]]
        n_tokens[b]  = #{t : labels[b, t+1] != ignore}

    Args:
        logits: [B, T, V], any float dtype; log_softmax is computed in float32.
        labels: [B, T], aligned with input_ids (see the module docstring).

    Returns:
        (logps_sum float32 [B], n_tokens int64 [B]). A row without target tokens gives (0.0, 0).
        Divide by n_tokens for the per-token average that IPO needs.
    """
    token_logps, mask = _token_logps(logits, labels, ignore_index)
    return reduce(token_logps, "b t -> b", "sum"), reduce(mask.long(), "b t -> b", "sum")


def count_target_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of target tokens: #{(b, t) : labels[b, t+1] != ignore_index}.

    Counted on the SHIFTED labels, so position 0 of a row is never counted (it is never a target;
    counting `labels != ignore_index` overcounts by one per row whose first label is set). Sum this
    over the micro-batches (and processes) of one optimizer step to get the SFT divisor N_global.
    """
    return int((labels[:, 1:] != ignore_index).sum().item())


def _check_sft_loss_type(loss_type: str) -> None:
    if loss_type not in SFT_LOSS_TYPES:
        raise ValueError(f"unknown SFT loss_type {loss_type!r}; valid: {', '.join(SFT_LOSS_TYPES)}")


def _per_token_sft_loss(token_logps: torch.Tensor, loss_type: str) -> torch.Tensor:
    """nll: -log p.  dft: -p.detach() * log p  (p = exp(log p); masked entries hold log p = 0 -> loss 0)."""
    if loss_type == "nll":
        return -token_logps
    return -(token_logps.detach().exp() * token_logps)


def sft_token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, loss_type: str = "nll", ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """SUM of the per-token SFT loss over all target tokens of a micro-batch, and their number.

        nll: loss_t = -log p_t
        dft: loss_t = -sg(p_t) * log p_t      ("dynamic fine-tuning"; sg = stop-gradient)
        p_t = softmax(logits[b, t])[labels[b, t+1]]
        loss_sum = sum_{target t} loss_t,  n_tokens = #targets

    Not a mean: the training loop divides by the target-token count of the whole optimizer step
    (`count_target_tokens` summed over all gradient-accumulation micro-batches and processes), so
    that batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same gradient.

    Returns:
        (loss_sum float32 scalar, n_tokens int64 scalar).
    """
    _check_sft_loss_type(loss_type)
    token_logps, mask = _token_logps(logits, labels, ignore_index)
    return _per_token_sft_loss(token_logps, loss_type).sum(), mask.sum()


@torch.no_grad()
def token_accuracy_counts(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts for the mean token accuracy (no gradient).

        n_correct = #{target t : argmax_v logits[b, t, v] == labels[b, t+1]},  n_tokens = #targets

    Sum both over micro-batches and processes, then divide: a token-weighted accuracy.
    Returns two int64 scalars.
    """
    safe_targets, mask = _shifted_targets(labels, ignore_index)
    correct = (logits[:, :-1].argmax(dim=-1) == safe_targets) & mask
    return correct.sum(), mask.sum()


# ---------------------------------------------------------------------------------------------
# Memory-lean (chunked) variants: hidden states + lm_head weight instead of logits
# ---------------------------------------------------------------------------------------------


def _chunk_logps(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: logits = h W^T -> float32 log_softmax -> log p(y) per row, and #(argmax == y).

    The projection runs in the training precision: float32 in an fp32 run, bf16 on the tensor cores
    (fp32 accumulation) under bf16 autocast or with bf16 weights, which is what the published HF
    Trainer run did. An fp32 projection there would run the largest matmul of the model (21% of
    its FLOPs) at a tenth of the GPU's bf16 rate. The softmax is always float32. With several chunks it
    runs under `checkpoint`: the [n, V] logits are freed after the forward and recomputed in the backward.
    """
    logits = (h @ weight.T).float()  # [n, V]
    with torch.autocast(device_type=h.device.type, enabled=False):
        logprobs = logits.log_softmax(dim=-1)
        picked = rearrange(logprobs.gather(-1, rearrange(y, "n -> n 1")), "n 1 -> n")
        n_correct = (logits.detach().argmax(dim=-1) == y).sum()
    return picked, n_correct


def _chunked_token_logps(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, chunk_size: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p of every target token, computed chunk by chunk.

    Returns (token_logps float32 [N], row index of each target [N], n_correct int64 scalar,
    mask [B, T-1]); N = number of target tokens, in row-major order.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    targets = labels[:, 1:]
    mask = targets != ignore_index
    n_positions = targets.shape[1]  # T - 1
    flat_hidden = rearrange(hidden[:, :-1], "b t d -> (b t) d")
    flat_targets = rearrange(targets, "b t -> (b t)")
    positions = rearrange(mask, "b t -> (b t)").nonzero().squeeze(-1)  # only the target positions
    rows = torch.div(positions, max(n_positions, 1), rounding_mode="floor")
    h_sel, y_sel = flat_hidden.index_select(0, positions), flat_targets.index_select(0, positions)

    if positions.numel() == 0:
        # Nothing to score. Keep the result attached to hidden and weight (zero gradients), so that
        # a backward on it works and no parameter looks "unused" to DDP.
        zero = (hidden.float().sum() + lm_head_weight.float().sum()) * 0.0
        return zero.reshape(1)[:0], rows, torch.zeros((), dtype=torch.long, device=hidden.device), mask

    pieces, n_correct = [], torch.zeros((), dtype=torch.long, device=hidden.device)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    # One chunk: no `checkpoint`. The head's backward follows its forward at once, so freeing the
    # chunk's [n, V] log-probs in between saves no peak memory; recomputing them costs the projection
    # once more (0.5 s of a 7.5 s step of the 135M model on 2 cores). Several chunks: one chunk's at a time.
    several = positions.numel() > chunk_size
    for h_chunk, y_chunk in zip(h_sel.split(chunk_size), y_sel.split(chunk_size)):
        if needs_grad and several:
            picked, correct = checkpoint(_chunk_logps, h_chunk, lm_head_weight, y_chunk, use_reentrant=False)
        else:
            picked, correct = _chunk_logps(h_chunk, lm_head_weight, y_chunk)
        pieces.append(picked)
        n_correct = n_correct + correct
    return torch.cat(pieces), rows, n_correct, mask


def chunked_sft_loss_sum(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    loss_type: str = "nll",
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sft_token_loss_sum` without materialising the [B, T, V] logits, plus the accuracy count.

        for the target positions only (labels[b, t+1] != ignore), in chunks of `chunk_size` rows:
            logits = float32(hidden[b, t] @ W^T)   (training precision matmul, under checkpoint)
            log p_t = log_softmax(logits)[labels[b, t+1]]
        loss_sum = sum_t loss_t   with loss_t = -log p_t (nll) or -sg(p_t) log p_t (dft)

    Peak extra memory is about chunk_size x V float32 values (plus their gradient in the backward)
    instead of B x T x V. Same normalisation rule as `sft_token_loss_sum`: divide by the target
    count of the whole optimizer step.

    Args:
        hidden: final hidden state [B, T, D], after the final norm (the input of lm_head).
        lm_head_weight: [V, D] (the tied embedding matrix for SmolLM2). No bias.
        labels: [B, T] aligned with input_ids.

    Returns:
        (loss_sum float32 scalar, n_tokens int64 scalar, n_correct int64 scalar without gradient).
    """
    _check_sft_loss_type(loss_type)
    token_logps, _, n_correct, mask = _chunked_token_logps(hidden, lm_head_weight, labels, chunk_size, ignore_index)
    loss_sum = _per_token_sft_loss(token_logps, loss_type).sum()
    return loss_sum, mask.sum(), n_correct


def chunked_sequence_logps(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` from hidden states, chunked like `chunked_sft_loss_sum` (for DPO).

        logps_sum[b] = sum_{t : labels[b, t+1] != ignore} log_softmax(float32(hidden[b, t] @ W^T))[labels[b, t+1]]

    Returns (logps_sum float32 [B], n_tokens int64 [B]).
    """
    token_logps, rows, _, mask = _chunked_token_logps(hidden, lm_head_weight, labels, chunk_size, ignore_index)
    n_rows = labels.shape[0]
    logps_sum = token_logps.new_zeros(n_rows).index_add(0, rows, token_logps)
    return logps_sum, reduce(mask.long(), "b t -> b", "sum")


def chunked_token_logps(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """log p of every target token, float32 [N], in row-major order (for per-token policy losses)."""
    return _chunked_token_logps(hidden, lm_head_weight, labels, chunk_size, ignore_index)[0]


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses [B] and the implicit rewards.

    Notation: lr_c = π_c − ref_c and lr_r = π_r − ref_r (log-ratios of the chosen and rejected
    completions), Δ = lr_c − lr_r, σ the logistic function, β = beta, ε = label_smoothing.

        sigmoid  : −log σ(βΔ)                                  (DPO)
                   with ε > 0, the conservative form (cDPO): −(1−ε) log σ(βΔ) − ε log σ(−βΔ)
        apo_zero : (1 − σ(β lr_c)) + σ(β lr_r)                 (anchored preference optimisation)
        ipo      : (Δ − 1/(2β))²                               (IPO)
        hinge    : relu(1 − βΔ)                                (SLiC)
        robust   : [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)   (rDPO; equals sigmoid for ε = 0)

    IPO is defined on length-normalised log-probs: for `ipo` the caller passes the per-token
    AVERAGES (logps_sum / n_tokens from `sequence_logps`), not the sums. All other types take sums.

    At initialisation (policy == reference, Δ = 0): sigmoid = robust = ln 2, apo_zero = 1,
    ipo = 1/(4β²), hinge = 1.

    Rewards: chosen_rewards = β·lr_c and rejected_rewards = β·lr_r, detached.

    Raises ValueError for an unknown loss_type, beta <= 0, label_smoothing outside [0, 0.5), or a
    non-zero label_smoothing with a type that has no smoothing term (apo_zero, ipo, hinge): a
    setting is never silently ignored. The caller reduces `losses` (mean over the pairs).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type not in LABEL_SMOOTHING_LOSSES:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect with loss_type {loss_type!r}; "
            f"it is only used by: {', '.join(LABEL_SMOOTHING_LOSSES)}"
        )
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must have the same shape, got {sorted(shapes)}")

    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    delta = chosen_logratios - rejected_logratios
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # robust
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)

    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards


@torch.no_grad()
def dpo_metrics(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, float]:
    """Means over the pairs of one (micro-)batch:

        loss               = mean(losses)
        rewards/chosen     = mean(β lr_c)          rewards/rejected = mean(β lr_r)
        rewards/accuracies = mean[β lr_c > β lr_r]   (strict: a tie counts 0)
        rewards/margins    = mean(β lr_c − β lr_r)
        logps/chosen       = mean(π_c)             logps/rejected   = mean(π_r)   (the log-probs the loss used)
    """

    def mean(x: torch.Tensor) -> float:
        return float(x.detach().float().mean().item())

    return {
        "loss": mean(losses),
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracies": mean((chosen_rewards > rejected_rewards).float()),
        "rewards/margins": mean(chosen_rewards - rejected_rewards),
        "logps/chosen": mean(policy_chosen_logps),
        "logps/rejected": mean(policy_rejected_logps),
    }


# ---------------------------------------------------------------------------------------------
# NEFTune (noisy embeddings during SFT)
# ---------------------------------------------------------------------------------------------


def neftune_noise(embeddings: torch.Tensor, alpha: float, seq_lengths: torch.Tensor | int) -> torch.Tensor:
    """embeddings + U(−1, 1) · alpha / sqrt(L · d)     (NEFTune, Jain et al. 2023)

    d = embeddings.shape[-1] (hidden size); L = the length of the document each token belongs to.

    Args:
        embeddings: [B, T, d] token embeddings.
        alpha: noise scale (>= 0).
        seq_lengths: L, broadcastable to [B, T, 1]: for a padded batch each row's real length
            ([B, 1, 1], or [B]); for a padding-free packed row each token's document length
            ([1, T, 1], or [1, T]); an int applies one length to everything. Lengths below 1
            (e.g. padding) are taken as 1.

    The noise is a constant (no gradient). Unlike transformers' NEFTune hook, which uses the padded
    row length T for every token, L here is the real document length, so a token's noise does not
    depend on how its batch was padded or packed.
    """
    if alpha < 0:
        raise ValueError(f"NEFTune alpha must be >= 0, got {alpha}")
    d = embeddings.shape[-1]
    lengths = torch.as_tensor(seq_lengths, device=embeddings.device).float().clamp(min=1)
    if lengths.dim() == 1:  # [B]: one length per row
        lengths = rearrange(lengths, "b -> b 1 1")
    elif lengths.dim() == 2:  # [B, T]: one length per token
        lengths = rearrange(lengths, "b t -> b t 1")
    scale = alpha / torch.sqrt(lengths * d)
    noise = torch.empty_like(embeddings).uniform_(-1, 1)
    return embeddings + (noise * scale).to(embeddings.dtype)


class NEFTune:
    """The NEFTune hook of `attach_neftune`, and the lengths it reads.

    `lengths`: the per-token document lengths of the NEXT training forward, broadcastable to
    [B, T, 1] (see `neftune_noise`); the training loop sets it before each forward. None: the row
    length T is used. `remove()` restores the clean embeddings.
    """

    def __init__(self, alpha: float, lengths: torch.Tensor | int | None = None) -> None:
        self.alpha = alpha
        self.lengths = lengths
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def attach_neftune(model: torch.nn.Module, alpha: float, lengths: torch.Tensor | int | None = None) -> NEFTune:
    """Add NEFTune noise to `model.get_input_embeddings()`'s output in training mode only.

    The hook adds `neftune_noise` only when the embedding module is in training mode
    (`module.training`): evaluation and generation (after `model.eval()`) see clean embeddings.
    It reads the document lengths from the returned holder (`NEFTune.lengths`), a closure, not an
    attribute on the model: the caller sets `holder.lengths` before each training forward.

    Returns the holder: `holder.remove()` restores the clean embeddings.
    """
    if alpha < 0:
        raise ValueError(f"NEFTune alpha must be >= 0, got {alpha}")
    embedding_module = model.get_input_embeddings()
    state = NEFTune(alpha, lengths)

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        return neftune_noise(output, alpha, output.shape[1] if state.lengths is None else state.lengths)

    state.handle = embedding_module.register_forward_hook(hook)
    return state
