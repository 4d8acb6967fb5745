"""Batch composition (issue 12 item 4): the videos of a batch come from many shards and folders.

The collection is category-organised: 40 folders of 64 videos. Planned in path order (the rule before
scan-4) every shard is one folder; the reference draws a batch uniformly from the whole collection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.data import DataConfig, make_loader, worker_videos
from store.ids import video_id
from store.layout import Workspace
from store.manifest import VideoRecord, assign_shards
from store.reader import open_features

from .conftest import random_video, write_shard

FOLDERS, PER_FOLDER, SHARD = 40, 64, 64


def _collection() -> list[VideoRecord]:
    paths = sorted(f"cat{c:02d}/clip{i:02d}.mp4" for c in range(FOLDERS) for i in range(PER_FOLDER))
    return [VideoRecord(id=video_id(p), path=p) for p in paths]


def _first_batch(plan: list[VideoRecord], folder_of: dict[str, str], cfg: DataConfig, batch: int = 128,
                 world: int = 1) -> tuple[int, int]:
    """Distinct shards and folders of the first global batch of ``batch`` videos (``batch / world``
    from worker 0 of each rank, as ClipStream takes them) of the shards of ``plan`` (manifest order)."""
    shards: dict[int, list[str]] = {}
    for r in plan:
        shards.setdefault(r.shard, []).append(r.id)
    shard_of = {r.id: r.shard for r in plan}
    order = sorted(shards)
    got: list[str] = []
    for rank in range(world):
        it = worker_videos(lambda cycle, pos: iter(shards[order[pos]]), len(order), cfg, 0, rank, world, 0, 1)
        got += [next(it) for _ in range(batch // world)]
    return len({shard_of[v] for v in got}), len({folder_of[v] for v in got})


def test_a_batch_spans_many_shards_and_folders() -> None:
    records = _collection()
    folder_of = {r.id: r.path.split("/")[0] for r in records}
    cfg = DataConfig()  # mix_shards 16, shuffle_buffer 64: the defaults
    # The plan: a seeded permutation, so every shard is a uniform sample of the 40 folders.
    plan = assign_shards(records, {}, SHARD, seed=0)
    assert sorted(np.bincount([r.shard for r in plan])) == [SHARD] * FOLDERS
    assert len({folder_of[r.id] for r in records if r.shard == 0}) >= 25  # 64 draws of 40: ~32 expected
    # One rank: its worker reads 10 shards at once (a quarter of its 40) and draws each video from
    # one of them at random, so 128 videos come from ≥ 10 shards (one of the 10 is missed with
    # probability ≤ 10·(9/10)^128 ≈ 1e-5), and as the shards are uniform samples, from
    # ~40·(1 − (39/40)^128) ≈ 38.4 folders, as 128 videos drawn from the whole collection.
    shards, folders = _first_batch(plan, folder_of, cfg)
    assert shards >= 10 and folders >= 32
    # Four ranks of 32 videos: the plan alone gives the folders of a uniform draw.
    shards, folders = _first_batch(plan, folder_of, cfg, world=4)
    assert folders >= 32
    # An old workspace keeps its path-ordered plan (a shard = a folder): the loader alone still mixes
    # 10 shards into a batch, where reading them one after the other through a 64-video buffer gave 3
    # (64 buffered + 128 read).
    old_plan = [VideoRecord(id=r.id, path=r.path, shard=i // SHARD)
                for i, r in enumerate(sorted(records, key=lambda r: r.path))]
    shards, folders = _first_batch(old_plan, folder_of, cfg)
    assert shards >= 10 and folders == shards
    assert _first_batch(old_plan, folder_of, DataConfig(mix_shards=1)) == (3, 3)


def test_plan_of_new_videos_follows_the_seeded_hash_and_planned_videos_stay(tmp_path: Path) -> None:
    records = _collection()[:200]
    assign_shards(records, {}, 64, seed=0)
    first = {r.id: r.shard for r in records}
    assert [sum(s == k for s in first.values()) for k in range(4)] == [64, 64, 64, 8]
    path_order = [r.id for r in sorted(records, key=lambda r: r.path)]
    assert [first[v] for v in path_order] != sorted(first[v] for v in path_order)  # not path order
    other = _collection()[:200]
    assign_shards(other, {}, 64, seed=1)
    assert {r.id: r.shard for r in other} != first  # the seed is part of the plan
    # 100 new videos: the planned ones keep their shard, the new fill shard 3 (56 more), then shard 4
    grown = _collection()[:300]
    assign_shards(grown, first, 64, seed=0)
    plan = {r.id: r.shard for r in grown}
    assert {v: plan[v] for v in first} == first
    new = [r.id for r in grown if r.id not in first]
    assert sorted(plan[v] for v in new) == [3] * 56 + [4] * 44


def test_clip_stream_batches_follow_worker_videos(tmp_path: Path) -> None:
    """The real loader on real shards takes its videos in the order of :func:`worker_videos`."""
    rng = np.random.default_rng(0)
    ws = Workspace(tmp_path / "ws")
    keys = {s: [f"s{s}-v{i}" for i in range(4)] for s in range(8)}
    for s, ks in keys.items():
        write_shard(ws, s, [random_video(k, rng, duration=12.0, n_captions=3) for k in ks])
    features = open_features(ws)
    cfg = DataConfig(n_pair=2, audio_frames=50, num_workers=0, shuffle_buffer=0, mix_shards=4, pin_memory=False)
    batch = next(iter(make_loader(cfg, features, batch_size=8, epoch=1, n_batches=1, n_mels=40)))
    it = worker_videos(lambda cycle, pos: iter(keys[features.shards[pos].index]), 8, cfg, 1, 0, 1, 0, 1)
    assert batch["keys"] == [next(it) for _ in range(8)]
    # 2 shards open (a quarter of 8): not one shard after the other, as with mix_shards 1
    one = worker_videos(lambda cycle, pos: iter(keys[features.shards[pos].index]), 8,
                        DataConfig(shuffle_buffer=0, mix_shards=1), 1, 0, 1, 0, 1)
    sequential = [next(one) for _ in range(8)]
    assert [k.split("-")[0] for k in sequential] == [sequential[0].split("-")[0]] * 4 + [sequential[4].split("-")[0]] * 4
    assert batch["keys"] != sequential
    # resuming mid-epoch replays the interleaved order: the batches after the resume point are the same
    full = list(make_loader(cfg, features, batch_size=4, epoch=1, n_batches=5, n_mels=40))
    resumed = list(make_loader(cfg, features, batch_size=4, epoch=1, n_batches=5, skip_batches=3, n_mels=40))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[3:]]
    assert all(torch.equal(a["text"], b["text"]) for a, b in zip(resumed, full[3:]))
