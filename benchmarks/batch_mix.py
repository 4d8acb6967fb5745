"""Batch composition: distinct shards and folders per batch on a category-organised collection.

A synthetic manifest of ``--folders`` folders (one category each) of ``--per-folder`` videos is
planned into shards of 64 by two rules: the rule before scan-4 (path order: a shard is a folder) and
:func:`store.manifest.assign_shards` (seeded hash order). The video order of the loader
(:func:`model.data.worker_videos`, the order :class:`model.data.ClipStream` reads in) is then taken
for ``--batches`` global batches of 128 videos, on 1 and 4 ranks, with the loader reading one shard
at a time (``mix_shards 1``: the loader before) or the default ``mix_shards``; the figures are the
mean numbers of distinct shards and folders per global batch. For reference, 128 videos drawn
uniformly from the whole collection (the reference's sampler) span ``F·(1 − (1 − 1/F)^128)`` folders.
No shard is written: only the order is measured. Asserts nothing.

    .venv/bin/python benchmarks/batch_mix.py
    .venv/bin/python benchmarks/batch_mix.py --quick --json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import emit, parser, use_json
from model.data import DataConfig, worker_videos
from store.ids import video_id
from store.manifest import VideoRecord, assign_shards

BENCH = "batch_mix"
SHARD = 64
BATCH = 128


def collection(folders: int, per_folder: int) -> list[VideoRecord]:
    paths = sorted(f"cat{c:03d}/clip{i:03d}.mp4" for c in range(folders) for i in range(per_folder))
    return [VideoRecord(id=video_id(p), path=p) for p in paths]


def path_plan(records: list[VideoRecord]) -> list[VideoRecord]:
    """The rule before scan-4 on a first scan: shards of 64 in path order."""
    ordered = sorted(records, key=lambda r: r.path)
    return [VideoRecord(id=r.id, path=r.path, shard=i // SHARD) for i, r in enumerate(ordered)]


def batches(plan: list[VideoRecord], cfg: DataConfig, world: int, n: int) -> list[list[str]]:
    """``n`` global batches: rank r's worker 0 gives BATCH / world videos per batch."""
    shards: dict[int, list[str]] = {}
    for r in plan:
        shards.setdefault(r.shard, []).append(r.id)
    order = sorted(shards)
    its = [worker_videos(lambda cycle, pos: iter(shards[order[pos]]), len(order), cfg, 0, rank, world, 0, 1)
           for rank in range(world)]
    return [[next(it) for it in its for _ in range(BATCH // world)] for _ in range(n)]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--folders", type=int, default=40)
    ap.add_argument("--per-folder", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    use_json(args.json)
    if args.quick:
        args.batches = 3
    records = collection(args.folders, args.per_folder)
    folder_of = {r.id: r.path.split("/")[0] for r in records}
    uniform = args.folders * (1 - (1 - 1 / args.folders) ** BATCH)
    emit(BENCH, "uniform_folders_per_batch", uniform, "folders", folders=args.folders, batch=BATCH,
         note="128 videos drawn uniformly from the collection (the reference)")
    plans = {"path": path_plan(records), "seeded": assign_shards(collection(args.folders, args.per_folder), {},
                                                                  SHARD, seed=0)}
    default_mix = DataConfig().mix_shards
    for plan_name, plan in plans.items():
        shard_of = {r.id: r.shard for r in plan}
        for mix in (1, default_mix):
            for world in (1, 4):
                cfg = DataConfig(mix_shards=mix)
                bs = batches(plan, cfg, world, args.batches)
                n_shards = float(np.mean([len({shard_of[v] for v in b}) for b in bs]))
                n_folders = float(np.mean([len({folder_of[v] for v in b}) for b in bs]))
                cond = {"plan": plan_name, "mix_shards": mix, "shuffle_buffer": cfg.shuffle_buffer, "ranks": world,
                        "batch": BATCH, "batches": args.batches, "shards": len({r.shard for r in plan}),
                        "folders": args.folders}
                emit(BENCH, "shards_per_batch", n_shards, "shards", **cond)
                emit(BENCH, "folders_per_batch", n_folders, "folders", **cond)


if __name__ == "__main__":
    main()
