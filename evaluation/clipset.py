"""Zero-shot evaluation sets built from a workspace's feature shards.

Every caption segment of every usable video is one query; its target is the clip [start, end] of the
same video: video rows pooled as in training (max over `int(s·fps) : int(e·fps)+1`, L2 per stream,
2D‖3D), log-mel frames cropped/padded to `audio_frames`, the caption's word vectors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
import numpy as np

from model.data import Rates, crop_audio, decode_video, empty_counts, pool_video
from store.reader import FeatureSet, zip_shard

logger = logging.getLogger(__name__)


@dataclass
class ClipSet:
    """N clips. video (N, D2+D3) f32, audio (N, n_mels, F) f16, nframes (N,) i64, audio_mask (N,) bool,
    text (N, W, Dw) f16, text_len (N,) i64; ids/starts/ends/captions describe each clip (seconds)."""

    video_ids: list[str]
    starts: np.ndarray
    ends: np.ndarray
    captions: list[str]
    video: np.ndarray
    audio: np.ndarray
    nframes: np.ndarray
    audio_mask: np.ndarray
    text: np.ndarray
    text_len: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.video_ids)


@dataclass
class ClipSetConfig:
    audio_frames: int = 1000  # log-mel frames per clip (YouCook2: 5120, MSR-VTT: 3072 in the paper)
    max_words: int | None = None  # word rows per query, zero-padded or cut (None: as the text shards store them)
    max_clips: int | None = None  # keep the first N clips (None: all)


def build_clipset(features: FeatureSet, cfg: ClipSetConfig, video_ids: set[str] | None = None) -> ClipSet:
    """One clip per caption of every usable video of `features` (optionally only `video_ids`); the
    streams' rates come from the features' done records.

    Captions without any known word are not queries (counted in `problems`: a zero text vector
    would be ranked silently); so are videos whose visual features failed. Clips beyond
    `cfg.max_clips` are dropped and counted in `counts["cut_by_max_clips"]`.
    """
    counts = empty_counts()
    counts["queries_without_words"] = 0
    rows: dict[str, list] = {k: [] for k in ("ids", "s", "e", "cap", "video", "audio", "nf", "mask", "text", "len")}
    problems: list[str] = list(features.problems)
    rates = Rates.of(features) if features.shards else None
    for shard in features.shards:
        for raw in zip_shard(shard, counts):
            v = decode_video(raw, counts, rates)
            if v is None or (video_ids is not None and v.key not in video_ids):
                continue
            d2 = v.video2d.shape[1]
            for i in range(len(v.starts)):
                if int(v.lengths[i]) == 0:
                    counts["queries_without_words"] += 1
                    continue
                s, e = float(v.starts[i]), float(v.ends[i])
                vec = np.zeros(d2 + v.video3d.shape[1], dtype=np.float32)
                vec[:d2] = pool_video(v.video2d, s, e, rates.video2d)
                vec[d2:] = pool_video(v.video3d, s, e, rates.video3d)
                mel, nf = crop_audio(v.audio, s, e, rates.audio, cfg.audio_frames)
                width = v.words.shape[1] if cfg.max_words is None else cfg.max_words
                words = np.zeros((width, v.words.shape[2]), np.float16)
                n = min(int(v.lengths[i]), width)
                words[:n] = v.words[i, :n]
                for key, val in (("ids", v.key), ("s", s), ("e", e), ("cap", v.captions[i]), ("video", vec),
                                 ("audio", mel), ("nf", nf), ("mask", v.audio is not None and nf > 0),
                                 ("text", words), ("len", n)):
                    rows[key].append(val)
    if counts["queries_without_words"]:
        problems.append(f"{counts['queries_without_words']} caption(s) have no known word and are not queries")
    for key in ("skipped_failed", "skipped_no_captions", "corrupted_samples", "corrupted_shards", "key_mismatch"):
        if counts.get(key):
            problems.append(f"{counts[key]} video(s)/shard(s) {key.replace('_', ' ')}")
    n = len(rows["ids"])
    if cfg.max_clips is not None and n > cfg.max_clips:
        counts["cut_by_max_clips"] = n - cfg.max_clips
        for key in rows:
            rows[key] = rows[key][: cfg.max_clips]
        n = cfg.max_clips
    if n == 0:
        raise ValueError(f"no valid clip in {features.ws.features_dir} ({'; '.join(problems) or 'no usable video'})")
    return ClipSet(
        video_ids=rows["ids"], starts=np.asarray(rows["s"]), ends=np.asarray(rows["e"]), captions=rows["cap"],
        video=np.stack(rows["video"]), audio=np.stack(rows["audio"]), nframes=np.asarray(rows["nf"], np.int64),
        audio_mask=np.asarray(rows["mask"], bool), text=np.stack(rows["text"]),
        text_len=np.asarray(rows["len"], np.int64), counts=counts, problems=problems,
    )
