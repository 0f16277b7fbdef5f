"""Policy-gradient losses over groups of sampled completions, written from the math (no `trl`).

Pure functions (tensors in, tensors out). Names are generic: the stage that uses them maps its
options onto them (`stages/grpo.py` says which published method each one is).

Group advantages
----------------
For P prompts with G sampled completions each, rewards r [P, G]:

    A[p, g] = r[p, g] - mean_g r[p, :]                               (scale "none")
    A[p, g] = (r[p, g] - mean_g r[p, :]) / (std_g r[p, :] + 1e-4)    (scale "group"; std unbiased)

A group whose rewards are all equal has A = 0: it carries no gradient (`zero_variance` flags it).

The clipped surrogate, per completion token t of completion i
--------------------------------------------------------------
    ratio[i, t] = exp(logp[i, t] - old_logp[i, t])        (= 1 in value when old_logp = logp.detach())
    l[i, t]     = -min(ratio A[i], clip(ratio, 1 - eps, 1 + eps) A[i]) + beta * kl[i, t]
    kl[i, t]    = exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1    (k3 estimator, >= 0)

and the normalisation (`normalise`), over the B completions of the whole optimizer step
(every micro-batch and every process), with mask m[i, t] = 1 on completion tokens:

    "sequence": L = (1 / B) sum_i (sum_t m l / sum_t m)          each completion's token mean, averaged
    "constant": L = (1 / (B * T_max)) sum_i sum_t m l             a constant normaliser (max completion length)
    "token":    L = (1 / sum_{i,t} m) sum_i sum_t m l             every token of the batch weighs the same

The function returns one micro-batch's share of L, given the step's global B (`num_sequences`)
and token count (`num_tokens`): summing the shares over micro-batches and processes gives L, so
micro-batching and several processes change nothing (the gradient-accumulation rule of losses.py).
"""

from __future__ import annotations

import torch
from einops import reduce

NORMALISATIONS: tuple[str, ...] = ("sequence", "constant", "token")
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, scale: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [P, G] -> (advantages [P, G], zero_variance [P] bool: every sample of the group scored alike)."""
    if scale not in ("group", "none"):
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    rewards = rewards.float()
    mean = reduce(rewards, "p g -> p 1", "mean")
    advantages = rewards - mean
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    if scale == "group":
        std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
        advantages = advantages / (std + STD_EPS)
    return advantages, spread == 0


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalise: str,
    num_sequences: float,
    num_tokens: float,
    max_length: int,
    epsilon: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's share of the loss L (module docstring) and its sums for the metrics.

    Args:
        logps, old_logps, ref_logps: [B, T] log p of each completion token (any value where mask is 0);
            old_logps (and ref_logps) carry no gradient.
        advantages: [B]; mask: [B, T] bool, True on completion tokens.
        num_sequences, num_tokens: the optimizer step's global completion and token counts.
        max_length: T_max of "constant" (the recipe's max completion length).
    Returns:
        (loss share, {"clipped": #tokens whose ratio was clipped (the min took the clipped term),
        "kl": sum of m * kl (0 when beta is 0), "tokens": sum of m}).
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps")
    m = mask.float()
    ratio = torch.exp(logps - old_logps)
    adv = advantages.float()[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if beta > 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    if normalise == "sequence":
        lengths = reduce(m, "b t -> b", "sum").clamp(min=1)
        loss = (reduce(masked, "b t -> b", "sum") / lengths).sum() / max(num_sequences, 1.0)
    elif normalise == "constant":
        loss = masked.sum() / (max(num_sequences, 1.0) * max_length)
    else:
        loss = masked.sum() / max(num_tokens, 1.0)
    was_clipped = (clipped < unclipped) & mask  # the min took the clipped term: no gradient there
    stats = {"clipped": was_clipped.sum().detach(), "kl": torch.where(mask, kl, torch.zeros_like(kl)).sum().detach(), "tokens": m.sum().detach()}
    return loss, stats
