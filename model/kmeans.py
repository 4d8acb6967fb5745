"""Online k-means on the fused MCN vectors: a FIFO queue of past batches, periodic warm-started refits.

Follows the reference (``train_tri_kmeans.py`` with ``fast_pytorch_kmeans``, cosine mode):

- assignment by cosine similarity (points and centroids L2-normalised for the assignment only);
- centroids are the means of the raw (un-normalised) member points, as fast_pytorch_kmeans computes
  them; they are what the cluster loss dots the embeddings with;
- every ``refit_every`` calls of :meth:`OnlineKMeans.step` (and on the first after a reset) Lloyd's
  algorithm runs on queue + current batch, warm-started from the previous centroids; in between, points
  go to the nearest fixed centroid.

The reference's ``KMeans(n_clusters, mode="cosine")`` (fast_pytorch_kmeans 0.1.x) starts from K
distinct random data points, runs at most 100 Lloyd iterations and stops after the update whose total
squared centroid shift ``Σ_k ‖c_k' − c_k‖²`` is ≤ 1e-4, and sets the centroid of a cluster that got no
point to the zero vector (its mean 0/0 = NaN is replaced by 0). ``init="random"``, ``iters=100``,
``stop="shift"``, ``shift_tol=1e-4``, ``empty="zero"`` reproduce that (configs/paper.yaml); the
defaults here are k-means++ seeding, at most 20 iterations stopping when no label changes, and
re-seeding empty clusters from the points farthest from their centroid (``empty="reseed"``).

Deliberate differences from the reference in every setting: a partly filled queue is used as it is
(the reference ignored the queue until it was full); the labels returned by a refit are those of the
final centroids (the reference returned those of the last assignment, one update earlier; equal when
the last shift is 0); the RNG is an explicit ``torch.Generator`` saved in :meth:`state_dict`.

Usage per training step: ``labels = km.step(fused)`` then ``km.push(km.queue_subset(fused, n_pair))``
(the reference clusters queue + batch before the batch enters the queue); ``km.new_epoch()`` at the
start of every epoch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KMeansConfig", "OnlineKMeans"]

logger = logging.getLogger(__name__)


@dataclass
class KMeansConfig:
    """Online k-means settings. K, queue and refit cadence default to the reference's (K 256, 20-batch
    queue, refit every 20); the Lloyd settings (init, iters, stop, empty) default to ours, and
    configs/paper.yaml sets the reference's (random, 100, shift ≤ 1e-4, zero): see the module docstring.
    """

    k: int = 256
    queue_batches: int = 20  # batches kept in the FIFO queue
    queue_clips_per_video: int = 16  # clips of every video that enter the queue (first ones of n_pair)
    refit_every: int = 20  # steps between full refits (a refit also happens on the first step)
    iters: int = 20  # max Lloyd iterations per refit (the reference: 100)
    # When a refit stops early: "labels": when at most ``tol`` × N labels changed since the previous
    # assignment; "shift" (the reference): after the update whose Σ_k ‖c_k' − c_k‖² (raw centroids,
    # the fused vectors' units squared) is ≤ ``shift_tol``.
    stop: Literal["labels", "shift"] = "labels"
    tol: float = 0.0  # stop "labels": fraction of labels changed (< 0: never stop early)
    shift_tol: float = 1e-4  # stop "shift": fast_pytorch_kmeans' default tol, which the reference used
    init: Literal["kmeans++", "random"] = "kmeans++"  # seeding when there are no centroids yet
    # A cluster left without points in a Lloyd iteration: "reseed" moves it onto the point farthest
    # from its centroid; "keep" leaves its centroid where it was; "zero" (the reference) sets it to 0.
    empty: Literal["reseed", "keep", "zero"] = "reseed"
    init_max_points: int = 4096  # k-means++ runs on a random subset of at most this many points
    init_proj_dim: int = 256  # ... in a random projection to this many dims (0: none); cosines ≈ kept
    reinit_each_epoch: bool = True  # new_epoch() drops the centroids (the queue is kept, as the reference)
    seed: int = 0
    chunk_size: int = 16384  # points per similarity block (bounds the N × K buffer)

    def __post_init__(self) -> None:
        if self.k < 1 or self.queue_batches < 0 or self.refit_every < 1 or self.iters < 1:
            raise ValueError(f"invalid k-means config: {self}")
        if self.init not in ("kmeans++", "random"):
            raise ValueError(f"init must be 'kmeans++' or 'random', got {self.init!r}")
        if self.stop not in ("labels", "shift"):
            raise ValueError(f"stop must be 'labels' or 'shift', got {self.stop!r}")
        if self.empty not in ("reseed", "keep", "zero"):
            raise ValueError(f"empty must be 'reseed', 'keep' or 'zero', got {self.empty!r}")


class OnlineKMeans:
    """Cosine k-means with a queue of past batches; see the module docstring.

    ``dim``: vector size D; ``device``: where queue, centroids and the computation live. Points are
    kept in float32 whatever the dtype of the input.
    """

    def __init__(self, cfg: KMeansConfig, dim: int, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.dim = dim
        self.device = torch.device(device)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(cfg.seed)
        self.centroids: Tensor | None = None  # (K, D) float32
        self.queue: list[Tensor] = []  # oldest first, each (n_i, D) float32
        self.calls = 0  # step() calls since the last reset / new epoch
        self.n_refits = 0
        self.last_fit_iters = 0  # Lloyd iterations of the last refit
        self._last: dict[str, Any] = {}

    # ------------------------------------------------------------------ queue
    def queue_subset(self, fused: Tensor, n_pair: int) -> Tensor:
        """The clips of a batch that enter the queue: the first ``queue_clips_per_video`` of every video.

        fused: (B·n_pair, D), clips of a video contiguous → (B·min(q, n_pair), D).
        """
        if fused.shape[0] % n_pair:
            raise ValueError(f"{fused.shape[0]} clips is not a multiple of n_pair = {n_pair}")
        q = min(self.cfg.queue_clips_per_video, n_pair)
        return fused.reshape(-1, n_pair, fused.shape[-1])[:, :q].reshape(-1, fused.shape[-1])

    def push(self, fused: Tensor) -> None:
        """Append (n, D) vectors (detached, copied) as one queue entry; drop the oldest beyond queue_batches."""
        if fused.dim() != 2 or fused.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}), got {tuple(fused.shape)}")
        if self.cfg.queue_batches == 0:
            return
        self.queue.append(fused.detach().to(self.device, torch.float32).clone())
        del self.queue[: max(0, len(self.queue) - self.cfg.queue_batches)]

    def queue_points(self) -> Tensor:
        """All queued vectors, oldest first: (N_q, D)."""
        if not self.queue:
            return torch.empty(0, self.dim, device=self.device)
        return torch.cat(self.queue)

    # ------------------------------------------------------------------ public steps
    def step(self, batch_fused: Tensor) -> Tensor:
        """Cluster labels (B,) int64 for the current batch (B, D), on the batch's device.

        Refits (Lloyd on queue + batch, warm start) on the first call after a reset and then every
        ``refit_every`` calls; otherwise assigns to the nearest fixed centroid.
        """
        if batch_fused.dim() != 2 or batch_fused.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}), got {tuple(batch_fused.shape)}")
        x = batch_fused.detach().to(self.device, torch.float32)
        refit = self.centroids is None or self.calls % self.cfg.refit_every == 0
        if refit:
            points = torch.cat([*self.queue, x]) if self.queue else x
            labels_all = self._fit(points)
            labels = labels_all[points.shape[0] - x.shape[0]:]
            counted = labels_all
            self.n_refits += 1
        else:
            assert self.centroids is not None
            labels, _ = self._assign(F.normalize(x, dim=1), self.centroids)
            counted = labels
        self.calls += 1
        sizes = torch.bincount(counted, minlength=self.cfg.k)
        self._last = {"refit": refit, "n_points": int(counted.numel()), "sizes": sizes.cpu()}
        return labels.to(batch_fused.device)

    def predict(self, x: Tensor) -> Tensor:
        """Nearest-centroid labels (N,) for (N, D) vectors; no state change."""
        if self.centroids is None:
            raise RuntimeError("no centroids yet: call step() first")
        labels, _ = self._assign(F.normalize(x.detach().to(self.device, torch.float32), dim=1), self.centroids)
        return labels.to(x.device)

    def new_epoch(self) -> None:
        """Start of an epoch: restart the refit cadence; drop the centroids if ``reinit_each_epoch``."""
        self.calls = 0
        if self.cfg.reinit_each_epoch:
            self.centroids = None

    def reset(self, clear_queue: bool = False) -> None:
        """Drop the centroids and restart the refit cadence (and empty the queue if asked)."""
        self.centroids = None
        self.calls = 0
        if clear_queue:
            self.queue.clear()

    def stats(self) -> dict[str, Any]:
        """Of the last step: refit (bool), n_points assigned (queue + batch on a refit, else the batch),
        sizes (list of K counts), n_empty, max_size; plus calls, n_refits, fit_iters (Lloyd iterations
        of the last refit) and queue_len (entries)."""
        out: dict[str, Any] = {
            "calls": self.calls,
            "n_refits": self.n_refits,
            "fit_iters": self.last_fit_iters,
            "queue_len": len(self.queue),
        }
        if self._last:
            sizes: Tensor = self._last["sizes"]
            out.update(
                refit=self._last["refit"],
                n_points=self._last["n_points"],
                sizes=sizes.tolist(),
                n_empty=int((sizes == 0).sum()),
                max_size=int(sizes.max()),
            )
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Centroids, queue, counters and RNG state (tensors and ints only: loads with weights_only)."""
        q = self.queue_points().cpu()
        return {
            "k": self.cfg.k,
            "dim": self.dim,
            "centroids": None if self.centroids is None else self.centroids.cpu().clone(),
            "queue": q,
            "queue_sizes": torch.tensor([e.shape[0] for e in self.queue], dtype=torch.long),
            "calls": self.calls,
            "n_refits": self.n_refits,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the next step() behaves exactly as it would have."""
        if int(state["k"]) != self.cfg.k or int(state["dim"]) != self.dim:
            raise ValueError(
                f"k-means state is for k={state['k']}, dim={state['dim']}; this one has k={self.cfg.k}, dim={self.dim}"
            )
        c = state["centroids"]
        self.centroids = None if c is None else c.to(self.device, torch.float32).clone()
        sizes = [int(s) for s in state["queue_sizes"].tolist()]
        q = state["queue"].to(self.device, torch.float32)
        if sum(sizes) != q.shape[0]:
            raise ValueError(f"queue sizes {sizes} do not add up to {q.shape[0]} rows")
        self.queue = [part.clone() for part in torch.split(q, sizes)] if sizes else []
        self.calls = int(state["calls"])
        self.n_refits = int(state["n_refits"])
        self.generator.set_state(state["generator"])
        self._last = {}

    # ------------------------------------------------------------------ algorithm
    def _assign(self, xn: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised points (N, D), centroids (K, D) → labels (N,), best cosine similarity (N,)."""
        cn = F.normalize(centroids, dim=1)
        labels = torch.empty(xn.shape[0], dtype=torch.long, device=xn.device)
        best = torch.empty(xn.shape[0], dtype=xn.dtype, device=xn.device)
        for s in range(0, xn.shape[0], self.cfg.chunk_size):
            sim = xn[s : s + self.cfg.chunk_size] @ cn.t()
            best[s : s + self.cfg.chunk_size], labels[s : s + self.cfg.chunk_size] = sim.max(dim=1)
        return labels, best

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _init_centroids(self, x: Tensor, xn: Tensor) -> Tensor:
        """K starting centroids (K, D), copies of data points: k-means++ (cosine distance) or random."""
        k, n = self.cfg.k, x.shape[0]
        if n < k:
            logger.warning("k-means: %d points for %d clusters; some clusters will stay empty", n, k)
            extra = torch.randint(n, (k - n,), generator=self.generator)
            idx = torch.cat([torch.randperm(n, generator=self.generator), extra])
            return x[idx.to(x.device)].clone()
        if self.cfg.init == "random":
            idx = torch.randperm(n, generator=self.generator)[:k]
            return x[idx.to(x.device)].clone()
        # Greedy k-means++ (as scikit-learn) on a random subset, with the cosine distance d = 1 - cos
        # (= half the squared Euclidean distance of the normalised points): each new centre is the best
        # of 2 + ln(k) candidates drawn ∝ d, "best" = lowest total distance afterwards. The k sequential
        # steps are memory-bound, so they run on a Gaussian random projection (Johnson–Lindenstrauss:
        # cosines are nearly preserved); the centres are the original points.
        m = min(n, max(k, self.cfg.init_max_points))
        n_trials = 2 + int(math.log(k))
        sub = torch.randperm(n, generator=self.generator)[:m].to(x.device)
        sn = xn[sub]
        if 0 < self.cfg.init_proj_dim < self.dim:
            proj = torch.randn(self.dim, self.cfg.init_proj_dim, generator=self.generator).to(sn)
            sn = F.normalize(sn @ proj, dim=1)
        chosen = [int(torch.randint(m, (), generator=self.generator))]
        d = (1.0 - sn @ sn[chosen[0]]).clamp_min(0)
        d[chosen[0]] = 0.0
        for _ in range(1, k):
            total = float(d.sum())
            if total <= 0.0:  # every remaining point coincides with a centre: pick any unchosen one
                free = torch.ones(m, dtype=torch.bool)
                free[chosen] = False
                cand = free.nonzero().squeeze(1)
                nxt = int(cand[int(self._rand() * cand.numel()) % cand.numel()])
                d = torch.minimum(d, (1.0 - sn @ sn[nxt]).clamp_min(0))
            else:
                u = (torch.rand(n_trials, generator=self.generator, dtype=torch.float64) * total).to(d)
                cand = torch.searchsorted(torch.cumsum(d, 0), u, right=True).clamp_(max=m - 1)
                new_d = torch.minimum(d[:, None], (1.0 - sn @ sn[cand].t()).clamp_min(0))  # (m, trials)
                best = int(torch.argmin(new_d.sum(0)))
                nxt = int(cand[best])
                d = new_d[:, best].contiguous()
            d[nxt] = 0.0
            chosen.append(nxt)
        return x[sub[torch.tensor(chosen, device=x.device)]].clone()

    def _reseed_empty(self, x: Tensor, labels: Tensor, best: Tensor, centroids: Tensor) -> int:
        """Move each empty cluster onto the point farthest from its centroid (its cluster keeps ≥ 1 member).

        Modifies ``labels`` and ``centroids`` in place; returns the number of clusters re-seeded.
        """
        counts = torch.bincount(labels, minlength=self.cfg.k)
        empty = (counts == 0).nonzero().squeeze(1).tolist()
        if not empty:
            return 0
        counts_l = counts.tolist()
        labels_l = labels.tolist()
        order = torch.argsort(best, stable=True).tolist()  # least similar first
        done = 0
        for i in order:
            if done == len(empty):
                break
            old = labels_l[i]
            if counts_l[old] <= 1:
                continue
            j = empty[done]
            counts_l[old] -= 1
            counts_l[j] += 1
            labels_l[i] = j
            labels[i] = j
            centroids[j] = x[i]
            best[i] = 1.0
            done += 1
        return done

    def _fit(self, x: Tensor) -> Tensor:
        """Lloyd iterations on x (N, D); sets self.centroids; returns labels (N,) of the final centroids.

        Each iteration assigns every point to its nearest centroid (cosine), then moves every centroid
        to the mean of its raw members; ``cfg.stop`` / ``cfg.empty`` choose the stopping rule and what
        an empty cluster's centroid becomes (see :class:`KMeansConfig`). ``last_fit_iters`` counts the
        assignments made inside the loop.
        """
        if x.shape[0] == 0:
            raise ValueError("k-means refit on zero points")
        cfg = self.cfg
        xn = F.normalize(x, dim=1)
        c = self._init_centroids(x, xn) if self.centroids is None else self.centroids.clone()
        prev: Tensor | None = None
        n_reseeded = 0
        converged = False  # True: ``labels`` are already the assignment to the final ``c``
        self.last_fit_iters = 0
        for _ in range(cfg.iters):
            labels, best = self._assign(xn, c)
            if cfg.empty == "reseed":
                n_reseeded += self._reseed_empty(x, labels, best, c)
            self.last_fit_iters += 1
            if cfg.stop == "labels" and prev is not None and int((labels != prev).sum()) <= cfg.tol * labels.numel():
                converged = True  # labels are the assignment to the current centroids c
                break
            counts = torch.bincount(labels, minlength=cfg.k)
            sums = torch.zeros_like(c).index_add_(0, labels, x)
            nonempty = counts > 0
            new = c.clone()
            new[nonempty] = sums[nonempty] / counts[nonempty, None].to(c.dtype)
            if cfg.empty == "zero":
                new[~nonempty] = 0.0
            if cfg.stop == "shift":
                shift = float((new - c).pow(2).sum())
                c = new
                if shift <= cfg.shift_tol:
                    converged = shift == 0.0  # otherwise the labels are of the centroids before the update
                    break
            else:
                c = new
                prev = labels
        if not converged:
            labels, best = self._assign(xn, c)
            if cfg.empty == "reseed":
                n_reseeded += self._reseed_empty(x, labels, best, c)
        if n_reseeded:
            logger.debug("k-means refit re-seeded %d empty clusters", n_reseeded)
        self.centroids = c
        return labels
