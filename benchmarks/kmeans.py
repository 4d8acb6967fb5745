"""Online k-means refit time at the reference scale: queue (20 batches × 2048 clips) + batch (4096 clips)
= 45,056 points × 6144 dims, K = 256. Prints seconds; asserts nothing.

    .venv/bin/python benchmarks/kmeans.py [--device cuda] [--iters 20] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from model.kmeans import KMeansConfig, OnlineKMeans

log = logging.getLogger("benchmarks.kmeans")


def synthetic(n: int, dim: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """n points around k random directions (noise comparable to the signal: k-means has work to do)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g)
    labels = torch.randint(k, (n,), generator=g)
    x = centres[labels]
    x.add_(torch.randn(n, dim, generator=g), alpha=1.5)
    return x.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queue", type=int, default=20 * 2048, help="queued points (20 batches × 128 videos × 16 clips)")
    ap.add_argument("--batch", type=int, default=4096, help="current batch (128 videos × 32 clips)")
    ap.add_argument("--dim", type=int, default=6144)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20, help="Lloyd iterations per refit (no early stop)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    n = args.queue + args.batch
    log.info("data: %d points × %d dims, K = %d, device %s, %d CPU threads", n, args.dim, args.k, device,
             torch.get_num_threads())
    x = synthetic(n, args.dim, args.k, args.seed, device)
    queue, batch = x[: args.queue], x[args.queue:]

    # tol < 0: never stop early, so the figure is for exactly --iters iterations.
    cfg = KMeansConfig(k=args.k, queue_batches=1, refit_every=2, iters=args.iters, tol=-1.0, seed=args.seed)
    km = OnlineKMeans(cfg, dim=args.dim, device=device)
    km.push(queue)

    def timed(fn: object) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one call."""
        sync(device)
        w, c = time.perf_counter(), time.process_time()
        fn()  # type: ignore[operator]
        sync(device)
        return time.perf_counter() - w, time.process_time() - c

    cold = timed(lambda: km.step(batch))  # first step: k-means++ seeding + Lloyd on queue + batch
    assign = timed(lambda: km.step(batch))  # in-between step: nearest fixed centroid, batch only
    warm = timed(lambda: km.step(batch))  # periodic refit, warm-started from the previous centroids
    st = km.stats()
    it = max(1, st["fit_iters"])

    print(f"refit (warm start, {st['fit_iters']} Lloyd iterations, {n} x {args.dim}, K={args.k}, {device}): "
          f"{warm[0]:.2f} s wall, {warm[1]:.2f} s CPU ({warm[0] / it:.3f} s wall / iteration)")
    print(f"first refit (k-means++ seeding + {args.iters} iterations): {cold[0]:.2f} s wall, {cold[1]:.2f} s CPU")
    print(f"assignment of one batch ({args.batch} points) to fixed centroids: {assign[0]:.3f} s wall")
    print(f"empty clusters after refit: {st['n_empty']}, largest cluster: {st['max_size']}")


if __name__ == "__main__":
    main()
