"""The `train:` section both trainers read (SFT and DPO): batch, schedule, precision, attention, processes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from trlm.recipe import Bool, Int, NoBool, NonNegativeFloat, PositiveFloat, PositiveInt, Strict


class TrainConfig(Strict):
    epochs: PositiveFloat = 1.0
    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: PositiveInt = Field(description="sequences (or pairs) per micro-batch per device")
    grad_accum_steps: PositiveInt = 1
    learning_rate: PositiveFloat
    lr_scheduler: Literal["constant", "linear", "cosine", "cosine_with_min_lr"] = "cosine"
    min_lr_rate: Annotated[float, NoBool, Field(ge=0, le=1)] = 0.0
    warmup_ratio: Annotated[float, NoBool, Field(ge=0, lt=1)] = 0.0
    weight_decay: NonNegativeFloat = 0.0
    max_grad_norm: PositiveFloat = 1.0
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-pure", "bf16-mixed-if-native"] = Field(
        "auto", description="auto = bf16-mixed on GPU, fp32 on CPU; bf16-mixed-if-native = bf16-mixed on a GPU or a CPU "
        "with AVX512-BF16/AMX, fp32 elsewhere; bf16-pure is what the published run did"
    )
    gradient_checkpointing: Bool = False
    seed: Int = 42
    logging_steps: PositiveInt = 1
    save_steps: PositiveInt = 500
    save_total_limit: PositiveInt = 2
    keep_checkpoints: Bool = Field(
        False,
        description="keep checkpoints/ (weights + optimizer state, about 3x the model) once the final model is written; "
        "off: deleted then, since a finished stage never resumes. Not part of the stage's cache key.",
    )
    padding_free: Bool = Field(
        True, description="concatenate a micro-batch's sequences into one row (no padding, no cross-document attention); same loss as padded batches"
    )
    attn_implementation: Literal["packed_sdpa", "sdpa", "flex_attention", "flash_attention_2", "eager"] = Field(
        "packed_sdpa",
        description="attention kernel: packed_sdpa = one SDPA call per packed document (no cross-document FLOPs, no mask); "
        "the others are transformers' (sdpa/eager build a dense [T, T] mask over a packed row)",
    )

    compile: Bool = Field(
        False, description="torch.compile each decoder layer's norms and MLP (GPU: fuses the memory-bound elementwise work; compiling costs a minute)"
    )
    # Several processes: README "Several GPUs and several machines", trlm/training/distributed.py.
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="ddp (each process holds the model) or fsdp (FSDP2: sharded; 2+ processes)")
    num_processes: Literal["auto"] | PositiveInt = Field(
        "auto", description="the world size (global batch = batch_size x grad_accum_steps x num_processes); auto = this machine's GPUs, 1 without one"
    )
    launcher: Literal["torchrun", "accelerate"] = Field("torchrun", description="how the flow starts several processes; not in the key")

    def world_size(self) -> int:
        """num_processes with `auto` resolved: the visible GPUs, 1 without one."""
        if self.num_processes != "auto":
            return self.num_processes
        import torch

        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1

    @model_validator(mode="after")
    def _min_lr_only_with_its_schedule(self) -> "TrainConfig":
        if self.min_lr_rate and self.lr_scheduler != "cosine_with_min_lr":
            raise ValueError("min_lr_rate is only used by lr_scheduler 'cosine_with_min_lr'")
        if self.distributed == "fsdp" and self.num_processes == 1:
            raise ValueError("distributed 'fsdp' shards the model over processes: it needs num_processes >= 2 (or 'auto'); use 'ddp' for one")
        return self
