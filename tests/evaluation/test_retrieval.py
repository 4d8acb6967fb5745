"""Retrieval metrics: hand-computed cases, a naive reference on seeded data, torch/numpy agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluation.retrieval import rank_of_true, retrieval_metrics, retrieval_report, similarity

TIES = ("pessimistic", "optimistic", "average")


def naive_rank(sim: np.ndarray, ties: str) -> np.ndarray:
    """Pair-by-pair definition. NaN is below every number; NaNs tie with each other."""

    def key(x: float) -> tuple[int, float]:
        return (0, 0.0) if math.isnan(x) else (1, x)

    n, m = sim.shape
    out = np.zeros(n)
    for i in range(n):
        true = key(float(sim[i, i]))
        greater = sum(1 for j in range(m) if j != i and key(float(sim[i, j])) > true)
        greater_equal = sum(1 for j in range(m) if j != i and key(float(sim[i, j])) >= true)
        average = (greater + greater_equal) / 2
        out[i] = {"pessimistic": greater_equal, "optimistic": greater, "average": average}[ties]
    return out


def naive_metrics(ranks: np.ndarray, n_total: int | None, m: int) -> dict[str, float]:
    """Recalls over n_total (None: the evaluated queries); ranks over the evaluated queries, and with
    n_total also over all of them, each missing query at 0-based rank m."""
    total = len(ranks) if n_total is None else n_total
    out = {
        "R@1": sum(r < 1 for r in ranks) / total,
        "R@5": sum(r < 5 for r in ranks) / total,
        "R@10": sum(r < 10 for r in ranks) / total,
        "median_rank": float(np.median(ranks)) + 1,
        "mean_rank": sum(ranks) / len(ranks) + 1,
    }
    if n_total is not None:
        padded = list(ranks) + [m] * (n_total - len(ranks))
        out["median_rank_all"] = float(np.median(padded)) + 1
        out["mean_rank_all"] = sum(padded) / len(padded) + 1
    return out


# A 3 x 4 case worked out by hand.
HAND = np.array(
    [
        [0.9, 0.1, 0.9, 0.2],  # true 0.9 ties with item 2: optimistic 0, pessimistic 1
        [0.5, 0.3, 0.1, 0.4],  # true 0.3: 0.5 and 0.4 above -> 2 in every mode
        [0.7, 0.7, 0.7, 0.8],  # true 0.7: 0.8 above, 0.7 twice tied -> optimistic 1, pessimistic 3
    ]
)


@pytest.mark.parametrize(
    ("ties", "expected"),
    [("pessimistic", [1, 2, 3]), ("optimistic", [0, 2, 1]), ("average", [0.5, 2, 2])],
)
def test_rank_hand_case(ties: str, expected: list[float]) -> None:
    np.testing.assert_array_equal(rank_of_true(HAND, ties=ties), expected)
    np.testing.assert_array_equal(rank_of_true(torch.from_numpy(HAND), ties=ties), expected)


def test_metrics_hand_case() -> None:
    # ranks (pessimistic) 1, 2, 3 -> R@1 = 0, R@5 = 1, median 2 + 1, mean 2 + 1
    m = retrieval_metrics(HAND)
    assert m == {"R@1": 0.0, "R@5": 1.0, "R@10": 1.0, "median_rank": 3.0, "mean_rank": 3.0,
                 "n_queries": 3, "n_total": 3}
    m = retrieval_metrics(HAND, ties="optimistic")  # ranks 0, 2, 1
    assert (m["R@1"], m["median_rank"], m["mean_rank"]) == (pytest.approx(1 / 3), 2.0, 2.0)


def test_metrics_with_missing_queries() -> None:
    # 3 of 5 annotated queries evaluated against 4 candidates, 0-based ranks 0, 2, 1 (optimistic).
    m = retrieval_metrics(HAND, ties="optimistic", n_total=5)
    # recalls: the 2 missing queries are misses, divided by 5
    assert (m["R@1"], m["R@5"], m["R@10"]) == (pytest.approx(1 / 5), pytest.approx(3 / 5), pytest.approx(3 / 5))
    # the reference's median and mean: over the 3 evaluated queries only
    assert m["median_rank"] == 2.0  # median(0, 1, 2) + 1
    assert m["mean_rank"] == 2.0  # (0 + 2 + 1) / 3 + 1
    # all 5 queries, the 2 missing at 0-based rank M = 4 (1-based 5)
    assert m["median_rank_all"] == 3.0  # median(0, 1, 2, 4, 4) + 1
    assert m["mean_rank_all"] == pytest.approx(11 / 5 + 1)
    assert (m["n_queries"], m["n_total"]) == (3, 5)
    # a pessimistic case where the two medians differ by more: ranks 1, 2, 3 of 3 evaluated, 7 counted
    m = retrieval_metrics(HAND, n_total=7)
    assert (m["median_rank"], m["median_rank_all"]) == (3.0, 5.0)  # median(1,2,3)+1; median(1,2,3,4,4,4,4)+1
    assert (m["mean_rank"], m["mean_rank_all"]) == (3.0, pytest.approx(22 / 7 + 1))
    assert m["R@5"] == pytest.approx(3 / 7)
    # n_total equal to the queries evaluated: both variants are reported and agree
    m = retrieval_metrics(HAND, n_total=3)
    assert (m["median_rank"], m["median_rank_all"], m["mean_rank"], m["mean_rank_all"]) == (3.0, 3.0, 3.0, 3.0)


def test_nan_scores_count_as_worst() -> None:
    sim = np.array(
        [
            [0.5, np.nan, 0.6, -np.inf],  # NaN candidate never above: rank 1 (only 0.6)
            [np.nan, np.nan, 0.0, -np.inf],  # NaN true: below 0.0 and -inf; ties with the NaN
        ]
    )
    np.testing.assert_array_equal(rank_of_true(sim, ties="optimistic"), [1, 2])
    np.testing.assert_array_equal(rank_of_true(sim, ties="pessimistic"), [1, 3])
    np.testing.assert_array_equal(rank_of_true(torch.from_numpy(sim), ties="pessimistic"), [1, 3])


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_rank_matches_naive_on_seeded_data(ties: str, chunk_size: int) -> None:
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 4, size=(23, 31)).astype(np.float64)  # many ties
    sim[rng.random(sim.shape) < 0.05] = np.nan
    sim[3, 3] = np.nan
    expected = naive_rank(sim, ties)
    np.testing.assert_array_equal(rank_of_true(sim, ties=ties, chunk_size=chunk_size), expected)
    got_torch = rank_of_true(torch.from_numpy(sim).float(), ties=ties, chunk_size=chunk_size)
    np.testing.assert_array_equal(got_torch, expected)


@pytest.mark.parametrize("ties", TIES)
def test_metrics_match_naive_on_seeded_data(ties: str) -> None:
    rng = np.random.default_rng(1)
    sim = np.round(rng.normal(size=(40, 50)), 1)  # ties from rounding
    sim[np.arange(40), np.arange(40)] += 1.0  # make the true pairs likelier to rank well
    got = retrieval_metrics(sim, ties=ties, n_total=45, chunk_size=16)
    expected = naive_metrics(naive_rank(sim, ties), 45, 50)
    assert got["R@1"] > 0  # the case is not degenerate
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_integer_and_half_inputs() -> None:
    rng = np.random.default_rng(2)
    sim = rng.integers(-3, 3, size=(9, 12))
    expected = naive_rank(sim.astype(np.float64), "pessimistic")
    np.testing.assert_array_equal(rank_of_true(sim), expected)
    bf16 = torch.from_numpy(sim).to(torch.bfloat16)  # small integers are exact in bfloat16
    np.testing.assert_array_equal(rank_of_true(bf16, chunk_size=4), expected)
    np.testing.assert_array_equal(rank_of_true(sim.astype(np.float16), chunk_size=5), expected)


def test_agrees_with_reference_formula_without_ties() -> None:
    # The reference (MIL-NCE / MCN metrics.py): position of the diagonal in the sorted row.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 60))
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, None]
    reference = np.where(sx - d == 0)[1]
    for ties in TIES:
        np.testing.assert_array_equal(rank_of_true(x, ties=ties, chunk_size=7), reference)
    m = retrieval_metrics(x)
    assert m["R@1"] == np.mean(reference == 0)
    assert m["median_rank"] == np.median(reference) + 1


def test_constant_scores_are_worst_when_pessimistic() -> None:
    sim = np.zeros((5, 8))
    assert retrieval_metrics(sim)["R@1"] == 0.0
    assert retrieval_metrics(sim)["median_rank"] == 8.0
    assert retrieval_metrics(sim, ties="optimistic")["R@1"] == 1.0
    assert retrieval_metrics(sim, ties="average")["mean_rank"] == 4.5


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="more queries"):
        rank_of_true(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="ties"):
        rank_of_true(np.zeros((2, 2)), ties="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_total"):
        retrieval_metrics(np.zeros((3, 3)), n_total=2)
    with pytest.raises(ValueError, match="2-D"):
        rank_of_true(np.zeros(3))
    with pytest.raises(TypeError):
        rank_of_true(np.zeros((2, 2), dtype=bool))
    with pytest.raises(TypeError):
        rank_of_true([[1.0]])  # type: ignore[arg-type]


def test_similarity_is_plain_dot_product() -> None:
    rng = np.random.default_rng(4)
    t, v = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    expected = np.array([[sum(t[i, k] * v[j, k] for k in range(5)) for j in range(4)] for i in range(3)])
    np.testing.assert_allclose(similarity(t, v), expected)
    np.testing.assert_allclose(similarity(torch.from_numpy(t), torch.from_numpy(v)), expected)
    with pytest.raises(ValueError):
        similarity(t, v[:, :4])


def test_report_hand_case() -> None:
    text = np.eye(3)
    video = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.5, 0.2]])
    audio = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -2.0], [0.0, 0.0, 1.0]])
    report = retrieval_report(text, video, audio)
    # text->video: sim = text @ video.T = video.T = [[1,0,0],[0,1,.5],[0,2,.2]] -> ranks 0, 0, 1
    assert report["text_to_video"]["R@1"] == pytest.approx(2 / 3)
    assert report["text_to_video"]["mean_rank"] == pytest.approx(1 / 3 + 1)
    # video->text: sim.T = video = [[1,0,0],[0,1,2],[0,.5,.2]] -> ranks 0, 1, 1
    assert report["video_to_text"]["R@1"] == pytest.approx(1 / 3)
    assert report["video_to_text"]["mean_rank"] == pytest.approx(2 / 3 + 1)
    assert report["video_to_text"]["median_rank"] == 2.0
    # text->video+audio: (v + a).T = [[1,0,0],[0,1,.5],[0,0,1.2]] -> the diagonal wins every row
    assert report["text_to_video_audio"]["R@1"] == 1.0
    assert report["text_to_video_audio"]["mean_rank"] == 1.0
    assert set(report) == {"text_to_video", "text_to_video_audio", "video_to_text"}
    assert set(retrieval_report(text, video)) == {"text_to_video", "video_to_text"}


def test_report_drops_clips_without_audio_as_misses() -> None:
    rng = np.random.default_rng(5)
    text, video, audio = (rng.normal(size=(12, 6)) for _ in range(3))
    mask = np.ones(12, dtype=bool)
    mask[[2, 7]] = False
    report = retrieval_report(text, video, audio, audio_mask=mask)
    kept = np.flatnonzero(mask)
    sub = text[kept] @ (video[kept] + audio[kept]).T
    expected = naive_metrics(naive_rank(sub, "pessimistic"), 12, 10)
    for key, value in expected.items():
        assert report["text_to_video_audio"][key] == pytest.approx(value), key
    assert "median_rank_all" not in report["text_to_video"]  # nothing missing, no n_total given
    assert report["text_to_video_audio"]["n_queries"] == 10
    assert report["text_to_video_audio"]["n_total"] == 12
    # text->video keeps every clip; n_total adds clips missing from the inputs altogether
    assert report["text_to_video"]["n_queries"] == 12
    report = retrieval_report(text, video, audio, audio_mask=mask, n_total=15)
    assert report["text_to_video_audio"]["n_total"] == 15
    assert report["text_to_video"]["R@10"] == pytest.approx(
        naive_metrics(naive_rank(text @ video.T, "pessimistic"), 15, 12)["R@10"]
    )


@pytest.mark.parametrize("ties", TIES)
def test_device_code_path_matches_naive(ties: str) -> None:
    # GPU tensors are ranked by _chunk_counts_torch on their device; run it on CPU here.
    from evaluation.retrieval import _chunk_counts_torch, _combine

    rng = np.random.default_rng(6)
    sim = rng.integers(0, 3, size=(9, 13)).astype(np.float32)
    sim[rng.random(sim.shape) < 0.1] = np.nan
    sim[4, 4] = np.nan
    got = np.concatenate(
        [_combine(*_chunk_counts_torch(torch.from_numpy(sim[a : a + 4]), a), ties) for a in range(0, 9, 4)]
    )
    np.testing.assert_array_equal(got, naive_rank(sim, ties))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ties", TIES)
def test_cuda_tensor_matches_numpy(ties: str) -> None:
    rng = np.random.default_rng(7)
    sim = np.round(rng.normal(size=(300, 500)), 1).astype(np.float32)
    sim[rng.random(sim.shape) < 0.01] = np.nan
    expected = rank_of_true(sim, ties=ties)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cuda = torch.from_numpy(sim).to("cuda", dtype)
        host = cuda.float().cpu().numpy()  # the scores after rounding to dtype
        got = rank_of_true(cuda, ties=ties, chunk_size=64)
        np.testing.assert_array_equal(got, rank_of_true(host, ties=ties))
    np.testing.assert_array_equal(rank_of_true(torch.from_numpy(sim).cuda(), ties=ties), expected)


def test_report_accepts_tensors() -> None:
    rng = np.random.default_rng(8)
    text, video = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    from_numpy = retrieval_report(text, video, chunk_size=6)
    from_torch = retrieval_report(torch.from_numpy(text), torch.from_numpy(video))
    assert from_numpy == from_torch
    expected = naive_metrics(naive_rank(video @ text.T, "pessimistic"), None, 20)
    for key, value in expected.items():
        assert from_numpy["video_to_text"][key] == pytest.approx(value), key
