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
  FLOPs are the context once plus the continuations, not the context once per choice. `batch_size`
  rows (longest first, right-padded, padding seeing only padding) go through the model together.
* **Shared prefixes run once** (eval/prefix.py). Contexts that begin with the same tokens (the system
  turn of every item; a subject's few-shot turns) are grouped by those tokens; the prefix goes through
  the model once and each batch of the group starts from its keys and values. For rows that would
  otherwise run unmasked (one-token answers, below) only a prefix that is most of the context is used.
* **Logits only where they are scored.** The backbone's hidden states are gathered at the positions
  that predict a continuation token, and only those go through `lm_head` and `log_softmax`.

A request whose context + continuation is longer than `max_length + 1` (HFLM then truncates from the
left), a model without a mask-taking attention kernel (sdpa or eager), or a seq2seq backend goes
through HFLM's own code. Results come back in the order of the requests and are added to lm-eval's
request cache as HFLM adds them. Numerics: float32 sums in another order than HFLM's, so per-request
log-likelihoods agree to ~1e-6, not bitwise (tested to 1e-4 against HFLM in tests/test_eval_backend.py).

Generation (`generate_until`, eval/generate.py): HFLM's prompts (its order, batches and `tok_batch_encode`),
each prefilled alone without padding (from a shared prefix's keys and values where one is most of the
prompt: BBH's chain-of-thought exemplars), then decoded `gen_batch_size` rows at a time (if set, else
`batch_size`) in a preallocated KV cache; our greedy loop drops a row from the batch once it has produced
EOS or one of lm-eval's stop strings. Texts equal HFLM's (tested item by item); what it cannot match
(sampling, ...) goes through HFLM's code.

A batch whose continuations are all one token (MMLU's answer letters) is plain causal rows: no 4D mask,
so SDPA skips the masked half of attention.

Tokenization goes through a per-process cache keyed by the tokenizer's content (vocabulary, special
tokens, BOS handling): every model of an eval stage with the same tokenizer shares the encodings of
the same contexts; a model whose added `<think>` tokens change its vocabulary gets its own.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from lm_eval.models.huggingface import HFLM

from trlm.eval.prefix import MIN_FRACTION_UNMASKED, cache_from_prefix, prefix_kv, shared_prefix_groups

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

    def __init__(self, *args, gen_batch_size: int | None = None, gen_workers: int = 1, token_budget: int = 2048, **kwargs):
        super().__init__(*args, **kwargs)
        self.gen_batch_size = gen_batch_size
        self.gen_workers = gen_workers  # decode batches run side by side, one thread each (eval/generate.py)
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
        rows = [(list(ctx), part) for ctx in groups for part in self._split(ctx, groups[ctx], requests)]
        step = max(1, int(self.batch_size)) if self.batch_size != "auto" else 1
        # Rows whose answers are all one token run unmasked (see _score_rows): a prefix must be most of them.
        is_one_token = [all(len(requests[i][2]) == 1 for i in part) for _, part in rows]
        one_token = [r for r, yes in zip(rows, is_one_token) if yes]
        packed = [r for r, yes in zip(rows, is_one_token) if not yes]
        for pool, min_fraction in ((packed, 0.0), (one_token, MIN_FRACTION_UNMASKED)):
            unshared: list = []
            for p, members in shared_prefix_groups([ctx for ctx, _ in pool], min_fraction=min_fraction):
                if not p:
                    unshared += [pool[m] for m in members]
                    continue
                kv = prefix_kv(self.model, pool[members[0]][0][:p], self.device, self._amp())  # once for the group
                self._score_batches([pool[m] for m in members], requests, results, step, (p, kv))
            self._score_batches(unshared, requests, results, step, None)
        return results

    def _score_batches(self, rows, requests, results, step: int, prefix) -> None:
        """Rows longest first (as HFLM) in batches of `step`; answers into `results` and lm-eval's request cache."""
        p = prefix[0] if prefix else 0
        rows = sorted(rows, key=lambda r: -(len(r[0]) - p + sum(len(requests[i][2]) - 1 for i in r[1])))
        for b in range(0, len(rows), step):
            batch = rows[b:b + step]
            answers = self._score_rows([(ctx, [requests[i][2] for i in part]) for ctx, part in batch], prefix)
            for (_, part), row_answers in zip(batch, answers):
                for i, answer in zip(part, row_answers):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)

    def _amp(self) -> dict:
        dtype = self.mixed_precision_dtype
        return dict(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)

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

    @staticmethod
    def _layout(ctx: list[int], conts: list[list[int]], offset: int = 0):
        """One packed row: tokens, position ids, document ids (0 = context, j = continuation j), and for
        each continuation the row positions whose logits predict its tokens. `offset`: the context's first
        `offset` tokens are a cached prefix, not in the row (positions still count them)."""
        n_ctx = len(ctx)
        tokens, positions, doc = list(ctx[offset:]), list(range(offset, n_ctx)), [0] * (n_ctx - offset)
        scored_at: list[list[int]] = []
        for j, cont in enumerate(conts, start=1):
            start = len(tokens)
            body = cont[:-1]
            tokens += body
            positions += range(n_ctx, n_ctx + len(body))
            doc += [j] * len(body)
            scored_at.append([n_ctx - offset - 1, *range(start, start + len(body))])
        return tokens, positions, doc, scored_at

    def _score_rows(self, rows: list[tuple[list[int], list[list[int]]]], prefix=None) -> list[list[tuple[float, bool]]]:
        """(log-likelihood, is_greedy) of each continuation after its row's context, one forward pass for
        the batch. Rows are right-padded; a padding query sees only padding (doc -1), no real one does.
        `prefix` = (p, keys and values): every context starts with the same p tokens, already run."""
        import torch
        import torch.nn.functional as F

        device, dtype = self.device, self.model.dtype
        p, kv = prefix or (0, None)
        layouts = [self._layout(ctx, conts, p) for ctx, conts in rows]
        width = max(len(t) for t, *_ in layouts)
        ids = torch.full((len(rows), width), int(self.tokenizer.pad_token_id or 0), dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        doc = torch.full((len(rows), width), -1, dtype=torch.long)
        flat: list[int] = []
        for r, (tokens, positions, docs, scored_at) in enumerate(layouts):
            n = len(tokens)
            ids[r, :n], pos[r, :n], doc[r, :n] = torch.tensor(tokens), torch.tensor(positions), torch.tensor(docs)
            flat += [r * width + q for at in scored_at for q in at]
        if kv is None and bool((doc <= 0).all()):
            # every continuation is one token (MMLU's letters): the rows are plain causal sequences. No mask, so
            # SDPA runs causal (the upper triangle skipped, no [T, T] mask); padding gets positions after the
            # row's last so transformers sees no packed sequences. Right padding: no real token sees it.
            mask = None
            pad = doc < 0
            pos = torch.where(pad, torch.arange(width).expand(len(rows), width), pos)
        else:
            # query q sees key k when k is not after q, and k is in the context or in q's own continuation
            # (and every query sees the whole cached prefix, padding too: no query row is all masked)
            allowed = (pos[:, None, :] <= pos[:, :, None]) & ((doc[:, None, :] == 0) | (doc[:, None, :] == doc[:, :, None]))
            if p:
                allowed = torch.cat([allowed.new_ones(len(rows), width, p), allowed], dim=-1)
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None].to(device)
        cache = cache_from_prefix(self.model.config, kv, len(rows)) if kv is not None else None
        with torch.no_grad(), torch.autocast(**self._amp()):
            backbone = getattr(self.model, self.model.base_model_prefix)
            hidden = backbone(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask,
                              cache=cache, use_cache=cache is not None).last_hidden_state
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, torch.tensor(flat, dtype=torch.long, device=device))
            logits = self.model.get_output_embeddings()(picked)
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        out, offset = [], 0
        for _, conts in rows:
            answers = []
            for cont in conts:
                scored = logprobs[offset:offset + len(cont)]
                offset += len(cont)
                target = torch.tensor(cont, dtype=torch.long, device=device)
                answers.append((float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(dim=-1) == target).all())))
            out.append(answers)
        return out

    # --- generation: HFLM's batches, finished rows dropped (eval/generate.py) ---------------------

    def generate_until(self, requests, disable_tqdm: bool = False):
        from trlm.eval.generate import generate_until

        if self.batch_size == "auto" or self.backend != "causal":
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        fallback = lambda reqs: super(TrlmLM, self).generate_until(reqs, disable_tqdm=True)  # noqa: E731
        return generate_until(self, requests, int(self.gen_batch_size or self.batch_size), fallback, encode_batch_size=int(self.batch_size))
