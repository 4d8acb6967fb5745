"""The stage runner: every stage's units of work, cached by lineage, claimed, shared by many processes.

Two kinds of stages go through it:

- **sharded** (extract, per field): a unit is one shard of one field. Each process takes its shards,
  statically (``index % WORLD_SIZE == RANK``) or dynamically (the next shard nobody holds, until every
  shard is done: any number of processes may join or leave at any time). For each shard it asks which
  fields are not done (:mod:`store.lineage`), claims those (:mod:`store.claims`), checks again under the
  claim, and hands the claimed fields to the stage's ``process``. Shards held by another live process
  are left to it and, at the end, waited for: should their holder die, its claim goes stale and a
  waiting process takes them over.
- **single units** (scan, a training run, an evaluation set, the search index, the demo videos):
  :func:`run_unit` checks the unit's state, claims it (waiting while another process holds it), checks
  again and runs it only when it is not done.

Before working, a process sweeps what processes that are gone left behind: their temporary files, their
scratch folders and their registry entries; nothing of a live process is touched.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from tqdm import tqdm

from pipeline.ranks import owns
from store import atomic, identity
from store.claims import Claim, ClaimLost, Claims, Holder
from store.layout import Workspace
from store.lineage import RUNTIME, Lineage, UnitState
from store.manifest import PlannedShard, VideoRecord
from store.owner import ClaimConfig, Registry

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class RunnerConfig:
    """How processes share a workspace (none of it changes any output)."""

    mode: Literal["static", "dynamic"] = field(default="static", metadata=RUNTIME)
    lease_s: float = field(default=120.0, metadata=RUNTIME)  # a process on another node is gone after this
    heartbeat_s: float = field(default=15.0, metadata=RUNTIME)
    poll_s: float = field(default=2.0, metadata=RUNTIME)  # how often a waiting process looks again

    def claim_config(self) -> ClaimConfig:
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"runner.mode must be static or dynamic, not {self.mode!r}")
        if not 0 < self.heartbeat_s < self.lease_s:
            raise ValueError(f"runner.heartbeat_s ({self.heartbeat_s}) must be > 0 and below runner.lease_s "
                             f"({self.lease_s})")
        return ClaimConfig(lease_s=self.lease_s, heartbeat_s=self.heartbeat_s, poll_s=self.poll_s)


class Workers:
    """This process's view of who works on a workspace: registry, claims, sweep, scratch space."""

    def __init__(self, ws: Workspace, cfg: RunnerConfig | None = None) -> None:
        self.ws = ws
        self.cfg = cfg or RunnerConfig()
        self.registry = Registry(ws.owners_dir, self.cfg.claim_config())
        self.claims = Claims(ws.lock, self.registry, ws.locks_dir)
        self._scratch = None

    def sweep(self) -> int:
        """Remove the claims, temporary files and scratch folders of processes that are gone."""
        n = self.claims.sweep()
        n += sum(atomic.sweep_temps(folder, self.registry.keeps) for folder in self.ws.temp_folders())
        try:
            entries = list(os.scandir(self.ws.scratch_root))
        except FileNotFoundError:
            entries = []
        now = time.time()
        for e in entries:
            try:
                age = now - e.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if e.is_dir(follow_symlinks=False) and not self.registry.keeps(e.name, age):
                shutil.rmtree(e.path, ignore_errors=True)
                n += 1
        n += self.registry.sweep()
        if n:
            logger.info("swept %d leftover(s) of processes that are gone from %s", n, self.ws.root)
        return n

    def scratch(self):
        """This process's scratch folder (``WS/tmp/<token>``), removed when the process exits."""
        if self._scratch is None:
            self.registry.register()
            self._scratch = self.ws.scratch(identity.current().token)
            self._scratch.mkdir(parents=True, exist_ok=True)
            atexit.register(shutil.rmtree, self._scratch, True)
        return self._scratch

    def claim(self, unit: str, *, what: str | None = None) -> Claim:
        """Claim ``unit``, waiting (and saying so once per holder) while a live process holds it."""
        def told(h: Holder) -> None:
            logger.info("%s is held by %s: waiting", what or unit, h.describe())
        return self.claims.acquire(unit, on_wait=told)


def run_unit(workers: Workers, unit: str, state: Callable[[], UnitState], work: Callable[[Claim, UnitState], T],
             *, force: bool = False) -> tuple[UnitState, T | None]:
    """Run one unit unless it is done: ``(state before, work's result or None when it was done)``.

    ``state`` is asked before and again under the claim (another process may have finished the unit
    while this one waited); ``work`` gets the claim, to verify before its final commit.
    """
    st = state()
    if st.done and not force:
        return st, None
    claim = workers.claim(unit)
    try:
        st = state()
        if st.done and not force:
            logger.info("%s was completed by another process", unit)
            return st, None
        workers.sweep()  # what killed processes left behind (their temporary files, claims, scratch)
        return st, work(claim, st)
    finally:
        claim.release()


# --------------------------------------------------------------------------------------------------
# Sharded stages


@dataclass
class ShardJob:
    """One shard of the plan; ``records`` (its manifest records) only where the stage processes it."""

    index: int
    planned: PlannedShard
    records: list[VideoRecord] = field(default_factory=list)


class ShardedStage(Protocol):
    """What the runner needs from a sharded stage."""

    name: str
    fields: list[str]

    def lineage(self, field: str, job: ShardJob) -> Lineage: ...

    def process(self, job: ShardJob, claims: dict[str, Claim], retry: dict[str, set[str]] | None = None) -> None:
        """Write the shard of every field in ``claims`` (``store.shards.ShardWriter(claim=...)``); for the
        fields in ``retry`` only the given videos are redone, the other samples are kept."""


@dataclass
class RunSummary:
    stage: str
    shards_total: int = 0
    shards_mine: int = 0  # shards this process was responsible for (static) or all (dynamic)
    processed: dict[str, int] = field(default_factory=dict)  # field → shards written by this process
    skipped: dict[str, int] = field(default_factory=dict)  # field → shards found done
    by_others: dict[str, int] = field(default_factory=dict)  # field → shards written by other processes
    retried: dict[str, int] = field(default_factory=dict)  # field → videos retried (--retry-failed)
    videos: int = 0
    seconds: float = 0.0
    waited_s: float = 0.0


def shard_todo(stage: ShardedStage, ws: Workspace, job: ShardJob, fields: list[str], *,
               force: bool = False, verify: bool = False) -> list[str]:
    from store.shards import shard_state

    if force:
        return list(fields)
    return [f for f in fields if not shard_state(ws, f, job.index, stage.lineage(f, job), verify=verify).done]


def transient_failures(ws: Workspace, job: ShardJob, fields: list[str]) -> dict[str, set[str]]:
    """field → the videos whose failure in the field's done record is transient (a timeout, a crashed
    worker, out of memory): what ``--retry-failed`` redoes."""
    from store.lineage import read_record

    out: dict[str, set[str]] = {}
    for f in fields:
        rec = read_record(ws.shard_record(f, job.index)) or {}
        ids = {str(v.get("id")) for v in rec.get("videos", []) if isinstance(v, dict) and v.get("transient")}
        if ids:
            out[f] = ids
    return out


def run_sharded(stage: ShardedStage, workers: Workers, jobs: list[ShardJob], *, rank: int = 0, world: int = 1,
                force: bool = False, progress: bool = True, verify: bool = False,
                retry_failed: bool = False) -> RunSummary:
    """Run ``stage`` over its shards (see the module docstring); returns what this process did.

    ``retry_failed``: in shards that are done, also redo the videos whose failure was transient (a
    timeout, a crashed worker, out of memory), keeping every other sample; the shard is rewritten
    atomically under its claim."""
    ws, cfg = workers.ws, workers.cfg
    dynamic = cfg.mode == "dynamic"
    summary = RunSummary(stage=stage.name, shards_total=len(jobs))
    for d in (summary.processed, summary.skipped, summary.by_others, summary.retried):
        d.update({f: 0 for f in stage.fields})
    workers.sweep()
    mine = jobs if dynamic else [j for j in jobs if owns(j.index, rank, world)]
    summary.shards_mine = len(mine)
    todo: list[tuple[ShardJob, list[str]]] = []
    for job in mine:
        fields = shard_todo(stage, ws, job, stage.fields, force=force, verify=verify)
        done = [f for f in stage.fields if f not in fields]
        if retry_failed and done:
            fields = fields + [f for f in done if f in transient_failures(ws, job, done)]
        for f in stage.fields:
            if f not in fields:
                summary.skipped[f] += 1
        if fields:
            todo.append((job, fields))
    n_videos = sum(j.planned.n_videos for j, _ in todo)
    who = "dynamic claims" if dynamic else f"rank {rank}/{world}"
    logger.info("%s (%s): %d of %d shards are mine; %d to (re)do (%d videos)", stage.name, who, len(mine),
                len(jobs), len(todo), n_videos)
    start = time.monotonic()
    bar = tqdm(total=n_videos, desc=stage.name, unit="video", disable=not progress or (rank != 0 and not dynamic))
    forced: set[tuple[int, str]] = set()  # (shard, field) redone under --force by this process

    def attempt(job: ShardJob, fields: list[str]) -> list[str]:
        """Claim and process what is still to do of ``fields``; returns the fields held by others."""
        claims: dict[str, Claim] = {}
        held: list[str] = []
        for f in fields:
            got = workers.claims.try_acquire(ws.shard_unit(f, job.index))
            if isinstance(got, Claim):
                claims[f] = got
            else:
                held.append(f)
        try:
            retry: dict[str, set[str]] = {}
            if claims:  # under the claims: done meanwhile by another process?
                again = set(shard_todo(stage, ws, job, list(claims), force=force, verify=verify))
                if force:
                    again -= {f for f in claims if (job.index, f) in forced}
                if retry_failed:
                    retry = {f: ids for f, ids in transient_failures(ws, job, [f for f in claims if f not in again]
                                                                     ).items() if (job.index, f) not in forced}
                for f in [f for f in claims if f not in again and f not in retry]:
                    summary.by_others[f] += 1
                    claims.pop(f).release()
            if claims:
                stage.process(job, claims, retry or None)
                for f in claims:
                    if f in retry:
                        summary.retried[f] += len(retry[f])
                    else:
                        summary.processed[f] += 1
                    forced.add((job.index, f))
                summary.videos += job.planned.n_videos
        except ClaimLost as exc:
            logger.warning("%s: %s", stage.name, exc)
        finally:
            for c in claims.values():
                c.release()
        return held

    waiting: list[tuple[ShardJob, list[str]]] = []
    try:
        for job, fields in todo:
            held = attempt(job, fields)
            if held:
                waiting.append((job, held))
            else:
                bar.update(job.planned.n_videos)
        # Shards held by other live processes: wait until they are done, or take them over when their
        # holder is gone (its claim then goes stale).
        t_wait = time.monotonic()
        last_note = 0.0
        while waiting:
            still: list[tuple[ShardJob, list[str]]] = []
            for job, fields in waiting:
                left = shard_todo(stage, ws, job, fields, verify=verify)
                if retry_failed:
                    done = [f for f in fields if f not in left]
                    left += [f for f in transient_failures(ws, job, done) if (job.index, f) not in forced]
                if force:
                    left = [f for f in left if (job.index, f) not in forced]
                for f in fields:
                    if f not in left:
                        summary.by_others[f] += 1
                held = attempt(job, left) if left else []
                if held:
                    still.append((job, held))
                else:
                    bar.update(job.planned.n_videos)
            waiting = still
            if waiting:
                now = time.monotonic()
                if now - last_note > 30:
                    last_note = now
                    holders = {h.describe() for job, fs in waiting for f in fs
                               if (h := workers.claims.holder(ws.shard_unit(f, job.index))) is not None}
                    logger.info("%s: waiting for %d shard(s) being written by %s", stage.name, len(waiting),
                                ", ".join(sorted(holders)) or "processes that are stopping")
                time.sleep(cfg.poll_s)
        summary.waited_s = time.monotonic() - t_wait
    finally:
        bar.close()
    summary.seconds = time.monotonic() - start
    return summary
