"""Greedy `generate_until` for `TrlmLM`: HFLM's prompts, our own prefill and decode loop (finished rows dropped).

What HFLM does (lm_eval/models/huggingface.py, `generate_until` + `_model_generate`), and what is kept:

* Requests are grouped by their generation kwargs, sorted by (-len(tok_encode(context)), context) and cut
  into batches of `batch_size`; each batch is encoded by HFLM's own `tok_batch_encode` (left padding, its
  BOS rule, `truncation`), left-truncated to `max_length - max_gen_toks` tokens. Kept as is (the same
  calls, the same batches), so every prompt has exactly the tokens HFLM's `model.generate` gets.
* `model.generate` greedy: position ids = cumsum(mask) - 1 (0 on padding), logits of the last position
  only, argmax, rows past an EOS token filled with the pad token; at most `max_gen_toks` new tokens; the
  whole batch stops when every row has produced one of the `until` strings. The text is the decoded new
  tokens (special tokens skipped) cut at the first stop string.

What changes (the same tokens; float sums in another order, as any change of batch does in HFLM):

* **Prefill one prompt at a time, unpadded.** No left padding, no mask: SDPA runs causal (the masked upper
  triangle is skipped, no [B, T, T] mask, grouped-query heads without copying K/V). The caches are then
  left-padded into one batch cache, and decoding goes on with HFLM's mask and position ids.
* **A shared prefix once** (eval/prefix.py): prompts whose first tokens are the same, and most of the
  prompt (BBH's exemplars of a subtask), are prefilled from the prefix's keys and values, computed once.
* **A preallocated KV cache** (`_buffer_layer_class`): room for `max_gen_toks` more tokens, so a decode
  step writes one position instead of `torch.cat`-copying the whole cache of every layer.
* **Finished rows leave the batch.** A row's KV cache rows are dropped as soon as it has produced EOS or a
  stop string, instead of decoding on until the slowest row of the batch is done. The text a row keeps
  is the same: HFLM's extra tokens come after the stop string and are cut off, and a row past EOS only
  adds pad tokens, which decoding skips (required: the pad token is a special token, else HFLM's path runs).
* **Decode batch apart from the encode batch.** Since a row's prompt no longer depends on its batch,
  the rows (in HFLM's order) are decoded `gen_batch_size` at a time: on a CPU a decode step reads every
  weight once whatever the batch, so wider batches cost less per row.

Not handled here (HFLM's own path runs): sampling, any generation kwarg besides until / max_gen_toks /
do_sample=False / temperature=0, a generation config that changes greedy tokens (repetition penalty,
forced or suppressed tokens, ...), `think_end_token`, `batch_size="auto"`, seq2seq models, a model
whose cache has other than plain full-attention layers (sliding windows, ...).
"""

from __future__ import annotations

import json

from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from trlm.eval.prefix import PrefixStore, cache_from_prefix

# generation-config fields that, when set, change which token greedy decoding picks or when it stops
_GREEDY_NEUTRAL = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "sequence_bias": (None,),
    "num_beams": (None, 1), "max_new_tokens": (None,), "exponential_decay_length_penalty": (None,),
    "stop_strings": (None,), "watermarking_config": (None,), "assistant_model": (None,), "prompt_lookup_num_tokens": (None,),
}


def greedy_settings(lm, gen_kwargs: dict) -> tuple[list[str], int] | None:
    """(until, max_gen_toks) as HFLM derives them, or None when this loop would not match HFLM."""
    if lm.backend != "causal" or lm.think_end_token is not None or lm.batch_size == "auto":
        return None
    kwargs = normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=lm.tok_decode(lm.eot_token_id, skip_special_tokens=False))
    max_gen_toks = kwargs.pop("max_gen_toks")
    if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) != 0.0 or kwargs:
        return None
    config = lm.model.generation_config
    if any(getattr(config, k, None) not in ok for k, ok in _GREEDY_NEUTRAL.items()):
        return None
    pad = lm.tokenizer.pad_token_id
    if pad is None or pad not in lm.tokenizer.all_special_ids or lm.max_length - max_gen_toks <= 0 or not _plain_layers(lm):
        return None
    return until, max_gen_toks


def _eos_ids(lm) -> set[int]:
    eos = lm.model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def stop_windows(lm, until: list[str]) -> list[tuple[str, int]]:
    """(stop string, how many last new tokens HFLM decodes to look for it): its length in tokens + 2."""
    return [(s, len(lm.tokenizer.encode(s, add_special_tokens=False)) + 2) for s in until]


def _stopped(lm, new_tokens: list[int], stops: list[tuple[str, int]]) -> bool:
    """HFLM's stop test for one row: a stop string in the decoded last len(ids)+2 new tokens."""
    return any(s in lm.tokenizer.decode(new_tokens[-n:]) for s, n in stops)


_LAYER_CLASS: list = []


def _buffer_layer_class():
    """A `DynamicLayer` whose keys/values are views into a buffer with room for the tokens still to come: a
    decode step writes one position instead of copying the whole cache (`torch.cat`, as long as the forward
    pass itself for a 1,100-token GSM8K prompt on the CPU). The values the attention sees are the same."""
    if _LAYER_CLASS:
        return _LAYER_CLASS[0]
    import torch
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, keys, values, length: int):
            super().__init__()
            self._k, self._v, self._n = keys, values, length  # buffers [B, H, capacity, D]; positions filled
            self.device, self.is_initialized = keys.device, True
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

        def update(self, key_states, value_states, *args, **kwargs):
            n, t = self._n, key_states.shape[-2]
            if n + t > self._k.shape[-2]:  # out of room: grow (not when sized for max_gen_toks)
                self._k, self._v = (torch.cat([b[:, :, :n], b.new_zeros(*b.shape[:2], t, b.shape[-1])], dim=-2)
                                    for b in (self._k, self._v))
            self._k[:, :, n:n + t] = key_states
            self._v[:, :, n:n + t] = value_states
            self._n = n + t
            self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
            self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]

    _LAYER_CLASS.append(BufferLayer)
    return BufferLayer


def _prefill(lm, rows: list[list[int]], reserve: int, amp: dict, prefixes: list[tuple] | None = None):
    """Each prompt through the model alone, unpadded (causal attention, no mask: no FLOPs on padding or on
    the masked upper triangle), then the caches left-padded into one batch cache with `reserve` free
    positions. `prefixes[r]` = (p, keys and values of row r's first p tokens) or (0, None): the row runs
    from token p on. Returns (cache, attention mask, position ids of the last prompt token, first new tokens)."""
    import torch
    from transformers import DynamicCache

    width = max(len(r) for r in rows)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=lm.device)
    firsts: list[int] = []
    bufs: list[tuple] | None = None
    for r, tokens in enumerate(rows):
        p, kv = prefixes[r] if prefixes else (0, None)
        one = cache_from_prefix(lm.model.config, kv, 1) if kv is not None else DynamicCache(config=lm.model.config)
        with torch.no_grad(), torch.autocast(**amp):
            out = lm.model(input_ids=torch.tensor([tokens[p:]], dtype=torch.long, device=lm.device), cache=one, use_cache=True,
                           position_ids=torch.arange(p, len(tokens), device=lm.device)[None], logits_to_keep=1)
        firsts.append(int(out.logits[0, -1, :].to(dtype=torch.float32).argmax()))
        if bufs is None:
            bufs = [(layer.keys.new_zeros(len(rows), layer.keys.shape[1], width + reserve, layer.keys.shape[-1]),
                     layer.values.new_zeros(len(rows), layer.values.shape[1], width + reserve, layer.values.shape[-1]))
                    for layer in one.layers]
        n = len(tokens)
        for (k, v), layer in zip(bufs, one.layers):
            k[r, :, width - n:width], v[r, :, width - n:width] = layer.keys[0], layer.values[0]
        mask[r, width - n:] = 1
    cache = DynamicCache(config=lm.model.config)
    layer_cls = _buffer_layer_class()
    cache.layers = [layer_cls(k, v, width) for k, v in bufs]
    pos = torch.tensor([[len(r) - 1] for r in rows], dtype=torch.long, device=lm.device)
    return cache, mask, pos, firsts


def _plain_layers(lm) -> bool:
    """Every layer of the model's DynamicCache is a plain full-attention `DynamicLayer` (no sliding window)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=lm.model.config).layers)


def encode_rows(lm, contexts: list[str], max_gen_toks: int) -> list[list[int]]:
    """The prompt tokens of each context exactly as HFLM's batch encodes them (its `tok_batch_encode`: BOS
    rule, left truncation to `max_length - max_gen_toks`), without the left padding."""
    ids, mask = lm.tok_batch_encode(list(contexts), left_truncate_len=lm.max_length - max_gen_toks, truncation=lm.truncation)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def generate_rows(lm, rows: list[list[int]], settings: list[tuple], prefixes: list[tuple] | None = None) -> list[str]:
    """Greedy continuations of the prompts `rows` (token ids), finished rows dropped from the batch.
    `settings[r]`: row r's (until, max_gen_toks, `stop_windows(lm, until)`); rows of different tasks
    decode side by side. Only decodes with the tokenizer (safe in several threads at once).
    `prefixes`: per row, a shared prefix already run (see `_prefill`)."""
    import torch

    eos = _eos_ids(lm)
    stops = [stop_windows for _, _, stop_windows in settings]
    limits = [max_gen_toks for _, max_gen_toks, _ in settings]
    new: list[list[int]] = [[] for _ in rows]
    amp = lm._amp()
    cache, mask, pos, chosen = _prefill(lm, rows, max(limits), amp, prefixes)
    live = list(range(len(rows)))  # original row of each row still in the batch
    for step in range(max(limits)):
        if step:
            with torch.no_grad(), torch.autocast(**amp):
                out = lm.model(input_ids=step_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                               logits_to_keep=1)
            chosen = out.logits[:, -1, :].to(dtype=torch.float32).argmax(dim=-1).tolist()
        keep = []
        for j, (row, tok) in enumerate(zip(live, chosen)):
            new[row].append(tok)
            if tok not in eos and len(new[row]) < limits[row] and not _stopped(lm, new[row], stops[row]):
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=lm.device)
            cache.batch_select_indices(index)
            mask, pos, chosen = mask[index], pos[index], [chosen[j] for j in keep]
            live = [live[j] for j in keep]
        step_ids = torch.tensor(chosen, dtype=torch.long, device=lm.device)[:, None]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        pos = pos + 1
    return [postprocess_generated_text(lm.tok_decode(toks), stop=until, think_end_token=None) for toks, (until, _, _) in zip(new, settings)]


def generate_until(lm, requests, batch_size: int, fallback, encode_batch_size: int | None = None) -> list[str]:
    """HFLM's `generate_until` with our greedy loop wherever it can match HFLM; `fallback(instances)` for the
    rest. The prompts of each generation-kwargs group (a task's) are ordered and encoded as HFLM does
    (batches of `encode_batch_size`, default `batch_size`); then all groups' rows, one group after the
    other, are decoded `batch_size` at a time, each row with its own stop strings and token limit: a
    row's text does not depend on the rows decoded beside it, and when lm-eval hands over several tasks
    at once their short tails share decode steps. Results in request order, each added to lm-eval's
    request cache as HFLM adds it."""
    results: list = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    encode_batch_size = encode_batch_size or batch_size
    order: list[int] = []  # request of each row
    rows: list[list[int]] = []
    settings: list[tuple] = []
    for members in groups.values():
        greedy = greedy_settings(lm, requests[members[0]].args[1])
        if greedy is None:
            for i, text in zip(members, fallback([requests[i] for i in members])):
                results[i] = text
            continue
        mine = sorted(members, key=lambda i: (-len(lm.tok_encode(requests[i].args[0])), requests[i].args[0]))
        for b in range(0, len(mine), encode_batch_size):
            rows += encode_rows(lm, [requests[i].args[0] for i in mine[b:b + encode_batch_size]], greedy[1])
        order += mine
        settings += [(*greedy, stop_windows(lm, greedy[0]))] * len(mine)  # encoded here, not in the worker threads
    if not rows:
        return results
    shared = PrefixStore(lm, rows, lm._amp())  # a prefix that is most of its prompts (a subtask's few-shot turns), run once
    workers = max(1, int(getattr(lm, "gen_workers", None) or 1))
    for b in range(0, len(order), batch_size * workers):
        # `workers` decode batches at once, one thread each, rows dealt out in turn (similar lengths)
        parts = [p for p in (list(range(b, min(b + batch_size * workers, len(order))))[k::workers] for k in range(workers)) if p]
        jobs = [([rows[r] for r in part], [settings[r] for r in part], [shared.take(r) for r in part]) for part in parts]
        for part, texts in zip(parts, _run_parts(lm, jobs)):
            for r, text in zip(part, texts):
                i = order[r]
                results[i] = text
                lm.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
    return results


def _run_parts(lm, jobs: list[tuple]) -> list[list[str]]:
    """`generate_rows` of each job; several jobs side by side in threads with one intra-op thread each. A
    CPU decode step of a small model is bound by one core's latency: two batches on two cores take about
    the time of one (eval/config.py `gen_workers`)."""
    if len(jobs) == 1:
        return [generate_rows(lm, *jobs[0])]
    from concurrent.futures import ThreadPoolExecutor

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="generate") as pool:
            return list(pool.map(lambda job: generate_rows(lm, *job), jobs))
    finally:
        torch.set_num_threads(before)
