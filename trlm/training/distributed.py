"""Training in several processes: DDP or FSDP2, the checks before any compute, one writer per output.

Modes (`train.distributed`; how many processes is the launcher's business, `train.num_processes`
says how many the recipe expects):

* one process: plain training, in-process (the flow's default on a CPU or one GPU).
* `ddp`: accelerate wraps the model in DistributedDataParallel (gloo on a CPU, NCCL on GPUs). Every
  process holds the whole model and optimizer state; gradients are all-reduced once per step (not
  after the step's earlier micro-batches: `gradient_sync`).
* `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`). Each decoder layer is one unit; the root unit
  holds the rest: the tied embedding = lm_head (one parameter, so sharded once and all-gathered
  once for both uses, inside the root's forward where the loss head reads it), the final norm.
  Parameters, gradients and AdamW states are DTensors sharded over the processes; a unit's
  parameters are gathered for its forward and backward, its gradients reduce-scattered (averaged,
  like DDP's, so the stages' loss normalisation is the same in both modes).

Why `fully_shard` here and not accelerate's FSDP2 plugin: accelerate enables FSDP only for GPU-like
process groups. On a CPU, `ACCELERATE_USE_FSDP` with gloo silently becomes plain MULTI_CPU data
parallelism (accelerate 1.15, `AcceleratorState`), so the plugin's path could never run in the
tests. The stage shards the model itself once accelerate has started the process group: one code
path on CPU (gloo) and GPU (NCCL), with the layout accelerate's TRANSFORMER_BASED_WRAP on
`LlamaDecoderLayer` gives. accelerate still starts the process group, places the device, runs DDP,
and saves the scheduler and RNG states. A launch through accelerate's FSDP config (fsdp.yaml sets
`ACCELERATE_USE_FSDP`) is accepted when the recipe says `fsdp`, and then accelerate's plugin stays
off; the options of that config this module does not implement (CPU offload, accelerate's
activation checkpointing, FSDP1) are refused.

Checkpoints under FSDP (`save_sharded` / `load_sharded`): torch.distributed.checkpoint (DCP) of the
model and optimizer state, each process writing its own shards and rank 0 the metadata, inside the
same atomic `step-N/` directory as accelerate's scheduler and RNG files. A resume needs the same
world size (checked with the trainer state). The final model is gathered whole (`full_state_dict`)
and written by rank 0 as a standard HF safetensors checkpoint.

What makes a launch fail before any compute (`LaunchError`, one message): a launcher that started
N processes which did not join one process group (each would train alone and write the same output
directory); a world size other than an explicit `train.num_processes` (the global batch would not
be the recipe's); FSDP with one process; fewer rows than one global micro-batch; accelerate's FSDP
launch for a `ddp` recipe or with options the stage does not implement.

One writer per output directory (`one_writer`): the process that writes `model/`, `metrics.json`
and `fingerprint.json` (rank 0) holds an flock on the directory for the whole stage call, so a
second run on the same `out_dir` (another launch, a flow run) stops with `OutputBusy` before any
compute. The OS drops the lock when the holder dies, even on SIGKILL. On a file system without
flock the stage still runs (multi-node output directories live on such shared file systems), with
a warning that nothing guards the directory.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class LaunchError(ValueError):
    """The processes were launched in a way that cannot train correctly; raised before any compute."""


class OutputBusy(RuntimeError):
    """Another process is writing the same output directory."""


# --- before the Accelerator ----------------------------------------------------------------------

# Settings of accelerate's FSDP config that the stage's own sharding does not implement.
_FSDP_ENV_REFUSED = {
    "FSDP_OFFLOAD_PARAMS": ("true", "CPU offload"),
    "FSDP_ACTIVATION_CHECKPOINTING": ("true", "accelerate's activation checkpointing (use train.gradient_checkpointing)"),
    "FSDP_VERSION": ("1", "FSDP1 (the stages use FSDP2)"),
}


def accelerator_options(distributed: str) -> dict:
    """Keyword arguments for `Accelerator(...)`, and accelerate's FSDP launch settings checked.

    `cpu=True` without a GPU: accelerate then joins the launcher's processes into one gloo group.
    Without it, processes started by torchrun or `accelerate launch` on a CPU each stay alone
    (accelerate's DistributedType.NO with WORLD_SIZE=2): independent runs into one directory."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if distributed != "fsdp":
            raise LaunchError("launched with accelerate's FSDP config (ACCELERATE_USE_FSDP) but train.distributed is "
                              f"{distributed!r}: set train.distributed: fsdp, or launch with multi_gpu.yaml for DDP")
        for key, (value, what) in _FSDP_ENV_REFUSED.items():
            if os.environ.get(key, "").lower() == value:
                raise LaunchError(f"the accelerate FSDP config asks for {what} ({key}={value}); the stage's FSDP2 "
                                  "sharding does not do that: remove it from the config")
        os.environ["ACCELERATE_USE_FSDP"] = "false"  # the stage shards the model itself (see above)
    return {"cpu": not torch.cuda.is_available()}


# --- after it: the launch checked before any compute ---------------------------------------------


def check_launch(train, accelerator, n_rows: int) -> None:
    """Refuse a launch that cannot train as the recipe says (see the module docstring)."""
    world = accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        raise LaunchError(
            f"the launcher started {launched} processes (WORLD_SIZE) but this one is in a process group of {world}: each "
            "would train alone and write the same output directory. Launch with torchrun or accelerate launch on "
            "one machine, or give every node the same --nnodes/--rdzv-endpoint"
        )
    if train.num_processes != "auto" and train.num_processes != world:
        raise LaunchError(
            f"train.num_processes is {train.num_processes} but {world} process(es) were launched: the global batch "
            f"(batch_size x grad_accum_steps x processes) would not be the recipe's; launch {train.num_processes} or change it"
        )
    if train.distributed == "fsdp" and world < 2:
        raise LaunchError("train.distributed is fsdp, which shards the model over processes, but only 1 process was "
                          "launched: launch several (torchrun --nproc-per-node N) or use ddp")
    if n_rows < train.batch_size * world:
        raise LaunchError(f"{n_rows} rows do not fill one global micro-batch of batch_size {train.batch_size} x "
                          f"{world} processes: lower batch_size or launch fewer processes")


# --- FSDP2 ---------------------------------------------------------------------------------------


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model, accelerator):
    """FSDP2 over all processes: each decoder layer (the model's `_no_split_modules`) one unit, then
    the root unit (embedding = lm_head, final norm). Call after `install_head_forward` and before
    building the optimizer (its parameters become DTensors). bf16-mixed: the forward runs under
    autocast, as accelerate does for DDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise LaunchError(f"{type(model).__name__} declares no decoder layer class (_no_split_modules) to shard by")
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    # fsdp.yaml's fsdp_reshard_after_forward (default true: free each layer's gathered weights after its forward)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    model.to(accelerator.device)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    if accelerator.mixed_precision == "bf16":
        forward = model.forward

        def autocast_forward(*args, **kwargs):
            with accelerator.autocast():
                return forward(*args, **kwargs)

        model.forward = autocast_forward
    return model


@contextmanager
def gradient_sync(accelerator, model, last: bool):
    """Reduce gradients only on the step's last micro-batch: DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync(False)` (it keeps the unsharded gradients until then)."""
    if last:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def save_sharded(model, optimizer, directory: Path) -> None:
    """DCP: every process writes its shards of the model and optimizer state (all must call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded(model, optimizer, directory: Path) -> None:
    """Read back what `save_sharded` wrote into the (already sharded) model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model) -> dict:
    """The whole model's state on rank 0, on the CPU (empty elsewhere); all processes must call.

    A tied parameter (embedding = lm_head) comes back as two separate copies, which `save_pretrained`
    would then both write: only its first name is kept, as in a one-process export."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for tied in names.values():
        for name in tied[1:]:
            state.pop(name, None)
    return state


# --- one writer ----------------------------------------------------------------------------------


@contextmanager
def exclusive_output(out_dir: Path):
    """The writer (rank 0 by the launcher's RANK, or a lone process) holds an flock on `out_dir`."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(f"{out_dir} is being written by another process (it holds the directory's lock): two runs "
                             "must not write one output directory. Wait for it, or use another out_dir") from None
        except OSError as exc:  # a file system without flock (some NFS mounts, FUSE buckets): cannot guard
            log.warning("cannot lock %s (flock: %s): this file system does not support flock, so nothing stops a second "
                        "run from writing the same output directory at the same time. Make sure only one run uses it "
                        "(the flow's stage lock covers runs of one work dir only)", out_dir, exc.strerror or exc)
        yield
    finally:
        os.close(fd)


def one_writer(train_stage):
    """Decorator of a stage's train function: the whole call runs under `exclusive_output(out_dir)`."""

    @functools.wraps(train_stage)
    def wrapper(cfg, *, out_dir, **kwargs):
        with exclusive_output(Path(out_dir)):
            return train_stage(cfg, out_dir=out_dir, **kwargs)

    return wrapper
