"""Stage entry points shared by the CLI and `mcn run`: read the workspace, run, record the config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import Config, write_resolved
from pipeline.manifest import group_by_shard, iter_manifest
from pipeline.ranks import rank_and_world
from pipeline.runner import RunSummary, ShardJob, run_stage
from pipeline.workspace import Workspace

logger = logging.getLogger(__name__)


def shard_jobs(ws: Workspace) -> list[ShardJob]:
    return [ShardJob(i, recs) for i, recs in group_by_shard(iter_manifest(ws.manifest)).items()]


def videos_root(ws: Workspace) -> Path:
    if not ws.scan_summary.exists():
        raise FileNotFoundError(f"no scan summary at {ws.scan_summary}: run `mcn scan` first")
    return Path(json.loads(ws.scan_summary.read_text())["videos_root"])


def extract_stage(ws: Workspace, cfg: Config):
    from pipeline.extract import ExtractStage

    return ExtractStage(ws, cfg.extract, videos_root(ws))


def run_extract(ws: Workspace, cfg: Config, *, force: bool = False, progress: bool = True) -> RunSummary:
    stage = extract_stage(ws, cfg)
    rank, world = rank_and_world()
    summary = run_stage(stage, ws, shard_jobs(ws), rank=rank, world=world, force=force, progress=progress)
    if rank == 0:
        for f in stage.fields:
            write_resolved(ws.field_dir(f) / "config.yaml", cfg.extract, field=f,
                           extractor=stage.describe(f))
    return summary


def run_train(ws: Workspace, cfg: Config, *, resume: str | None = None, init_from: str | None = None,
              progress: bool = True):
    """Train into WS/runs/<evaluate.run>; a finished run (max_steps/epochs reached) is a no-op."""
    from model.distributed import cleanup, init_distributed
    from model.train import train

    run_dir = ws.run_dir(cfg.evaluate.run)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.train.progress = cfg.train.progress and progress
    rank, world = rank_and_world()
    if rank == 0:
        write_resolved(run_dir / "config.yaml", cfg.train, world_size=world)
    if world > 1:
        init_distributed()
    try:
        return train(cfg.train, ws.features_dir, run_dir, resume=resume, init_from=init_from)
    finally:
        if world > 1:
            cleanup()
