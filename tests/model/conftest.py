"""Fixtures: tiny feature shards in the docs/formats.md layout, written with the real shard writer
(:class:`store.shards.ShardWriter`) under ``<tmp>/ws/features`` and handed to tests as a
:class:`store.layout.Workspace` or its :class:`store.reader.FeatureSet`.

Dims are tiny (2D 16, 3D 16 → video 32; 40 mels; words 8-d) so tests run in seconds on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from store.fields import FIELDS
from store.layout import Workspace
from store.lineage import Lineage
from store.reader import FeatureSet, open_features
from store.shards import ShardWriter, encode_json, encode_npy

D2, D3, DW, N_MELS, MAX_WORDS = 16, 16, 8, 40, 20


@dataclass
class FakeVideo:
    """Features of one synthetic video; ``status`` per field ("ok", "failed", "no_audio", "no_captions")."""

    key: str
    duration: float = 30.0
    captions: list[dict] = field(default_factory=list)
    video2d: np.ndarray | None = None  # (T2, D2) float16
    video3d: np.ndarray | None = None  # (T3, D3) float16
    audio: np.ndarray | None = None  # (Ta, 40) float16
    words: np.ndarray | None = None  # (N, 20, DW) float16
    lengths: np.ndarray | None = None  # (N,) int32
    status: dict[str, str] = field(default_factory=lambda: {f: "ok" for f in FIELDS})
    corrupt: dict[str, str] = field(default_factory=dict)  # field → member whose bytes are garbage


def l2rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float16)


_LATENT = 6
_MIX = {name: np.random.default_rng(99 + i).standard_normal((_LATENT, dim))
        for i, (name, dim) in enumerate((("video2d", D2), ("video3d", D3), ("audio", N_MELS), ("text", DW)))}


def random_video(key: str, rng: np.random.Generator, duration: float = 30.0, n_captions: int = 8,
                 structured: bool = False) -> FakeVideo:
    """A video with ``n_captions`` captions of 1–4 s laid out over ``duration`` seconds.

    ``structured``: every stream of the video is a fixed linear map of one per-video latent vector plus
    noise, so that the modalities of a video agree (a model can learn to match them).
    """
    t = 0.5
    caps = []
    for i in range(n_captions):
        d = float(rng.uniform(1.0, 4.0))
        caps.append({"start": round(t, 2), "end": round(min(t + d, duration), 2), "text": f"words {i}"})
        t = min(t + d + float(rng.uniform(0.0, 1.0)), duration - 1.0)
    lengths = rng.integers(1, 7, size=n_captions).astype(np.int32)
    words = np.zeros((n_captions, MAX_WORDS, DW), dtype=np.float16)
    for i, n in enumerate(lengths):
        words[i, :n] = rng.standard_normal((n, DW))
    v2 = np.abs(rng.standard_normal((int(duration * 1.0), D2)))
    v3 = np.abs(rng.standard_normal((int(duration * 1.5), D3)))
    audio = rng.standard_normal((int(duration * 100), N_MELS)) * 10 - 40
    if structured:
        z = rng.standard_normal(_LATENT)
        v2 = z @ _MIX["video2d"] + 0.3 * v2
        v3 = z @ _MIX["video3d"] + 0.3 * v3
        audio = (z @ _MIX["audio"]) * 10 - 40 + 0.3 * (audio + 40)
        for i, n in enumerate(lengths):
            words[i, :n] = z @ _MIX["text"] + 0.3 * words[i, :n].astype(np.float64)
    return FakeVideo(
        key=key, duration=duration, captions=caps, video2d=l2rows(v2), video3d=l2rows(v3),
        audio=audio.astype(np.float16), words=words, lengths=lengths,
    )


RATES: dict[str, float | None] = {"video2d": 1.0, "video3d": 1.5, "audio": 100.0, "text": None}
DIMS: dict[str, int] = {"video2d": D2, "video3d": D3, "audio": N_MELS, "text": DW}
LINEAGE = Lineage(config="test", code="test", inputs={})
GARBAGE_NPY = b"\x93NUMPY garbage" + b"\x00" * 40


def extractor_meta(f: str, rate: float | None = None) -> dict:
    """The done record's ``extractor`` of the fake extractor of field ``f`` (``rate``: another rate)."""
    return {"extractor": "fake", "version": "0", "weights": None, "random_weights": True,
            "rate": RATES[f] if rate is None else rate, "dim": DIMS[f]}


def field_writer(ws: Workspace, f: str, index: int, rate: float | None = None) -> ShardWriter:
    """The real shard writer of field ``f`` of shard ``index`` with the fake extractor's record."""
    return ShardWriter(ws, f, index, LINEAGE, extractor_meta(f, rate), dtype="float16")


def sample_meta(v: FakeVideo, f: str, rate: float | None) -> dict:
    """The ``json`` member of one sample, as the extract stage writes it (``rate``: another rate)."""
    status = v.status[f]
    arr = {"video2d": v.video2d, "video3d": v.video3d, "audio": v.audio, "text": v.words}[f]
    meta = {
        "id": v.key, "field": f, "status": status, "error": "boom" if status == "failed" else None,
        **extractor_meta(f, rate),
        "dtype": "float16", "shape": None if (arr is None or status != "ok") else list(arr.shape),
        "duration": v.duration,
    }
    if f == "text" and status == "ok":
        meta["captions"] = v.captions
    return meta


def write_shard(ws: Workspace, index: int, videos: list[FakeVideo],
                drop: dict[str, set[str]] | None = None, rates: dict[str, float] | None = None) -> None:
    """Write the four field tars + done records of one shard with :class:`store.shards.ShardWriter`
    (``drop``: field → keys left out; ``rates``: field → a rate other than :data:`RATES`)."""
    drop, rates = drop or {}, rates or {}
    for f in FIELDS:
        writer = field_writer(ws, f, index, rates.get(f))
        for v in videos:
            if v.key in drop.get(f, set()):
                continue
            meta = sample_meta(v, f, rates.get(f))
            members: dict[str, bytes] = {"json": encode_json(meta)}
            if v.status[f] == "ok":
                if f == "text":
                    members["words.npy"] = encode_npy(v.words)
                    members["lengths.npy"] = encode_npy(v.lengths)
                else:
                    members["feat.npy"] = encode_npy(getattr(v, f))
            for member in members:
                if v.corrupt.get(f) == member:
                    members[member] = GARBAGE_NPY
            writer.add(v.key, members, v.status[f], meta["error"])
        writer.commit()


def match_record_to_tar(ws: Workspace, f: str, index: int) -> None:
    """Rewrite the done record of a tar changed after its commit so that its ``bytes`` and ``sha256``
    describe the changed tar (the damage is then only seen when reading it)."""
    tar, path = ws.shard_tar(f, index), ws.shard_record(f, index)
    data = tar.read_bytes()
    rec = json.loads(path.read_text())
    rec["bytes"], rec["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(rec))


def corrupt_tar_middle(tar: Path) -> None:
    """Overwrite the header of a member in the middle of a tar with garbage (size unchanged)."""
    with tarfile.open(tar) as t:
        offsets = [m.offset for m in t.getmembers()]
    data = bytearray(tar.read_bytes())
    off = offsets[len(offsets) // 2]
    data[off: off + 512] = b"\xff" * 512
    tar.write_bytes(bytes(data))


def make_features(ws: Workspace, *, n_shards: int = 3, per_shard: int = 4, seed: int = 0,
                  specials: bool = True, duration: float = 30.0,
                  structured: bool = False) -> dict[str, list[str]]:
    """Write ``n_shards`` shards of ``per_shard`` videos under ``ws.features_dir``.

    With ``specials``: shard 0 holds one no_audio video, one no_captions video and one video that
    failed in every field; shard 1 one video with a corrupted video3d npy; an extra last shard whose
    audio tar is corrupted in the middle (its record rewritten to match, so only reading finds it).
    Returns the keys by kind ("ok", "no_audio", ...).
    """
    rng = np.random.default_rng(seed)
    kinds: dict[str, list[str]] = {"ok": [], "no_audio": [], "no_captions": [], "failed": [], "corrupt": [],
                                   "corrupt_shard": []}
    for s in range(n_shards):
        videos = []
        for i in range(per_shard):
            v = random_video(f"vid-{s:02d}-{i:02d}", rng, duration=duration, structured=structured)
            kind = "ok"
            if specials and s == 0 and i == 1:
                v.status["audio"], v.audio, kind = "no_audio", None, "no_audio"
            elif specials and s == 0 and i == 2:
                v.status["text"], v.words, v.lengths, v.captions = "no_captions", None, None, []
                kind = "no_captions"
            elif specials and s == 0 and i == 3:
                v.status = {f: "failed" for f in FIELDS}
                v.video2d = v.video3d = v.audio = v.words = v.lengths = None
                kind = "failed"
            elif specials and s == 1 and i == 0:
                v.corrupt["video3d"], kind = "feat.npy", "corrupt"
            kinds[kind].append(v.key)
            videos.append(v)
        write_shard(ws, s, videos)
    if specials:
        s = n_shards
        videos = [random_video(f"vid-{s:02d}-{i:02d}", rng, duration=duration) for i in range(per_shard)]
        write_shard(ws, s, videos)
        corrupt_tar_middle(ws.shard_tar("audio", s))
        match_record_to_tar(ws, "audio", s)
        kinds["corrupt_shard"] = [v.key for v in videos]
    return kinds


@pytest.fixture(scope="session")
def feature_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureSet, dict[str, list[str]]]:
    """3 regular shards of 4 videos + one corrupted shard (see make_features) under <tmp>/ws/features."""
    ws = Workspace(tmp_path_factory.mktemp("fixture") / "ws")
    kinds = make_features(ws)
    return open_features(ws), kinds


@pytest.fixture(scope="session")
def train_features(tmp_path_factory: pytest.TempPathFactory) -> FeatureSet:
    """4 shards × 4 ordinary, learnable (structured) videos for training tests."""
    ws = Workspace(tmp_path_factory.mktemp("fixture_train") / "ws")
    make_features(ws, n_shards=4, per_shard=4, seed=1, specials=False, duration=24.0, structured=True)
    return open_features(ws)


@pytest.fixture(scope="session")
def grown_features(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureSet, FeatureSet]:
    """New data arriving: one workspace's features with 3 shards × 4 structured videos (12 usable),
    then the same workspace after 2 more shards were added (5 shards, 20 usable)."""
    ws = Workspace(tmp_path_factory.mktemp("fixture_grown") / "ws")
    make_features(ws, n_shards=3, per_shard=4, seed=1, specials=False, duration=24.0, structured=True)
    before = open_features(ws)
    rng = np.random.default_rng(2)
    for s in (3, 4):
        write_shard(ws, s, [random_video(f"vid-{s:02d}-{i:02d}", rng, duration=24.0, structured=True)
                            for i in range(4)])
    return before, open_features(ws)
