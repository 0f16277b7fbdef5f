"""The model a training stage starts from, and what is done to it before training.

* `make_accelerator`: one `Accelerator` per stage call, and the precision (fp32, bf16-mixed, bf16-pure).
* `load_model` (with the per-document attention kernel of `trlm/training/attention.py`), `load_tokenizer`.
* vocabulary: `resize_for_tokenizer` (new rows = the mean of their text pieces' rows),
  `set_end_of_turn` (eos = pad = `<|im_end|>`).
* `disable_dropout` (DPO), `enable_gradient_checkpointing`, `compile_blocks` (torch.compile of the
  norms and MLPs).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from trlm.training.attention import PACKED_SDPA, register_packed_sdpa

END_OF_TURN = "<|im_end|>"
log = logging.getLogger(__name__)


def make_accelerator(precision: str, distributed: str = "ddp"):
    """One `Accelerator` per stage call; returns (accelerator, weight dtype, resolved precision).

    Under a launcher it joins the launched processes into one group (gloo on a CPU; see
    `distributed.accelerator_options`); `distributed` is checked against accelerate's FSDP launch.

    precision:
      auto        bf16 autocast on GPU (fp32 master weights), fp32 on CPU
      bf16-mixed-if-native
                  bf16-mixed where the hardware computes bf16 natively (a GPU with bf16, Ampere or
                  later; a CPU with AVX512-BF16 or AMX: 1.3x fp32's tokens/s on the smoke recipe's SFT
                  on 2 cores), fp32 elsewhere (emulated bf16 is slower than fp32). Logged; the
                  fingerprint records the result.
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

    from trlm.training.distributed import accelerator_options

    # AcceleratorState is a process-wide singleton that refuses a different mixed_precision: reset it
    # so that several stages (and tests) can run one after the other in one process. The distributed
    # part (PartialState) is kept, so this is also safe under `accelerate launch`.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16-mixed" if on_gpu else "fp32"
    elif precision == "bf16-mixed-if-native":
        native = torch.cuda.is_bf16_supported(including_emulation=False) if on_gpu else native_cpu_bf16()
        precision = "bf16-mixed" if native else "fp32"
        log.info("precision bf16-mixed-if-native: %s (%s %s native bf16)", precision, "this GPU" if on_gpu else "this CPU",
                 "computes" if native else "has no")
    mixed = {"fp32": "no", "bf16-mixed": "bf16", "bf16-pure": "no"}[precision]
    accelerator = Accelerator(mixed_precision=mixed, step_scheduler_with_optimizer=False, **accelerator_options(distributed))
    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    return accelerator, dtype, precision


def native_cpu_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles), as oneDNN's bf16 kernels need."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


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


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


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
