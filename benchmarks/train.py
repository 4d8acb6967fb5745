"""One MCN training step at the paper's dimensions on synthetic tensors (no data loading).

Embedding 6144, video 4096, audio 40 × 1000 log-mel frames, text 20 × 300, n_pair 32; the step is
:meth:`model.train.Trainer.train_step` (forward, k-means assignment, losses, backward, Adam). Prints the
median seconds per step, clips per second and peak memory for each batch size (in clips), each in a
fresh subprocess so that peak RSS belongs to that batch size; then one k-means refit. Asserts nothing.

``--precision`` (TrainConfig.amp, see extractors/precision.py): ``fp32``, ``bf16`` autocast, or ``both``
(the default): each batch size runs in fp32 and in bf16 one after the other and the bf16 / fp32
speed-up of the step is printed. ``--json``: one JSON line per figure (benchmarks/common.py).

    .venv/bin/python benchmarks/train.py                                # CPU, batches 64 and 256 clips
    .venv/bin/python benchmarks/train.py --quick --json                 # smoke run
    .venv/bin/python benchmarks/train.py --device cuda --batch 4096     # one GPU, fp32 vs bf16
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import emit, parser, use_json

from model.data import DataConfig
from model.kmeans import KMeansConfig, OnlineKMeans
from model.mcn import MCNConfig
from model.train import TrainConfig, Trainer

BENCH = "train"

N_PAIR = 32


def synthetic_batch(clips: int, frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch in the model.data layout: clips = videos · 32."""
    g = torch.Generator().manual_seed(seed)
    videos = max(1, clips // N_PAIR)
    return {
        "video": torch.nn.functional.normalize(torch.rand(clips, 4096, generator=g), dim=1),
        "audio": (torch.randn(clips, 40, frames, generator=g) * 10 - 40).to(torch.float16),
        "nframes": torch.full((clips,), frames, dtype=torch.long),
        "text": torch.randn(clips, 20, 300, generator=g).to(torch.float16),
        "text_len": torch.full((clips,), 20, dtype=torch.long),
        "audio_mask": torch.ones(clips, dtype=torch.bool),
        "video_index": torch.arange(videos).repeat_interleave(clips // videos),
    }


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def one(args: argparse.Namespace) -> dict:
    """Time ``args.repeat`` steps (after ``args.warmup`` untimed ones) at one batch size."""
    device = torch.device(args.device)
    cfg = TrainConfig(batch_size=max(1, args.batch // N_PAIR), warmup_steps=0, amp=args.precision,
                      device=args.device, progress=False, tensorboard=False,
                      model=MCNConfig(), kmeans=KMeansConfig(refit_every=10**9),
                      data=DataConfig(n_pair=N_PAIR))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, total_steps=10**6, device=device)
    build_s = time.perf_counter() - t0
    batch = synthetic_batch(args.batch, args.frames)
    times, cpus = [], []
    for i in range(args.warmup + args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        c = time.process_time()
        t = time.perf_counter()
        trainer.train_step(batch)  # first step: k-means refit on the batch (warm-up, untimed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    med = statistics.median(times)
    out = {"batch_clips": args.batch, "device": str(device), "steps_timed": len(times), "median_s": med,
           "min_s": min(times), "clips_per_s": args.batch / med, "cpu_s": statistics.median(cpus), "build_s": build_s,
           "peak_rss_gib": _peak_rss_gib(), "threads": torch.get_num_threads(),
           "precision": trainer.precision, "params": sum(p.numel() for p in trainer.model.parameters())}
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 1024**3
        out["gpu"] = torch.cuda.get_device_name()
    return out


def kmeans_refit(device: str, points: int, iters: int) -> dict:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(256, 6144, generator=g)
    x = centres[torch.randint(256, (points,), generator=g)] + 1.5 * torch.randn(points, 6144, generator=g)
    x = x.to(device)
    km = OnlineKMeans(KMeansConfig(k=256, iters=iters), 6144, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    km.step(x)  # first call: k-means++ init + Lloyd
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    km.calls = 0  # force a warm-started refit on the next call
    km.step(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    warm = time.perf_counter() - t
    return {"points": points, "iters_max": iters, "refit_cold_s": cold, "refit_warm_s": warm,
            "n_empty": km.stats().get("n_empty")}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="clips per step (default: 64 256 on CPU, 4096 on CUDA; --quick: 32)")
    p.add_argument("--frames", type=int, default=None, help="log-mel frames per clip (default 1000; --quick: 100)")
    p.add_argument("--precision", default="both", choices=("fp32", "bf16", "both"),
                   help="fp32, bf16 autocast, or both side by side (default both)")
    p.add_argument("--repeat", type=int, default=None, help="timed steps (default 3; --quick: 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--kmeans-points", type=int, default=None,
                   help="points of the refit timing (default 8192 on CPU; 45056 = reference queue + batch "
                   "on CUDA; --quick: 1024, at most 5 iterations)")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--skip-kmeans", action="store_true")
    p.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args._one:
        args.batch = args.batch[0]
        print(json.dumps(one(args)))
        return
    use_json(args.json)
    cpu = args.device == "cpu"
    batches = args.batch or ([32] if args.quick else [64, 256] if cpu else [4096])
    frames = args.frames or (100 if args.quick else 1000)
    repeat = args.repeat or (1 if args.quick else 3)
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    say(f"MCN train step, paper dims (D 6144, video 4096, audio 40x{frames}, text 20x300), "
        f"device {args.device}, {repeat} timed step(s) after {args.warmup} warm-up, precision "
        f"{' + '.join(precisions)}")
    for b in batches:
        steps: dict[str, float] = {}
        cpu_steps: dict[str, float] = {}
        for precision in precisions:  # side by side: fp32 then bf16 for each batch size
            cmd = [sys.executable, __file__, "--_one", "--device", args.device, "--batch", str(b), "--frames",
                   str(frames), "--repeat", str(repeat), "--warmup", str(args.warmup), "--precision", precision]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                say(f"batch {b} {precision}: failed\n{res.stderr[-2000:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            steps[precision], cpu_steps[precision] = r["median_s"], r["cpu_s"]
            c = {"device": args.device, "batch_clips": b, "frames": frames, "precision": r["precision"],
                 "threads": r["threads"], "steps_timed": r["steps_timed"]}
            emit(BENCH, "step_s", r["median_s"], "s", **c, min_s=round(r["min_s"], 4))
            emit(BENCH, "step_clips_per_s", r["clips_per_s"], "clips/s", **c)
            emit(BENCH, "step_cpu_s", r["cpu_s"], "CPU s", **c, what="process CPU seconds per step")
            emit(BENCH, "peak_rss_gib", r["peak_rss_gib"], "GiB", **c)
            if "peak_cuda_gib" in r:
                emit(BENCH, "peak_cuda_gib", r["peak_cuda_gib"], "GiB", **c, gpu=r["gpu"])
        if len(steps) == 2:
            emit(BENCH, "step_speedup_bf16", steps["fp32"] / steps["bf16"], "x", device=args.device,
                 batch_clips=b, frames=frames, target=">= 1.8")
            emit(BENCH, "step_speedup_bf16_cpu", cpu_steps["fp32"] / cpu_steps["bf16"], "x", device=args.device,
                 batch_clips=b, frames=frames, what="ratio of CPU seconds")
    if not args.skip_kmeans:
        pts = args.kmeans_points or (1024 if args.quick else 8192 if cpu else 45056)
        iters = min(args.kmeans_iters, 5) if args.quick else args.kmeans_iters
        r = kmeans_refit(args.device, pts, iters)
        c = {"device": args.device, "k": 256, "dim": 6144, "points": pts, "iters_max": iters}
        emit(BENCH, "kmeans_refit_cold_s", r["refit_cold_s"], "s", **c, what="k-means++ init + Lloyd")
        emit(BENCH, "kmeans_refit_warm_s", r["refit_warm_s"], "s", **c, n_empty=r["n_empty"])


if __name__ == "__main__":
    main()
