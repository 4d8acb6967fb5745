"""Clip scoring: the one place that says how a text is scored against a clip.

A clip's candidate vector is ``v + a``: its video embedding plus its audio embedding, the audio term
only where the clip has audio (``audio_mask``). A text ``t`` scores ``t · (v + a)``: dot products, no
normalisation (SPEC §6). Retrieval metrics, the report's examples, ``mcn search`` and step
localization all score through these two functions.
"""

from __future__ import annotations

import numpy as np


def fused_targets(video: np.ndarray, audio: np.ndarray | None = None,
                  audio_mask: np.ndarray | None = None) -> np.ndarray:
    """(N, D) video, (N, D) audio or None, (N,) bool or None (all True) → (N, D) ``v + a``, the audio
    term only where ``audio_mask``; the inputs' dtype."""
    v = np.asarray(video)
    if audio is None:
        return v
    a = np.asarray(audio)
    if a.shape != v.shape:
        raise ValueError(f"audio {a.shape} and video {v.shape} embeddings must have the same shape")
    if audio_mask is None:
        return v + a
    mask = np.asarray(audio_mask, dtype=bool).reshape(-1)
    if mask.shape != (v.shape[0],):
        raise ValueError(f"audio_mask must have shape ({v.shape[0]},), got {mask.shape}")
    return v + np.where(mask[:, None], a, 0).astype(np.result_type(v, a), copy=False)


def clip_scores(text: np.ndarray, video: np.ndarray, audio: np.ndarray | None = None,
                audio_mask: np.ndarray | None = None) -> np.ndarray:
    """(Q, D) texts against N clips → (Q, N) float64 ``t · (v + a)`` (see :func:`fused_targets`)."""
    t = np.asarray(text, dtype=np.float64)
    if t.ndim != 2:
        raise ValueError(f"text embeddings must be (Q, D), got shape {t.shape}")
    target = np.asarray(fused_targets(video, audio, audio_mask), dtype=np.float64)
    if target.ndim != 2 or target.shape[1] != t.shape[1]:
        raise ValueError(f"text is {t.shape[1]}-d, the clips are {target.shape[1:]}")
    return t @ target.T
