"""Plain helper functions shared by the SFT and DPO stages (`stages/sft.py`, `stages/dpo.py`).

Nothing here is a trainer: each stage file owns its loop and reads top to bottom. This module holds
the pieces both loops need, each a small function:

* accelerate + precision      `make_accelerator`, `load_model`, `load_tokenizer`
* data                        `load_ragged`, `plan_steps`, `micro_batch_rows`, `collate`, `unpack_rows`
* the loss forward            `install_head_forward` (backbone + a loss "head" on the hidden states)
* vocabulary                  `resize_for_tokenizer`, `set_end_of_turn`
* optimisation                `build_optimizer`, `build_scheduler` (`lr_factor`), `clip_gradients`,
                              `disable_dropout`, `enable_gradient_checkpointing`
* checkpoints and artifacts   `remove_incomplete`, `save_checkpoint`, `trainer_state`,
                              `latest_checkpoint`, `load_checkpoint`, `export_model`,
                              `finish_stage`, `finished_summary`
* logging                     `Stopwatch`, `reduce_sums`, `progress_bar`
* entry points                `stage_argument_parser`, `parse_stage_args`

Conventions: token lists are `labels`-aligned (`labels[t] = input_ids[t]` where trained, -100
elsewhere; position t predicts labels[t + 1]); a "micro-batch" is what one process runs in one
forward; an "optimizer step" is `grad_accum_steps` micro-batches on every process.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
from einops import rearrange
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from trlm.artifacts import atomic_directory, hash_file, hash_json, read_fingerprint, remove_stale_temporaries, write_fingerprint
from trlm.recipe import output_config

IGNORE_INDEX = -100
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "COMPLETE"  # written last inside a checkpoint, before the atomic rename
TRAINER_STATE = "trainer_state.json"
END_OF_TURN = "<|im_end|>"


# --- accelerate and precision -------------------------------------------------------------------


def make_accelerator(precision: str):
    """One `Accelerator` per stage call; returns (accelerator, weight dtype, resolved precision).

    precision:
      auto        bf16 autocast on GPU (fp32 master weights), fp32 on CPU
      fp32        everything in float32
      bf16-mixed  fp32 weights and optimizer, bf16 autocast for the forward
      bf16-pure   weights, gradients and AdamW states in bf16, no fp32 master copy: what the
                  published TRLM run did (`from_pretrained(dtype=bfloat16)` + `bf16=True`). Half the
                  memory of mixed precision; small updates can round away (lr x update < bf16 ulp).

    Gradient accumulation is done by the stage loops themselves (they need the token count of the
    whole step), so the Accelerator is built with `gradient_accumulation_steps=1`; and the scheduler
    is stepped exactly once per optimizer step (`step_scheduler_with_optimizer=False`; accelerate's
    default steps it once per process).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # AcceleratorState is a process-wide singleton that refuses a different mixed_precision: reset it
    # so that several stages (and tests) can run one after the other in one process. The distributed
    # part (PartialState) is kept, so this is also safe under `accelerate launch`.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16-mixed" if on_gpu else "fp32"
    mixed = {"fp32": "no", "bf16-mixed": "bf16", "bf16-pure": "no"}[precision]
    accelerator = Accelerator(mixed_precision=mixed, step_scheduler_with_optimizer=False)
    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    return accelerator, dtype, precision


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


def load_model(model_dir: Path, dtype: torch.dtype, attn_implementation: str = PACKED_SDPA):
    """An HF causal LM from a local checkpoint, with an attention kernel that keeps packed documents apart.

    packed_sdpa (default): one SDPA call per document, see `packed_sdpa_attention`. The kernels of
    transformers read the position resets too: sdpa/eager with a dense block-diagonal [T, T] mask
    (which computes every cross-document block and is 17 G entries for 32 x 4096 tokens),
    flex_attention with a block-sparse mask (compiled), flash_attention_2 with varlen kernels
    (needs the flash-attn package).
    """
    from transformers import AutoModelForCausalLM

    register_packed_sdpa()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)


def register_packed_sdpa() -> None:
    """Make "packed_sdpa" a valid `attn_implementation` for transformers models in this process."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ragged:
    """A list<int> parquet column as one flat array plus offsets (row i = values[offsets[i]:offsets[i+1]]).

    Memory-lean: 250M tokens are 1 GB of int32, not 250M Python ints.
    """

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def load_ragged(parquet: Path, columns: list[str]) -> dict[str, Ragged]:
    table = pq.read_table(parquet, columns=columns)
    out = {}
    for name in columns:
        col = table.column(name).combine_chunks()
        out[name] = Ragged(col.values.to_numpy(zero_copy_only=False).astype(np.int64), col.offsets.to_numpy().astype(np.int64))
    return out


def data_fingerprint(data_dir: Path) -> str:
    """The data artifact's fingerprint (falls back to the parquet's hash for hand-made directories)."""
    return read_fingerprint(data_dir) or hash_file(Path(data_dir) / "train.parquet")


@dataclass(frozen=True)
class StepPlan:
    micro_batches_per_epoch: int  # global micro-batches (batch_size x num_processes rows each)
    total_steps: int

    def position(self, step: int, grad_accum_steps: int) -> tuple[int, int]:
        """(epoch, micro-batch index within it) after `step` optimizer steps."""
        consumed = step * grad_accum_steps
        return consumed // self.micro_batches_per_epoch, consumed % self.micro_batches_per_epoch


def plan_steps(n_rows: int, train, num_processes: int) -> StepPlan:
    """How many optimizer steps: `max_steps`, else floor(epochs x micro-batches per epoch / accum).

    The data is one stream of micro-batches: epoch e is a seeded permutation of all rows, cut into
    micro-batches of `batch_size x num_processes` rows (an incomplete last one is dropped, like the
    published `dataloader_drop_last`); an optimizer step takes the next `grad_accum_steps` of them,
    crossing an epoch boundary when it has to. So fractional epochs and `max_steps` beyond one
    epoch both work.
    """
    per_epoch = n_rows // (train.batch_size * num_processes)
    if per_epoch == 0:
        raise ValueError(f"{n_rows} rows are fewer than one micro-batch ({train.batch_size} x {num_processes} processes)")
    total = train.max_steps or max(1, math.floor(train.epochs * per_epoch) // train.grad_accum_steps)
    return StepPlan(per_epoch, total)


def epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same order."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def micro_batch_rows(plan: StepPlan, n_rows: int, batch_size: int, seed: int, global_micro_batch: int, rank: int, num_processes: int) -> np.ndarray:
    """Row indices of this process's share of global micro-batch number `global_micro_batch`."""
    epoch, index = divmod(global_micro_batch, plan.micro_batches_per_epoch)
    order = epoch_permutation(n_rows, seed, epoch)
    start = (index * num_processes + rank) * batch_size
    return order[start : start + batch_size]


def collate(sequences: list[tuple[np.ndarray, np.ndarray]], *, padding_free: bool, pad_id: int) -> dict[str, Any]:
    """Sequences (input_ids, labels) -> one micro-batch.

    padding_free=True: all sequences are concatenated into ONE row [1, sum L]; `position_ids` restart
      at 0 for each document. No attention mask is passed: the attention kernel finds the
      documents from the position resets (`packed_sdpa_attention`; transformers' own kernels do the
      same via `masking_utils.find_packed_sequence_indices`), so no token attends across documents. The label at every document start is set to -100, so the last
      token of document k is never trained to predict the first token of document k+1. No compute
      is spent on padding.
    padding_free=False: right-padded [B, max L] rows with an attention mask; labels -100 on padding.

    Both forms have the same targets: `labels[t+1]` of each document for t in 0..L-2.
    Also returns `doc_lengths` (per-token document length, for NEFTune), `seq_lengths`, and
    `packed_lengths` (the documents of the packed row for the attention kernel; None when padded).
    """
    lengths = [len(ids) for ids, _ in sequences]
    if padding_free:
        input_ids = np.concatenate([ids for ids, _ in sequences])
        labels = np.concatenate([lab for _, lab in sequences]).copy()
        starts = np.cumsum([0] + lengths[:-1])
        labels[starts] = IGNORE_INDEX
        position_ids = np.concatenate([np.arange(n) for n in lengths])
        doc_lengths = np.concatenate([np.full(n, n) for n in lengths])
        return {
            "input_ids": torch.as_tensor(input_ids, dtype=torch.long)[None],
            "labels": torch.as_tensor(labels, dtype=torch.long)[None],
            "position_ids": torch.as_tensor(position_ids, dtype=torch.long)[None],
            "attention_mask": None,
            "doc_lengths": torch.as_tensor(doc_lengths, dtype=torch.long)[None],
            "seq_lengths": lengths,
            "packed_lengths": lengths,
        }
    width = max(lengths)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    labels = np.full((len(sequences), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, (ids, lab) in enumerate(sequences):
        input_ids[row, : len(ids)], labels[row, : len(ids)], mask[row, : len(ids)] = ids, lab, 1
    return {
        "input_ids": torch.as_tensor(input_ids),
        "labels": torch.as_tensor(labels),
        "position_ids": None,
        "attention_mask": torch.as_tensor(mask),
        "doc_lengths": torch.as_tensor(lengths, dtype=torch.long),  # one length per row
        "seq_lengths": lengths,
        "packed_lengths": None,
    }


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def unpack_rows(packed: torch.Tensor, seq_lengths: list[int], pad_value: float | int) -> torch.Tensor:
    """[1, sum L, ...] packed row -> [D, max L, ...] one row per document, padded with `pad_value`.

    Used by DPO to get one log-prob sum per sequence from a packed forward pass: the hidden states
    (cheap: width 576) are re-laid out, so the vocabulary projection still runs on target tokens only.
    Differentiable (a gather).
    """
    row = packed[0]
    width = max(seq_lengths)
    starts = torch.as_tensor(np.cumsum([0] + list(seq_lengths[:-1])), device=row.device)
    offsets = torch.arange(width, device=row.device)
    index = starts[:, None] + offsets[None, :]  # [D, width]
    valid = offsets[None, :] < torch.as_tensor(seq_lengths, device=row.device)[:, None]
    gathered = row[index.clamp(max=row.shape[0] - 1)]
    fill = torch.as_tensor(pad_value, dtype=row.dtype, device=row.device)
    valid = valid.reshape(*valid.shape, *([1] * (gathered.dim() - 2)))
    return torch.where(valid, gathered, fill)


# --- the loss forward ----------------------------------------------------------------------------


def _forward_with_head(self, input_ids, *, head: Callable, position_ids=None, attention_mask=None, packed_lengths=None, shared_prefix=None):
    """Run the transformer backbone and hand the final hidden states to `head(hidden, lm_head_weight)`.

    The full [B, T, V] logits are never built: the head (a chunked loss from `stages/losses.py`)
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


# --- vocabulary ----------------------------------------------------------------------------------


def resize_for_tokenizer(model, tokenizer) -> int:
    """Grow the (tied) embedding to the tokenizer's size; each new row = the mean of the rows of the
    pieces the old vocabulary splits the token's text into (`<think>` -> `<`, `think`, `>`).

    Why not one shared vocabulary mean for every new row (transformers' `mean_resizing` samples
    around it): `<think>` and `</think>` would start identical, so as inputs the model cannot tell
    them apart and as outputs they rise together. Measured on the real model after the smoke
    stage-2 run with mean rows: greedy answers opened with `</think>` instead of `<think>`. Piece
    means are distinct, start near what the model already associates with the tag's text, and keep
    the new logits at an ordinary level, so the initial loss is not disrupted.
    Returns the number of rows added (0 when the embedding is already large enough).
    """
    old = model.get_input_embeddings().weight.shape[0]
    new = len(tokenizer)
    if new <= old:
        return 0
    model.resize_token_embeddings(new, mean_resizing=False)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        output = model.get_output_embeddings()
        untied = output is not None and output.weight.data_ptr() != weight.data_ptr()
        for token_id in range(old, new):
            text = tokenizer.convert_ids_to_tokens(token_id)
            pieces = [i for i in tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if i < old]
            rows = torch.as_tensor(pieces) if pieces else torch.arange(old)
            weight[token_id] = weight[rows].float().mean(dim=0).to(weight.dtype)
            if untied:
                output.weight[token_id] = output.weight[rows].float().mean(dim=0).to(output.weight.dtype)
    return new - old


def set_end_of_turn(model, tokenizer) -> int:
    """eos = pad = `<|im_end|>` in the model config and generation config (the published "EOS fix")."""
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if eot is None or eot == tokenizer.unk_token_id:
        eot = tokenizer.eos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eot
        cfg.pad_token_id = eot
    return eot


# --- optimisation --------------------------------------------------------------------------------


def build_optimizer(model, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999, eps 1e-8: the transformers defaults the published run used).

    Weight decay only on matrices (linear weights, the embedding). Biases and RMSNorm gains get none:
    they set offsets and scales, not the "size" of the learned function, and decaying a norm gain
    towards 0 just shrinks the activations it normalises, fighting the normalisation (the standard
    transformers/GPT practice). In bf16-pure the AdamW states are bf16 like the weights.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused kernel on GPU (the published run's adamw_torch_fused); the default foreach one on CPU.
    fused = True if torch.cuda.is_available() else None
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def clip_gradients(accelerator, model, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm`; return the norm BEFORE clipping (what is logged)."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def lr_factor(step: int, *, kind: str, total_steps: int, warmup_steps: int, min_lr_rate: float = 0.0) -> float:
    """Multiplier of the peak learning rate for the optimizer step with 0-based index `step`.

    Linear warmup from 0 over `warmup_steps` (ceil(warmup_ratio x total)), then:
      constant            1
      linear              (total - step) / (total - warmup)  -> 0
      cosine              0.5 (1 + cos(pi progress))          -> 0
      cosine_with_min_lr  min_lr_rate + (1 - min_lr_rate) 0.5 (1 + cos(pi progress))
    The same formulas as transformers' schedulers (so the very first step of a warmed-up run uses
    lr 0, as in the published run). `constant` here also honours the warmup.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "cosine":
        return cosine
    if kind == "cosine_with_min_lr":
        return min_lr_rate + (1.0 - min_lr_rate) * cosine
    raise ValueError(f"unknown lr_scheduler {kind!r}")


def build_scheduler(optimizer, train, total_steps: int):
    warmup = math.ceil(train.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, kind=train.lr_scheduler, total_steps=total_steps, warmup_steps=warmup, min_lr_rate=train.min_lr_rate),
    )


def disable_dropout(model) -> None:
    """DPO: dropout off, so the policy at step 0 computes exactly the reference's log-probs."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward: ~30% slower, activation memory O(layers) smaller."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def compile_blocks(model) -> None:
    """torch.compile the norms and the SwiGLU MLP of every decoder layer (and the final norm).

    At width 576 the step time on a GPU is dominated by memory-bound elementwise kernels (RMSNorm,
    SiLU x up, residual adds) over [tokens, 576|1536] tensors, not by the matmuls; compiling fuses
    them. Only tensor-in/tensor-out modules are compiled, with dynamic sequence length, so packed
    rows of any length reuse one graph and the per-document attention stays eager.
    """
    for layer in model.model.layers:
        for block in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            block.compile(dynamic=True)
    model.model.norm.compile(dynamic=True)


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A directory without the completion marker is not one."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def remove_incomplete(out_dir: Path) -> None:
    """Remove what a killed process can leave behind: `.tmp-*`/`.old-*` (a half-written checkpoint,
    model export or reference file) and step directories without their completion marker."""
    root = Path(out_dir) / CHECKPOINTS
    remove_stale_temporaries(out_dir)
    remove_stale_temporaries(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and not (p / COMPLETE_MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator, out_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Atomically write `out_dir/checkpoints/step-<6-digit step>/` and keep only the newest `keep`.

    Contents: accelerate's `save_state` (model.safetensors, optimizer.bin, scheduler.bin and the RNG
    states of every process: python, numpy, torch, cuda) plus `trainer_state.json` (step, epoch,
    micro-batch index, metrics history) and, last, the `COMPLETE` marker. Everything is written to a
    `.tmp-*` sibling, fsynced and renamed (`trlm.artifacts.atomic_directory`), so a killed process
    never leaves a directory that looks complete. All processes must call this (each saves its own
    RNG state, FSDP its shards); the main process owns the temporary directory.
    """
    from accelerate.utils import broadcast_object_list

    final = Path(out_dir) / CHECKPOINTS / checkpoint_name(step)
    with atomic_directory(final) if accelerator.is_main_process else nullcontext(None) as tmp:
        tmp = Path(broadcast_object_list([str(tmp) if tmp else None])[0])
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
            (tmp / COMPLETE_MARKER).write_text(f"step {step}\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def trainer_state(cfg, plan: StepPlan, step: int, *, data_fp: str, runtime_s: float, total_tokens: float, history: list) -> dict[str, Any]:
    """What a checkpoint records besides accelerate's state: the data position and the history."""
    epoch, index = plan.position(step, cfg.train.grad_accum_steps)
    return {
        "step": step,
        "epoch": epoch,
        "micro_batch_in_epoch": index,
        "total_steps": plan.total_steps,
        "config_hash": config_hash(cfg),
        "data_fingerprint": data_fp,
        "runtime_s": runtime_s,
        "total_tokens": total_tokens,
        "history": history,
    }


def load_checkpoint(accelerator, checkpoint: Path, cfg, *, data_fp: str) -> dict[str, Any]:
    """Check that `checkpoint` belongs to this run (same stage config and data), restore model,
    optimizer, scheduler and RNG states, and return its trainer state (step, data position, history)."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    if state.get("config_hash") != config_hash(cfg) or state.get("data_fingerprint") != data_fp:
        raise ValueError(
            f"{checkpoint} was written by a run with a different stage config or data; "
            "resume needs the same settings (use a fresh out_dir, or delete its checkpoints/)"
        )
    accelerator.load_state(str(checkpoint))
    return state


def config_hash(cfg) -> str:
    return hash_json(output_config(cfg))


# --- final artifact ------------------------------------------------------------------------------


def export_model(accelerator, model, tokenizer, out_dir: Path) -> Path:
    """`out_dir/model/`: a standard HF checkpoint (safetensors, config, generation config with
    eos = <|im_end|>) plus the training tokenizer (added special tokens, chat template). Atomic."""
    final = Path(out_dir) / "model"
    state_dict = accelerator.get_state_dict(model)  # full state dict (gathered under FSDP); all ranks
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True  # turned off for gradient checkpointing; generation wants it
        with atomic_directory(final) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    return final


def finish_stage(out_dir: Path, summary: dict[str, Any], history: list[dict[str, Any]], meta: dict[str, Any], *, keep_checkpoints: bool) -> None:
    """Write `metrics.json` (summary + full history), then `fingerprint.json` LAST (main process).

    Then, unless `keep_checkpoints`, delete `checkpoints/`: a finished stage never resumes, and its
    optimizer state is about twice the model (GBs per stage even for the smoke run). The
    fingerprint never covers checkpoints, so a kill during the deletion leaves a finished stage.
    """
    out_dir = Path(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    write_fingerprint(out_dir, meta=meta)
    if not keep_checkpoints:
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)


def finished_summary(out_dir: Path) -> dict[str, Any] | None:
    """The saved summary of a finished stage (fingerprint.json present), else None."""
    if read_fingerprint(out_dir) is None:
        return None
    path = Path(out_dir) / "metrics.json"
    return json.loads(path.read_text())["summary"] if path.is_file() else {}


# --- logging -------------------------------------------------------------------------------------


class Stopwatch:
    """Seconds since `reset()`, minus the time spent inside `with watch.excluded():` (checkpoint writes)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return max(1e-9, time.perf_counter() - self.start - self.paused)

    @contextmanager
    def excluded(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t


def reduce_sums(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Sum scalar accumulators over processes (one all-reduce)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return dict(zip(keys, t.tolist()))


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


# --- entry points --------------------------------------------------------------------------------


def stage_argument_parser(description: str, default_stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="JSON or YAML file holding the stage config")
    source.add_argument("--recipe", help="recipe name or path; the stage config is taken from it")
    parser.add_argument("--stage", default=default_stage, help=f"stage of the recipe (default {default_stage})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, e.g. sft_think.train.max_steps=20")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    return parser


def parse_stage_args(argv: list[str] | None, description: str, default_stage: str, config_cls):
    """Parse a stage CLI's arguments and load its config; every input problem exits with code 2 and
    one message (missing file or directory, invalid config, wrong stage) before any compute."""
    from pydantic import ValidationError

    from trlm.recipe import RecipeError, format_validation_error, load_recipe

    parser = stage_argument_parser(description, default_stage)
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir}: no config.json there (want a Hugging Face checkpoint directory)")
    if not (args.data_dir / "train.parquet").is_file():
        parser.error(f"--data-dir {args.data_dir}: no train.parquet there (want a directory written by data-prep)")
    if args.config is not None:
        import yaml

        if not args.config.is_file():
            parser.error(f"--config {args.config}: no such file")
        try:
            return args, config_cls.model_validate(yaml.safe_load(args.config.read_text()))
        except (ValidationError, yaml.YAMLError) as exc:
            detail = format_validation_error(str(args.config), exc) if isinstance(exc, ValidationError) else str(exc)
            parser.error(detail)
    try:
        recipe = load_recipe(args.recipe, overrides=args.set, check_files=False)
        cfg = recipe.stage_config(args.stage)
    except (RecipeError, ValueError) as exc:
        parser.error(str(exc))
    if not isinstance(cfg, config_cls):
        parser.error(f"stage {args.stage!r} has a {type(cfg).__name__}, this entry point needs {config_cls.__name__}")
    return args, cfg


def env_summary(accelerator, precision: str) -> dict[str, Any]:
    """Where and how a stage ran (recorded in the fingerprint's meta, not hashed)."""
    return {
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "precision": precision,
        "torch": torch.__version__,
    }
