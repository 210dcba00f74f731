"""Multi-process data parallelism under `torchrun` (gloo on CPU, NCCL on GPU).

piflow averages gradients explicitly after every backward pass of an iteration has run (one coalesced all-reduce),
which gives the same update as DistributedDataParallel and works with any loss structure — several backward calls
per iteration (data-free π-ID), gradient accumulation, and frozen or tied parameters.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group started by torchrun (no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(wait_for_others: bool = True) -> None:
    """Leave the process group: after a barrier (all ranks together, so that no rank exits while others still talk
    to it), or at once after a failure (a barrier could wait forever for ranks that are still training)."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def from_environment() -> DistInfo:
    """Rank and world size for work split by rank without collectives: the process group's when one is
    initialised, else torchrun's RANK / WORLD_SIZE / LOCAL_RANK environment variables (one process without them)."""
    if dist.is_available() and dist.is_initialized():
        return current()
    from piflow.errors import ConfigError

    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError("the environment variables RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    return DistInfo(rank, world_size, local_rank)


@torch.no_grad()
def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank `src`'s parameters and buffers (FSDP-sharded DTensors are skipped: each rank
    holds its own shard of identical weights)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if not is_sharded(tensor):
            dist.broadcast(tensor.data, src)


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a parameter sharded by FSDP2)."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def _reduction_device() -> torch.device:
    """Where collectives on small host values run: the rank's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", current().local_rank)
    return torch.device("cpu")


@torch.no_grad()
def average_gradients(params: list[torch.Tensor]) -> None:
    """All-reduce the gradients of `params` (missing grads count as zero) and divide by the world size."""
    world_size = dist.get_world_size()
    grads = []
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def all_ranks_mean(value: float) -> float:
    """Mean of a Python float over ranks (for logging)."""
    if not current().enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_reduction_device())
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


def raise_if_main_failed(error: Optional[BaseException]) -> None:
    """Collective: rank 0 passes the error it hit (or None), every rank raises it (non-zero ranks as the same
    `UserError` class with the same message, or a RuntimeError), so that no rank waits for a rank that gave up."""
    if not current().enabled:
        return
    from piflow import errors

    payload = [None if error is None else (type(error).__name__, str(error))]
    dist.broadcast_object_list(payload, src=0)
    if payload[0] is None or current().is_main:
        return
    name, message = payload[0]
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.UserError)):
        cls = RuntimeError
    raise cls(f"rank 0 failed: {message}")
