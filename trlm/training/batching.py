"""The training data as micro-batches: loading, the step plan, the row order, collation.

* `load_ragged`: list<int> parquet columns as flat arrays + offsets (`Ragged`); `data_fingerprint`.
* `plan_steps` / `StepPlan`: how many optimizer steps, and where in the data stream a step starts.
* `micro_batch_rows`: one process's rows of a global micro-batch (seeded per-epoch permutation, so
  a resumed run sees the same order).
* `collate`: sequences -> one padding-free packed row or a right-padded batch; `to_device`;
  `unpack_rows` (a packed row -> one row per document, for DPO's per-sequence sums).

Conventions: token lists are `labels`-aligned (`labels[t] = input_ids[t]` where trained, -100
elsewhere; position t predicts labels[t + 1]); a "micro-batch" is what one process runs in one
forward; an "optimizer step" is `grad_accum_steps` micro-batches on every process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from trlm.artifacts import hash_file, read_fingerprint
from trlm.training.losses import IGNORE_INDEX


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


def shared_prefix_layout(seq_lengths: list[int], shares: list[tuple[int, int] | None]) -> dict[str, torch.Tensor]:
    """A packed row that holds repeated prefixes once, and the maps to and from the full layout.

    `shares[j] = (i, k)`: sequence j starts with the same k tokens as the earlier sequence i (GRPO:
    the G samples of one prompt share the prompt); None: nothing shared. The full ("virtual")
    layout is collate's padding-free row; `to_real` lists the row positions' virtual positions,
    `to_virtual` maps every virtual position to the row position that computes it. Index the
    collated `input_ids`/`position_ids` with `to_real`, pass `(to_virtual, to_real)` as
    `shared_prefix` (`attention.packed_sdpa_attention`). Exact: under causal attention a prefix's
    hidden states do not depend on what follows it.
    """
    starts = np.cumsum([0, *seq_lengths[:-1]])
    to_virtual = np.empty(sum(seq_lengths), dtype=np.int64)
    to_real, row = [], 0
    for j, (start, n) in enumerate(zip(starts, seq_lengths)):
        source, k = shares[j] or (j, 0)
        if k:
            if source >= j or k > min(n, seq_lengths[source]):
                raise ValueError(f"sequence {j} cannot share {k} tokens with sequence {source}")
            to_virtual[start : start + k] = to_virtual[starts[source] : starts[source] + k]
        to_virtual[start + k : start + n] = row + np.arange(n - k)
        to_real.append(start + k + np.arange(n - k))
        row += n - k
    return {"to_virtual": torch.as_tensor(to_virtual), "to_real": torch.as_tensor(np.concatenate(to_real))}
