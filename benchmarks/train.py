"""One MCN training step at the paper's dimensions on synthetic tensors (no data loading).

Embedding 6144, video 4096, audio 40 × 1000 log-mel frames, text 20 × 300, n_pair 32; the step is
:meth:`model.train.Trainer.train_step` (forward, k-means assignment, losses, backward, Adam). Prints the
median seconds per step, clips per second and peak memory for each batch size (in clips), each in a
fresh subprocess so that peak RSS belongs to that batch size; then one k-means refit. Asserts nothing.

    .venv/bin/python benchmarks/train.py                                # CPU, batches 64 and 256 clips
    .venv/bin/python benchmarks/train.py --device cuda --batch 4096     # one GPU, bf16 autocast
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

import torch  # noqa: E402

from model.data import DataConfig  # noqa: E402
from model.kmeans import KMeansConfig, OnlineKMeans  # noqa: E402
from model.mcn import MCNConfig  # noqa: E402
from model.train import TrainConfig, Trainer  # noqa: E402

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
    cfg = TrainConfig(batch_size=max(1, args.batch // N_PAIR), warmup_steps=0, amp=not args.no_amp,
                      device=args.device, progress=False, tensorboard=False,
                      model=MCNConfig(), kmeans=KMeansConfig(refit_every=10**9),
                      data=DataConfig(n_pair=N_PAIR))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, total_steps=10**6, device=device)
    build_s = time.perf_counter() - t0
    batch = synthetic_batch(args.batch, args.frames)
    times = []
    for i in range(args.warmup + args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.train_step(batch)  # first step: k-means refit on the batch (warm-up, untimed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    out = {"batch_clips": args.batch, "device": str(device), "steps_timed": len(times), "median_s": med,
           "min_s": min(times), "clips_per_s": args.batch / med, "build_s": build_s,
           "peak_rss_gib": _peak_rss_gib(), "threads": torch.get_num_threads(),
           "amp": trainer.autocast, "params": sum(p.numel() for p in trainer.model.parameters())}
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="clips per step (default: 64 256 on CPU, 4096 on CUDA)")
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--kmeans-points", type=int, default=None,
                   help="points of the refit timing (default 8192 on CPU; 45056 = reference queue + batch "
                   "on CUDA)")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--skip-kmeans", action="store_true")
    p.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args._one:
        args.batch = args.batch[0]
        print(json.dumps(one(args)))
        return
    batches = args.batch or ([64, 256] if args.device == "cpu" else [4096])
    print(f"MCN train step, paper dims (D 6144, video 4096, audio 40x{args.frames}, text 20x300), "
          f"device {args.device}, {args.repeat} timed step(s) after {args.warmup} warm-up")
    for b in batches:
        cmd = [sys.executable, __file__, "--_one", "--device", args.device, "--batch", str(b), "--frames",
               str(args.frames), "--repeat", str(args.repeat), "--warmup", str(args.warmup)]
        if args.no_amp:
            cmd.append("--no-amp")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"batch {b}: failed\n{res.stderr[-2000:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        extra = f", peak CUDA {r['peak_cuda_gib']:.1f} GiB ({r['gpu']})" if "peak_cuda_gib" in r else ""
        print(f"batch {b:5d} clips: median {r['median_s']:.2f} s/step (min {r['min_s']:.2f}), "
              f"{r['clips_per_s']:.1f} clips/s, peak RSS {r['peak_rss_gib']:.2f} GiB{extra}, "
              f"{r['threads']} threads, amp {r['amp']}, {r['params']:,} params")
    if not args.skip_kmeans:
        pts = args.kmeans_points or (8192 if args.device == "cpu" else 45056)
        r = kmeans_refit(args.device, pts, args.kmeans_iters)
        print(f"k-means refit (K 256, D 6144, {pts} points, ≤{args.kmeans_iters} Lloyd iterations): "
              f"cold (k-means++ init) {r['refit_cold_s']:.2f} s, warm-started {r['refit_warm_s']:.2f} s, "
              f"{r['n_empty']} empty clusters")


if __name__ == "__main__":
    main()
