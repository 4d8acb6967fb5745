"""Training clips from feature shards (SPEC §2, docs/formats.md).

Reading
    The shards of a :class:`store.reader.FeatureSet` (those whose done records exist for all four
    fields) are streamed and zipped by key with :func:`store.reader.zip_shard` (sequential reads; only
    npy / json / txt members are ever decoded, and npy members only when their header declares the
    bytes they hold). A key missing from one field costs that one video (``key_mismatch``), not the
    rest of the shard. The rates (rows per second) of the streams come from the done records
    (:class:`Rates`), never from constants.

Order (deterministic given ``seed, epoch, rank, world, num_workers``)
    For epoch ``e`` the global shard sequence is ``perm(e, 0) ‖ perm(e, 1) ‖ ...`` (an endless
    concatenation of seeded permutations). Rank ``r`` of ``W`` takes every ``W``-th shard from
    position ``r``; its logical data worker ``w`` of ``nw`` takes every ``nw``-th of those. Each
    worker shuffles videos through a seeded buffer and emits whole batches; the DataLoader visits
    workers round-robin, so batch ``j`` of a rank comes from logical worker ``j % nw``. Streams are
    endless and every rank yields exactly ``batches_per_epoch`` batches (the ``with_epoch`` idea), so
    ranks never wait on each other at the end of an epoch. Clip sampling uses a generator seeded by
    ``(seed, epoch, cycle, crc32(video id))``, independent of what was read before.

Data position
    ``(epoch, batches consumed in that epoch)``. Resuming mid-epoch re-reads and re-decodes the
    skipped part of the epoch on each worker (no clip building, no collation) and rotates the
    logical worker ids so that the DataLoader's round-robin continues at the right worker; the batch
    sequence after the resume point is then identical to the uninterrupted one. Cost: the I/O of the
    skipped part of the epoch, so prefer checkpoints at epoch ends for very large epochs.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from store.fields import FIELDS, NO_CAPTIONS, OK, unusable_reason
from store.lineage import RUNTIME
from store.reader import CorruptMember, FeatureSet, ShardInfo, decode_member, zip_shard

logger = logging.getLogger(__name__)

COUNTERS: tuple[str, ...] = (
    "videos",  # videos turned into clips
    "clips",
    "no_audio",  # used, with audio_mask False
    "skipped_no_captions",
    "skipped_failed",
    "key_mismatch",
    "corrupted_samples",
    "corrupted_shards",
)


@dataclass
class DataConfig:
    """Clip sampling and loading settings (SPEC §2)."""

    n_pair: int = 32  # clips per video
    min_time: float = 10.0  # seconds a merged caption span must reach
    audio_frames: int = 1000  # log-mel frames per clip (crop / zero-pad)
    max_words: int = 20
    shuffle_buffer: int = 64  # decoded videos held per data worker
    num_workers: int = 2  # logical data workers: part of the data order (see the module docstring)
    prefetch_factor: int = field(default=2, metadata=RUNTIME)
    pin_memory: bool = field(default=True, metadata=RUNTIME)
    seed: int = 0
    batches_per_epoch: int | None = None  # per rank; None: usable videos // global batch (≥ 1)
    check_sizes: bool = field(default=True, metadata=RUNTIME)  # a tar of another size than its record: left out
    mp_context: str | None = field(default=None, metadata=RUNTIME)  # DataLoader worker start method


@dataclass(frozen=True)
class Rates:
    """Rows per second of the three streams, from the features' done records."""

    video2d: float
    video3d: float
    audio: float

    @classmethod
    def of(cls, features: FeatureSet) -> "Rates":
        return cls(features.rate("video2d"), features.rate("video3d"), features.rate("audio"))


@dataclass
class VideoFeatures:
    """Decoded features of one video.

    video2d (T2, D2), video3d (T3, D3), audio (Ta, n_mels) or None (no audio), words (N, W, Dw),
    lengths (N,), starts/ends (N,) seconds, sorted by start.
    """

    key: str
    video2d: np.ndarray
    video3d: np.ndarray
    audio: np.ndarray | None
    words: np.ndarray
    lengths: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    cycle: int = 0
    captions: list[str] = field(default_factory=list)  # caption texts, aligned with starts/ends


def empty_counts() -> dict[str, int]:
    return {k: 0 for k in COUNTERS}


# --------------------------------------------------------------------------------------------------
# Epochs


def batches_per_epoch(shards: list[ShardInfo], batch_size: int, world_size: int, cfg: DataConfig) -> int:
    """Batches each rank yields per epoch: usable videos // (batch_size · world), at least 1."""
    if cfg.batches_per_epoch is not None:
        return max(1, int(cfg.batches_per_epoch))
    usable = sum(s.n_usable for s in shards)
    return max(1, usable // (batch_size * world_size))


# --------------------------------------------------------------------------------------------------
# Reading and decoding


class CorruptSample(ValueError):
    """A sample whose members are missing, undecodable or inconsistent."""


def decode_video(raw: dict[str, dict[str, Any]], counts: dict[str, int], rates: Rates | None = None
                 ) -> VideoFeatures | None:
    """Decode and validate one zipped sample; None (counted) when it is skipped.

    ``rates``: the feature set's rates; a sample whose own metadata states another rate is corrupted.
    """
    key = raw["video2d"]["__key__"]
    try:
        meta = {}
        for f in FIELDS:
            if "json" not in raw[f]:
                raise CorruptSample(f"{f}: no json member")
            meta[f] = decode_member("json", raw[f]["json"])
            if not isinstance(meta[f], dict):
                raise CorruptSample(f"{f}: json is not an object")
        status = {f: meta[f].get("status") for f in FIELDS}
        why = unusable_reason(status)
        if why is not None:
            counts["skipped_no_captions" if why == NO_CAPTIONS else "skipped_failed"] += 1
            return None
        if rates is not None:
            for f in ("video2d", "video3d", "audio"):
                said = meta[f].get("rate")
                if status[f] == OK and said is not None and float(said) != getattr(rates, f):
                    raise CorruptSample(f"{f}: sample says {said} rows/s, its shard's record {getattr(rates, f)}")

        def arr(f: str, member: str, ndim: int) -> np.ndarray:
            if member not in raw[f]:
                raise CorruptSample(f"{f}: no {member} member")
            a = decode_member(member, raw[f][member])
            if not isinstance(a, np.ndarray) or a.ndim != ndim or a.dtype.kind not in "fiu":
                raise CorruptSample(f"{f}.{member}: bad array")
            return a

        v2 = arr("video2d", "feat.npy", 2)
        v3 = arr("video3d", "feat.npy", 2)
        audio = arr("audio", "feat.npy", 2) if status["audio"] == OK else None
        words = arr("text", "words.npy", 3)
        lengths = arr("text", "lengths.npy", 1).astype(np.int64)
        caps = meta["text"].get("captions")
        if not isinstance(caps, list) or len(caps) != len(words) or len(lengths) != len(words):
            raise CorruptSample("text: captions, words and lengths disagree")
        if len(words) == 0:
            counts["skipped_no_captions"] += 1
            return None
        starts = np.asarray([float(c["start"]) for c in caps], dtype=np.float64)
        ends = np.asarray([float(c["end"]) for c in caps], dtype=np.float64)
        if not (np.all(np.isfinite(starts)) and np.all(np.isfinite(ends))):
            raise CorruptSample("text: non-finite caption times")
    except (CorruptSample, CorruptMember, ValueError, KeyError, TypeError, UnicodeDecodeError, EOFError,
            OSError) as exc:
        counts["corrupted_samples"] += 1
        logger.warning("sample %r: corrupted (%s); skipped", key, exc)
        return None
    return VideoFeatures(key=key, video2d=v2, video3d=v3, audio=audio, words=words,
                         lengths=np.clip(lengths, 0, words.shape[1]), starts=starts, ends=ends,
                         captions=[str(c.get("text", "")) for c in caps])


# --------------------------------------------------------------------------------------------------
# Clip building (pure functions, SPEC §2)


def merge_span(starts: np.ndarray, ends: np.ndarray, ind: int, min_time: float) -> tuple[int, int]:
    """First and last caption of the clip grown from caption ``ind`` until it spans ≥ min_time.

    As the reference loader: while both neighbours exist, take the previous caption when that
    gives the shorter span (ties: previous), else the next; at a border take the one that exists.
    """
    first = last = ind
    n = len(starts)
    while ends[last] - starts[first] < min_time:
        if first > 0 and last < n - 1:
            d_next = ends[last + 1] - starts[first]
            d_prev = ends[last] - starts[first - 1]
            if d_prev <= d_next:
                first -= 1
            else:
                last += 1
        elif first > 0:
            first -= 1
        elif last < n - 1:
            last += 1
        else:
            break
    return first, last


def pool_video(rows: np.ndarray, start: float, end: float, fps: float) -> np.ndarray:
    """Max-pool rows ``int(start·fps) : int(end·fps)+1`` and L2-normalise; zeros if empty. (D,) f32."""
    a, b = int(start * fps), int(end * fps) + 1
    piece = rows[max(a, 0):max(b, 0)]
    if len(piece) == 0:
        return np.zeros(rows.shape[1], dtype=np.float32)
    v = piece.max(axis=0).astype(np.float32)
    norm = float(np.linalg.norm(v))
    return v / max(norm, 1e-12)


def crop_audio(mel: np.ndarray | None, start: float, end: float, rate: float, frames: int,
               n_mels: int | None = None) -> tuple[np.ndarray, int]:
    """Log-mel frames ``int(start·rate) : int(end·rate)`` cropped / zero-padded to ``frames``.

    mel (Ta, n_mels) → ((n_mels, frames) float16, nframes before padding).
    """
    if mel is None:
        return np.zeros((n_mels or 40, frames), dtype=np.float16), 0
    a = max(int(start * rate), 0)
    b = max(int(end * rate), a)
    piece = mel[a:min(b, a + frames)]
    out = np.zeros((mel.shape[1], frames), dtype=np.float16)
    out[:, : len(piece)] = piece.T
    return out, len(piece)


def merge_words(words: np.ndarray, lengths: np.ndarray, first: int, last: int,
                max_words: int) -> tuple[np.ndarray, int]:
    """Words of captions first..last in order, truncated to max_words. ((max_words, D) f16, count)."""
    out = np.zeros((max_words, words.shape[2]), dtype=np.float16)
    n = 0
    for i in range(first, last + 1):
        take = min(int(lengths[i]), max_words - n)
        if take <= 0:
            break
        out[n:n + take] = words[i, :take]
        n += take
    return out, n


def build_clips(v: VideoFeatures, cfg: DataConfig, rates: Rates, rng: np.random.Generator,
                n_mels: int = 40) -> dict[str, np.ndarray]:
    """``cfg.n_pair`` clips of one video, each from a random caption (with replacement).

    Returns video (P, D2+D3) f32, audio (P, n_mels, F) f16, nframes (P,) i64, text (P, W, Dw) f16,
    text_len (P,) i64, audio_mask (P,) bool, start/end (P,) f64.
    """
    P = cfg.n_pair
    inds = rng.integers(0, len(v.starts), size=P)
    mels = v.audio.shape[1] if v.audio is not None else n_mels
    video = np.zeros((P, v.video2d.shape[1] + v.video3d.shape[1]), dtype=np.float32)
    audio = np.zeros((P, mels, cfg.audio_frames), dtype=np.float16)
    text = np.zeros((P, cfg.max_words, v.words.shape[2]), dtype=np.float16)
    nframes = np.zeros(P, dtype=np.int64)
    text_len = np.zeros(P, dtype=np.int64)
    se = np.zeros((P, 2), dtype=np.float64)
    d2 = v.video2d.shape[1]
    for p, ind in enumerate(inds):
        first, last = merge_span(v.starts, v.ends, int(ind), cfg.min_time)
        s, e = float(v.starts[first]), float(v.ends[last])
        se[p] = (s, e)
        video[p, :d2] = pool_video(v.video2d, s, e, rates.video2d)
        video[p, d2:] = pool_video(v.video3d, s, e, rates.video3d)
        audio[p], nframes[p] = crop_audio(v.audio, s, e, rates.audio, cfg.audio_frames, mels)
        text[p], text_len[p] = merge_words(v.words, v.lengths, first, last, cfg.max_words)
    return {
        "video": video, "audio": audio, "nframes": nframes, "text": text, "text_len": text_len,
        "audio_mask": np.full(P, v.audio is not None), "start": se[:, 0], "end": se[:, 1],
    }


def collate(clips: list[dict[str, np.ndarray]], keys: list[str]) -> dict[str, Any]:
    """Stack per-video clip dicts into a batch of B·n_pair clips (+ video_index, keys)."""
    batch: dict[str, Any] = {k: torch.from_numpy(np.concatenate([c[k] for c in clips])) for k in clips[0]}
    n = [len(c["video"]) for c in clips]
    batch["video_index"] = torch.repeat_interleave(torch.arange(len(clips)), torch.tensor(n))
    batch["keys"] = keys
    return batch


def clip_rng(seed: int, epoch: int, cycle: int, key: str) -> np.random.Generator:
    """Clip-sampling generator of one video occurrence; independent of the reading history."""
    return np.random.default_rng([seed, epoch, cycle, zlib.crc32(key.encode("utf-8"))])


# --------------------------------------------------------------------------------------------------
# Streams


def shard_sequence(n: int, seed: int, epoch: int, offset: int, stride: int) -> Iterator[tuple[int, int]]:
    """Endless ``(cycle, shard position)`` at global positions offset, offset+stride, ... of
    ``perm(epoch, 0) ‖ perm(epoch, 1) ‖ ...``."""
    pos = offset
    cycle = -1
    perm = np.empty(0, dtype=np.int64)
    while True:
        c, i = divmod(pos, n)
        if c != cycle:
            cycle = c
            perm = np.random.default_rng([seed, epoch, cycle, 0x5A4D]).permutation(n)
        yield cycle, int(perm[i])
        pos += stride


class ClipStream(IterableDataset):
    """Batches of one rank for one epoch (see the module docstring for the order).

    Each item: video (B·P, D2+D3) f32, audio (B·P, n_mels, F) f16, nframes i64, text (B·P, W, Dw) f16,
    text_len i64, audio_mask bool, video_index i64, start/end f64, keys list[str], counts dict
    (counter increments since this worker's previous batch).
    """

    def __init__(self, cfg: DataConfig, features: FeatureSet, *, batch_size: int, epoch: int,
                 n_batches: int, rank: int = 0, world_size: int = 1, skip_batches: int = 0, n_mels: int = 40):
        shards = features.shards
        if not shards:
            raise ValueError("no complete feature shards (done records for all four fields) to read")
        if sum(s.n_usable for s in shards) == 0:
            raise ValueError("the done records list no video usable for training")
        self.cfg, self.shards, self.rates = cfg, shards, Rates.of(features)
        self.batch_size, self.epoch, self.n_batches = batch_size, epoch, n_batches
        self.rank, self.world_size, self.skip = rank, world_size, skip_batches
        self.n_mels = n_mels

    def __len__(self) -> int:
        return self.n_batches - self.skip

    def _videos(self, worker: int, n_workers: int, counts: dict[str, int]) -> Iterator[VideoFeatures]:
        cfg = self.cfg
        n = len(self.shards)
        stride = self.world_size * n_workers
        offset = self.rank + self.world_size * worker
        idle = 0
        for cycle, pos in shard_sequence(n, cfg.seed, self.epoch, offset, stride):
            found = False
            for raw in zip_shard(self.shards[pos], counts):
                v = decode_video(raw, counts, self.rates)
                if v is not None:
                    v.cycle = cycle
                    found = True
                    yield v
            idle = 0 if found else idle + 1
            if idle > 2 * n + stride:
                raise RuntimeError(f"data worker {worker} of rank {self.rank}: {idle} shards in a row gave "
                                   "no usable video; the feature shards look unusable")

    def _shuffled(self, worker: int, n_workers: int, counts: dict[str, int]) -> Iterator[VideoFeatures]:
        size = self.cfg.shuffle_buffer
        src = self._videos(worker, n_workers, counts)
        if size <= 1:
            yield from src
            return
        rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank, worker, 0xB0F])
        buf: list[VideoFeatures] = []
        for v in src:
            if len(buf) < size:
                buf.append(v)
                continue
            i = int(rng.integers(size))
            out, buf[i] = buf[i], v
            yield out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (loader_worker + self.skip) % n_workers  # logical id: keeps the round-robin aligned
        quota = self.n_batches // n_workers + (worker < self.n_batches % n_workers)
        skip = self.skip // n_workers + (worker < self.skip % n_workers)
        counts = empty_counts()
        videos = self._shuffled(worker, n_workers, counts)
        for _ in range(skip):  # replay the skipped part of the epoch: read + decode, no clips
            for _ in range(self.batch_size):
                next(videos)
        counts.update(empty_counts())  # counters of the replayed part were reported before the resume
        for _ in range(skip, quota):
            group = [next(videos) for _ in range(self.batch_size)]
            seed, epoch = self.cfg.seed, self.epoch
            clips = [build_clips(v, self.cfg, self.rates, clip_rng(seed, epoch, v.cycle, v.key), self.n_mels)
                     for v in group]
            batch = collate(clips, [v.key for v in group])
            counts["videos"] += len(group)
            counts["clips"] += len(group) * self.cfg.n_pair
            counts["no_audio"] += sum(v.audio is None for v in group)
            batch["counts"] = dict(counts)
            for k in counts:
                counts[k] = 0
            yield batch


def make_loader(cfg: DataConfig, features: FeatureSet, *, batch_size: int, epoch: int, n_batches: int,
                rank: int = 0, world_size: int = 1, skip_batches: int = 0, n_mels: int = 40,
                pin_memory: bool | None = None) -> DataLoader:
    """DataLoader over one rank's epoch: ``n_batches - skip_batches`` batches of ``batch_size`` videos."""
    ds = ClipStream(cfg, features, batch_size=batch_size, epoch=epoch, n_batches=n_batches, rank=rank,
                    world_size=world_size, skip_batches=skip_batches, n_mels=n_mels)
    workers = max(0, int(cfg.num_workers))
    kw: dict[str, Any] = {}
    if workers > 0:
        kw = {"prefetch_factor": cfg.prefetch_factor, "multiprocessing_context": cfg.mp_context}
    pin = cfg.pin_memory if pin_memory is None else pin_memory
    pin = bool(pin and torch.cuda.is_available())
    return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin, **kw)


def add_counts(total: dict[str, int], delta: dict[str, int]) -> dict[str, int]:
    for k, v in delta.items():
        total[k] = total.get(k, 0) + int(v)
    return total


__all__ = [
    "COUNTERS", "ClipStream", "DataConfig", "Rates", "VideoFeatures", "add_counts",
    "batches_per_epoch", "build_clips", "clip_rng", "collate", "crop_audio", "decode_video", "empty_counts",
    "make_loader", "merge_span", "merge_words", "pool_video", "shard_sequence",
]
