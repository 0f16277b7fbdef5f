"""Sampling a group of completions of one prompt with the KV cache, each sample from its own seed.

    completions = sample_group(model, prompt_ids, seeds=[s0, s1, ...], max_new_tokens=64, eos_id=2)

The prompt runs through the model once: its keys and values are computed for one row and the cache
is repeated G times (`DynamicCache.batch_repeat_interleave`); then every new token is one forward
of G rows of length 1. All G rows share the prompt, so there is no padding; a row that has emitted
`eos_id` keeps being fed `eos_id` and what follows is dropped.

Determinism: sample g draws its tokens from its own `torch.Generator` seeded with `seeds[g]`
(the caller derives it from (seed, step, prompt, sample index)), on the CPU, so a completion does
not depend on which other samples share its batch, on the number of processes, or on a resume.

CPU threads: decoding is many small matmuls. On a CPU shared with other busy processes, 2 intra-op
threads spin-wait on each other at every op (measured here: a 2-layer model's 16-token decode took
18 s with 2 threads under a load of 8; eval/config.py measured the same for lm-eval's decoding), so
`num_threads` (e.g. 1) sets the threads for the decoding only, restored afterwards.

The decoding forward uses transformers' "sdpa" attention (which handles a query shorter than its
keys; the training kernel "packed_sdpa" is causal over equal lengths) and is switched back after.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch


def filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (nucleus), renormalised. probs [G, V]."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
    sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


@contextmanager
def decoding_attention(model):
    """The model's attention switched to "sdpa" for decoding with a cache, restored afterwards."""
    before = model.config._attn_implementation
    if before != "sdpa":
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if before != "sdpa":
            model.set_attn_implementation(before)


def _next_logits(model, input_ids, position_ids, cache) -> torch.Tensor:
    """Backbone + lm_head on the last position only (the stages replace `forward` by a loss-head forward)."""
    hidden = model.model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True).last_hidden_state
    return model.lm_head(hidden[:, -1]).float()


@contextmanager
def intra_op_threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _sample(model, prompt_ids: list[int], seeds: list[int], max_new_tokens: int, eos_id: int, temperature: float,
            top_p: float) -> list[list[int]]:
    """One group, the model already in its decoding state (`sample_groups`). Safe to run in several
    threads at once: its cache, generators and grad mode are its own."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    generators = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]
    n, p = len(seeds), len(prompt_ids)
    cache = DynamicCache()
    logits = _next_logits(model, torch.tensor([prompt_ids], device=device), None, cache)
    cache.batch_repeat_interleave(n)
    logits = logits.expand(n, -1)
    tokens: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for t in range(max_new_tokens):
        probs = filter_top_p(torch.softmax(logits.cpu() / max(temperature, 1e-6), dim=-1), top_p)
        step = [int(torch.multinomial(probs[g], 1, generator=generators[g])) if not done[g] else eos_id for g in range(n)]
        for g, token in enumerate(step):
            if not done[g]:
                tokens[g].append(token)
                done[g] = token == eos_id
        if all(done) or t == max_new_tokens - 1:
            break
        position = torch.full((n, 1), p + t, device=device)
        logits = _next_logits(model, torch.tensor(step, device=device)[:, None], position, cache)
    return tokens


def sample_groups(model, prompts: list[list[int]], *, seeds: list[list[int]], max_new_tokens: int, eos_id: int,
                  temperature: float = 1.0, top_p: float = 1.0, num_threads: int | None = None, workers: int = 1) -> list[list[list[int]]]:
    """The group of completions of each prompt (`sample_group`), `workers` groups at a time, each in a
    thread of its own. On a CPU a decode step of a small model is bound by one core's latency, not by
    the memory bus: two groups decoding side by side, one core each, take about the time of one
    (135M model, 1 intra-op thread: 106 ms a step alone, 109 and 112 ms two at once). A group's
    completions are the same whatever the workers: each group runs the same ops on its own cache."""
    was_training = model.training
    model.eval()
    jobs = [(prompt, group_seeds, max_new_tokens, eos_id, temperature, top_p) for prompt, group_seeds in zip(prompts, seeds, strict=True)]
    parallel = workers > 1 and len(jobs) > 1
    try:  # side by side, each worker runs one intra-op thread (no oversubscribed cores)
        with decoding_attention(model), intra_op_threads(1 if parallel else num_threads):
            if not parallel:
                return [_sample(model, *job) for job in jobs]
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sample") as pool:
                return list(pool.map(lambda job: _sample(model, *job), jobs))
    finally:
        model.train(was_training)


def sample_group(model, prompt_ids: list[int], *, seeds: list[int], max_new_tokens: int, eos_id: int,
                 temperature: float = 1.0, top_p: float = 1.0, num_threads: int | None = None) -> list[list[int]]:
    """G = len(seeds) completions of `prompt_ids`: each a list of token ids, ending with `eos_id`
    unless it was cut at `max_new_tokens`. `model` is a plain (unwrapped) causal LM."""
    return sample_groups(model, [prompt_ids], seeds=[seeds], max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature,
                         top_p=top_p, num_threads=num_threads)[0]
