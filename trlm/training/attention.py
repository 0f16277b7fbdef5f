"""Per-document attention over packed rows, and the loss-head forward (backbone + a loss on the hidden states).

* `packed_sdpa_attention`, registered with transformers as attn_implementation "packed_sdpa" (the
  stages' default, `register_packed_sdpa`): causal attention within each document of a packed row,
  no [T, T] mask, no cross-document FLOPs; the DPO prompt-sharing layout (`shared_prefix`).
* `install_head_forward`: `model(input_ids, head=...)` returns `head(final hidden states, lm_head
  weight)`, so the [B, T, V] logits are never built (the heads are the chunked losses of
  `trlm/training/losses.py`).
"""

from __future__ import annotations

from contextlib import nullcontext
from types import MethodType
from typing import Callable

import torch
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

PACKED_SDPA = "packed_sdpa"


_GPU_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
try:  # PyTorch >= 2.10 on CUDA: varlen flash attention over a packed row
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:
    _varlen_attn = None


@torch.compiler.disable  # per-document Python loop: keep it out of compiled decoder layers
def packed_sdpa_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, position_ids=None, packed_lengths=None,
    shared_prefix=None, **kwargs
):
    """Causal attention restricted to each document of a row: one SDPA call per document.

    Registered with transformers as attn_implementation "packed_sdpa" (the stages' default). For a
    padding-free row [1, sum L] the document lengths come from `packed_lengths` (passed down by the
    stages' forward, no device sync) or else from the `position_ids` resets (collate restarts them
    at 0). Each document runs `F.scaled_dot_product_attention(is_causal=True)` on its own piece of
    a `split` (whose backward is one concatenation; slicing would write a full-size gradient per
    document). The FLOPs are sum L_i^2, not (sum L_i)^2, no [T, T] mask is ever built, and on a GPU
    every call takes the flash kernel: what a varlen flash-attention kernel does, as a Python loop.

    transformers builds no mask for a registered custom kernel, so `attention_mask` is None. The
    stages pad on the right only (collate), and under causal attention a real token never sees the
    padding after it, so right-padded rows [B, L] need no mask: their padded positions carry labels
    -100 and are never scored. Do not use this kernel for left-padded generation.

    `shared_prefix = (to_virtual, to_real)` (DPO, `stages/dpo.py`): the row holds each pair's common
    prefix once, but the documents `packed_lengths` describes are the full sequences. Queries, keys
    and values are gathered into that virtual layout (`to_virtual`: virtual -> row position), the
    documents attend as usual, and each row position takes its output from one virtual copy
    (`to_real`). The prefix's keys and values get the gradients of both copies (gather backward).

    query [B, H, T, D], key/value [B, H_kv, T, D] -> (output [B, T, H, D], None).
    """
    import torch.nn.functional as F

    if shared_prefix is not None:
        to_virtual, to_real = shared_prefix
        query, key, value = (t.index_select(2, to_virtual) for t in (query, key, value))
        out, _ = packed_sdpa_attention(module, query, key, value, None, dropout, scaling, packed_lengths=packed_lengths)
        return out.index_select(1, to_real), None
    length = query.shape[2]
    grouped = query.shape[1] != key.shape[1]
    on_gpu = query.device.type == "cuda"
    if grouped and not on_gpu:  # the CPU kernels want as many K/V heads as query heads
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    options = dict(dropout_p=dropout if module.training else 0.0, is_causal=True, scale=scaling, enable_gqa=grouped and on_gpu)
    lengths = None
    if query.shape[0] == 1 and length > 1:
        if packed_lengths is not None:
            lengths = [int(n) for n in packed_lengths]
        elif position_ids is not None:
            starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [length]
            lengths = [b - a for a, b in zip(starts, starts[1:]) if b > a] if starts[0] == 0 else None
    if lengths is not None and sum(lengths) != length:  # checked once, for the varlen and the loop paths
        raise ValueError(f"packed_lengths sum to {sum(lengths)} but the row has {length} tokens")
    if on_gpu and lengths is not None and len(lengths) > 1 and _varlen_attn is not None:
        # One varlen flash-attention call for all documents (PyTorch >= 2.10): [T, H, D] layout,
        # cu_seqlens = document boundaries, window (-1, 0) = causal.
        bounds = torch.tensor([0, *lengths], device=query.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        q, k, v = (rearrange(t[0], "h t d -> t h d").contiguous() for t in (query, key, value))
        out = _varlen_attn(q, k, v, bounds, bounds, max(lengths), max(lengths), scale=scaling, window_size=(-1, 0))
        return rearrange(out, "t h d -> 1 t h d"), None
    # On a GPU: the flash kernel. cuDNN's attention (preferred by PyTorch on Hopper) builds an
    # execution plan per new sequence length (measured: 0.18 s each on an H100), which costs more
    # than the attention itself when every document has a different length.
    with sdpa_kernel(_GPU_BACKENDS) if on_gpu else nullcontext():
        if lengths is not None and len(lengths) > 1:
            pieces = zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
            out = torch.cat([F.scaled_dot_product_attention(q, k, v, **options) for q, k, v in pieces], dim=2)
        else:
            out = F.scaled_dot_product_attention(query, key, value, **options)
    return out.transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> None:
    """Make "packed_sdpa" a valid `attn_implementation` for transformers models in this process."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)


def _forward_with_head(self, input_ids, *, head: Callable, position_ids=None, attention_mask=None, packed_lengths=None, shared_prefix=None):
    """Run the transformer backbone and hand the final hidden states to `head(hidden, lm_head_weight)`.

    The full [B, T, V] logits are never built: the head (a chunked loss from `trlm/training/losses.py`)
    projects only the target positions, a chunk at a time. `packed_lengths` (a padding-free row's
    document lengths) and `shared_prefix` (see `packed_sdpa_attention`) travel down to the attention
    kernel as keyword arguments. With `shared_prefix` the head gets the hidden states gathered back
    into the full sequences' layout, as if nothing had been shared.
    """
    extra = {"packed_lengths": packed_lengths} if packed_lengths is not None else {}
    if shared_prefix is not None:
        extra["shared_prefix"] = shared_prefix
    hidden = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **extra).last_hidden_state
    if shared_prefix is not None:
        hidden = hidden.index_select(1, shared_prefix[0])
    return head(hidden, self.lm_head.weight)


def install_head_forward(model) -> None:
    """Make `model(input_ids, head=..., ...)` return `head(final hidden states, lm_head weight)`.

    Why replace `forward` instead of calling `model.model(...)` from the loop: under DDP and FSDP the
    wrapped model's own forward must run (DDP's gradient-sync bookkeeping, FSDP's all-gather of the
    root parameters, which include the tied embedding = lm_head weight), and accelerate wraps this
    same `forward` with bf16 autocast. Call before `accelerator.prepare`. Only the in-memory object
    changes; the saved checkpoint is a standard HF model.
    """
    model.forward = MethodType(_forward_with_head, model)
