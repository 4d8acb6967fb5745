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
