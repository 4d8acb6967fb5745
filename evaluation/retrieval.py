"""Zero-shot retrieval metrics (SPEC §6): rank of the true item, R@K, median and mean rank.

Conventions, shared by every function here:

- ``sim`` is an ``(N, M)`` score matrix (numpy array or torch tensor, any device), rows are queries,
  columns are candidates, and ``sim[i, i]`` is the true pair of query ``i`` (so ``N <= M``).
- The *rank* of a query is the 0-based position of its true item once the row is sorted by decreasing
  score: 0 means retrieved first. ``R@K`` is the fraction of queries with ``rank < K``; the median and
  mean rank are reported 1-based (``median(rank) + 1``, ``mean(rank) + 1``), as in the reference code.
- Queries of a test set that could not be evaluated (``n_total > N``, MSR-VTT 1k-A: 968 of 1000 clips
  have audio) count as misses in the recalls, which are divided by ``n_total`` as the reference did.
  ``median_rank`` and ``mean_rank`` are taken over the ``N`` evaluated queries (the reference's
  convention); ``median_rank_all`` and ``mean_rank_all`` over all ``n_total``, each missing query at
  the worst rank (1-based ``M + 1``: its true item is not among the ``M`` candidates).
- Ties: ``"pessimistic"`` ranks the true item after every other item whose score is ``>=`` its own,
  ``"optimistic"`` only after the strictly greater ones, ``"average"`` takes the mean of the two (the
  expected rank under a random order of the tied items). The reference implementation
  (``np.where(sort(-x) - diag == 0)``) is optimistic and breaks on ties; pessimistic is our default
  because it cannot be gamed by a degenerate model that gives every item the same score.
- NaN scores count as the worst possible score, below every number (``-inf`` included): a NaN
  candidate never ranks before a real true score; a NaN true score ranks after every non-NaN
  candidate, and ties with the other NaN candidates.

Rows are processed in chunks of ``chunk_size``, so apart from ``sim`` itself at most a couple of
``chunk_size x M`` boolean arrays (and, for torch inputs off the CPU, nothing on the host but the
per-row counts) are alive at once.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch

from evaluation.scoring import fused_targets

logger = logging.getLogger(__name__)

Ties = Literal["pessimistic", "optimistic", "average"]
_TIES: tuple[str, ...] = ("pessimistic", "optimistic", "average")
RECALL_KS: tuple[int, ...] = (1, 5, 10)

__all__ = [
    "RECALL_KS",
    "Ties",
    "rank_of_true",
    "retrieval_metrics",
    "retrieval_report",
    "similarity",
]


def _check_sim(sim: Any) -> tuple[int, int]:
    if not isinstance(sim, (np.ndarray, torch.Tensor)):
        raise TypeError(f"sim must be a numpy array or a torch tensor, got {type(sim).__name__}")
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D (N queries, M candidates), got shape {tuple(sim.shape)}")
    n, m = int(sim.shape[0]), int(sim.shape[1])
    if n > m:
        raise ValueError(f"sim has more queries than candidates ({n} > {m}): the diagonal is the true pair")
    if isinstance(sim, np.ndarray):
        real = np.issubdtype(sim.dtype, np.integer) or np.issubdtype(sim.dtype, np.floating)
    else:
        real = sim.dtype != torch.bool and not sim.is_complex()
    if not real:
        raise TypeError(f"sim must hold real numbers, got dtype {sim.dtype}")
    return n, m


def _chunk_counts_numpy(block: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of other items strictly greater / greater-or-equal than the true one, per row."""
    rows = np.arange(block.shape[0])
    true = block[rows, rows + start][:, None]
    greater = np.count_nonzero(block > true, axis=1)
    greater_equal = np.count_nonzero(block >= true, axis=1) - 1  # the true item is >= itself
    nan_true = np.isnan(true[:, 0]) if np.issubdtype(block.dtype, np.floating) else None
    if nan_true is not None and nan_true.any():
        # NaN true score: worst of all. Every non-NaN item is strictly better; NaN items tie.
        m = block.shape[1]
        sub = block[nan_true]
        n_nan = np.count_nonzero(np.isnan(sub), axis=1)  # includes the true item itself
        greater[nan_true] = m - n_nan
        greater_equal[nan_true] = m - 1
    return greater, greater_equal


def _chunk_counts_torch(block: torch.Tensor, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Same as :func:`_chunk_counts_numpy`, on the tensor's device (used for GPU tensors)."""
    rows = torch.arange(block.shape[0], device=block.device)
    true = block[rows, rows + start].unsqueeze(1)
    greater = torch.count_nonzero(block > true, dim=1)
    greater_equal = torch.count_nonzero(block >= true, dim=1) - 1
    if block.is_floating_point():
        nan_true = torch.isnan(true[:, 0])
        if bool(nan_true.any()):
            m = block.shape[1]
            n_nan = torch.count_nonzero(torch.isnan(block[nan_true]), dim=1)
            greater[nan_true] = m - n_nan
            greater_equal[nan_true] = m - 1
    return greater.cpu().numpy(), greater_equal.cpu().numpy()


def _chunk_counts(block: np.ndarray | torch.Tensor, start: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(block, np.ndarray):
        return _chunk_counts_numpy(block, start)
    block = block.detach()
    if block.device.type != "cpu":
        return _chunk_counts_torch(block, start)
    if block.dtype == torch.bfloat16:  # no numpy equivalent; the float32 copy is exact
        block = block.float()
    return _chunk_counts_numpy(block.numpy(), start)  # zero-copy view; numpy is faster on CPU


def _check_ranking_args(ties: str, chunk_size: int) -> int:
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _combine(greater: np.ndarray, greater_equal: np.ndarray, ties: str) -> np.ndarray:
    if ties == "pessimistic":
        return greater_equal
    if ties == "optimistic":
        return greater
    return (greater + greater_equal) / 2.0


def rank_of_true(
    sim: np.ndarray | torch.Tensor, ties: Ties = "pessimistic", chunk_size: int = 1024
) -> np.ndarray:
    """0-based rank of the true item ``sim[i, i]`` in each row.

    Args:
        sim: ``(N, M)`` scores, ``N <= M``; numpy array or torch tensor (a GPU tensor is ranked on its
            device and only the per-row counts come back).
        ties: ``"pessimistic"``, ``"optimistic"`` or ``"average"`` (see the module docstring).
        chunk_size: rows processed at once (memory ``O(chunk_size * M)`` besides ``sim``).

    Returns:
        ``(N,)`` float64 ranks in ``[0, M - 1]`` (integers unless ``ties="average"``).
    """
    chunk_size = _check_ranking_args(ties, chunk_size)
    n, _ = _check_sim(sim)
    ranks = np.empty(n, dtype=np.float64)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            ranks[start:stop] = _combine(*_chunk_counts(sim[start:stop], start), ties)
    return ranks


def _ranks_from_embeddings(
    queries: np.ndarray, candidates: np.ndarray, ties: str, chunk_size: int
) -> np.ndarray:
    """:func:`rank_of_true` of ``queries @ candidates.T`` without materialising the whole matrix."""
    n = queries.shape[0]
    ranks = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = queries[start:stop] @ candidates.T
        ranks[start:stop] = _combine(*_chunk_counts_numpy(block, start), ties)
    return ranks


def retrieval_metrics(
    sim: np.ndarray | torch.Tensor,
    *,
    ties: Ties = "pessimistic",
    n_total: int | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """R@1/5/10, median and mean rank of the true pairs on the diagonal of ``sim``.

    Args:
        sim: ``(N, M)`` scores, rows are queries, ``sim[i, i]`` the true pair (``N <= M``).
        ties: tie handling, see the module docstring.
        n_total: size of the full test set when only ``N`` of its queries could be evaluated (MSR-VTT
            1k-A: 968 of 1000 clips have audio); None: ``N``. The ``n_total - N`` missing queries count
            as misses: recall is divided by ``n_total``.
        chunk_size: rows processed at once.

    Returns:
        ``{"R@1", "R@5", "R@10"}`` fractions in ``[0, 1]``; ``"median_rank"``, ``"mean_rank"`` (1-based,
        over the ``N`` evaluated queries, as the reference); ``"n_queries"`` (``N``, queries evaluated)
        and ``"n_total"`` (denominator of the recalls). When ``n_total`` is given, also
        ``"median_rank_all"`` and ``"mean_rank_all"``: over all ``n_total`` queries, each missing one
        at the 0-based rank ``M`` (all ``M`` candidates rank before it: 1-based ``M + 1``).
    """
    n, m = _check_sim(sim)
    _check_total(n, n_total)
    return _metrics_from_ranks(rank_of_true(sim, ties=ties, chunk_size=chunk_size), m, n_total)


def _check_total(n: int, n_total: int | None) -> int:
    total = n if n_total is None else int(n_total)
    if total < n:
        raise ValueError(f"n_total ({total}) is smaller than the number of queries ({n})")
    if total == 0:
        raise ValueError("cannot compute retrieval metrics without any query")
    return total


def _metrics_from_ranks(ranks: np.ndarray, m: int, n_total: int | None) -> dict[str, float]:
    """Metrics from ``(N,)`` 0-based ranks among ``m`` candidates (see :func:`retrieval_metrics`);
    the ``*_rank_all`` keys are added when ``n_total`` is given."""
    n = ranks.shape[0]
    total = _check_total(n, n_total)
    n_missing = total - n
    if n_missing:
        logger.info("counting %d of %d queries that were not evaluated as misses", n_missing, total)
    out: dict[str, float] = {f"R@{k}": float(np.count_nonzero(ranks < k)) / total for k in RECALL_KS}
    out["median_rank"] = float(np.median(ranks)) + 1.0 if n else float("nan")
    out["mean_rank"] = float(np.mean(ranks)) + 1.0 if n else float("nan")
    if n_total is not None:
        all_ranks = np.concatenate([ranks, np.full(n_missing, float(m))])
        out["median_rank_all"] = float(np.median(all_ranks)) + 1.0
        out["mean_rank_all"] = float(np.mean(all_ranks)) + 1.0
    out["n_queries"] = n
    out["n_total"] = total
    return out


def _to_numpy(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {arr.shape}")
    return arr


def similarity(text_emb: np.ndarray | torch.Tensor, video_emb: np.ndarray | torch.Tensor) -> np.ndarray:
    """Dot products ``text_emb @ video_emb.T``: ``(N, D) x (M, D) -> (N, M)`` (no normalisation)."""
    t = _to_numpy(text_emb, "text_emb")
    v = _to_numpy(video_emb, "video_emb")
    if t.shape[1] != v.shape[1]:
        raise ValueError(f"embedding sizes differ: text {t.shape} vs video {v.shape}")
    return t @ v.T


def retrieval_report(
    text: np.ndarray | torch.Tensor,
    video: np.ndarray | torch.Tensor,
    audio: np.ndarray | torch.Tensor | None = None,
    audio_mask: np.ndarray | torch.Tensor | None = None,
    n_total: int | None = None,
    *,
    ties: Ties = "pessimistic",
    chunk_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """The paper's retrieval modes on one test set of ``N`` aligned (text, video[, audio]) clips.

    Args:
        text, video: ``(N, D)`` embeddings; row ``i`` of each belongs to clip ``i``.
        audio: optional ``(N, D)`` audio embeddings; the video+audio side is ``video + audio``.
        audio_mask: optional ``(N,)`` bool, True where clip ``i`` has audio (default: all True).
            Clips without audio are dropped from text->video+audio, as queries and as candidates,
            and counted as misses through ``n_total`` (what the reference did for MSR-VTT).
        n_total: size of the full test set if some clips are already missing from ``text``/``video``
            (default ``N``); every mode divides its recalls by it.

    Returns:
        ``{"text_to_video": m, "video_to_text": m}`` plus ``"text_to_video_audio"`` when ``audio``
        is given, each ``m`` as from :func:`retrieval_metrics` on the dot-product matrix (text->video:
        ``text @ video.T``; video->text: its transpose, the videos are the queries). The similarity
        rows are computed ``chunk_size`` queries at a time: the ``N x N`` matrix never exists whole.
        ``median_rank_all`` / ``mean_rank_all`` are in a mode's metrics when ``n_total`` is given or
        (text->video+audio) some clips have no audio. If no clip has audio, text->video+audio has
        recalls 0 and NaN ranks.
    """
    chunk_size = _check_ranking_args(ties, chunk_size)
    t = _to_numpy(text, "text")
    v = _to_numpy(video, "video")
    if t.shape != v.shape:
        raise ValueError(f"text {t.shape} and video {v.shape} must have the same shape (N, D)")
    n = t.shape[0]
    total = _check_total(n, n_total)
    report: dict[str, dict[str, float]] = {
        "text_to_video": _metrics_from_ranks(_ranks_from_embeddings(t, v, ties, chunk_size), n, n_total),
    }
    if audio is not None:
        a = _to_numpy(audio, "audio")
        if a.shape != v.shape:
            raise ValueError(f"audio {a.shape} must have the same shape as video {v.shape}")
        keep = np.ones(n, dtype=bool) if audio_mask is None else _mask_to_numpy(audio_mask, n)
        n_kept = int(keep.sum())
        if n_kept < n:
            logger.info("text->video+audio: %d of %d clips have no audio and count as misses", n - n_kept, n)
        if n_kept == 0:
            report["text_to_video_audio"] = _all_missing(total)
        else:
            ranks = _ranks_from_embeddings(t[keep], fused_targets(v[keep], a[keep]), ties, chunk_size)
            counted = total if n_total is not None or n_kept < n else None
            report["text_to_video_audio"] = _metrics_from_ranks(ranks, n_kept, counted)
    report["video_to_text"] = _metrics_from_ranks(_ranks_from_embeddings(v, t, ties, chunk_size), n, n_total)
    return report


def _mask_to_numpy(mask: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    keep = np.asarray(mask)
    if keep.shape != (n,):
        raise ValueError(f"audio_mask must have shape ({n},), got {keep.shape}")
    if keep.dtype != np.bool_:
        if not np.isin(keep, (0, 1)).all():
            raise ValueError("audio_mask must be boolean (or 0/1)")
        keep = keep.astype(bool)
    return keep


def _all_missing(total: int) -> dict[str, float]:
    """Metrics when no query could be evaluated: every query is a miss (rank = worst, undefined M)."""
    out: dict[str, float] = {f"R@{k}": 0.0 for k in RECALL_KS}
    for key in ("median_rank", "mean_rank", "median_rank_all", "mean_rank_all"):
        out[key] = float("nan")
    out["n_queries"] = 0
    out["n_total"] = total
    return out
