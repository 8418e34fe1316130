"""Training across processes with torch.distributed: DDP or FSDP2 (`fully_shard`), launched by torchrun.

    torchrun --nproc_per_node 2 -m qwen2.cli train sft --config sft.toml distributed=ddp

The backend is NCCL when the run is on GPUs (each process takes cuda:LOCAL_RANK), gloo on CPU.
Every rank reads its own slice of each global micro-batch (`batch_size` rows per rank), so a step
sees batch_size x world x grad_accum examples: the same rows, and the same loss curve, as one
process with batch_size x world. The loss is normalised by the step's count summed over all ranks
and multiplied by the world size, undoing the gradient averaging of DDP's all-reduce and FSDP2's
reduce-scatter, so the gradient is exactly that of the one large batch.

Rank 0 alone logs, prints and writes checkpoints and the final model; the others compute.
Checkpoints stay single-file safetensors: under FSDP2 every sharded tensor is gathered in full
(`DTensor.full_tensor`, a collective all ranks join) and rank 0 writes it; on resume every rank
reads the full tensors and keeps its own shard. `output_dir` must be visible to every rank (a
shared filesystem across machines) for resume.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import Qwen2Error

MODES = ("none", "ddp", "fsdp2")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mode: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"


_world = World()


def world() -> World:
    """The process's place in the run (rank 0 of 1 outside torchrun)."""
    return _world


def launched_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(mode: str, device_name: str) -> World:
    """Join the process group torchrun set up the environment for (a no-op for mode "none")."""
    global _world
    if mode == "none":
        if launched_size() > 1:
            raise Qwen2Error(f"launched as {launched_size()} processes but distributed is \"none\"; "
                             "set distributed=ddp or distributed=fsdp2")
        _world = World()
        return _world
    if "RANK" not in os.environ:
        raise Qwen2Error(f"distributed={mode} needs torchrun's environment; launch with "
                         f"torchrun --nproc_per_node N -m qwen2.cli train ...")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")
    _world = World(dist.get_rank(), dist.get_world_size(), local_rank, mode)
    return _world


def teardown() -> None:
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def device_for(w: World, device: torch.device) -> torch.device:
    """Each rank on its own GPU."""
    return torch.device("cuda", w.local_rank) if w.active and device.type == "cuda" else device


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (the identity in a single process)."""
    if not _world.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if _world.active:
        dist.barrier()


# ---- wrapping the model ---------------------------------------------------------------------------

def wrap(model: torch.nn.Module, device: torch.device):
    """What the objectives call for the training forward: the model itself in one process, else the
    model behind a `TrainingForward` module that DDP wraps or that FSDP2 shards block by block
    (each decoder block a unit of its own, the embeddings, final norm and lm_head in the root)."""
    from torch.nn.parallel import DistributedDataParallel

    from .forward import TrainingForward

    if _world.mode == "none":
        return model
    if _world.mode == "ddp":
        return DistributedDataParallel(TrainingForward(model),
                                       device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    return fully_shard(TrainingForward(model))


def gradient_sync(wrapped, sync: bool):
    """Skip the gradient all-reduce (reduce-scatter) on all but the last micro-batch of a step."""
    if _world.mode == "ddp" and not sync:
        return wrapped.no_sync()
    if _world.mode == "fsdp2":
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with every element: gathered from the ranks when `t` is an FSDP2 shard."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` is: this rank's shard when `like` is an FSDP2 DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full.to(like.device)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer in full, on every rank (a collective under FSDP2)."""
    return {name: full_tensor(t.detach()) for name, t in model.state_dict().items()}
