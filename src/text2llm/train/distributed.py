"""torchrun environment, the device mesh, DDP / FSDP2 wrapping, and rank-0 helpers.

The model is single-device code; parallelism is applied here and in :mod:`text2llm.train.parallelize`
(tensor and pipeline parallel), from outside (torchtitan style)::

    dist = init_distributed(train_cfg)            # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    fwd  = wrap_model(model, dist, compile=...)   # DDP, or FSDP2 fully_shard per block + root

One device mesh holds every process, with named dims ``("pp", "dp", "tp")`` (tp innermost, so a
tensor-parallel group is neighbouring ranks, on one node): ``world = pp * dp * tp``, and
``train.distributed`` says how the ``dp`` dim runs (DDP or FSDP2).

Backends: gloo on CPU, NCCL on CUDA. Under FSDP2 the parameters are DTensor shards; each process
saves its own through ``torch.distributed.checkpoint`` (:mod:`text2llm.train.checkpoint`).
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
    mode: str = "none"  # how the data-parallel dim runs: none (dp == 1) | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object = None  # DeviceMesh ("pp", "dp", "tp") when world_size > 1
    tp: int = 1
    pp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def dp(self) -> int:
        """Data-parallel degree: the number of model replicas, each reading its own data."""
        return self.world_size // (self.tp * self.pp)

    @property
    def model_parallel(self) -> bool:
        return self.tp > 1 or self.pp > 1

    @property
    def reads_new_data(self) -> bool:
        """The one process of each model replica whose data (and loader state) is that replica's."""
        return self.tp_rank == 0 and self.pp_rank == 0

    @property
    def holds_loss(self) -> bool:
        """The one process of each model replica that reports its loss (last pipeline stage, tp rank 0)."""
        return self.tp_rank == 0 and self.pp_rank == self.pp - 1


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
    """Join the process group torchrun describes (no-op for one process) and build the device mesh.
    ``tc`` is a TrainConfig; ``tc.tp * tc.pp`` must divide the number of processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    tp, pp = tc.tp, tc.pp
    if world % (tp * pp):
        raise UserError(f"train.tp ({tp}) x train.pp ({pp}) = {tp * pp} does not divide the {world} processes "
                        f"(start a multiple of {tp * pp} with torchrun --nproc-per-node)")
    dp = world // (tp * pp)
    mode = tc.distributed
    if world <= 1:
        return DistEnv(mode="none", device=pick_device(tc.device))
    if mode == "none" and dp > 1:
        raise UserError(f"train.distributed=none but torchrun started {world} processes for {dp} data-parallel "
                        f"replicas (use ddp or fsdp, or raise train.tp / train.pp)")
    if mode == "auto":
        mode = "fsdp" if tp > 1 else "ddp"  # DDP does not take tensor-parallel (DTensor) parameters
    if dp == 1:
        mode = "none"
    if mode == "ddp" and tp > 1:
        raise UserError("train.distributed=ddp with train.tp > 1: DDP does not take tensor-parallel (DTensor) "
                        "parameters; use train.distributed=fsdp for the data-parallel dim")
    device = join_process_group(tc.device, local_rank)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    pp_rank, dp_rank, tp_rank = mesh.get_coordinate()
    return DistEnv(mode=mode, rank=rank, world_size=world, local_rank=local_rank, device=device, mesh=mesh,
                   tp=tp, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank)


def join_process_group(device_name: str, local_rank: int) -> torch.device:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); this process's device."""
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    global joined_process_group
    joined_process_group = True
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                 device_id=device if device.type == "cuda" else None)
    return device


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

        for block in model.blocks.children():  # (a ModuleList, or a pipeline stage's ModuleDict)
            fully_shard(block, mesh=env.mesh["dp"])
        fully_shard(model, mesh=env.mesh["dp"])
        return (torch.compile(model) if compile else model), model
    if env.mode == "ddp":
        wrapped = ddp(model, env)
        return (torch.compile(wrapped) if compile else wrapped), wrapped
    return (torch.compile(model) if compile else model), None


def ddp(module: torch.nn.Module, env: DistEnv):
    """``module`` under DDP over the data-parallel dim of the mesh."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(module, device_ids=ids, process_group=env.mesh["dp"].get_group())


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


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, by_name: bool) -> None:
    """Load an ``optimizer.pt`` state: keyed by parameter name (``by_name``: a numbered one renamed for
    a sharded layout, or one an earlier sharded run saved; loaded through ``set_optimizer_state_dict``,
    which shards it), or a plain numbered ``state_dict()``. Sharded checkpoints (``dcp/``) load
    through :func:`text2llm.train.checkpoint.load_sharded_checkpoint` instead."""
    if by_name:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. the grad norm under FSDP2), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
