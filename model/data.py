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
    worker reads ``mix_shards`` of its shards at once and takes each video from one of them drawn at
    random (:func:`worker_videos`), shuffles the videos through a seeded buffer and emits whole
    batches, so that a batch spans many shards (a shard is a seeded random sample of the collection,
    :func:`store.manifest.assign_shards`, except in workspaces planned before scan-4, where it is a
    run of paths). The DataLoader visits workers round-robin, so batch ``j`` of a rank comes from
    logical worker ``j % nw``. Streams are
    endless and every rank yields exactly ``batches_per_epoch`` batches (the ``with_epoch`` idea), so
    ranks never wait on each other at the end of an epoch. Clip sampling uses a generator seeded by
    ``(seed, epoch, cycle, crc32(video id))``, independent of what was read before.

Data position
    ``(epoch, batches consumed in that epoch)``. Resuming mid-epoch re-reads and re-decodes the
    skipped part of the epoch on each worker (no clip building, no collation) and rotates the
    logical worker ids so that the DataLoader's round-robin continues at the right worker; the batch
    sequence after the resume point is then identical to the uninterrupted one. Cost: the I/O of the
    skipped part of the epoch, so prefer checkpoints at epoch ends for very large epochs.

Cost (benchmarks/loader.py)
    Per video: the four tars' members are read once and decoded without copies (read-only npy
    views); the 32 clips are pooled by :func:`pool_clips` (torch's float16 max kernels) and written
    straight into the batch's tensors (:func:`build_batch`), in shared memory inside a DataLoader
    worker. Values stay float16 (audio, words) until the trainer casts them; the pooled video rows
    are float32 (normalised as the reference does, in float32).
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from store.fields import FIELDS, NO_CAPTIONS, OK, unusable_reason
from store.lineage import RUNTIME
from store.reader import CorruptMember, FeatureSet, ShardInfo, decode_member, zip_shard

logger = logging.getLogger(__name__)

T = TypeVar("T")

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
    mix_shards: int = 16  # shards each data worker reads at once, interleaved (see worker_videos)
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
    def of(cls, features: FeatureSet) -> Rates:
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


def merge_order(starts: np.ndarray, ends: np.ndarray, ind: int, min_time: float) -> list[int]:
    """The captions of the clip grown from caption ``ind`` until it spans ≥ min_time, in merge order:
    ``ind`` first, then each neighbour in the step that added it (SPEC §2, the reference loader).

    At each step, while both neighbours exist, the previous caption is taken when that gives the
    shorter span (ties: previous), else the next; at a border the one that exists. This order is
    also the order of the clip's words (:func:`merge_words`).
    """
    first = last = ind
    order = [ind]
    n = len(starts)
    while ends[last] - starts[first] < min_time:
        if first > 0 and last < n - 1:
            d_next = ends[last + 1] - starts[first]
            d_prev = ends[last] - starts[first - 1]
            if d_prev <= d_next:
                first -= 1
                order.append(first)
            else:
                last += 1
                order.append(last)
        elif first > 0:
            first -= 1
            order.append(first)
        elif last < n - 1:
            last += 1
            order.append(last)
        else:
            break
    return order


def clip_rows(start: np.ndarray, end: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Row ranges ``[a, b)`` of clips ``[start, end]`` (seconds) in a stream of ``fps`` rows/s:
    ``a = int(start·fps)``, ``b = int(end·fps) + 1`` (SPEC §2; negative bounds clamp to 0)."""
    a = (np.asarray(start, np.float64) * fps).astype(np.int64)
    b = (np.asarray(end, np.float64) * fps).astype(np.int64) + 1
    return np.maximum(a, 0), np.maximum(b, 0)


def _rows_tensor(rows: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``rows``' memory, read only here (shard members decode to read-only arrays,
    which ``torch.from_numpy`` accepts with a warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(rows))


def pool_clips(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, fps: float,
               out: np.ndarray | None = None) -> np.ndarray:
    """Every clip of a video at once: max over rows ``int(s·fps) : int(e·fps)+1`` (:func:`clip_rows`),
    then L2-normalised; a clip with no row gives zeros.

    rows (T, D) float16 (or any float), starts/ends (P,) seconds → (P, D) float32, written into
    ``out`` when given. The max is taken in the rows' own dtype (exact: it picks one of the values)
    by torch, which has vectorised float16 kernels (numpy's float16 reductions are scalar, ~15× slower
    here); the norm of each pooled row is a float32 dot product, as in the one-clip rule before.
    """
    a, b = clip_rows(starts, ends, fps)
    b = np.minimum(b, len(rows))
    if out is None:
        out = np.zeros((len(a), rows.shape[1]), dtype=np.float32)
    else:
        out[...] = 0.0
    t = _rows_tensor(rows)
    for p in np.flatnonzero(a < b):
        v = t[a[p]:b[p]].amax(dim=0).numpy().astype(np.float32)
        norm = float(np.sqrt(np.dot(v, v)))
        out[p] = v / max(norm, 1e-12)
    return out


def pool_video(rows: np.ndarray, start: float, end: float, fps: float) -> np.ndarray:
    """One clip of :func:`pool_clips`: (D,) float32."""
    return pool_clips(rows, np.array([start]), np.array([end]), fps)[0]


def crop_audio(mel: np.ndarray | None, start: float, end: float, rate: float, frames: int,
               n_mels: int | None = None, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Log-mel frames ``int(start·rate) : int(end·rate)`` cropped / zero-padded to ``frames``.

    mel (Ta, n_mels) → ((n_mels, frames) float16, nframes before padding); written into ``out``
    (a zero-filled (n_mels, frames) float16 array) when given.
    """
    if out is None:
        out = np.zeros((mel.shape[1] if mel is not None else (n_mels or 40), frames), dtype=np.float16)
    if mel is None:
        return out, 0
    a = max(int(start * rate), 0)
    b = max(int(end * rate), a)
    piece = mel[a:min(b, a + frames)]
    out[:, : len(piece)] = piece.T
    return out, len(piece)


def merge_words(words: np.ndarray, lengths: np.ndarray, order: list[int] | np.ndarray,
                max_words: int, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Words of the captions ``order`` (merge order, :func:`merge_order`: the seed caption first,
    then each neighbour as it was added), truncated to max_words. ((max_words, D) f16, count).

    As the reference: the words are concatenated in merge order (out-of-vocabulary words are
    already left out of the stored rows ``words[i, :lengths[i]]``) and then cut, so a seed caption's
    words are always kept. ``out``: a zero-filled (max_words, D) float16 array to write into.
    """
    if out is None:
        out = np.zeros((max_words, words.shape[2]), dtype=np.float16)
    n = 0
    for i in order:
        if n >= max_words:
            break
        take = min(int(lengths[i]), max_words - n)  # a caption without known words adds none
        if take > 0:
            out[n:n + take] = words[i, :take]
            n += take
    return out, n


def _clip_layout(d_video: int, n_mels: int, frames: int, max_words: int, d_words: int
                 ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The arrays of a batch of clips: name → (dtype, shape after the clip axis)."""
    return {
        "video": (torch.float32, (d_video,)), "audio": (torch.float16, (n_mels, frames)),
        "nframes": (torch.int64, ()), "text": (torch.float16, (max_words, d_words)),
        "text_len": (torch.int64, ()), "audio_mask": (torch.bool, ()),
        "start": (torch.float64, ()), "end": (torch.float64, ()),
    }


def clip_arrays(n: int, d_video: int, n_mels: int, frames: int, max_words: int, d_words: int,
                shared: bool = False) -> dict[str, torch.Tensor]:
    """Zero-filled tensors for ``n`` clips: video (n, d_video) f32, audio (n, n_mels, frames) f16,
    nframes (n,) i64, text (n, max_words, d_words) f16, text_len (n,) i64, audio_mask (n,) bool,
    start/end (n,) f64 seconds.

    ``shared``: in shared memory, as torch's ``default_collate`` allocates a batch inside a
    DataLoader worker, so that handing the batch to the training process copies nothing.
    """
    out: dict[str, torch.Tensor] = {}
    for name, (dtype, shape) in _clip_layout(d_video, n_mels, frames, max_words, d_words).items():
        if shared:
            numel = n * int(np.prod(shape, dtype=np.int64))
            storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
            out[name] = torch.empty(0, dtype=dtype).new(storage).view(n, *shape).zero_()
        else:
            out[name] = torch.zeros((n, *shape), dtype=dtype)
    return out


def build_clips(v: VideoFeatures, cfg: DataConfig, rates: Rates, rng: np.random.Generator,
                n_mels: int = 40, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``cfg.n_pair`` clips of one video, each from a random caption (with replacement).

    Returns video (P, D2+D3) f32, audio (P, n_mels, F) f16, nframes (P,) i64, text (P, W, Dw) f16,
    text_len (P,) i64, audio_mask (P,) bool, start/end (P,) f64; written into ``out`` (P rows of
    zero-filled arrays of :func:`clip_arrays`, e.g. one video's slice of a batch) when given.
    """
    P = cfg.n_pair
    inds = rng.integers(0, len(v.starts), size=P)
    if out is None:
        mels = v.audio.shape[1] if v.audio is not None else n_mels
        out = {k: t.numpy() for k, t in clip_arrays(P, v.video2d.shape[1] + v.video3d.shape[1], mels,
                                                      cfg.audio_frames, cfg.max_words, v.words.shape[2]).items()}
    orders = [merge_order(v.starts, v.ends, int(ind), cfg.min_time) for ind in inds]
    starts = np.array([v.starts[min(o)] for o in orders], dtype=np.float64)
    ends = np.array([v.ends[max(o)] for o in orders], dtype=np.float64)
    out["start"][:], out["end"][:] = starts, ends
    d2 = v.video2d.shape[1]
    pool_clips(v.video2d, starts, ends, rates.video2d, out=out["video"][:, :d2])
    pool_clips(v.video3d, starts, ends, rates.video3d, out=out["video"][:, d2:])
    audio, nframes, text, text_len = out["audio"], out["nframes"], out["text"], out["text_len"]
    for p, order in enumerate(orders):
        _, nframes[p] = crop_audio(v.audio, float(starts[p]), float(ends[p]), rates.audio, cfg.audio_frames,
                                   out=audio[p])
        _, text_len[p] = merge_words(v.words, v.lengths, order, cfg.max_words, out=text[p])
    out["audio_mask"][:] = v.audio is not None
    return out


def collate(clips: list[dict[str, np.ndarray]], keys: list[str]) -> dict[str, Any]:
    """Stack per-video clip dicts into a batch of B·n_pair clips (+ video_index, keys)."""
    batch: dict[str, Any] = {k: torch.from_numpy(np.concatenate([c[k] for c in clips])) for k in clips[0]}
    n = [len(c["video"]) for c in clips]
    batch["video_index"] = torch.repeat_interleave(torch.arange(len(clips)), torch.tensor(n))
    batch["keys"] = keys
    return batch


def build_batch(group: list[VideoFeatures], cfg: DataConfig, rates: Rates, seed: int, epoch: int,
                n_mels: int = 40, shared: bool = False) -> dict[str, Any]:
    """The clips of ``group`` (one :func:`build_clips` each, with :func:`clip_rng`), written straight
    into the batch's tensors (:func:`clip_arrays`; ``shared``: in shared memory): the same values as
    :func:`collate` of the videos' clips, without building and copying them one video at a time."""
    P = cfg.n_pair
    first = group[0]
    mels = next((v.audio.shape[1] for v in group if v.audio is not None), n_mels)
    batch: dict[str, Any] = clip_arrays(len(group) * P, first.video2d.shape[1] + first.video3d.shape[1], mels,
                                        cfg.audio_frames, cfg.max_words, first.words.shape[2], shared=shared)
    arrays = {k: t.numpy() for k, t in batch.items()}
    for j, v in enumerate(group):
        build_clips(v, cfg, rates, clip_rng(seed, epoch, v.cycle, v.key), n_mels,
                    out={k: a[j * P:(j + 1) * P] for k, a in arrays.items()})
    batch["video_index"] = torch.arange(len(group)).repeat_interleave(P)
    batch["keys"] = [v.key for v in group]
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


def open_shards(mix_shards: int, n: int, stride: int) -> int:
    """Shards a data worker reads at once: ``mix_shards``, at most a quarter of the worker's share of
    one cycle (``n // stride``; at least 1). Near the end of a cycle a shard of the next cycle that is
    still open from this one must wait (:func:`mix_sources`); with a quarter that is rare. A small
    collection is mixed by the shuffle buffer anyway (64 videos: its whole share)."""
    return max(1, min(int(mix_shards), (n // max(1, stride)) // 4))


def mix_sources(sources: Iterator[tuple[Hashable, Iterable[T]]], k: int,
                rng: np.random.Generator) -> Iterator[T]:
    """The items of an endless sequence of finite ``(key, source)`` with ``k`` sources open at once:
    each item comes from an open source drawn uniformly by ``rng``; a source that ends is replaced by
    the next one. A source whose key is open already (the same shard, read again in the next cycle)
    waits until that one ends, so that one video cannot be taken twice from two open readings of its
    shard. ``k = 1`` reads the sources one after the other.
    """
    slots: list[Iterator[T]] = []
    keys: list[Hashable] = []
    waiting: list[tuple[Hashable, Iterable[T]]] = []
    while True:
        while len(slots) < k:
            ready = next((i for i, (key, _) in enumerate(waiting) if key not in keys), None)
            if ready is not None:
                key, src = waiting.pop(ready)
            else:
                key, src = next(sources)
                if key in keys:
                    waiting.append((key, src))
                    continue
            slots.append(iter(src))
            keys.append(key)
        i = int(rng.integers(len(slots))) if len(slots) > 1 else 0
        try:
            yield next(slots[i])
        except StopIteration:
            del slots[i], keys[i]


def shuffle_buffer(items: Iterator[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """A shuffle buffer of ``size`` items: once full, each new item takes the place of a random one,
    which is yielded. ``size <= 1``: the items as they come."""
    if size <= 1:
        yield from items
        return
    buf: list[T] = []
    for v in items:
        if len(buf) < size:
            buf.append(v)
            continue
        i = int(rng.integers(size))
        out, buf[i] = buf[i], v
        yield out


def worker_videos(open_shard: Callable[[int, int], Iterator[T]], n_shards: int, cfg: DataConfig, epoch: int,
                  rank: int, world_size: int, worker: int, n_workers: int) -> Iterator[T]:
    """The videos of logical data ``worker`` of ``n_workers`` on ``rank`` of ``world_size``, in order.

    Its shards are every ``world·n_workers``-th of :func:`shard_sequence` (from position
    ``rank + world·worker``); :func:`open_shards` of them are read at once and interleaved
    (:func:`mix_sources`), then the videos pass a shuffle buffer of ``cfg.shuffle_buffer``
    (:func:`shuffle_buffer`). ``open_shard(cycle, position)`` gives the videos of one shard.
    Deterministic given ``cfg.seed, epoch, rank, world_size, worker, n_workers`` and the shards.
    """
    stride = world_size * n_workers
    offset = rank + world_size * worker
    seq = ((pos, open_shard(cycle, pos)) for cycle, pos in shard_sequence(n_shards, cfg.seed, epoch, offset, stride))
    k = open_shards(cfg.mix_shards, n_shards, stride)
    mixed = mix_sources(seq, k, np.random.default_rng([cfg.seed, epoch, rank, worker, 0x313]))
    return shuffle_buffer(mixed, cfg.shuffle_buffer, np.random.default_rng([cfg.seed, epoch, rank, worker, 0xB0F]))


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

    def _shard_videos(self, cycle: int, pos: int, counts: dict[str, int], idle: list[int], worker: int,
                      stride: int) -> Iterator[VideoFeatures]:
        """The usable videos of shard ``pos`` (read in cycle ``cycle``); ``idle[0]`` counts the shards
        in a row that gave none, which means the feature shards are unusable past a bound."""
        found = False
        for raw in zip_shard(self.shards[pos], counts):
            v = decode_video(raw, counts, self.rates)
            if v is not None:
                v.cycle = cycle
                found = True
                yield v
        idle[0] = 0 if found else idle[0] + 1
        if idle[0] > 2 * len(self.shards) + stride:
            raise RuntimeError(f"data worker {worker} of rank {self.rank}: {idle[0]} shards in a row gave "
                               "no usable video; the feature shards look unusable")

    def _shuffled(self, worker: int, n_workers: int, counts: dict[str, int]) -> Iterator[VideoFeatures]:
        idle, stride = [0], self.world_size * n_workers
        return worker_videos(lambda cycle, pos: self._shard_videos(cycle, pos, counts, idle, worker, stride),
                             len(self.shards), self.cfg, self.epoch, self.rank, self.world_size, worker, n_workers)

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
            batch = build_batch(group, self.cfg, self.rates, self.cfg.seed, self.epoch, self.n_mels,
                                shared=info is not None)
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
    "batches_per_epoch", "build_batch", "build_clips", "clip_arrays", "clip_rng", "clip_rows", "collate",
    "crop_audio", "decode_video", "empty_counts", "make_loader", "merge_order", "merge_words",
    "mix_sources", "open_shards", "pool_clips", "pool_video", "shard_sequence", "shuffle_buffer", "worker_videos",
]
