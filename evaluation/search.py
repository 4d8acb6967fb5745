"""Text search over a workspace's clips with a trained MCN.

Every caption segment of every usable video is one clip (:func:`evaluation.clipset.build_clipset`:
video rows max-pooled over the segment as in training, audio cropped/padded to
``ClipSetConfig.audio_frames``); its video and audio embeddings are computed once and cached on disk:

    cache_dir/index.json       key, clip descriptions (video id, start, end, caption), problems
    cache_dir/video.npy        (N, D) float32 video embeddings
    cache_dir/audio.npy        (N, D) float32 audio embeddings (rows of silent clips are meaningless)
    cache_dir/audio_mask.npy   (N,) bool, True where the clip has audio

The cache is reused when its key equals the current one: the checkpoint's content (sha256; the hash
is recomputed only when the file's path, size or mtime changed), the features (the done records'
fingerprint, sha256 and size of every field of every complete shard) and the clip configuration.
A rebuild first deletes ``index.json``, writes the arrays atomically, and writes ``index.json`` last,
so an interrupted rebuild never leaves a cache that looks valid. Concurrent builders of the same
cache directory are not coordinated (the last one wins, each writes a complete cache).

A query's score against clip ``i`` is ``t · (v_i + a_i)``, the audio term only for clips with audio
(``t`` = ``model.embed_text`` of the query's word vectors, zero-padded to ``max_words`` rows as the
captions in training). A query without any known word is refused (``ValueError``), never ranked as
a zero vector.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.clipset import ClipSetConfig, build_clipset
from evaluation.embed import embed_clipset
from extractors.weights import file_sha256
from model.data import FIELDS, list_shards
from pipeline import atomic

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_VERSION",
    "Hit",
    "SearchIndex",
    "checkpoint_identity",
    "features_fingerprint",
    "search_text",
]

CACHE_VERSION = 1
TextExtractor = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
_ARRAYS = ("video", "audio", "audio_mask")
_CHUNK = 65536  # clips scored at once


@dataclass(frozen=True)
class Hit:
    """One search result: the clip ``[start, end]`` seconds of ``video_id`` and its caption."""

    video_id: str
    start: float
    end: float
    caption: str
    score: float


def checkpoint_identity(path: Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns", "sha256"}`` of a checkpoint file.

    The sha256 of ``previous`` (an identity stored earlier) is reused when path, size and mtime_ns are
    unchanged; otherwise the file is hashed.
    """
    path = Path(path)
    st = path.stat()
    ident: dict[str, Any] = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stat_keys = ("path", "size", "mtime_ns")
    if previous and previous.get("sha256") and all(previous.get(k) == ident[k] for k in stat_keys):
        ident["sha256"] = previous["sha256"]
    else:
        ident["sha256"] = file_sha256(path)
    return ident


def features_fingerprint(features_dir: Path) -> str:
    """sha256 over ``(shard, field, fingerprint, sha256, bytes)`` of the done records of every shard
    complete in all four fields (the shards :func:`model.data.list_shards` reads)."""
    parts: list[Any] = []
    for shard in list_shards(Path(features_dir)):
        for f in FIELDS:
            try:
                rec = json.loads(shard.paths[f].with_suffix(".json").read_text())
            except (OSError, ValueError) as exc:  # list_shards read it a moment ago: a concurrent writer
                raise RuntimeError(f"done record of {shard.paths[f]} became unreadable: {exc}") from exc
            parts.append([shard.index, f, rec.get("fingerprint"), rec.get("sha256"), rec.get("bytes")])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@dataclass
class SearchIndex:
    """N clips with their cached embeddings.

    video_ids/captions (N,), starts/ends (N,) float64 seconds, video/audio (N, D) float32 (memory-mapped
    when read from the cache), audio_mask (N,) bool. ``key`` is the cache key, ``from_cache`` tells
    whether the embeddings were read from ``cache_dir`` rather than computed.
    """

    video_ids: list[str]
    starts: np.ndarray
    ends: np.ndarray
    captions: list[str]
    video: np.ndarray
    audio: np.ndarray
    audio_mask: np.ndarray
    checkpoint: Path
    cache_dir: Path
    key: dict[str, Any]
    from_cache: bool = False
    problems: list[str] = field(default_factory=list)
    max_words: int = 20
    model: torch.nn.Module | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.video_ids)

    # ------------------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        features_dir: Path,
        checkpoint: Path,
        cache_dir: Path,
        *,
        model: torch.nn.Module | None = None,
        clip_config: ClipSetConfig | None = None,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
        rebuild: bool = False,
    ) -> SearchIndex:
        """The index of ``features_dir`` (``WS/features``) for ``checkpoint``, from ``cache_dir`` when valid.

        ``model``: the MCN of ``checkpoint`` already loaded (trusted to match it); None loads it with
        :func:`model.checkpoint.load_mcn` only if the embeddings must be computed (or at the first
        search). ``rebuild`` ignores a valid cache.
        """
        features_dir, checkpoint, cache_dir = Path(features_dir), Path(checkpoint), Path(cache_dir)
        cfg = clip_config or ClipSetConfig()
        meta_path = cache_dir / "index.json"
        old: dict[str, Any] | None = None
        if meta_path.exists():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, ValueError) as exc:
                logger.warning("search cache %s unreadable (%s): rebuilding", meta_path, exc)
        old_ckpt = old.get("checkpoint") if isinstance(old, dict) else None
        ident = checkpoint_identity(checkpoint, old_ckpt if isinstance(old_ckpt, dict) else None)
        key = {
            "version": CACHE_VERSION,
            "checkpoint_sha256": ident["sha256"],
            "features": features_fingerprint(features_dir),
            "clip_config": dataclasses.asdict(cfg),
        }
        if old is not None and not rebuild and old.get("key") == key:
            index = cls._load(old, checkpoint, cache_dir, key, cfg, model)
            if index is not None:
                if old_ckpt != ident:  # same content, moved or touched: remember the new stat
                    old["checkpoint"] = ident
                    atomic.write_json(meta_path, old)
                logger.info("search index: %d clips from the cache %s", len(index), cache_dir)
                return index
        elif old is not None and not rebuild:
            changed = [k for k in key if not isinstance(old.get("key"), dict) or old["key"].get(k) != key[k]]
            logger.info("search cache %s is stale (%s changed): rebuilding", cache_dir, ", ".join(changed))

        if model is None:
            from model.checkpoint import load_mcn

            model = load_mcn(checkpoint)
        clips = build_clipset(features_dir, cfg)
        emb = embed_clipset(model, clips, batch_size=batch_size, device=device)
        arrays = {"video": emb["video"].astype(np.float32), "audio": emb["audio"].astype(np.float32),
                  "audio_mask": clips.audio_mask.astype(bool)}
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # the arrays below no longer match any index.json
        for name in _ARRAYS:
            with atomic.atomic_open(cache_dir / f"{name}.npy", "wb") as fh:
                np.save(fh, arrays[name], allow_pickle=False)
        meta = {
            "key": key,
            "checkpoint": ident,
            "n_clips": len(clips),
            "dim": int(arrays["video"].shape[1]),
            "video_ids": list(clips.video_ids),
            "starts": [float(x) for x in clips.starts],
            "ends": [float(x) for x in clips.ends],
            "captions": list(clips.captions),
            "problems": list(clips.problems),
        }
        atomic.write_json(meta_path, meta)
        logger.info("search index: %d clips embedded and cached in %s", len(clips), cache_dir)
        return cls(
            video_ids=list(clips.video_ids), starts=np.asarray(clips.starts, np.float64),
            ends=np.asarray(clips.ends, np.float64), captions=list(clips.captions), video=arrays["video"],
            audio=arrays["audio"], audio_mask=arrays["audio_mask"], checkpoint=checkpoint,
            cache_dir=cache_dir, key=key, from_cache=False, problems=list(clips.problems),
            max_words=cfg.max_words, model=model,
        )

    @classmethod
    def _load(cls, meta: dict[str, Any], checkpoint: Path, cache_dir: Path, key: dict[str, Any],
              cfg: ClipSetConfig, model: torch.nn.Module | None) -> SearchIndex | None:
        """The cached index, or None (logged) when its files are missing or inconsistent."""
        try:
            n, dim = int(meta["n_clips"]), int(meta["dim"])
            arrays = {name: np.load(cache_dir / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                      for name in _ARRAYS}
            lists = [meta[k] for k in ("video_ids", "starts", "ends", "captions")]
            ok = (arrays["video"].shape == (n, dim) and arrays["audio"].shape == (n, dim)
                  and arrays["audio_mask"].shape == (n,) and arrays["audio_mask"].dtype == bool
                  and all(isinstance(x, list) and len(x) == n for x in lists))
            if not ok:
                raise ValueError("array shapes or clip lists disagree with index.json")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("search cache %s is damaged (%s): rebuilding", cache_dir, exc)
            return None
        return cls(
            video_ids=[str(x) for x in meta["video_ids"]], starts=np.asarray(meta["starts"], np.float64),
            ends=np.asarray(meta["ends"], np.float64), captions=[str(x) for x in meta["captions"]],
            video=arrays["video"], audio=arrays["audio"], audio_mask=np.asarray(arrays["audio_mask"]),
            checkpoint=checkpoint, cache_dir=cache_dir, key=key, from_cache=True,
            problems=list(meta.get("problems", [])), max_words=cfg.max_words, model=model,
        )

    # ------------------------------------------------------------------------------ querying
    def _model(self, model: torch.nn.Module | None) -> torch.nn.Module:
        if model is not None:
            return model
        if self.model is None:
            from model.checkpoint import load_mcn

            self.model = load_mcn(self.checkpoint)
        return self.model

    def embed_query(self, words: np.ndarray, length: int, *,
                    model: torch.nn.Module | None = None) -> np.ndarray:
        """(W, Dw) word vectors (rows from ``length`` on ignored) → (D,) float32 text embedding.

        The first ``length`` rows are kept and zero-padded to ``max_words`` rows (the caption layout
        the model was trained on). ``length`` < 1 raises ValueError: a query without a known word.
        """
        words = np.asarray(words)
        if words.ndim != 2:
            raise ValueError(f"query words must be (W, D), got shape {words.shape}")
        length = int(length)
        if length < 1:
            raise ValueError("no known word in query: nothing to search with (a zero vector is not ranked)")
        net = self._model(model)
        if words.shape[1] != net.config.text_dim:
            raise ValueError(f"query words are {words.shape[1]}-d, the model expects {net.config.text_dim}-d")
        n = min(length, words.shape[0], self.max_words)
        padded = np.zeros((1, self.max_words, words.shape[1]), dtype=np.float32)
        padded[0, :n] = words[:n]
        t = net.embed_text(torch.from_numpy(padded).to(_model_device(net)))
        return t[0].float().cpu().numpy()

    def scores(self, query: np.ndarray) -> np.ndarray:
        """(D,) text embedding → (N,) float64 scores ``t · (v + a)``, audio term only where audio_mask."""
        t = np.asarray(query, dtype=np.float64).reshape(-1)
        if t.shape[0] != self.video.shape[1]:
            raise ValueError(f"query embedding is {t.shape[0]}-d, "
                             f"the index holds {self.video.shape[1]}-d clips")
        out = np.empty(len(self), dtype=np.float64)
        for i in range(0, len(self), _CHUNK):
            sl = slice(i, min(len(self), i + _CHUNK))
            s = np.asarray(self.video[sl], dtype=np.float64) @ t
            s += np.where(self.audio_mask[sl], np.asarray(self.audio[sl], dtype=np.float64) @ t, 0.0)
            out[sl] = s
        return out

    def search(self, words: np.ndarray, length: int, top: int = 10, *,
               model: torch.nn.Module | None = None) -> list[Hit]:
        """The ``top`` best clips for a query given as word vectors (W, Dw) and its word count.

        Sorted by decreasing score, ties by index order; ``min(top, N)`` hits. ``model``: the MCN of the
        index's checkpoint (default: the one given to :meth:`build`, else loaded from the checkpoint).
        """
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        scores = self.scores(self.embed_query(words, length, model=model))
        order = np.argsort(-scores, kind="stable")[:top]
        return [Hit(self.video_ids[i], float(self.starts[i]), float(self.ends[i]), self.captions[i],
                    float(scores[i])) for i in order]


def search_text(index: SearchIndex, model: torch.nn.Module | None, text_extractor: TextExtractor,
                query: str, top: int = 10) -> list[Hit]:
    """Search ``index`` with a free-text query through ``text_extractor`` (the one used for training).

    Raises ValueError("no known word in query ...") when the extractor finds no word of the query.
    """
    words, lengths = text_extractor([query])
    n = int(np.asarray(lengths).reshape(-1)[0])
    if n < 1:
        raise ValueError(f"no known word in query {query!r}: nothing to search with "
                         f"(the text extractor's vocabulary has none of its words)")
    return index.search(np.asarray(words)[0], n, top=top, model=model)
