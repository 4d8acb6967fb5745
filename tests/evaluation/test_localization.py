"""Step localization: DP against brute force, hand-made optima, CrossTask recall on a hand case."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from evaluation.localization import (
    crosstask_recall,
    log_softmax_steps,
    ordered_step_assignment,
    second_in_interval,
)


def brute_force(scores: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """Best total and placement over all strictly increasing placements (T >= S)."""
    t_len, s_len = scores.shape
    best = max(
        itertools.combinations(range(t_len), s_len),
        key=lambda ts: sum(scores[t, s] for s, t in enumerate(ts)),
    )
    return sum(scores[t, s] for s, t in enumerate(best)), best


def total(scores: np.ndarray, placement: np.ndarray) -> float:
    return sum(scores[t, s] for s, t in enumerate(placement) if t >= 0)


@pytest.mark.parametrize("seed", range(40))
def test_dp_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s_len = int(rng.integers(1, 5))
    t_len = int(rng.integers(s_len, 9))
    scores = rng.normal(size=(t_len, s_len))
    got = ordered_step_assignment(scores)
    best_total, best_placement = brute_force(scores)
    assert got.dtype == np.int64 and got.shape == (s_len,)
    assert np.all(np.diff(got) > 0) and got[0] >= 0 and got[-1] < t_len
    assert total(scores, got) == pytest.approx(best_total)
    assert tuple(got) == best_placement  # continuous scores: the optimum is unique


def test_dp_hand_made_optimum() -> None:
    # Per-step argmax (greedy) would put step 0 at t=3 and step 1 at t=0: out of order.
    scores = np.array(
        [
            [0.0, 9.0, 0.0],
            [1.0, 0.0, 0.0],
            [0.0, 5.0, 0.0],
            [8.0, 0.0, 4.0],
            [0.0, 0.0, 3.0],
        ]
    )
    # Candidates: (3, ?, ?) leaves no room for step 1 before step 2 -> (1, 2, 3) = 1 + 5 + 4 = 10,
    # (0, ..) gives 0 + 5 + 4; (3, 4, ...) impossible. Best is (1, 2, 3).
    np.testing.assert_array_equal(ordered_step_assignment(scores), [1, 2, 3])
    # With room to spare, the step-2 peak and the step-0 peak are both reachable.
    scores2 = np.array([[5.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 7.0]])
    np.testing.assert_array_equal(ordered_step_assignment(scores2), [0, 3])


def test_dp_ties_pick_earliest_and_forbidden_cells_stay_valid() -> None:
    np.testing.assert_array_equal(ordered_step_assignment(np.zeros((6, 3))), [0, 1, 2])
    everything_forbidden = np.full((5, 3), -np.inf)
    got = ordered_step_assignment(everything_forbidden)
    assert np.all(np.diff(got) > 0) and got[0] >= 0 and got[-1] < 5
    # -inf forbids a cell: step 1 cannot be at t = 2 although its score is otherwise best there.
    scores = np.array([[1.0, 0.0], [0.0, 0.5], [0.0, -np.inf], [0.0, 0.0]])
    np.testing.assert_array_equal(ordered_step_assignment(scores), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        ordered_step_assignment(np.array([[np.nan]]))
    with pytest.raises(ValueError, match="inf"):
        ordered_step_assignment(np.array([[np.inf, 0.0]]))


def test_more_steps_than_seconds() -> None:
    # T = 2 < S = 4: each second gets one step, steps still in order, the rest are -1.
    scores = np.array([[0.0, 3.0, 1.0, 0.0], [0.0, 0.0, 2.0, 5.0]])
    np.testing.assert_array_equal(ordered_step_assignment(scores), [-1, 0, -1, 1])
    assert ordered_step_assignment(np.zeros((0, 3))).tolist() == [-1, -1, -1]
    assert ordered_step_assignment(np.zeros((4, 0))).shape == (0,)


@pytest.mark.parametrize("seed", range(15))
def test_more_steps_than_seconds_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    t_len = int(rng.integers(1, 4))
    s_len = int(rng.integers(t_len + 1, 7))
    scores = rng.normal(size=(t_len, s_len))
    best = max(
        itertools.combinations(range(s_len), t_len),
        key=lambda ss: sum(scores[t, s] for t, s in enumerate(ss)),
    )
    expected = np.full(s_len, -1)
    expected[list(best)] = np.arange(t_len)
    np.testing.assert_array_equal(ordered_step_assignment(scores), expected)


def test_log_softmax_steps() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 4)) * 10
    got = log_softmax_steps(x)
    np.testing.assert_allclose(got, torch.log_softmax(torch.from_numpy(x), dim=1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0)
    # by hand: [0, ln 3] -> [-ln 4, ln 3 - ln 4]
    by_hand = [[-math.log(4), math.log(0.75)]]
    np.testing.assert_allclose(log_softmax_steps(np.array([[0.0, math.log(3)]])), by_hand)


def test_mining_youtube_flag_changes_the_answer() -> None:
    scores = np.array([[0.0, 0.0], [5.0, 10.0], [0.0, 6.0]])
    # raw: (0,1) = 10, (0,2) = 6, (1,2) = 11 -> (1, 2)
    np.testing.assert_array_equal(ordered_step_assignment(scores), [1, 2])
    # log-softmax per second: t1 = [-5.007, -0.007], t0 = [-0.693, -0.693], t2 = [-6.002, -0.002]
    # (0,2) = -0.696 beats (0,1) = -0.700 and (1,2) = -5.009
    np.testing.assert_array_equal(ordered_step_assignment(scores, mining_youtube=True), [0, 2])
    rng = np.random.default_rng(8)
    x = rng.normal(size=(7, 3))
    np.testing.assert_array_equal(
        ordered_step_assignment(x, mining_youtube=True), brute_force(log_softmax_steps(x))[1]
    )


def test_second_in_interval() -> None:
    # CrossTask marks seconds floor(start) .. ceil(end) - 1
    assert second_in_interval(5, 5.5, 8.0)  # bin [5, 6) overlaps [5.5, 8]
    assert second_in_interval(7, 5.5, 8.0)
    assert not second_in_interval(8, 5.5, 8.0)  # [8, 9) only touches the end
    assert second_in_interval(8, 5.5, 8.2)
    assert not second_in_interval(4, 5.5, 8.0)
    assert not second_in_interval(-1, 0.0, 3.0)


def test_crosstask_recall_hand_two_tasks() -> None:
    gt = {
        "v1": [(0, 1.0, 3.0), (1, 5.5, 8.0), (2, 10.0, 12.0)],
        "v2": [(0, 0.0, 4.0), (3, 6.0, 9.0)],
        "v3": [(1, 2.0, 3.0), (1, 10.0, 11.0)],
    }
    pred = {
        "v1": np.array([2, 5, 12]),  # hit, hit, miss (12 is past [10, 12)) -> 2/3
        "v2": [1, 7, 8, 20],  # step 0 hit, step 3 miss; steps 1, 2 not annotated -> 1/2
        "v3": [0, 10],  # step 1 hits its second interval -> 1/1
        "v_extra": [0, 1],  # not in gt: ignored
    }
    task_of = {"v1": "A", "v2": "A", "v3": "B", "v_extra": "B"}
    result = crosstask_recall(pred, gt, task_of)
    assert result["per_task"] == {"A": pytest.approx((2 / 3 + 1 / 2) / 2), "B": 1.0}
    assert result["recall"] == pytest.approx((7 / 12 + 1) / 2)  # 19/24, not the step-pooled 0.8
    assert result["n_videos"] == 3
    assert result["per_task_videos"] == {"A": 2, "B": 1}
    # One group: the plain mean over videos (the reference's Mining YouTube number).
    assert crosstask_recall(pred, gt, None)["recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_crosstask_recall_misses() -> None:
    gt = {"v1": [(0, 0.0, 2.0), (1, 3.0, 5.0)], "v2": [(0, 0.0, 9.0)], "v3": [], "v4": [(0, 0.0, 1.0)]}
    pred = {"v1": [-1, 4], "v3": [0]}  # v1 step 0 unplaced; v2 has no prediction
    task_of = {"v1": "A", "v2": "A", "v3": "A"}  # v4 has no task
    result = crosstask_recall(pred, gt, task_of)
    assert result["per_task"] == {"A": pytest.approx((1 / 2 + 0) / 2)}
    assert (result["n_videos"], result["n_missing_pred"], result["n_skipped"]) == (2, 1, 2)
    assert math.isnan(crosstask_recall({}, {}, {})["recall"])


def test_end_to_end_dp_then_recall() -> None:
    # 10 s video, 3 steps; scores peak inside each step's interval, in order.
    scores = np.full((10, 3), -1.0)
    scores[1, 0] = scores[4, 1] = scores[8, 2] = 2.0
    scores[0, 2] = 3.0  # an out-of-order distractor the DP must ignore
    pred = {"v": ordered_step_assignment(scores)}
    np.testing.assert_array_equal(pred["v"], [1, 4, 8])
    gt = {"v": [(0, 0.5, 2.0), (1, 4.0, 5.0), (2, 7.2, 9.0)]}
    assert crosstask_recall(pred, gt, {"v": "T"})["recall"] == 1.0
