"""Process rank and world size: torchrun (RANK/WORLD_SIZE) or SLURM (SLURM_PROCID/SLURM_NTASKS).

A setup that cannot be meant as "rank 0 of 1" is an error, not a silent default: RANK without
WORLD_SIZE (or the reverse), SLURM_PROCID without SLURM_NTASKS, a SLURM array task or a Kubernetes
indexed-job pod without explicit rank variables (every such task would otherwise believe it is alone
and do all the work). In the dynamic claim mode no partition is needed and array tasks need nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


class RankError(ValueError):
    """The environment's rank variables do not describe a partition."""


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise RankError(f"{key}={env[key]!r} is not an integer") from None


def rank_and_world(env: Mapping[str, str] | None = None, *, partition: bool = True) -> tuple[int, int]:
    """``(rank, world)`` of this process. ``partition=False`` (dynamic claims): array tasks and indexed
    pods without rank variables are fine and count as (0, 1)."""
    env = os.environ if env is None else env
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        has_rank, has_world = rank_key in env, world_key in env
        if has_rank != has_world:
            there, absent = (rank_key, world_key) if has_rank else (world_key, rank_key)
            raise RankError(f"{there} is set but {absent} is not: set both (or neither) so that every "
                            "process knows its share of the work")
        if has_rank and rank_key == "SLURM_PROCID" and partition and "SLURM_ARRAY_TASK_ID" in env:
            break  # SLURM_PROCID/NTASKS of an array task describe its own job step, not the array
        if has_rank:
            rank, world = _int(env, rank_key), _int(env, world_key)
            if world < 1 or not 0 <= rank < world:
                raise RankError(f"{rank_key}={rank} is outside 0..{world_key}-1={world - 1}")
            return rank, world
    if partition and "SLURM_ARRAY_TASK_ID" in env:
        raise RankError(
            f"SLURM array task {env['SLURM_ARRAY_TASK_ID']} without rank variables: every task would do "
            "all the work. Set RANK=$SLURM_ARRAY_TASK_ID WORLD_SIZE=$SLURM_ARRAY_TASK_COUNT, or use the "
            "dynamic claim mode (runner.mode=dynamic), where tasks take the next unclaimed shard")
    if partition and "JOB_COMPLETION_INDEX" in env:
        raise RankError(
            f"indexed-job pod {env['JOB_COMPLETION_INDEX']} without RANK/WORLD_SIZE: every pod would do all "
            "the work. Set RANK to the completion index and WORLD_SIZE to the completions, or use "
            "runner.mode=dynamic")
    return 0, 1


def owns(shard_index: int, rank: int, world: int) -> bool:
    """Static partition: shard ``i`` belongs to the process with ``i % world == rank``."""
    return shard_index % world == rank
