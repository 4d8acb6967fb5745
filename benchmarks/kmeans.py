"""Online k-means refit time at the reference scale: queue (20 batches × 2048 clips) + batch (4096 clips)
= 45,056 points × 6144 dims, K = 256 (prints figures, asserts nothing).

    .venv/bin/python benchmarks/kmeans.py [--device cuda] [--iters 20] [--threads N] [--json] [--quick]

``--quick``: 4,096 + 1,024 points × 512 dims, K = 32, 5 iterations (a smoke run of the GPU suite).
Figures: the warm-started periodic refit (wall and CPU seconds, and per Lloyd iteration), the first
refit (k-means++ seeding + iterations), the assignment of one batch to fixed centroids, and the
arithmetic rate of the warm refit (2·N·D·K FLOPs per iteration for the distance products).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import emit, parser, use_json  # noqa: E402
from model.kmeans import KMeansConfig, OnlineKMeans  # noqa: E402

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
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--queue", type=int, default=None,
                    help="queued points (default 20 batches × 128 videos × 16 clips = 40,960; --quick 4,096)")
    ap.add_argument("--batch", type=int, default=None,
                    help="current batch (default 128 videos × 32 clips = 4,096)")
    ap.add_argument("--dim", type=int, default=None, help="default 6144 (--quick 512)")
    ap.add_argument("--k", type=int, default=None, help="default 256 (--quick 32)")
    ap.add_argument("--iters", type=int, default=None,
                    help="Lloyd iterations per refit, no early stop (default 20, --quick 5)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    use_json(args.json)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quick = args.quick
    queue_n = args.queue or (4096 if quick else 20 * 2048)
    batch_n = args.batch or (1024 if quick else 4096)
    dim = args.dim or (512 if quick else 6144)
    k = args.k or (32 if quick else 256)
    iters = args.iters or (5 if quick else 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    n = queue_n + batch_n
    log.info("data: %d points × %d dims, K = %d, device %s, %d CPU threads", n, dim, k, device,
             torch.get_num_threads())
    x = synthetic(n, dim, k, args.seed, device)
    queue, batch = x[:queue_n], x[queue_n:]

    # tol < 0: never stop early, so the figure is for exactly `iters` iterations.
    cfg = KMeansConfig(k=k, queue_batches=1, refit_every=2, iters=iters, tol=-1.0, seed=args.seed)
    km = OnlineKMeans(cfg, dim=dim, device=device)
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
    cond = {"device": str(device), "points": n, "dim": dim, "k": k, "iters": int(st["fit_iters"]),
            "threads": torch.get_num_threads()}
    emit("kmeans", "refit_s", round(warm[0], 4), "s", cpu_s=round(warm[1], 3), **cond)
    emit("kmeans", "refit_s_per_iter", round(warm[0] / it, 5), "s", **cond)
    emit("kmeans", "refit_tflops", round(2 * n * dim * k * it / warm[0] / 1e12, 3), "TFLOP/s", **cond)
    emit("kmeans", "first_refit_s", round(cold[0], 4), "s", cpu_s=round(cold[1], 3), **cond)
    emit("kmeans", "assign_batch_s", round(assign[0], 5), "s", batch=batch_n, **cond)
    emit("kmeans", "empty_clusters", int(st["n_empty"]), "clusters", largest=int(st["max_size"]), **cond)


if __name__ == "__main__":
    main()
