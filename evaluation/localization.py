"""Temporal action step localization (SPEC §6): CrossTask protocol and the Mining YouTube variant.

For each video, a ``(T, S)`` matrix scores every second ``t`` against every step text ``s`` of the
video's task. :func:`ordered_step_assignment` places each step exactly once, in the task's order, at
strictly increasing seconds, maximising the total score (dynamic programming, ``O(T * S)``).
:func:`crosstask_recall` then checks each placed second against the ground-truth intervals.

Mining YouTube uses the same procedure after a log-softmax over the steps at each second
(``mining_youtube=True``); the reference averaged its recall over all videos rather than per task,
which :func:`crosstask_recall` reproduces with ``task_of=None``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "crosstask_recall",
    "log_softmax_steps",
    "ordered_step_assignment",
    "second_in_interval",
]

ALL_VIDEOS = "all"
"""Task key used by :func:`crosstask_recall` when ``task_of`` is None."""


def log_softmax_steps(scores: np.ndarray) -> np.ndarray:
    """Log-softmax over the steps (axis 1) of a ``(T, S)`` score matrix, in float64."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"scores must be 2-D (T seconds, S steps), got shape {x.shape}")
    if x.shape[1] == 0:
        return x.copy()
    peak = np.max(x, axis=1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    shifted = x - peak
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def _increasing_placement(scores: np.ndarray) -> np.ndarray:
    """DP for ``T >= S``: steps at strictly increasing rows maximising the sum. Returns ``(S,)`` rows.

    ``best[t]`` is the best total for steps ``0..s`` with step ``s`` at row ``t``; for step ``s`` only
    rows ``s .. T - S + s`` are reachable. Ties are broken towards the earliest row at every
    back-pointer and at the final step (deterministic).
    """
    t_len, s_len = scores.shape
    back = np.zeros((s_len, t_len), dtype=np.int64)
    rows = np.arange(t_len)
    best = scores[:, 0].copy()
    best[t_len - s_len + 1 :] = -np.inf  # leave room for the later steps
    for s in range(1, s_len):
        # prefix maximum over t' < t of the previous step's totals, with its earliest argmax
        prev = np.concatenate(([-np.inf], best[:-1]))
        run_max = np.maximum.accumulate(prev)
        earlier = np.concatenate(([-np.inf], run_max[:-1]))
        new_max = prev > earlier
        # row s - 1 is the earliest one the previous step can reach: it is the fallback pointer, so
        # that even a row whose every predecessor scores -inf points to a valid, earlier row
        new_max[s] = True
        arg = np.maximum.accumulate(np.where(new_max, rows - 1, 0))
        back[s] = arg
        best = run_max + scores[:, s]
        best[:s] = -np.inf  # not enough earlier rows (already -inf by induction; kept explicit)
        best[t_len - s_len + s + 1 :] = -np.inf
    out = np.empty(s_len, dtype=np.int64)
    valid = np.arange(s_len - 1, t_len)
    out[-1] = valid[int(np.argmax(best[valid]))]
    for s in range(s_len - 1, 0, -1):
        out[s - 1] = back[s, out[s]]
    return out


def ordered_step_assignment(scores: np.ndarray, *, mining_youtube: bool = False) -> np.ndarray:
    """Place each step once, in order, at strictly increasing seconds, maximising the summed score.

    Args:
        scores: ``(T, S)`` score of step ``s`` at second ``t`` (higher is better; ``-inf`` allowed to
            forbid a placement, NaN and ``+inf`` are not).
        mining_youtube: apply :func:`log_softmax_steps` first (the Mining YouTube protocol).

    Returns:
        ``(S,)`` int64 seconds ``t_0 < t_1 < ... < t_{S-1}``. If ``T < S`` not every step can get its
        own second: then each of the ``T`` seconds gets exactly one step, steps still in order
        (the same DP on the transposed matrix, maximising the same sum), and the ``S - T`` steps left
        without a second get ``-1`` (they count as misses in :func:`crosstask_recall`).
        Among equal optima the earliest back-pointer wins (deterministic).
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"scores must be 2-D (T seconds, S steps), got shape {x.shape}")
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError("scores must be finite or -inf (NaN and +inf are not allowed)")
    if mining_youtube:
        x = log_softmax_steps(x)
    t_len, s_len = x.shape
    if s_len == 0:
        return np.empty(0, dtype=np.int64)
    if t_len >= s_len:
        return _increasing_placement(x)
    logger.debug("only %d seconds for %d steps: %d steps stay unplaced", t_len, s_len, s_len - t_len)
    out = np.full(s_len, -1, dtype=np.int64)
    if t_len == 0:
        return out
    step_of_second = _increasing_placement(x.T)  # (T,) strictly increasing steps
    out[step_of_second] = np.arange(t_len)
    return out


def second_in_interval(second: int, start: float, end: float) -> bool:
    """Whether the one-second bin ``[second, second + 1)`` overlaps the interval ``[start, end]``.

    Equivalently ``floor(start) <= second < ceil(end)``: the CrossTask ground truth marks the seconds
    ``floor(start) .. ceil(end) - 1`` of each annotated interval.
    """
    return second >= 0 and math.floor(start) <= second < math.ceil(end)


def crosstask_recall(
    pred: Mapping[str, Sequence[int] | np.ndarray],
    gt: Mapping[str, Sequence[tuple[int, float, float]]],
    task_of: Mapping[str, str] | None,
) -> dict[str, object]:
    """CrossTask step recall, averaged per video, then per task, then over tasks.

    Args:
        pred: video -> ``(S,)`` predicted second of each step (from :func:`ordered_step_assignment`;
            negative means not placed; floats are floored to the second that contains them).
        gt: video -> ``[(step_index (0-based), start_s, end_s), ...]``; a step may have several intervals.
        task_of: video -> task id. ``None`` puts every video in one group ``"all"`` (the reference's
            Mining YouTube number: a plain average over videos).

    Per video: recall = (# annotated steps whose predicted second is inside one of that step's
    intervals, see :func:`second_in_interval`) / (# distinct annotated steps). Videos of ``gt`` are
    evaluated; one without a prediction counts as recall 0 (logged), one with no annotated step or no
    task is skipped (logged). Predictions for videos absent from ``gt`` are ignored.

    Returns:
        ``{"recall": mean over tasks, "per_task": {task: mean over its videos}, "n_videos": evaluated
        videos, "per_task_videos": {task: count}, "n_missing_pred": videos of gt without prediction,
        "n_skipped": videos of gt that could not be evaluated}``. ``recall`` is NaN when no video is left.
    """
    per_task_values: dict[str, list[float]] = {}
    n_missing = 0
    n_skipped = 0
    for video, segments in gt.items():
        task = ALL_VIDEOS if task_of is None else task_of.get(video)
        if task is None:
            logger.warning("video %s has no task: skipped", video)
            n_skipped += 1
            continue
        steps = sorted({int(step) for step, _, _ in segments})
        if not steps:
            logger.warning("video %s has no annotated step: skipped", video)
            n_skipped += 1
            continue
        if video not in pred:
            logger.warning("video %s has no prediction: counted as recall 0", video)
            n_missing += 1
            per_task_values.setdefault(task, []).append(0.0)
            continue
        seconds = np.asarray(pred[video], dtype=np.float64).reshape(-1)
        hit = 0
        for step in steps:
            if step < 0 or step >= seconds.shape[0]:
                logger.warning("video %s: no prediction for step %d (%d given)", video, step, len(seconds))
                continue
            t = seconds[step]
            if not np.isfinite(t):
                continue
            second = int(math.floor(t))
            if any(s == step and second_in_interval(second, a, b) for s, a, b in segments):
                hit += 1
        per_task_values.setdefault(task, []).append(hit / len(steps))
    per_task = {task: float(np.mean(values)) for task, values in sorted(per_task_values.items())}
    recall = float(np.mean(list(per_task.values()))) if per_task else float("nan")
    return {
        "recall": recall,
        "per_task": per_task,
        "n_videos": sum(len(v) for v in per_task_values.values()),
        "per_task_videos": {task: len(values) for task, values in sorted(per_task_values.items())},
        "n_missing_pred": n_missing,
        "n_skipped": n_skipped,
    }
