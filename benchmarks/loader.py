"""The training data path alone (shard → clip → batch) at the paper's dimensions, in videos/s per worker.

Synthetic feature shards of realistic HowTo100M-like videos are written with the project's own shard
writer (:class:`store.shards.ShardWriter`) into a temporary workspace: 2D 2048-d at 1 row/s, 3D 2048-d
at 1.5 rows/s, 40-band log-mel at 100 rows/s (all float16), one caption every ~4 s with 4–15 known
words of 300-d vectors. Then :func:`model.data.make_loader` (the loader training uses) is iterated for
a number of batches in this process (``num_workers 0``: the work of exactly one data worker, without
the hand-over to the training process) and the time per video is printed, together with the share of
each part of the path: reading and decoding the four tars (:func:`store.reader.zip_shard`,
:func:`model.data.decode_video`), building the 32 clips of a video (:func:`model.data.build_clips`)
and stacking the batch (:func:`model.data.collate`). The shards sit in the page cache after the first
pass: the figures are the CPU cost of the path, not the storage's. Asserts nothing.

    .venv/bin/python benchmarks/loader.py                 # 4 shards × 24 videos of 4–5 min
    .venv/bin/python benchmarks/loader.py --quick --json  # 2 shards × 6 videos, 2 batches
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import emit, machine, parser, use_json
from model.data import (
    DataConfig,
    Rates,
    build_clips,
    clip_rng,
    collate,
    decode_video,
    empty_counts,
    make_loader,
)
from store.fields import FIELDS
from store.layout import Workspace
from store.lineage import Lineage
from store.reader import open_features, zip_shard
from store.shards import ShardWriter, encode_json, encode_npy

BENCH = "loader"
RATES = {"video2d": 1.0, "video3d": 1.5, "audio": 100.0, "text": None}
DIMS = {"video2d": 2048, "video3d": 2048, "audio": 40, "text": 300}
MAX_WORDS = 20


def _extractor(f: str) -> dict:
    return {"extractor": "synthetic", "version": "0", "weights": None, "random_weights": True,
            "rate": RATES[f], "dim": DIMS[f]}


def _video(key: str, rng: np.random.Generator, pool: np.ndarray, duration: float) -> dict:
    """One video's arrays (float16) and captions; array contents are slices of a random ``pool``."""
    def take(rows: int, dim: int) -> np.ndarray:
        n = rows * dim
        off = int(rng.integers(0, len(pool) - n))
        return pool[off:off + n].reshape(rows, dim)

    caps, t = [], float(rng.uniform(0.0, 2.0))
    while t < duration - 1.0:
        d = float(rng.uniform(1.5, 4.0))
        caps.append({"start": round(t, 2), "end": round(min(t + d, duration), 2), "text": "w " * 8})
        t += d + float(rng.uniform(0.0, 1.0))  # a caption every ~3.75 s
    n = len(caps)
    lengths = rng.integers(4, 16, size=n).astype(np.int32)
    words = np.zeros((n, MAX_WORDS, DIMS["text"]), np.float16)
    for i, k in enumerate(lengths):
        words[i, :k] = take(int(k), DIMS["text"])
    return {
        "key": key, "duration": duration, "captions": caps,
        "video2d": np.abs(take(int(duration * RATES["video2d"]), DIMS["video2d"])) * np.float16(0.02),
        "video3d": np.abs(take(int(duration * RATES["video3d"]), DIMS["video3d"])) * np.float16(0.02),
        "audio": take(int(duration * RATES["audio"]), DIMS["audio"]) * np.float16(10) - np.float16(40),
        "words": words * np.float16(0.1), "lengths": lengths,
    }


def write_shards(ws: Workspace, n_shards: int, per_shard: int, seed: int = 0) -> float:
    """Write ``n_shards`` × ``per_shard`` videos of 4–5 min; returns the MB written."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(32 * 2**20, dtype=np.float32).astype(np.float16)
    lineage = Lineage(config="bench", code="bench", inputs={})
    for s in range(n_shards):
        videos = [_video(f"v{s:03d}-{i:03d}", rng, pool, float(rng.uniform(240.0, 300.0))) for i in range(per_shard)]
        for f in FIELDS:
            w = ShardWriter(ws, f, s, lineage, _extractor(f), dtype="float16")
            for v in videos:
                arr = v["words"] if f == "text" else v[f]
                meta = {"id": v["key"], "field": f, "status": "ok", "error": None, **_extractor(f),
                        "dtype": "float16", "shape": list(arr.shape), "duration": v["duration"]}
                members = {}
                if f == "text":
                    meta["captions"] = v["captions"]
                    members = {"words.npy": encode_npy(v["words"]), "lengths.npy": encode_npy(v["lengths"])}
                else:
                    members = {"feat.npy": encode_npy(arr)}
                w.add(v["key"], {"json": encode_json(meta), **members})
            w.commit()
    return sum(p.stat().st_size for p in ws.features_dir.rglob("*.tar")) / 2**20


def _cfg(workers: int) -> DataConfig:
    return DataConfig(n_pair=32, min_time=10.0, audio_frames=1000, max_words=MAX_WORDS, num_workers=workers,
                      pin_memory=False)


def time_loader(features, batch: int, n_batches: int, workers: int) -> tuple[float, int]:
    """Seconds for ``n_batches`` batches after a first, untimed one; videos timed."""
    cfg = _cfg(workers)
    loader = make_loader(cfg, features, batch_size=batch, epoch=0, n_batches=n_batches + 1, n_mels=40,
                         pin_memory=False)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    n = 0
    for b in it:
        n += len(b["keys"])
    return time.perf_counter() - t, n


def time_parts(features, n_videos: int) -> dict[str, float]:
    """Seconds per video of each part of the path, timed apart on ``n_videos`` videos."""
    cfg, rates = _cfg(0), Rates.of(features)
    counts = empty_counts()
    decoded = []
    t = time.perf_counter()
    shards = iter(features.shards * (1 + n_videos // max(1, features.n_usable)))
    while len(decoded) < n_videos:
        raws = zip_shard(next(shards), counts)
        for raw in raws:
            v = decode_video(raw, counts, rates)
            if v is not None:
                decoded.append(v)
            if len(decoded) == n_videos:
                raws.close()
                break
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    clips = [build_clips(v, cfg, rates, clip_rng(0, 0, 0, v.key), 40) for v in decoded]
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    batch = collate(clips, [v.key for v in decoded])
    collate_s = time.perf_counter() - t
    batch_mb = sum(x.numel() * x.element_size() for x in batch.values() if hasattr(x, "numel")) / 2**20
    return {"read_decode": read_s / n_videos, "build_clips": build_s / n_videos, "collate": collate_s / n_videos,
            "batch_mb_per_video": batch_mb / n_videos}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32, help="videos per batch (a rank's share of 128 on 4 GPUs)")
    ap.add_argument("--batches", type=int, default=6, help="timed batches")
    ap.add_argument("--workers", type=int, nargs="*", default=[0], help="DataLoader workers to time (0: in-process)")
    ap.add_argument("--profile", action="store_true", help="print the top of a cProfile of the timed loop")
    args = ap.parse_args()
    use_json(args.json)
    torch.set_num_threads(1)  # as in a DataLoader worker, which torch runs with one thread
    if args.quick:
        args.shards, args.per_shard, args.batch, args.batches = 2, 6, 4, 2
    info = machine()
    with tempfile.TemporaryDirectory(prefix="mcn-bench-loader-") as tmp:
        ws = Workspace(Path(tmp) / "ws")
        t = time.perf_counter()
        mb = write_shards(ws, args.shards, args.per_shard)
        n_videos = args.shards * args.per_shard
        emit(BENCH, "shards_written", mb, "MB", videos=n_videos, mb_per_video=round(mb / n_videos, 2),
             seconds=round(time.perf_counter() - t, 1))
        features = open_features(ws)
        time_parts(features, min(n_videos, args.batch))  # warm the page cache
        for workers in args.workers:
            if args.profile and workers == 0:
                prof = cProfile.Profile()
                prof.enable()
            secs, n = time_loader(features, args.batch, args.batches, workers)
            if args.profile and workers == 0:
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
                print(out.getvalue(), file=sys.stderr)
            per_worker = n / secs / max(1, workers)
            emit(BENCH, "videos_per_s_per_worker", n / secs / max(1, workers), "videos/s", workers=workers,
                 batch_videos=args.batch, n_pair=32, videos_timed=n, cpu=info.get("cpu"), cores=info.get("cores"))
            if workers == 0:
                emit(BENCH, "clips_per_s_per_worker", per_worker * 32, "clips/s", workers=workers)
        parts = time_parts(features, min(n_videos, args.batch))
        for name in ("read_decode", "build_clips", "collate"):
            emit(BENCH, f"{name}_ms_per_video", parts[name] * 1e3, "ms/video")
        emit(BENCH, "batch_mb_per_video", parts["batch_mb_per_video"], "MB/video",
             note="bytes handed to the trainer per video (32 clips)")


if __name__ == "__main__":
    main()
