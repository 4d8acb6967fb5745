"""The stage runner: shards as units of work, caching and resumption, split across ranks.

A sharded stage produces one or more *fields* (output folders under `features/`). For every shard
of the plan that this rank owns (`index % world == rank`), the runner asks which fields are not
done (missing, or stale: their record holds another fingerprint) and hands only those to the
stage's `process` function, which writes them through `ShardWriter`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from tqdm import tqdm

from pipeline import atomic
from pipeline.manifest import VideoRecord
from pipeline.ranks import owns
from pipeline.shards import read_record, shard_state
from pipeline.workspace import Workspace

logger = logging.getLogger(__name__)


@dataclass
class ShardJob:
    index: int
    records: list[VideoRecord]


class ShardedStage(Protocol):
    """What the runner needs from a stage."""

    name: str
    fields: list[str]

    def fingerprint(self, field: str, job: ShardJob) -> str: ...

    def process(self, job: ShardJob, fields: list[str]) -> None: ...


@dataclass
class RunSummary:
    stage: str
    shards_total: int = 0
    shards_mine: int = 0
    processed: dict[str, int] = field(default_factory=dict)  # field → shards written this run
    skipped: dict[str, int] = field(default_factory=dict)  # field → shards already done
    videos: int = 0
    seconds: float = 0.0


def run_stage(
    stage: ShardedStage,
    ws: Workspace,
    jobs: list[ShardJob],
    *,
    rank: int = 0,
    world: int = 1,
    force: bool = False,
    progress: bool = True,
    on_shard_done: Callable[[ShardJob], None] | None = None,
) -> RunSummary:
    """Run `stage` over the jobs this rank owns, skipping fields that are done."""
    summary = RunSummary(stage=stage.name, shards_total=len(jobs))
    summary.processed = {f: 0 for f in stage.fields}
    summary.skipped = {f: 0 for f in stage.fields}
    for f in stage.fields:
        atomic.remove_stale_temps(ws.field_dir(f))
    mine = [j for j in jobs if owns(j.index, rank, world)]
    summary.shards_mine = len(mine)
    plan: list[tuple[ShardJob, list[str]]] = []
    for job in mine:
        todo = []
        for f in stage.fields:
            if force or shard_state(ws, f, job.index, stage.fingerprint(f, job)) != "done":
                todo.append(f)
            else:
                summary.skipped[f] += 1
        if todo:
            plan.append((job, todo))
    n_videos = sum(len(j.records) for j, _ in plan)
    logger.info(
        "%s: rank %d/%d owns %d of %d shards; %d to (re)do (%d videos)",
        stage.name, rank, world, len(mine), len(jobs), len(plan), n_videos,
    )
    start = time.monotonic()
    bar = tqdm(total=n_videos, desc=stage.name, unit="video", disable=not progress or rank != 0)
    try:
        for job, todo in plan:
            stage.process(job, todo)
            for f in todo:
                summary.processed[f] += 1
            summary.videos += len(job.records)
            bar.update(len(job.records))
            if on_shard_done:
                on_shard_done(job)
    finally:
        bar.close()
    summary.seconds = time.monotonic() - start
    return summary


@dataclass
class FieldStatus:
    field: str
    done: int = 0
    stale: int = 0
    missing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (video id, reason)


def field_status(stage: ShardedStage, ws: Workspace, jobs: list[ShardJob]) -> list[FieldStatus]:
    """Per field: done / stale / missing shards and the failed videos recorded in done shards."""
    out = []
    for f in stage.fields:
        st = FieldStatus(f)
        for job in jobs:
            state = shard_state(ws, f, job.index, stage.fingerprint(f, job))
            setattr(st, state, getattr(st, state) + 1)
            record = read_record(ws.shard_record(f, job.index)) if state != "missing" else None
            for v in (record or {}).get("videos", []):
                if v.get("status") not in ("ok",):
                    st.failed.append((v["id"], f"{v.get('status')}: {v.get('error')}"))
        out.append(st)
    return out
