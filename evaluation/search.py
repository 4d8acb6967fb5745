"""Text search over a workspace's clips with a trained MCN.

Every caption segment of every usable video is one clip (:func:`evaluation.clipset.build_clipset`:
video rows max-pooled over the segment as in training, audio cropped/padded to
``ClipSetConfig.audio_frames``); its video and audio embeddings are computed once and saved:

    cache_dir/index.json       clip descriptions (video id, start, end, caption), problems
    cache_dir/video.npy        (N, D) float32 video embeddings
    cache_dir/audio.npy        (N, D) float32 audio embeddings (rows of silent clips are meaningless)
    cache_dir/audio_mask.npy   (N,) bool, True where the clip has audio

Whether a saved index is still current (same checkpoint, features and clip settings) is not decided
here: the pipeline's runner keeps the index's lineage in its record (``mcn search``).

A query's score against clip ``i`` is ``t · (v_i + a_i)``, the audio term only for clips with audio
(:func:`evaluation.scoring.clip_scores`; ``t`` = ``model.embed_text`` of the query's word vectors,
zero-padded to ``max_words`` rows as the captions in training). A query without any known word is
refused (``ValueError``), never ranked as a zero vector.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evaluation.clipset import ClipSetConfig, build_clipset
from evaluation.embed import embed_clipset
from evaluation.scoring import clip_scores
from store import atomic
from store.reader import FeatureSet

logger = logging.getLogger(__name__)

__all__ = ["CODE_VERSION", "Hit", "SearchIndex", "search_text"]

#: Version of the index's content in its lineage: bump it when the embedded clips change.
CODE_VERSION = "search-index-2"
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


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@dataclass
class SearchIndex:
    """N clips with their cached embeddings.

    video_ids/captions (N,), starts/ends (N,) float64 seconds, video/audio (N, D) float32 (memory-mapped
    when read from the cache), audio_mask (N,) bool. ``from_cache`` tells whether the embeddings were
    read from ``cache_dir`` rather than computed.
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
    from_cache: bool = False
    problems: list[str] = field(default_factory=list)
    max_words: int = 20  # a query's word rows (from index.json; 20 for an index saved before it was)
    model: torch.nn.Module | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.video_ids)

    # ------------------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        features: FeatureSet,
        checkpoint: Path,
        cache_dir: Path,
        *,
        model: torch.nn.Module | None = None,
        clip_config: ClipSetConfig | None = None,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
    ) -> SearchIndex:
        """Embed every clip of ``features`` with ``checkpoint`` and save the index in ``cache_dir``.

        ``model``: the MCN of ``checkpoint`` already loaded (trusted to match it); None loads it with
        :func:`model.checkpoint.load_mcn`. ``index.json`` is removed first and written last, so an
        interrupted build never leaves an index that loads.
        """
        checkpoint, cache_dir = Path(checkpoint), Path(cache_dir)
        cfg = clip_config or ClipSetConfig()
        if model is None:
            from model.checkpoint import load_mcn

            model = load_mcn(checkpoint)
        clips = build_clipset(features, cfg)
        emb = embed_clipset(model, clips, batch_size=batch_size, device=device)
        arrays = {"video": emb["video"].astype(np.float32), "audio": emb["audio"].astype(np.float32),
                  "audio_mask": clips.audio_mask.astype(bool)}
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / "index.json").unlink(missing_ok=True)  # the arrays below no longer match any index
        for name in _ARRAYS:
            with atomic.atomic_open(cache_dir / f"{name}.npy", "wb") as fh:
                np.save(fh, arrays[name], allow_pickle=False)
        meta = {
            "n_clips": len(clips),
            "dim": int(arrays["video"].shape[1]),
            "video_ids": list(clips.video_ids),
            "starts": [float(x) for x in clips.starts],
            "ends": [float(x) for x in clips.ends],
            "captions": list(clips.captions),
            "problems": list(clips.problems),
            "max_words": int(clips.text.shape[1]),  # a query's word rows: as the clips' captions
        }
        atomic.write_json(cache_dir / "index.json", meta)
        logger.info("search index: %d clips embedded and saved in %s", len(clips), cache_dir)
        return cls(
            video_ids=list(clips.video_ids), starts=np.asarray(clips.starts, np.float64),
            ends=np.asarray(clips.ends, np.float64), captions=list(clips.captions), video=arrays["video"],
            audio=arrays["audio"], audio_mask=arrays["audio_mask"], checkpoint=checkpoint,
            cache_dir=cache_dir, from_cache=False, problems=list(clips.problems),
            max_words=meta["max_words"], model=model,
        )

    @classmethod
    def load(cls, cache_dir: Path, checkpoint: Path, *, clip_config: ClipSetConfig | None = None,
             model: torch.nn.Module | None = None) -> SearchIndex:
        """The index saved in ``cache_dir`` (arrays memory-mapped); ValueError when its files are
        missing or disagree with each other."""
        cache_dir = Path(cache_dir)
        cfg = clip_config or ClipSetConfig()
        try:
            meta = json.loads((cache_dir / "index.json").read_text())
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
            raise ValueError(f"search index {cache_dir} is damaged ({exc})") from None
        return cls(
            video_ids=[str(x) for x in meta["video_ids"]], starts=np.asarray(meta["starts"], np.float64),
            ends=np.asarray(meta["ends"], np.float64), captions=[str(x) for x in meta["captions"]],
            video=arrays["video"], audio=arrays["audio"], audio_mask=np.asarray(arrays["audio_mask"]),
            checkpoint=Path(checkpoint), cache_dir=cache_dir, from_cache=True,
            problems=list(meta.get("problems", [])),
            max_words=cfg.max_words or int(meta.get("max_words") or cls.max_words), model=model,
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
            out[sl] = clip_scores(t[None, :], self.video[sl], self.audio[sl], self.audio_mask[sl])[0]
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
