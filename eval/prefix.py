"""Token prefixes that several requests share: found once per request list, run through the model once.

A task's prompts often begin with the same tokens: the chat template's system turn in every item, and in
MMLU (`first_n` few-shot sampler) or BBH (fixed chain-of-thought exemplars) the same few-shot turns in
every item of a subject, most of each prompt. The trlm backend runs such a prefix once, keeps its keys
and values, and runs each request from where the prefix ends (eval/backend.py for log-likelihoods,
eval/generate.py for generation's prefill). A token's keys and values depend only on the tokens before
it, so the results are those of the whole sequence, with float sums in another order.

Grouping works on token ids, not strings, so a BPE merge across the boundary cannot make two prefixes
look equal. `shared_prefix_groups` sorts the sequences, so that sequences sharing a prefix are neighbours,
and splits the sorted list where neighbours share least, as long as the parts save more tokens than the
whole (k members sharing p tokens save (k - 1) * p): a subject's few-shot turns, not only the system
turn that every subject shares. A prefix stops one token short of its shortest member, so every
request still runs its last context token, whose output predicts the continuation.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_SHARED = 16  # below this many tokens a shared prefix is not worth its own forward pass and mask
# Where a row would otherwise run without a mask (causal SDPA computes half the [T, T] square, and GQA
# needs no copies of K/V), a prefix costs the suffix a full mask over prefix + suffix: it pays only when it
# is most of the row. GSM8K's ~25 shared tokens (the system turn) of ~1,100 made prefill 25% slower.
MIN_FRACTION_UNMASKED = 0.5


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def shared_prefix_groups(seqs: Sequence[Sequence[int]], min_shared: int = MIN_SHARED,
                         min_fraction: float = 0.0) -> list[tuple[int, list[int]]]:
    """A partition of range(len(seqs)) into (prefix length, member indices). Members of a group with a
    prefix length p > 0 share their first p tokens, each has at least p + 1, and p is at least
    `min_fraction` of each member's length; p is 0 for sequences left alone: no neighbour shares
    `min_shared` tokens (and that fraction) with them, or grouping would save nothing."""
    order = sorted(range(len(seqs)), key=lambda i: tuple(seqs[i]))
    # edge[k]: tokens that neighbours k and k + 1 can share (one short of either's length)
    edge = [min(common_prefix_length(seqs[a], seqs[b]), len(seqs[a]) - 1, len(seqs[b]) - 1) for a, b in zip(order, order[1:])]

    def best(lo: int, hi: int, depth: int) -> tuple[int, list[tuple[int, list[int]]]]:
        """(tokens saved, groups) for the sorted run order[lo:hi]: one group sharing the run's smallest edge,
        or the runs between its smallest edges grouped on their own, whichever saves more."""
        if hi - lo == 1:
            return 0, [(0, [order[lo]])]
        shared = min(edge[lo:hi - 1])
        enough = shared >= max(min_shared, min_fraction * sum(len(seqs[i]) for i in order[lo:hi]) / (hi - lo))
        whole = (hi - lo - 1) * shared if enough else 0
        if depth >= 64:  # deeply nested prefixes: stop refining (bounded work on adversarial input)
            return whole, [(shared if whole else 0, order[lo:hi])]
        cuts = [lo] + [k + 1 for k in range(lo, hi - 1) if edge[k] == shared] + [hi]
        if len(cuts) == 2:  # every edge is above the minimum: cannot happen, kept for safety
            return whole, [(shared if whole else 0, order[lo:hi])]
        saved, groups = 0, []
        for a, b in zip(cuts, cuts[1:]):
            s, g = best(a, b, depth + 1)
            saved, groups = saved + s, groups + g
        if whole > saved:
            return whole, [(shared, order[lo:hi])]
        return saved, groups

    if not order:
        return []
    merged, alone = [], []  # the ungrouped ones end in one entry with p = 0
    for p, members in best(0, len(order), 0)[1]:
        # the fraction holds for each member, not only on average: a long member runs alone
        kept = [i for i in members if p and p >= min_fraction * len(seqs[i])]
        if len(kept) > 1:
            merged.append((p, kept))
            alone += [i for i in members if i not in kept]
        else:
            alone += members
    return merged + ([(0, alone)] if alone else [])


def prefix_kv(model, tokens: Sequence[int], device, amp: dict) -> list[tuple]:
    """Each layer's (keys, values) for `tokens`: one sequence through the causal LM's backbone (no LM head)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    backbone = getattr(model, model.base_model_prefix)
    with torch.no_grad(), torch.autocast(**amp):
        backbone(input_ids=torch.tensor([list(tokens)], dtype=torch.long, device=device), cache=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_prefix(config, kv: list[tuple], batch: int):
    """A fresh `DynamicCache` for `batch` rows that all start with the prefix `kv` (views, not copies: a forward
    pass appends its own positions to a new tensor and leaves `kv` as it was)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    if len(cache.layers) != len(kv):
        raise ValueError(f"the prefix has {len(kv)} layers, the model's cache {len(cache.layers)}")
    for layer, (keys, values) in zip(cache.layers, kv):
        layer.lazy_initialization(keys, values)
        layer.keys = keys.expand(batch, -1, -1, -1)
        layer.values = values.expand(batch, -1, -1, -1)
    return cache


class PrefixStore:
    """The shared prefixes of a list of prompts, each computed when its first member needs it and dropped
    after its last member has used it. Prompts run longest first across a task's subtasks, so a task may
    hold all its prefixes at once: BBH's 27 subtasks' exemplars, about 1.2 GB in float32 for SmolLM2-135M."""

    def __init__(self, lm, seqs: Sequence[Sequence[int]], amp: dict, min_fraction: float = MIN_FRACTION_UNMASKED):
        self._lm, self._amp, self._seqs = lm, amp, seqs
        self._group_of: dict[int, int] = {}
        self._length: list[int] = []
        self._left: list[int] = []
        for p, members in shared_prefix_groups(seqs, min_fraction=min_fraction):
            if p:
                for i in members:
                    self._group_of[i] = len(self._length)
                self._length.append(p)
                self._left.append(len(members))
        self._kv: dict[int, list[tuple]] = {}

    def take(self, i: int) -> tuple[int, list[tuple] | None]:
        """(p, keys and values of sequence i's first p tokens), or (0, None) when it shares no prefix."""
        g = self._group_of.get(i)
        if g is None:
            return 0, None
        p = self._length[g]
        kv = self._kv.get(g)
        if kv is None:
            kv = self._kv[g] = prefix_kv(self._lm.model, self._seqs[i][:p], self._lm.device, self._amp)
        self._left[g] -= 1
        if not self._left[g]:
            del self._kv[g]
        return p, kv
