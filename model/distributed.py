"""torch.distributed helpers: set-up from torchrun / SLURM variables, differentiable all-gather, and
what a rank does when another one dies.

Everything degrades to the single-process case when torch.distributed is not initialised.

A dead or unreachable rank
    :func:`init_distributed` passes ``timeout_s`` (``TrainConfig.dist_timeout_s``, default 300 s) to
    ``init_process_group``: it bounds the rendezvous and every collective. gloo (CPU) raises in the
    calling thread when a peer's connection closes (at once) or when a collective waits longer than
    the timeout. For NCCL, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` is set unless the user set it: the
    watchdog aborts the communicators and tears the process down once a collective has waited
    ``timeout_s`` (``TORCH_NCCL_BLOCKING_WAIT`` is not needed with async error handling). A
    communication error that reaches Python is turned into :class:`RankFailure` by
    :func:`collective_guard`: one line, ``training rank N stopped or became unreachable during step S
    (cause); this rank stops too``, instead of a hang or a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TIMEOUT_S", "DistInfo", "RankFailure", "all_gather_nograd", "all_gather_with_grad", "all_reduce_max",
    "all_reduce_mean", "broadcast_", "cleanup", "collective_guard", "dist_env", "get_rank", "get_world_size",
    "init_distributed", "is_comm_error", "is_distributed",
]

#: seconds a collective (or the rendezvous) may wait for the other ranks before it fails
DEFAULT_TIMEOUT_S = 300.0


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


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Initialise the default process group when the environment names more than one process.

    Backend: ``nccl`` when CUDA is available, else ``gloo`` (unless given). Under SLURM without
    torchrun, MASTER_ADDR and MASTER_PORT must be exported by the launch script (see docker/).
    Also selects ``cuda:LOCAL_RANK`` as the current CUDA device. Idempotent.

    ``timeout_s``: seconds the rendezvous and each collective may wait for the other ranks (both
    backends; for NCCL through the watchdog, with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` unless set).
    Ranks that do not all join within it raise :class:`RankFailure`.
    """
    info = dist_env()
    if is_distributed():
        return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank)
    if info.world_size <= 1:
        return info
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError(f"distributed run (world size {info.world_size}) without MASTER_ADDR/MASTER_PORT; "
                           "launch with torchrun or export them in the SLURM script")
    if not timeout_s > 0:
        raise ValueError(f"distributed timeout must be > 0 seconds, got {timeout_s}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        # abort the communicators and end the process when a collective times out (read when the
        # process group is made); the user's own setting wins
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(info.local_rank)
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=info.rank,
                                world_size=info.world_size, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:
        if not is_comm_error(exc):
            raise
        raise RankFailure(f"training rank {info.rank} of {info.world_size}: the ranks did not all join within "
                          f"{timeout_s:g} s at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                          f"({short_cause(exc)}); this rank stops too") from None
    logger.info("process group: backend %s, rank %d of %d (local %d), timeout %g s", backend, info.rank,
                info.world_size, info.local_rank, timeout_s)
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


def all_reduce_max(x: Tensor) -> Tensor:
    """Maximum over ranks (a new tensor); identity when not distributed."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


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



# --------------------------------------------------------------------------------------------------
# A rank that died or cannot be reached


class RankFailure(TimeoutError):
    """Another rank stopped or became unreachable; this rank stops too (a one-line message).

    A :class:`TimeoutError` so that command lines that print one line for timeouts do so here too.
    """


_COMM_MARKERS = re.compile(r"gloo|nccl|processgroup|c10d|connection (reset|closed|refused)|closed by peer|"
                           r"broken pipe|pair closure|timed out waiting|application timeout", re.IGNORECASE)
_COMM_FILES = ("torch/distributed/", "torch/nn/parallel/distributed.py", "model/distributed.py")


def is_comm_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from torch.distributed's communication (a peer gone, a timeout): a
    ``torch.distributed.DistError`` (backend, network, store errors), or a RuntimeError raised inside
    a collective (torch.distributed, DDP's own broadcasts, this module) or worded like gloo's and
    NCCL's errors (gloo raises plain RuntimeErrors: ``Connection reset by peer``, ``Application
    timeout caused pair closure``; DDP's reducer raises them from ``backward()``)."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    if _COMM_MARKERS.search(str(exc)):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_next is None:  # the innermost Python frame: where the C++ call raised
            name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
            return any(part in name for part in _COMM_FILES)
        tb = tb.tb_next
    return False


def short_cause(exc: BaseException, limit: int = 160) -> str:
    """The gist of a communication error on one line: no source path prefix, no advice, no newlines."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", text)  # [/path/pair.cc:537]
    text = re.split(r"\. (This is typically|Check the logs|Exception raised from)", text)[0]
    text = text.strip().rstrip(".") or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unreachable_ranks(store: Any, rank: int, world: int, *, grace_s: float = 3.0,
                      key: str = "mcn/comm-failure") -> list[int] | None:
    """After a failed collective: the ranks that did not report the failure within ``grace_s``.

    Each surviving rank writes ``<key>/<rank>`` to the process group's store and waits for the others'
    keys; those still missing are taken as stopped or unreachable (best effort: a live rank that
    notices the failure later than ``grace_s`` is counted too). ``[]`` when every rank reported;
    None when the store itself cannot be reached (its host, rank 0 without torchrun, is gone).
    """
    try:
        if hasattr(store, "set_timeout"):
            store.set_timeout(timedelta(seconds=max(1.0, grace_s)))
        store.set(f"{key}/{rank}", "1")
        deadline = time.monotonic() + grace_s
        while True:
            missing = [r for r in range(world) if r != rank and not store.check([f"{key}/{r}"])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.1)
    except (RuntimeError, OSError, ValueError, AttributeError):  # the store is gone with its host
        return None


def _failed_ranks_text(rank: int, world: int) -> str:
    if world == 2:
        return f"training rank {1 - rank}"
    try:
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # pragma: no cover - private API moved
        store = None
    gone = unreachable_ranks(store, rank, world) if store is not None else None
    if gone is None and rank != 0 and store is not None:
        return "training rank 0 (which hosts the rendezvous store)"
    if not gone:  # every rank reported, or no store
        return "another training rank"
    return f"training rank {gone[0]}" if len(gone) == 1 else f"training ranks {', '.join(map(str, gone))}"


@contextmanager
def collective_guard(where: Callable[[], str]) -> Iterator[None]:
    """Turn a communication error inside the block into :class:`RankFailure` naming the rank(s) gone
    and ``where()`` (e.g. ``"step 12"``); other errors pass unchanged. No-op outside DDP."""
    try:
        yield
    except RankFailure:
        raise
    except Exception as exc:
        if not is_distributed() or not is_comm_error(exc):
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        who = _failed_ranks_text(rank, world)
        msg = f"{who} stopped or became unreachable during {where()} ({short_cause(exc)}); this rank stops too"
        raise RankFailure(msg) from None
