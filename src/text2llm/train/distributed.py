"""torchrun environment, DDP / FSDP2 wrapping, and rank-0 helpers.

The model is single-device code; parallelism is applied here, from outside (torchtitan style)::

    dist = init_distributed(train_cfg)            # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    fwd  = wrap_model(model, dist, compile=...)   # DDP, or FSDP2 fully_shard per block + root
    sd   = full_model_state(model, dist)          # full, plain state dict on rank 0 (FSDP2 gathers shards)

Backends: gloo on CPU, NCCL on CUDA. Under FSDP2 the parameters are DTensor shards; checkpoints
stay plain safetensors because rank 0 writes a gathered full state dict.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from text2llm.errors import UserError

# Set once this process has joined a torchrun process group. The CLI then ends the process with
# os._exit (see :func:`text2llm.cli.entry`): under FSDP2 the group outlives destroy_process_group
# (DTensor's functional collectives keep a reference to it, measured with torch 2.13), so its gloo
# worker threads are still running when the interpreter finalizes. A worker releasing its last
# collective then needs the GIL, the finalizing interpreter ends that thread with pthread_exit,
# and the C++ runtime aborts ("terminate called without an active exception", exit -6) after the
# run itself succeeded (6 of 30 runs of a tight repro; 1 of 78 runs of the FSDP test's command).
joined_process_group = False


@dataclass
class DistEnv:
    mode: str = "none"  # none | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps but MPS is not available")
    return torch.device(name)


def init_distributed(tc) -> DistEnv:
    """Join the process group torchrun describes (no-op for one process). ``tc`` is a TrainConfig."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    mode = tc.distributed
    if world <= 1:
        return DistEnv(mode="none", device=pick_device(tc.device))
    if mode == "none":
        raise UserError(f"train.distributed=none but torchrun started {world} processes (use ddp or fsdp)")
    mode = "ddp" if mode == "auto" else mode
    device = pick_device(tc.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    global joined_process_group
    joined_process_group = True
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    mesh = None
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
    return DistEnv(mode=mode, rank=rank, world_size=world, local_rank=local_rank, device=device, mesh=mesh)


def shutdown(env: DistEnv, barrier: bool = False) -> None:
    """Leave the process group. ``barrier`` (a run that ended normally, on every rank) waits for all
    ranks first, so no rank tears its group down while a peer still has a collective in flight. After
    an error on one rank it is skipped: the peers may be inside another collective."""
    if env.enabled and tdist.is_initialized():
        try:
            if barrier:
                tdist.barrier()
        finally:
            tdist.destroy_process_group()


def wrap_model(model: torch.nn.Module, env: DistEnv, compile: bool = False):
    """``(fwd, parallel)``: the callable training runs forward through, and the DDP / FSDP module
    that owns gradient sync (None for one process). ``model`` stays the unwrapped module (under
    FSDP2 it is sharded in place: its parameters become DTensors)."""
    if env.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=env.mesh)
        fully_shard(model, mesh=env.mesh)
        return (torch.compile(model) if compile else model), model
    if env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        wrapped = DDP(model, device_ids=ids)
        return (torch.compile(wrapped) if compile else wrapped), wrapped
    return (torch.compile(model) if compile else model), None


@contextmanager
def grad_sync(parallel, env: DistEnv, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step
    (``parallel`` is the second value of :func:`wrap_model`)."""
    if env.mode == "fsdp":
        parallel.set_requires_gradient_sync(sync)
        yield
        return
    if env.mode == "ddp" and not sync:
        with parallel.no_sync():
            yield
        return
    yield


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_gather_objects(obj, env: DistEnv) -> list:
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    tdist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        tdist.barrier()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def full_model_state(model: torch.nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The full, unsharded state dict of the unwrapped model on rank 0 (None elsewhere).
    Under FSDP2 every rank must call this (it gathers shards)."""
    if env.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if env.is_main else None
    return model.state_dict() if env.is_main else None


def full_optimizer_state(model: torch.nn.Module, optimizer, env: DistEnv) -> dict | None:
    """Optimizer state to save on rank 0. FSDP2: a full state dict keyed by parameter name
    (gathered from all ranks); otherwise the optimizer's own ``state_dict()``."""
    if env.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(model, optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if env.is_main else None
    return optimizer.state_dict() if env.is_main else None


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, env: DistEnv) -> None:
    if env.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. the grad norm under FSDP2), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
