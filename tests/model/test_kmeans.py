"""Online k-means: planted clusters, empty-cluster re-seeding, queue, refit cadence, state round trip;
the reference's Lloyd settings of configs/paper.yaml on hand-computed cases."""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from model.kmeans import KMeansConfig, OnlineKMeans
from model.train import TrainConfig


def blobs(k: int, per: int, dim: int, seed: int, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """k well-separated directions (random unit vectors, random scales) with small noise; shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=1)
    truth = torch.arange(k).repeat_interleave(per)
    scale = 0.5 + 2 * torch.rand(k * per, 1, generator=g)  # norms differ: cosine must not care
    x = (centres[truth] + noise * torch.randn(k * per, dim, generator=g)) * scale
    perm = torch.randperm(k * per, generator=g)
    return x[perm], truth[perm]


def adjusted_rand(a: list[int], b: list[int]) -> float:
    """Adjusted Rand index from the contingency table (plain Python)."""
    n = len(a)
    comb = lambda m: m * (m - 1) / 2  # noqa: E731
    pairs = Counter(zip(a, b))
    sum_ij = sum(comb(c) for c in pairs.values())
    sum_a = sum(comb(c) for c in Counter(a).values())
    sum_b = sum(comb(c) for c in Counter(b).values())
    expected = sum_a * sum_b / comb(n)
    return (sum_ij - expected) / (0.5 * (sum_a + sum_b) - expected)


def test_adjusted_rand_helper() -> None:
    assert adjusted_rand([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    # a = [0,0,1,1], b = [0,1,0,1]: sum_ij = 0, sum_a = sum_b = 2, expected = 4/6
    assert adjusted_rand([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx((0 - 4 / 6) / (2 - 4 / 6))


def test_recovers_planted_clusters() -> None:
    x, truth = blobs(k=8, per=50, dim=32, seed=1)
    km = OnlineKMeans(KMeansConfig(k=8, seed=3), dim=32)
    labels = km.step(x)
    assert adjusted_rand(labels.tolist(), truth.tolist()) == pytest.approx(1.0)
    assert km.centroids is not None and torch.isfinite(km.centroids).all()
    # Later batches go to the nearest fixed centroid: same partition.
    x2, truth2 = blobs(k=8, per=10, dim=32, seed=1)  # same centres (same seed), new draw
    labels2 = km.step(x2)
    assert not km.stats()["refit"]
    assert adjusted_rand(labels2.tolist(), truth2.tolist()) == pytest.approx(1.0)


def test_assignment_is_cosine_and_centroids_are_raw_means() -> None:
    # Two clusters in 2D, points of different norms along two directions.
    x = torch.tensor([[1.0, 0.0], [3.0, 0.2], [0.0, 2.0], [0.1, 4.0]])
    km = OnlineKMeans(KMeansConfig(k=2, seed=0), dim=2)
    labels = km.step(x).tolist()
    assert labels[0] == labels[1] != labels[2] == labels[3]
    c = km.centroids
    assert c is not None
    torch.testing.assert_close(c[labels[0]], torch.tensor([2.0, 0.1]))  # (1 + 3) / 2, (0 + .2) / 2
    torch.testing.assert_close(c[labels[2]], torch.tensor([0.05, 3.0]))
    # Scaling a point does not change its label (cosine).
    assert km.predict(x * 100).tolist() == labels
    assert km.predict(torch.tensor([[0.2, 0.0]])).tolist() == [labels[0]]


def test_empty_clusters_are_reseeded_without_nan() -> None:
    x, _ = blobs(k=4, per=30, dim=16, seed=2)
    km = OnlineKMeans(KMeansConfig(k=6, iters=10, seed=0), dim=16)
    km.step(x)
    # Warm start from centroids of which two are far from every point: they would stay empty.
    assert km.centroids is not None
    km.centroids[0] = -x.mean(0) * 10
    km.centroids[5] = 0.0
    km.calls = 0  # force a refit on the next step
    labels = km.step(x)
    stats = km.stats()
    assert stats["refit"] and stats["n_empty"] == 0 and min(stats["sizes"]) >= 1
    assert torch.isfinite(km.centroids).all()
    assert sorted(set(labels.tolist())) == list(range(6))


def test_fewer_points_than_clusters(caplog: pytest.LogCaptureFixture) -> None:
    km = OnlineKMeans(KMeansConfig(k=16, seed=0), dim=8)
    with caplog.at_level(logging.WARNING, logger="model.kmeans"):
        labels = km.step(torch.randn(5, 8))
    assert "5 points for 16 clusters" in caplog.text
    assert labels.shape == (5,) and labels.max() < 16
    assert torch.isfinite(km.centroids).all()
    # identical points: no NaN either
    km2 = OnlineKMeans(KMeansConfig(k=4, seed=0), dim=3)
    km2.step(torch.ones(20, 3))
    assert torch.isfinite(km2.centroids).all()


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_init_methods_are_seeded(init: str) -> None:
    x, _ = blobs(k=5, per=20, dim=8, seed=4)
    runs = []
    for _ in range(2):
        km = OnlineKMeans(KMeansConfig(k=5, init=init, seed=11), dim=8)
        runs.append(km.step(x))
    assert torch.equal(runs[0], runs[1])


def test_refit_cadence_queue_and_epochs() -> None:
    cfg = KMeansConfig(k=3, queue_batches=2, queue_clips_per_video=2, refit_every=3, seed=0)
    km = OnlineKMeans(cfg, dim=4)
    refits, n_points = [], []
    for i in range(7):
        batch = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))  # 2 videos × n_pair 4
        km.step(batch)
        st = km.stats()
        refits.append(st["refit"])
        n_points.append(st["n_points"])
        sub = km.queue_subset(batch, n_pair=4)
        assert torch.equal(sub, batch.reshape(2, 4, 4)[:, :2].reshape(4, 4))
        km.push(sub)
    assert refits == [True, False, False, True, False, False, True]
    # refits cluster queue + batch (the queue holds at most 2 entries of 4); other steps only the batch
    assert n_points == [8, 8, 8, 16, 8, 8, 16]
    assert len(km.queue) == 2 and km.queue_points().shape == (8, 4)
    km.new_epoch()
    assert km.centroids is None and km.calls == 0 and len(km.queue) == 2  # queue kept across epochs
    km.reset(clear_queue=True)
    assert km.queue_points().shape == (0, 4)
    with pytest.raises(ValueError):
        km.queue_subset(torch.randn(7, 4), n_pair=4)


def test_state_round_trip_continues_identically() -> None:
    cfg = KMeansConfig(k=4, queue_batches=3, refit_every=2, seed=5)
    batches = [torch.randn(12, 6, generator=torch.Generator().manual_seed(100 + i)) for i in range(8)]

    def advance(km: OnlineKMeans, bs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for b in bs:
            out.append(km.step(b))
            km.push(b[:6])
        return out

    a = OnlineKMeans(cfg, dim=6)
    advance(a, batches[:3])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = OnlineKMeans(cfg, dim=6)
    b.load_state_dict(torch.load(buf, weights_only=True))
    # next steps: a fixed-centroid step, a refit, then a new epoch (re-initialisation uses the RNG)
    la = advance(a, batches[3:5])
    lb = advance(b, batches[3:5])
    a.new_epoch()
    b.new_epoch()
    la += advance(a, batches[5:])
    lb += advance(b, batches[5:])
    for x, y in zip(la, lb):
        assert torch.equal(x, y)
    assert torch.equal(a.centroids, b.centroids)
    with pytest.raises(ValueError):
        OnlineKMeans(KMeansConfig(k=5), dim=6).load_state_dict(a.state_dict())


def test_stats_and_half_precision_input() -> None:
    km = OnlineKMeans(KMeansConfig(k=2, seed=0), dim=2)
    assert "sizes" not in km.stats()
    labels = km.step(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=torch.float16))
    assert labels.dtype == torch.int64
    st = km.stats()
    assert sorted(st["sizes"]) == [1, 2] and st["n_empty"] == 0 and st["max_size"] == 2 and st["n_points"] == 3
    assert km.centroids.dtype == torch.float32
    assert math.isclose(sum(st["sizes"]), 3)


# ---------------------------------------------------------------- the reference's Lloyd (configs/paper.yaml)
PAPER_YAML = Path(__file__).resolve().parents[2] / "configs" / "paper.yaml"

# Six 2-D points: angles 0°, 18.4°, 45°, 63.4°, 90°, 90°. With seed 0, torch.randperm(6)[:2] = [2, 5].
SIX = torch.tensor([[1.0, 0.0], [3.0, 1.0], [1.0, 1.0], [1.0, 2.0], [0.0, 1.0], [0.0, 3.0]])


def paper_kmeans(**over: object) -> KMeansConfig:
    """The k-means section of configs/paper.yaml, read as the trainer reads it, with ``over`` replaced."""
    train = yaml.safe_load(PAPER_YAML.read_text(encoding="utf-8"))["train"]
    return dataclasses.replace(TrainConfig.from_dict(train).kmeans, **over)


def test_paper_preset_is_the_reference_lloyd() -> None:
    cfg = paper_kmeans()
    assert (cfg.init, cfg.iters, cfg.stop, cfg.shift_tol, cfg.empty) == ("random", 100, "shift", 1e-4, "zero")
    assert (cfg.k, cfg.queue_batches, cfg.queue_clips_per_video, cfg.refit_every) == (256, 20, 16, 20)
    # elsewhere the defaults stay ours
    d = KMeansConfig()
    assert (d.init, d.iters, d.stop, d.empty) == ("kmeans++", 20, "labels", "reseed")


def test_paper_preset_starts_from_random_data_points_and_converges_by_hand() -> None:
    cfg = paper_kmeans(k=2, seed=0)
    assert torch.randperm(6, generator=torch.Generator().manual_seed(0))[:2].tolist() == [2, 5]
    km = OnlineKMeans(cfg, dim=2)
    torch.testing.assert_close(km._init_centroids(SIX, F.normalize(SIX, dim=1)), SIX[[2, 5]], rtol=0, atol=0)

    km = OnlineKMeans(cfg, dim=2)
    labels = km.step(SIX)
    # By hand, from c = (1,1), (0,3):
    #  it 1: cosines put 0°, 18°, 45°, 63° with (1,1), 90°, 90° with (0,3) → c = (6/4, 4/4), (0, 2); shift 1.25
    #  it 2: (1,2) is now nearer (0,2) (cos .894 > .868) → c = (5/3, 2/3), (1/3, 2); shift 9/36
    #  it 3: same labels → shift 0 ≤ 1e-4: stop (3 of at most 100 iterations)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(km.centroids, torch.tensor([[5 / 3, 2 / 3], [1 / 3, 2.0]]))
    assert km.stats()["fit_iters"] == 3


def test_paper_preset_stops_on_an_absolute_centroid_shift() -> None:
    # The same points scaled by 1e-3: the first update moves the centroids by 1.25e-6 in total squared
    # distance, ≤ 1e-4, so the refit stops after one iteration even though label 3 would still change
    # (our default, stop on labels, runs the 3 iterations above). Labels are those of the final centroids.
    x = SIX * 1e-3
    km = OnlineKMeans(paper_kmeans(k=2, seed=0), dim=2)
    labels = km.step(x)
    assert km.stats()["fit_iters"] == 1
    torch.testing.assert_close(km.centroids, torch.tensor([[1.5e-3, 1e-3], [0.0, 2e-3]]))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]  # (1,2) is nearer (0,2) than (1.5,1)
    ours = OnlineKMeans(KMeansConfig(k=2, seed=0, init="random"), dim=2)
    ours.step(x)
    assert ours.stats()["fit_iters"] == 3
    torch.testing.assert_close(ours.centroids, torch.tensor([[5e-3 / 3, 2e-3 / 3], [1e-3 / 3, 2e-3]]))


@pytest.mark.parametrize(("empty", "third"), [("zero", [0.0, 0.0]), ("keep", [-1.0, -1.0])])
def test_empty_cluster_becomes_zero_in_the_paper_preset(empty: str, third: list[float]) -> None:
    # Warm start with a third centroid (-1,-1) opposite every point: its cluster is empty from the first
    # iteration. The reference sets it to 0 (cosine 0 with every point, so it stays empty); "keep"
    # leaves it; the other two converge as in the hand-computed case above (3 iterations).
    km = OnlineKMeans(paper_kmeans(k=3, empty=empty), dim=2)
    km.centroids = torch.tensor([[1.0, 1.0], [0.0, 3.0], [-1.0, -1.0]])
    labels = km.step(SIX)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(km.centroids, torch.tensor([[5 / 3, 2 / 3], [1 / 3, 2.0], third]))
    st = km.stats()
    assert st["refit"] and st["fit_iters"] == 3 and st["sizes"] == [3, 3, 0] and st["n_empty"] == 1


def test_paper_preset_state_round_trip_continues_identically() -> None:
    cfg = paper_kmeans(k=4, queue_batches=3, refit_every=2, seed=5)
    batches = [torch.randn(12, 6, generator=torch.Generator().manual_seed(200 + i)) for i in range(8)]
    a, b = OnlineKMeans(cfg, dim=6), None
    la, lb = [], []
    for i, x in enumerate(batches):
        if i == 3:  # checkpoint after 3 steps, resume in a new object
            buf = io.BytesIO()
            torch.save(a.state_dict(), buf)
            buf.seek(0)
            b = OnlineKMeans(cfg, dim=6)
            b.load_state_dict(torch.load(buf, weights_only=True))
        if i == 5:
            a.new_epoch()
            if b is not None:
                b.new_epoch()
        la.append(a.step(x))
        a.push(x[:6])
        if b is not None:
            lb.append(b.step(x))
            b.push(x[:6])
    assert b is not None
    for x, y in zip(la[3:], lb):
        assert torch.equal(x, y)
    assert torch.equal(a.centroids, b.centroids)


def test_lloyd_options_are_checked() -> None:
    with pytest.raises(ValueError):
        KMeansConfig(stop="iterations")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        KMeansConfig(empty="drop")  # type: ignore[arg-type]
