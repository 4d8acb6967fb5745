"""Retrieval metric speed and memory at N = 10,000 (prints figures, asserts nothing).

Run from the repository root: ``python benchmarks/retrieval.py`` (``--n`` for another size). Peak
memory is measured with tracemalloc (numpy registers its buffers there), as the extra bytes allocated
beyond the input similarity matrix; torch CPU allocations are invisible to tracemalloc, so the torch
rows report the growth of the process's peak RSS instead (coarse: it only grows past earlier peaks).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.localization import ordered_step_assignment  # noqa: E402
from evaluation.retrieval import rank_of_true, retrieval_metrics, retrieval_report  # noqa: E402

N = 10_000
MIB = 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def timed_traced(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, float, Any]:
    """(best wall seconds, peak extra MiB seen by tracemalloc, result)."""
    best = float("inf")
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return best, peak / MIB, result


def main() -> None:
    global N
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=N, help=f"queries and clips (default {N})")
    N = ap.parse_args().n
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"numpy {np.__version__}, torch {torch.__version__}, torch threads {torch.get_num_threads()}")
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((N, N), dtype=np.float32)
    sim[np.arange(N), np.arange(N)] += 3.0  # a plausible score distribution (R@1 around 0.1)
    print(f"sim: {N} x {N} float32 = {sim.nbytes / MIB:.0f} MiB (not counted below)")
    print()
    print(f"{'case':48s} {'time s':>8s} {'extra MiB':>10s}")
    for ties in ("pessimistic", "optimistic", "average"):
        for chunk in (256, 1024, 4096):
            t, mem, _ = timed_traced(lambda: rank_of_true(sim, ties=ties, chunk_size=chunk))
            print(f"{f'rank_of_true numpy {ties} chunk={chunk}':48s} {t:8.3f} {mem:10.1f}")
    t, mem, metrics = timed_traced(lambda: retrieval_metrics(sim))
    print(f"{'retrieval_metrics numpy (defaults)':48s} {t:8.3f} {mem:10.1f}")
    print(f"  -> R@1 {metrics['R@1']:.4f} R@5 {metrics['R@5']:.4f} R@10 {metrics['R@10']:.4f} "
          f"MdR {metrics['median_rank']:.1f} MnR {metrics['mean_rank']:.1f}")

    sim_t = torch.from_numpy(sim)
    for chunk in (1024,):
        rss_before = _peak_rss_mib()
        start = time.perf_counter()
        ranks_t = rank_of_true(sim_t, chunk_size=chunk)
        t = time.perf_counter() - start
        print(f"{f'rank_of_true torch cpu pessimistic chunk={chunk}':48s} {t:8.3f} "
              f"{_peak_rss_mib() - rss_before:10.1f}  (peak RSS growth)")
    print(f"  torch and numpy ranks agree: {bool(np.array_equal(ranks_t, rank_of_true(sim)))}")

    # The reference approach for comparison: sort every row of the whole matrix (optimistic ties).
    def reference() -> np.ndarray:
        sx = np.sort(-sim, axis=1)
        d = -np.diag(sim)[:, None]
        return np.argmax(sx == d, axis=1)  # first match: optimistic rank

    t, mem, ref_ranks = timed_traced(reference, repeats=1)
    print(f"{'reference: full row sort (MIL-NCE metrics.py)':48s} {t:8.3f} {mem:10.1f}")
    same = bool(np.array_equal(ref_ranks, rank_of_true(sim, ties="optimistic")))
    print(f"  reference equals optimistic ranks: {same}")
    del sim, sim_t

    print()
    d = 512
    text, video, audio = (rng.standard_normal((N, d), dtype=np.float32) for _ in range(3))
    mask = rng.random(N) > 0.032
    t, mem, _ = timed_traced(lambda: retrieval_report(text, video, audio, audio_mask=mask), repeats=1)
    print(f"{f'retrieval_report N={N} D={d}, 3 modes':48s} {t:8.3f} {mem:10.1f}  (chunked; no N x N matrix)")

    scores = [rng.standard_normal((300, 10)) for _ in range(1000)]
    start = time.perf_counter()
    for s in scores:
        ordered_step_assignment(s)
    t = time.perf_counter() - start
    print(f"{'ordered_step_assignment 1000 x (T=300, S=10)':48s} {t:8.3f}")


if __name__ == "__main__":
    main()
