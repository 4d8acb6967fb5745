"""Process rank and world size from torchrun (RANK/WORLD_SIZE) or SLURM (SLURM_PROCID/SLURM_NTASKS)."""

from __future__ import annotations

import os


def rank_and_world(env: dict[str, str] | None = None) -> tuple[int, int]:
    env = dict(os.environ) if env is None else env
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in env and world_key in env:
            rank, world = int(env[rank_key]), int(env[world_key])
            if not 0 <= rank < world:
                raise ValueError(f"{rank_key}={rank} is outside 0..{world_key}-1={world - 1}")
            return rank, world
    return 0, 1


def owns(shard_index: int, rank: int, world: int) -> bool:
    """Shard `i` belongs to the process with `i % world == rank`."""
    return shard_index % world == rank
