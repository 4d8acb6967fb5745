"""torch.distributed helpers: set-up from torchrun / SLURM variables, differentiable all-gather.

Everything degrades to the single-process case when torch.distributed is not initialised.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "DistInfo", "all_gather_nograd", "all_gather_with_grad", "all_reduce_mean", "broadcast_", "cleanup",
    "dist_env", "get_rank", "get_world_size", "init_distributed", "is_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistInfo:
    """Rank, world size and local rank from RANK/WORLD_SIZE/LOCAL_RANK (torchrun) or
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; single process when neither is set."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        local = int(env.get("SLURM_LOCALID", "0"))
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), local)
    return DistInfo()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group when the environment names more than one process.

    Backend: ``nccl`` when CUDA is available, else ``gloo`` (unless given). Under SLURM without
    torchrun, MASTER_ADDR and MASTER_PORT must be exported by the launch script (see docker/).
    Also selects ``cuda:LOCAL_RANK`` as the current CUDA device. Idempotent.
    """
    info = dist_env()
    if is_distributed():
        return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank)
    if info.world_size <= 1:
        return info
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError(f"distributed run (world size {info.world_size}) without MASTER_ADDR/MASTER_PORT; "
                           "launch with torchrun or export them in the SLURM script")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=timedelta(seconds=timeout_s))
    logger.info("process group: backend %s, rank %d of %d (local %d)", backend, info.rank, info.world_size,
                info.local_rank)
    return info


def cleanup() -> None:
    """Destroy the default process group if there is one."""
    if is_distributed():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward (concatenated along dim 0, rank order); backward: the all-reduced (summed)
    gradient's slice of this rank. With DDP's gradient averaging this makes every rank's update equal
    to the gradient of the loss on the global batch."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """(n, ...) on each rank → (world·n, ...) in rank order, differentiable; identity when not distributed.

    Every rank must pass the same n.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_nograd(x: Tensor) -> Tensor:
    """Non-differentiable all-gather (any dtype, bool included); identity when not distributed."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    src = x.to(torch.uint8) if x.dtype == torch.bool else x
    parts = [torch.empty_like(src) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, src.contiguous())
    out = torch.cat(parts, dim=0)
    return out.to(torch.bool) if x.dtype == torch.bool else out


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean over ranks (a new tensor); identity when not distributed."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def broadcast_(x: Tensor, src: int = 0) -> Tensor:
    """In-place broadcast from ``src``; no-op when not distributed."""
    if is_distributed():
        dist.broadcast(x, src=src)
    return x

