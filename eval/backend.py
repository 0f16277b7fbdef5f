"""`TrlmLM`: lm-eval's model API with shared contexts scored once (the `trlm` eval backend).

lm-eval's HF backend (`HFLM`) scores a multiple-choice question by running the model once per answer
choice over context + choice, and builds the logits of every position ([B, T, 49,152] for SmolLM2).
`TrlmLM` is a subclass of `HFLM` that keeps everything that decides *what* is scored (tokenization,
`_encode_pair`'s whitespace handling, the chat template, BOS handling, `max_length`, the request
cache hooks) and changes *how* the loglikelihood requests are computed:

* **One packed row per context.** The requests that share a context's tokens (a question's choices)
  become one row: the context once, then each continuation (less its last token), with position ids
  restarting after the context for each continuation and a 4D attention mask in which a continuation
  sees the context and itself only (per-document attention, as DPO's shared prompt in training). The
  FLOPs are the context once plus the continuations, not the context once per choice.
* **Logits only where they are scored.** The backbone's hidden states are gathered at the positions
  that predict a continuation token, and only those go through `lm_head` and `log_softmax`.

A request whose context + continuation is longer than `max_length + 1` (HFLM then truncates from the
left), a model without a mask-taking attention kernel (sdpa or eager), or a seq2seq backend goes
through HFLM's own code. Results come back in the order of the requests and are added to lm-eval's
request cache as HFLM adds them. Numerics: float32 sums in another order than HFLM's, so per-request
log-likelihoods agree to ~1e-6, not bitwise (tested to 1e-4 against HFLM in tests/test_eval_backend.py).

Generation (`generate_until`) is HFLM's own (length-sorted, left-padded, KV cache, lm-eval's stop
sequences), in batches of `gen_batch_size` rows: decoding a 135M model on a CPU is bound by reading
the weights once per step, so a wider batch costs about as much per step as a narrow one.

Tokenization goes through a per-process cache keyed by the tokenizer's content (vocabulary, special
tokens, BOS handling): every model of an eval stage with the same tokenizer shares the encodings of
the same contexts; a model whose added `<think>` tokens change its vocabulary gets its own.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from lm_eval.models.huggingface import HFLM

_MASKED_KERNELS = ("sdpa", "eager")
_ENCODINGS: dict[str, OrderedDict] = {}  # tokenizer key -> (string, options) -> token ids
_MAX_CACHED = 200_000  # encodings per tokenizer


def tokenizer_key(tokenizer, add_bos_token) -> str:
    """What a token encoding depends on: the vocabulary, the special tokens and the BOS setting."""
    ident = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "class": type(tokenizer).__name__,
        "add_bos_token": add_bos_token,
        "bos": getattr(tokenizer, "add_bos_token", None),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


class TrlmLM(HFLM):
    """HFLM with the loglikelihood path computed once per shared context (see the module doc)."""

    def __init__(self, *args, gen_batch_size: int | None = None, token_budget: int = 2048, **kwargs):
        super().__init__(*args, **kwargs)
        self.gen_batch_size = gen_batch_size
        self.token_budget = token_budget  # longest packed row before a context group is split
        self._tok_key = tokenizer_key(self.tokenizer, self.add_bos_token)
        self._encodings = _ENCODINGS.setdefault(self._tok_key, OrderedDict())

    # --- tokenization, cached per tokenizer -------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs) -> list[int]:
        if kwargs:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        key = (string, add_special_tokens, left_truncate_len)
        found = self._encodings.get(key)
        if found is None:
            found = tuple(super().tok_encode(string, add_special_tokens, left_truncate_len))
            self._encodings[key] = found
            if len(self._encodings) > _MAX_CACHED:
                self._encodings.popitem(last=False)
        return list(found)

    # --- loglikelihood: one packed row per shared context ------------------------------------------

    def _packable(self) -> bool:
        impl = getattr(self.model.config, "_attn_implementation", None)
        return self.backend == "causal" and impl in _MASKED_KERNELS and hasattr(self.model, "get_output_embeddings")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self._packable():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        results: list = [None] * len(requests)
        too_long: list[int] = []
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            assert len(ctx) > 0 and len(cont) > 0 and len(cont) <= self.max_length
            if len(ctx) + len(cont) > self.max_length + 1:
                too_long.append(i)  # HFLM truncates these from the left: its own code does it
            else:
                groups.setdefault(tuple(ctx), []).append(i)
        if too_long:
            for i, answer in zip(too_long, super()._loglikelihood_tokens([requests[i] for i in too_long], disable_tqdm=True)):
                results[i] = answer
        # longest first, as HFLM, so that a memory problem shows at once
        for ctx in sorted(groups, key=lambda c: -len(c)):
            for part in self._split(ctx, groups[ctx], requests):
                for i, answer in zip(part, self._score_group(list(ctx), [requests[i][2] for i in part])):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results

    def _split(self, ctx: tuple, members: list[int], requests) -> list[list[int]]:
        """The group's requests in rows of at most `token_budget` tokens (at least one request a row)."""
        parts, part, size = [], [], len(ctx)
        for i in members:
            n = len(requests[i][2]) - 1
            if part and size + n > max(self.token_budget, self.max_length):
                parts.append(part)
                part, size = [], len(ctx)
            part.append(i)
            size += n
        parts.append(part)
        return parts

    def _score_group(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each continuation after `ctx`, from one forward pass."""
        import torch
        import torch.nn.functional as F

        n_ctx = len(ctx)
        tokens, positions, doc = list(ctx), list(range(n_ctx)), [0] * n_ctx
        scored_at: list[list[int]] = []  # row positions whose logits predict each continuation's tokens
        for j, cont in enumerate(conts, start=1):
            start = len(tokens)
            body = cont[:-1]
            tokens += body
            positions += range(n_ctx, n_ctx + len(body))
            doc += [j] * len(body)
            scored_at.append([n_ctx - 1, *range(start, start + len(body))])
        device = self.device
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        pos = torch.tensor([positions], dtype=torch.long, device=device)
        d = torch.tensor(doc, device=device)
        p = torch.tensor(positions, device=device)
        # query q sees key k when k is not after q, and k is in the context or in q's own continuation
        allowed = (p[None, :] <= p[:, None]) & ((d[None, :] == 0) | (d[None, :] == d[:, None]))
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=self.mixed_precision_dtype, enabled=self.mixed_precision_dtype is not None):
            backbone = getattr(self.model, self.model.base_model_prefix)
            hidden = backbone(input_ids=ids, position_ids=pos, attention_mask=mask[None, None], use_cache=False).last_hidden_state[0]
            flat = torch.tensor([q for at in scored_at for q in at], dtype=torch.long, device=device)
            logits = self.model.get_output_embeddings()(hidden.index_select(0, flat))
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        answers, offset = [], 0
        for cont in conts:
            rows = logprobs[offset:offset + len(cont)]
            offset += len(cont)
            target = torch.tensor(cont, dtype=torch.long, device=device)
            greedy = bool((rows.argmax(dim=-1) == target).all())
            answers.append((float(rows.gather(1, target[:, None]).sum()), greedy))
        return answers

    # --- generation: HFLM's, in wider batches -----------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False):
        if not self.gen_batch_size or self.batch_size == "auto":
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        narrow = self.batch_size_per_gpu
        self.batch_size_per_gpu = self.gen_batch_size
        try:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            self.batch_size_per_gpu = narrow
