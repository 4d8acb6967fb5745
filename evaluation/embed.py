"""Embedding a `ClipSet` with an MCN model, batch by batch."""

from __future__ import annotations

import numpy as np
import torch

from evaluation.clipset import ClipSet


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def embed_clipset(model: torch.nn.Module, clips: ClipSet, *, batch_size: int = 256,
                  device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """{"video", "audio", "text"}: (N, D) float32 eval-mode embeddings (audio rows of silent clips are
    computed on zero padding; callers mask them with `clips.audio_mask`)."""
    device = torch.device(device)
    model = model.to(device)
    out: dict[str, list[np.ndarray]] = {"video": [], "audio": [], "text": []}
    for sl in _batches(len(clips), batch_size):
        video = torch.from_numpy(clips.video[sl]).to(device)
        audio = torch.from_numpy(clips.audio[sl]).float().to(device)
        nframes = torch.from_numpy(clips.nframes[sl]).clamp(min=1).to(device)
        text = torch.from_numpy(clips.text[sl]).float().to(device)
        emb = model.embed(video, audio, nframes, text)
        for k in out:
            out[k].append(emb[k].float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
