"""The extract stage's entry points (shared by the CLI, `mcn run`, evaluation sets and status), and
each process's :class:`~pipeline.runner.Workers` of a workspace.

Lineage chain (store.lineage): the scan's record holds the shard plan with the fingerprint of every
shard's inputs; an extract shard's lineage is its field's config and code plus those inputs; a
training run's lineage (pipeline.training) is its config and code plus the fingerprints of the
features it read; an evaluation's lineage (pipeline.evaluate) is its set's config plus the checkpoint's
identity and its features' fingerprint. A change anywhere makes exactly the units downstream of it
stale.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from pipeline.config import Config, write_resolved
from pipeline.ranks import rank_and_world
from pipeline.runner import RunSummary, ShardJob, Workers, run_sharded
from store.layout import Workspace
from store.manifest import group_by_shard, iter_manifest, read_scan
from store.index import FieldRecords, field_records

logger = logging.getLogger(__name__)

_WORKERS: dict[tuple[str, str], Workers] = {}


def workers_for(ws: Workspace, cfg: Config) -> Workers:
    """This process's :class:`Workers` of a workspace (one registry per workspace and process)."""
    key = (str(ws.root.resolve()), repr(cfg.runner))
    if key not in _WORKERS:
        _WORKERS[key] = Workers(ws, cfg.runner)
    return _WORKERS[key]


# --------------------------------------------------------------------------------------------------
# extract


def shard_jobs(ws: Workspace, *, with_records: bool = True) -> list[ShardJob]:
    """The shards of the scan's plan; with their manifest records (to process them) or without (to
    check their state, which needs only the plan)."""
    scan = read_scan(ws)
    jobs = [ShardJob(p.index, p) for p in scan.shards]
    if with_records:
        groups = group_by_shard(iter_manifest(ws.manifest))
        for job in jobs:
            job.records = groups.get(job.index, [])
            if len(job.records) != job.planned.n_videos:
                raise FileNotFoundError(f"the manifest does not match the scan's plan (shard {job.index}); "
                                        "run `mcn scan` again")
    return jobs


def extract_stage(ws: Workspace, cfg: Config, workers: Workers | None = None):
    from pipeline.extract import ExtractStage

    scan = read_scan(ws)
    return ExtractStage(ws, cfg.extract, scan.videos_root, scratch=(workers.scratch if workers else None))


def run_extract(ws: Workspace, cfg: Config, *, force: bool = False, progress: bool = True,
                verify: bool = False, dynamic: bool | None = None, retry_failed: bool = False) -> RunSummary:
    """Extract the shards this process takes (see :func:`pipeline.runner.run_sharded`).

    ``dynamic`` overrides ``runner.mode`` (``mcn run`` uses it with several ranks, so that every rank
    returns only when every shard is done)."""
    workers = workers_for(ws, cfg)
    if dynamic is not None:
        mode = "dynamic" if dynamic else "static"
        workers = Workers(ws, type(cfg.runner)(**{**cfg.runner.__dict__, "mode": mode}))
    rank, world = rank_and_world(partition=workers.cfg.mode == "static")
    with extract_stage(ws, cfg, workers) as stage:  # its decode workers serve every shard of the run
        summary = run_sharded(stage, workers, shard_jobs(ws), rank=rank, world=world, force=force,
                              progress=progress, verify=verify, retry_failed=retry_failed)
    if rank == 0 or workers.cfg.mode == "dynamic":
        for f in stage.fields:  # each field's own settings: a change to one field rewrites only its file
            write_resolved(ws.field_config(f), getattr(cfg.extract, f), field=f,
                           decode=stage.field_config(f)["decode"], extractor=stage.describe(f))
    return summary


@dataclass
class FieldState:
    """One field's shards: counts by state, the reasons for staleness and the failed videos."""

    field: str
    extractor: str = ""
    done: int = 0
    stale: int = 0
    missing: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # reason → shards
    failed: list[tuple[str, str, str, bool]] = field(default_factory=list)  # (video id, status, reason, transient)
    records: FieldRecords | None = None  # the field's record summaries, for open_features

    @property
    def complete(self) -> bool:
        return self.stale == 0 and self.missing == 0


def failure_summary(states: dict[str, FieldState], *, top: int = 8) -> list[str]:
    """Failed videos by reason, most frequent first: ``"  12  video2d  decode: timeout: no progress
    for N s (transient)"``.

    Numbers in a reason are written ``N`` (``worker died (signal N)``, ``no progress for N s``), so
    that file-specific details do not split one cause into many lines."""
    counts: dict[tuple[str, str], int] = {}
    for f, st in states.items():
        for _, status, error, transient in st.failed:
            if status != "failed":
                continue
            reason = re.sub(r"\d+(\.\d+)?", "N", str(error))[:100] + (" (transient)" if transient else "")
            counts[(f, reason)] = counts.get((f, reason), 0) + 1
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = [f"{n:6d}  {f:<8} {reason}" for (f, reason), n in rows[:top]]
    if len(rows) > top:
        lines.append(f"   ... {len(rows) - top} more reason(s): `mcn status` lists every failed video")
    return lines


def extract_states(ws: Workspace, cfg: Config, *, verify: bool = False) -> dict[str, FieldState]:
    """Per field of ``cfg.extract.fields``: done / stale / missing shards (reasons) and failed videos.

    One listing of each field's folder and its record index (store.index): no per-shard file is read
    unless the shard is stale (to say why)."""
    from store.shards import check_shard

    stage = extract_stage(ws, cfg)
    jobs = shard_jobs(ws, with_records=False)
    interned: dict[str, str] = {}
    out: dict[str, FieldState] = {}
    for f in stage.fields:
        recs = field_records(ws, f, interned=interned)
        st = FieldState(f, extractor=stage.describe(f)["extractor"], records=recs)
        for job in jobs:
            summary = recs.records.get(job.index)
            lineage = stage.lineage(f, job)
            size = recs.tar_sizes.get(job.index)
            if (not verify and summary is not None and size == summary.bytes
                    and summary.fingerprint == lineage.fingerprint):
                st.done += 1  # the common case, without building a state
                st.failed.extend(summary.problems)
                continue
            s = check_shard(ws, f, job.index, lineage, summary, size, verify=verify)
            setattr(st, s.status, getattr(st, s.status) + 1)
            for r in s.reasons:
                st.reasons[r] = st.reasons.get(r, 0) + 1
            if summary is not None:
                st.failed.extend(summary.problems)
        out[f] = st
    return out


__all__ = ["FieldState", "extract_stage", "extract_states", "failure_summary", "run_extract", "shard_jobs",
           "workers_for"]
