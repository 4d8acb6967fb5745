"""Clip building from hand-made features, and shard reading from the fixture shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data import (
    DataConfig,
    Rates,
    VideoFeatures,
    add_counts,
    batches_per_epoch,
    build_batch,
    build_clips,
    clip_rng,
    collate,
    crop_audio,
    decode_video,
    empty_counts,
    make_loader,
    merge_order,
    merge_words,
    pool_clips,
    pool_video,
    shard_sequence,
)
from store.fields import FIELDS
from store.layout import Workspace
from store.lineage import read_record
from store.reader import FeatureSet, open_features, zip_shard
from store.shards import encode_json, encode_npy

from .conftest import D2, D3, DW, N_MELS, FakeVideo, field_writer, random_video, sample_meta, write_shard

RATES = Rates(video2d=1.0, video3d=1.5, audio=100.0)

STARTS = np.array([0.0, 3.0, 5.0, 12.0, 20.0])
ENDS = np.array([2.0, 4.0, 9.0, 15.0, 30.0])


# ------------------------------------------------------------------------------------------------ pure


@pytest.mark.parametrize("ind, expected", [(1, (0, 3)), (3, (2, 3)), (4, (4, 4)), (0, (0, 3)), (2, (0, 3))])
def test_merge_span_follows_reference_rule(ind: int, expected: tuple[int, int]) -> None:
    # ind 1: prev gives span 4 < next 6 → first 0; then only next: 9 < 10, 15 ≥ 10 → (0, 3)
    # ind 3: next span 18 > prev span 10 → prev → span 10 → (2, 3);  ind 4: alone spans 10 → (4, 4)
    # ind 2: next span 10 > prev span 6 → (1, 2) → span 6; prev span 9 < next 12 → (0, 2) → 9;
    # then (0, 3)
    order = merge_order(STARTS, ENDS, ind, 10.0)
    first, last = min(order), max(order)
    assert (first, last) == expected
    assert ENDS[last] - STARTS[first] >= 10.0


def test_merge_span_stops_when_all_captions_merged() -> None:
    order = merge_order(np.array([0.0, 2.0]), np.array([1.0, 3.0]), 1, 10.0)
    assert (min(order), max(order)) == (0, 1)


def test_pool_video_exact_rows_and_norm() -> None:
    rows = np.arange(30, dtype=np.float16).reshape(10, 3) % 7
    # fps 1: int(2.4) = 2 .. int(5.1) + 1 = 6 → rows 2, 3, 4, 5
    expected = np.stack([rows[2], rows[3], rows[4], rows[5]]).astype(np.float32).max(axis=0)
    got = pool_video(rows, 2.4, 5.1, 1.0)
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected), rtol=1e-6)
    assert got.dtype == np.float32
    # fps 1.5: int(3.6) = 3 .. int(7.65) + 1 = 8 → rows 3..7
    expected = rows[3:8].astype(np.float32).max(axis=0)
    got = pool_video(rows, 2.4, 5.1, 1.5)
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected), rtol=1e-6)


def test_pool_video_empty_slice_gives_zeros() -> None:
    rows = np.ones((10, 4), dtype=np.float16)
    np.testing.assert_array_equal(pool_video(rows, 20.0, 25.0, 1.0), np.zeros(4, dtype=np.float32))
    np.testing.assert_array_equal(pool_video(np.zeros((0, 4), np.float16), 0.0, 5.0, 1.0), np.zeros(4))


def _one_clip_before(rows: np.ndarray, start: float, end: float, fps: float) -> np.ndarray:
    """The per-clip rule as it was written before pool_clips (numpy, one clip at a time)."""
    a, b = int(start * fps), int(end * fps) + 1
    piece = rows[max(a, 0):max(b, 0)]
    if len(piece) == 0:
        return np.zeros(rows.shape[1], dtype=np.float32)
    v = piece.max(axis=0).astype(np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def test_pool_clips_equals_the_per_clip_rule_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    rows = np.frombuffer(rng.standard_normal((40, 64)).astype(np.float16).tobytes(), np.float16).reshape(40, 64)
    assert not rows.flags.writeable  # as decoded from a shard
    # inside, across the end, past the end, before the start, one row, fps 1 and 1.5
    starts = np.array([0.0, 2.4, 25.0, 30.0, -3.0, 7.0, 26.2])
    ends = np.array([39.9, 5.1, 40.0, 35.0, -1.0, 7.0, 26.6])
    for fps in (1.0, 1.5):
        got = pool_clips(rows, starts, ends, fps)
        want = np.stack([_one_clip_before(rows, s, e, fps) for s, e in zip(starts, ends)])
        assert got.dtype == np.float32 and got.shape == (7, 64)
        np.testing.assert_array_equal(got, want)
        assert not got[3 if fps == 1.5 else 4].any() and not got[4].any()  # no row: zeros


def test_build_batch_equals_the_clips_of_each_video_stacked() -> None:
    a, b = _hand_video(), _hand_video()
    b.key, b.audio = "other", None  # a video without audio: its clips keep zeros
    cfg = DataConfig(n_pair=6, min_time=10.0, audio_frames=300, max_words=20)
    batch = build_batch([a, b], cfg, RATES, seed=3, epoch=1, n_mels=N_MELS)
    clips = [build_clips(v, cfg, RATES, clip_rng(3, 1, 0, v.key), N_MELS) for v in (a, b)]
    stacked = collate(clips, ["hand", "other"])
    assert batch["keys"] == stacked["keys"] == ["hand", "other"]
    for k in ("video", "audio", "nframes", "text", "text_len", "audio_mask", "start", "end", "video_index"):
        assert batch[k].dtype == stacked[k].dtype and torch.equal(batch[k], stacked[k]), k


def test_crop_audio_pad_crop_and_nframes() -> None:
    mel = (np.arange(500 * 40) % 1000).reshape(500, 40).astype(np.float16)
    out, n = crop_audio(mel, 1.0, 2.5, 100.0, 200)  # rows 100:250 → 150 frames, zero-padded
    assert out.shape == (40, 200) and n == 150
    np.testing.assert_array_equal(out[:, :150], mel[100:250].T)
    assert not out[:, 150:].any()
    out, n = crop_audio(mel, 0.0, 4.0, 100.0, 200)  # rows 0:400 cropped to 200
    assert n == 200
    np.testing.assert_array_equal(out, mel[:200].T)
    out, n = crop_audio(mel, 4.5, 6.0, 100.0, 200)  # past the end of the audio: 50 frames
    assert n == 50
    np.testing.assert_array_equal(out[:, :50], mel[450:500].T)
    out, n = crop_audio(None, 0.0, 10.0, 100.0, 200, n_mels=40)
    assert n == 0 and out.shape == (40, 200) and not out.any()


def test_merge_words_appends_and_truncates() -> None:
    words = np.zeros((3, 20, 2), dtype=np.float16)
    lengths = np.array([3, 15, 6])
    for i in range(3):
        words[i, : lengths[i], 0] = i + 1
        words[i, : lengths[i], 1] = np.arange(lengths[i])
    out, n = merge_words(words, lengths, [0, 1, 2], 20)
    assert n == 20  # 3 + 15 + 2 of 6
    np.testing.assert_array_equal(out[:, 0], [1] * 3 + [2] * 15 + [3] * 2)
    np.testing.assert_array_equal(out[18:, 1], [0, 1])
    out, n = merge_words(words, lengths, [2], 20)
    assert n == 6 and not out[6:].any()


# The hand case of the issue: captions of 2 s every 3 s; from seed 4 with min_time 8 s every step
# is a tie (prev span = next span), so the previous caption is taken twice: 4, then 3, then 2
# ([6, 14] = 8 s). Each caption has 8 known words.
TIE_STARTS = np.array([0.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0])
TIE_ENDS = TIE_STARTS + 2.0


def test_merge_order_is_the_order_of_the_merge_steps() -> None:
    assert merge_order(TIE_STARTS, TIE_ENDS, 4, 8.0) == [4, 3, 2]
    # the hand captions of STARTS/ENDS (min_time 10): seed 2 takes prev 1 (span 6 < 10), prev 0
    # (9 < 12), then, at the border, next 3; seed 3 takes prev 2 (span 10 < 18)
    assert merge_order(STARTS, ENDS, 2, 10.0) == [2, 1, 0, 3]
    assert merge_order(STARTS, ENDS, 1, 10.0) == [1, 0, 2, 3]
    assert merge_order(STARTS, ENDS, 3, 10.0) == [3, 2]
    assert merge_order(STARTS, ENDS, 4, 10.0) == [4]


def test_merged_words_keep_the_seed_first_then_neighbours_in_merge_order() -> None:
    """Reference: seed 4 merged with 3 then 2 keeps c4:8, c3:8, c2:4 (not c2:8, c3:8, c4:4 of time
    order)."""
    lengths = np.full(7, 8)
    words = np.zeros((7, 20, 2), dtype=np.float16)
    for i in range(7):
        words[i, :8, 0] = i  # caption id
        words[i, :8, 1] = np.arange(8)  # word position in its caption
    order = merge_order(TIE_STARTS, TIE_ENDS, 4, 8.0)
    out, n = merge_words(words, lengths, order, 20)
    assert n == 20
    np.testing.assert_array_equal(out[:, 0], [4] * 8 + [3] * 8 + [2] * 4)
    np.testing.assert_array_equal(out[:, 1], [*range(8), *range(8), *range(4)])
    # through build_clips: every clip drawn from seed 4 holds exactly these words
    v = VideoFeatures(key="tie", video2d=np.ones((21, 4), np.float16), video3d=np.ones((32, 4), np.float16),
                      audio=None, words=words, lengths=lengths, starts=TIE_STARTS, ends=TIE_ENDS)
    cfg = DataConfig(n_pair=16, min_time=8.0, audio_frames=10, max_words=20)
    rng = np.random.default_rng(0)
    seeds = np.random.default_rng(0).integers(0, 7, size=16)  # build_clips' first draw
    c = build_clips(v, cfg, RATES, rng, n_mels=4)
    assert 4 in seeds
    for p in np.flatnonzero(seeds == 4):
        assert (c["start"][p], c["end"][p]) == (6.0, 14.0)
        np.testing.assert_array_equal(c["text"][p], out)
    # a caption without any known word adds nothing and does not end the merge
    lengths0 = lengths.copy()
    lengths0[3] = 0
    out0, n0 = merge_words(words, lengths0, [4, 3, 2, 1], 20)
    assert n0 == 20
    np.testing.assert_array_equal(out0[:, 0], [4] * 8 + [2] * 8 + [1] * 4)


#: merge order of every seed caption of STARTS/ENDS at min_time 10 (worked out in the test above)
HAND_ORDERS = {0: [0, 1, 2, 3], 1: [1, 0, 2, 3], 2: [2, 1, 0, 3], 3: [3, 2], 4: [4]}


def _hand_video() -> VideoFeatures:
    rng = np.random.default_rng(3)
    n = len(STARTS)
    words = np.zeros((n, 20, DW), dtype=np.float16)
    lengths = np.array([2, 5, 7, 9, 4])
    for i, k in enumerate(lengths):
        words[i, :k] = rng.standard_normal((k, DW))
    return VideoFeatures(
        key="hand", video2d=np.abs(rng.standard_normal((31, D2))).astype(np.float16),
        video3d=np.abs(rng.standard_normal((46, D3))).astype(np.float16),
        audio=rng.standard_normal((3000, N_MELS)).astype(np.float16), words=words, lengths=lengths,
        starts=STARTS, ends=ENDS,
    )


@pytest.mark.parametrize("rates", [RATES, Rates(video2d=0.5, video3d=1.0, audio=50.0)])
def test_build_clips_matches_naive_computation(rates: Rates) -> None:
    """The rows taken follow the rates given (the done records'), not constants of the code."""
    v = _hand_video()
    cfg = DataConfig(n_pair=12, min_time=10.0, audio_frames=600, max_words=20)
    c = build_clips(v, cfg, rates, np.random.default_rng(0))
    seeds = np.random.default_rng(0).integers(0, len(STARTS), size=12)  # build_clips' first draw
    assert c["video"].shape == (12, D2 + D3) and c["audio"].shape == (12, N_MELS, 600)
    assert c["text"].shape == (12, 20, DW) and c["audio_mask"].all()
    spans = {(0.0, 15.0), (5.0, 15.0), (20.0, 30.0), (3.0, 15.0)}
    for p in range(12):
        s, e = float(c["start"][p]), float(c["end"][p])
        assert (s, e) in spans and e - s >= 10.0
        first, last = int(np.searchsorted(STARTS, s)), int(np.searchsorted(ENDS, e))
        # naive pooled video
        for off, rows, fps in ((0, v.video2d, rates.video2d), (D2, v.video3d, rates.video3d)):
            idx = [i for i in range(len(rows)) if int(s * fps) <= i <= int(e * fps)]
            ref = np.max(rows[idx].astype(np.float32), axis=0)
            got = c["video"][p, off:off + rows.shape[1]]
            np.testing.assert_allclose(got, ref / np.linalg.norm(ref), rtol=1e-6)
        # audio frames [s, e] at the audio rate, cropped to 600
        a0 = int(s * rates.audio)
        n = min(int(e * rates.audio) - a0, 600)
        assert c["nframes"][p] == n
        np.testing.assert_array_equal(c["audio"][p, :, :n], v.audio[a0:a0 + n].T)
        # words of the seed caption, then of its neighbours in merge order, cut to 20
        order = HAND_ORDERS[int(seeds[p])]
        assert (first, last) == (min(order), max(order))
        ref_words = np.concatenate([v.words[i, : v.lengths[i]] for i in order])[:20]
        assert c["text_len"][p] == len(ref_words)
        np.testing.assert_array_equal(c["text"][p, : len(ref_words)], ref_words)
        assert not c["text"][p, len(ref_words):].any()


def test_build_clips_no_audio_and_rng_determinism() -> None:
    v = _hand_video()
    v.audio = None
    cfg = DataConfig(n_pair=5, audio_frames=100)
    a = build_clips(v, cfg, RATES, clip_rng(1, 2, 0, "hand"))
    b = build_clips(v, cfg, RATES, clip_rng(1, 2, 0, "hand"))
    assert not a["audio_mask"].any() and not a["audio"].any() and not a["nframes"].any()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_shard_sequence_partitions_each_cycle() -> None:
    n, world, workers = 5, 2, 2
    seen = []
    for rank in range(world):
        for w in range(workers):
            it = shard_sequence(n, 0, 3, rank + world * w, world * workers)
            seen += [pos for cycle, pos in (next(it) for _ in range(5)) if cycle == 0]
    assert sorted(seen) == list(range(n))  # cycle 0 visited exactly once over all ranks and workers


# ------------------------------------------------------------------------------------------------ shards


def _epoch(features: FeatureSet, *, n_batches: int, batch_size: int = 2, workers: int = 0, skip: int = 0,
           rank: int = 0, world: int = 1, epoch: int = 0, **kw) -> list[dict]:
    kw.setdefault("shuffle_buffer", 3)
    cfg = DataConfig(n_pair=3, audio_frames=120, num_workers=workers, **kw)
    loader = make_loader(cfg, features, batch_size=batch_size, epoch=epoch, n_batches=n_batches,
                         rank=rank, world_size=world, skip_batches=skip, n_mels=N_MELS)
    return list(loader)


def test_open_features_uses_done_records(feature_set) -> None:
    features, kinds = feature_set
    shards = features.shards
    assert [s.index for s in shards] == [0, 1, 2, 3]
    assert features.problems == []
    # shard 0: ok, no_audio usable; no_captions and failed not. Corruption is only seen when reading.
    assert [s.n_usable for s in shards] == [2, 4, 4, 4]
    assert features.n_usable == 14
    assert shards[0].record == features.ws.shard_record("video2d", 0)  # the order the zip follows
    assert [v["id"] for v in read_record(shards[0].record)["videos"]] == \
        ["vid-00-00", *kinds["no_audio"], *kinds["no_captions"], *kinds["failed"]]
    assert shards[2].paths == {f: features.ws.shard_tar(f, 2) for f in FIELDS}
    assert batches_per_epoch(shards, 2, 1, DataConfig()) == 7
    assert batches_per_epoch(shards, 4, 2, DataConfig()) == 1
    # the rates and dims of the streams are the done records' (the fake extractor's)
    assert features.rates == {"video2d": 1.0, "video3d": 1.5, "audio": 100.0, "text": None}
    assert features.dims == {"video2d": D2, "video3d": D3, "audio": N_MELS, "text": DW}
    assert Rates.of(features) == Rates(video2d=1.0, video3d=1.5, audio=100.0)


def test_open_features_skips_incomplete_and_resized(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ws = Workspace(tmp_path / "ws")
    write_shard(ws, 0, [random_video("a", rng)])
    write_shard(ws, 1, [random_video("b", rng)])
    write_shard(ws, 2, [random_video("c", rng)])
    ws.shard_record("text", 1).unlink()  # text of shard 1 not done
    with open(ws.shard_tar("audio", 2), "ab") as f:  # size differs from the record
        f.write(b"\0" * 512)
    features = open_features(ws)
    assert [s.index for s in features.shards] == [0]
    assert len(features.problems) == 2
    assert "shard 000001" in features.problems[0] and "text" in features.problems[0]
    assert "shard 000002" in features.problems[1] and "audio" in features.problems[1]
    assert [s.index for s in open_features(ws, check_sizes=False).shards] == [0, 2]


def test_rates_come_from_the_done_records(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ws = Workspace(tmp_path / "ws")
    other = {"video2d": 2.0, "video3d": 3.0, "audio": 50.0}
    write_shard(ws, 0, [random_video("a", rng)], rates=other)
    assert Rates.of(open_features(ws)) == Rates(**other)
    # another extractor (rate) for one field in a second shard: the features cannot be mixed
    write_shard(ws, 1, [random_video("b", rng)], rates={**other, "video3d": 1.5})
    with pytest.raises(ValueError, match="video3d"):
        open_features(ws)


def test_sample_stating_another_rate_than_its_record_is_corrupted(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    ws = Workspace(tmp_path / "ws")
    videos = [random_video(k, rng) for k in ("a", "liar", "b")]
    write_shard(ws, 0, videos)
    w = field_writer(ws, "video3d", 0)  # rewritten: "liar" says 3 rows/s, the record 1.5
    for v in videos:
        meta = sample_meta(v, "video3d", 3.0 if v.key == "liar" else None)
        w.add(v.key, {"json": encode_json(meta), "feat.npy": encode_npy(v.video3d)})
    w.commit()
    features = open_features(ws)
    counts = empty_counts()
    decoded = [decode_video(raw, counts, Rates.of(features)) for raw in zip_shard(features.shards[0], counts)]
    assert [v.key for v in decoded if v is not None] == ["a", "b"]
    assert decoded[1] is None and counts["corrupted_samples"] == 1
    counts = empty_counts()  # without rates to check against, the sample is read
    decoded = [decode_video(raw, counts) for raw in zip_shard(features.shards[0], counts)]
    assert [v.key for v in decoded] == ["a", "liar", "b"]


def test_reader_skips_and_counts(feature_set) -> None:
    features, kinds = feature_set
    batches = _epoch(features, n_batches=12)
    counts = empty_counts()
    keys: list[str] = []
    for b in batches:
        add_counts(counts, b["counts"])
        keys += b["keys"]
        assert b["video"].shape == (6, D2 + D3) and b["audio"].shape == (6, N_MELS, 120)
        assert b["text"].shape == (6, 20, DW) and b["audio"].dtype == torch.float16
        assert b["video_index"].tolist() == [0, 0, 0, 1, 1, 1]
        for i, k in enumerate(b["keys"]):
            clips = b["video_index"] == i
            if k in kinds["no_audio"]:
                assert not b["audio_mask"][clips].any() and not b["audio"][clips].any()
                assert not b["nframes"][clips].any()
            else:
                assert b["audio_mask"][clips].all() and (b["nframes"][clips] > 0).all()
    seen = set(keys)
    bad = set(kinds["no_captions"] + kinds["failed"] + kinds["corrupt"])
    assert not seen & bad
    assert set(kinds["ok"] + kinds["no_audio"]) <= seen  # 24 videos over ~2 cycles of 12 usable ones
    # the corrupted audio tar of the last shard: only samples before the damaged header survive
    assert seen & set(kinds["corrupt_shard"]) <= {"vid-03-00", "vid-03-01"}
    assert seen & set(kinds["corrupt_shard"])
    assert counts["videos"] == 24 and counts["clips"] == 72
    for k in ("skipped_no_captions", "skipped_failed", "corrupted_samples", "corrupted_shards", "no_audio"):
        assert counts[k] >= 1, k
    assert counts["key_mismatch"] == 0


def test_reader_is_deterministic_and_resume_skips_exactly(feature_set) -> None:
    features, _ = feature_set
    full = _epoch(features, n_batches=7)
    again = _epoch(features, n_batches=7)
    assert [b["keys"] for b in full] == [b["keys"] for b in again]
    for a, b in zip(full, again):
        for k in ("video", "audio", "text", "nframes", "text_len"):
            assert torch.equal(a[k], b[k])
    resumed = _epoch(features, n_batches=7, skip=3)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[3:]]
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(resumed, full[3:]))
    other_epoch = _epoch(features, n_batches=7, epoch=1)
    assert [b["keys"] for b in other_epoch] != [b["keys"] for b in full]


def test_resume_skip_with_workers_keeps_round_robin(feature_set) -> None:
    features, _ = feature_set
    full = _epoch(features, n_batches=7, workers=2)
    resumed = _epoch(features, n_batches=7, workers=2, skip=3)
    assert len(full) == 7 and len(resumed) == 4
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[3:]]
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(resumed, full[3:]))


def test_ranks_read_different_shards(feature_set) -> None:
    features, _ = feature_set
    # first video of each rank: from its first shard, G[0] and G[1] of the same permutation
    r0 = _epoch(features, n_batches=1, batch_size=1, rank=0, world=2, shuffle_buffer=0)[0]["keys"][0]
    r1 = _epoch(features, n_batches=1, batch_size=1, rank=1, world=2, shuffle_buffer=0)[0]["keys"][0]
    assert r0[:6] != r1[:6]  # "vid-SS": different shards


def test_key_mismatch_is_skipped_and_counted(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    ws = Workspace(tmp_path / "ws")
    videos = [random_video(f"k{i}", rng) for i in range(4)]
    write_shard(ws, 0, videos, drop={"text": {"k1"}})
    batches = _epoch(open_features(ws), n_batches=3, batch_size=1, shuffle_buffer=0)
    counts = empty_counts()
    for b in batches:
        add_counts(counts, b["counts"])
    assert [k for b in batches for k in b["keys"]] == ["k0", "k2", "k3"]
    assert counts["key_mismatch"] == 3  # one per field holding k1: video2d, video3d, audio


def _pickled() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _header_bomb() -> bytes:
    """A valid npy header declaring 2 GB of float16 rows, followed by 64 bytes."""
    buf = io.BytesIO()
    header = {"descr": "<f2", "fortran_order": False, "shape": (10**6, 1024)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + b"\0" * 64


@pytest.mark.parametrize("bad", [
    pytest.param(_pickled, id="pickled-object-array"),
    pytest.param(_header_bomb, id="header-declares-more-bytes"),
    pytest.param(lambda: encode_npy(np.ones((30, D2), np.float16))[:-10], id="truncated"),
])
def test_unsafe_npy_is_rejected_not_loaded(tmp_path: Path, bad) -> None:
    rng = np.random.default_rng(6)
    ws = Workspace(tmp_path / "ws")
    good, evil = random_video("good", rng), random_video("evil", rng)
    write_shard(ws, 0, [evil, good])
    # rewrite the video2d field: evil's feat.npy replaced by the bad member
    w = field_writer(ws, "video2d", 0)
    for v, feat in ((evil, bad()), (good, encode_npy(good.video2d))):
        w.add(v.key, {"json": encode_json(sample_meta(v, "video2d", None)), "feat.npy": feat})
    w.commit()
    batches = _epoch(open_features(ws), n_batches=2, batch_size=1)
    counts = empty_counts()
    for b in batches:
        add_counts(counts, b["counts"])
    assert {k for b in batches for k in b["keys"]} == {"good"}
    assert counts["corrupted_samples"] >= 1


def test_no_usable_video_is_an_error(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    v = FakeVideo(key="x", status={f: "failed" for f in ("video2d", "video3d", "audio", "text")})
    write_shard(ws, 0, [v])
    with pytest.raises(ValueError, match="usable"):
        _epoch(open_features(ws), n_batches=1)
