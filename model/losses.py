"""MCN losses: masked margin softmax (MMS), centroid contrast (clustering) and reconstruction.

Everything is computed in float32 (embeddings from autocast are upcast first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossConfig", "mms_loss", "cluster_loss", "mcn_losses"]


@dataclass
class LossConfig:
    """Loss weights: total = mms + cluster_weight · cluster + recon_weight · recon (SPEC §4)."""

    margin: float = 0.001  # δ, subtracted from the positive logit (MMS and cluster loss)
    cluster_weight: float = 1.0  # λ_clu
    recon_weight: float = 50.0
    cluster_mode: Literal["per_modality", "fused"] = "per_modality"
    use_audio: bool = True  # False: text–video only (no audio MMS, cluster or reconstruction terms)

    def __post_init__(self) -> None:
        if self.cluster_mode not in ("per_modality", "fused"):
            raise ValueError(f"cluster_mode must be 'per_modality' or 'fused', got {self.cluster_mode!r}")


def mms_loss(a: Tensor, b: Tensor, margin: float = 0.001) -> Tensor:
    """Masked margin softmax of paired embeddings a, b: (N, D) each → scalar.

    S = a·bᵀ (raw dot products), S_ii -= margin,
    loss = −(1/N) Σ_i log softmax(S_i,:)_i − (1/N) Σ_j log softmax(S_:,j)_j
    (reference ``MMS_loss``: nll(log_softmax(S, 1)) + nll(log_softmax(Sᵀ, 1)), both batch means).
    Returns 0 (differentiable) for N = 0.
    """
    n = a.shape[0]
    if n == 0:
        return (a.sum() + b.sum()).float() * 0.0
    s = a.float() @ b.float().t()
    s = s - margin * torch.eye(n, device=s.device, dtype=s.dtype)
    target = torch.arange(n, device=s.device)
    return F.cross_entropy(s, target) + F.cross_entropy(s.t(), target)


def cluster_loss(z: Tensor, centroids: Tensor, labels: Tensor, margin: float = 0.001) -> Tensor:
    """Centroid contrast: z (N, D), centroids (K, D), labels (N,) → scalar.

    S = z·Cᵀ, S_{i, label_i} -= margin, loss = (1/N) Σ_i −log softmax(S_i,:)_{label_i}
    (reference ``cluster_contrast`` with nce = 0). Returns 0 (differentiable) for N = 0.
    """
    n = z.shape[0]
    if n == 0:
        return z.sum().float() * 0.0
    c = centroids.to(device=z.device, dtype=torch.float32)
    s = z.float() @ c.t()
    labels = labels.to(device=s.device, dtype=torch.long)
    s = s - margin * F.one_hot(labels, c.shape[0]).to(s.dtype)
    return F.cross_entropy(s, labels)


def _mse_per_clip(pred: Tensor, target: Tensor) -> Tensor:
    """(N, d), (N, d) → (N,) per-clip mean over dimensions of the squared error."""
    return (pred.float() - target.float()).pow(2).mean(dim=-1)


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        x = x[mask]
    return x.mean() if x.numel() > 0 else x.sum() * 0.0


def mcn_losses(
    out: dict[str, Tensor],
    *,
    labels: Tensor | None,
    centroids: Tensor | None,
    audio_mask: Tensor | None,
    cfg: LossConfig,
) -> dict[str, Tensor]:
    """All MCN loss parts from :meth:`MCN.forward`'s output (B clips).

    Parts (scalars):
      "mms_tv", "mms_at", "mms_av": :func:`mms_loss` of (text, video), (audio, text), (audio, video);
        clips whose ``audio_mask`` is False are removed from the audio matrices (rows and columns);
      "mms" = their sum;
      "cluster": per_modality mode: (L(v) + L(a) + L(t)) / 3 with L = :func:`cluster_loss` against the
        k-means ``centroids`` (K, D) and ``labels`` (B,); L(a) over the clips with audio only (0 when
        none have audio; the divisor stays 3, as the reference's ``/ 3``); with ``use_audio`` False
        (L(v) + L(t)) / 2. "fused" mode: L(out["fused"]). 0 when labels or centroids are None;
      "recon": mean over clips of the per-dimension MSE of each head, summed over the three heads —
        the reference's mean_b(mse_v + mse_a + mse_t); the audio term is the mean over clips with audio
        (0 if none, or with ``use_audio`` False);
      "total" = mms + cluster_weight · cluster + recon_weight · recon.
    ``audio_mask``: (B,) bool, None = every clip has audio.
    """
    v, a, t = out["video"], out["audio"], out["text"]
    zero = torch.zeros((), device=v.device)
    if not cfg.use_audio:
        mask: Tensor | None = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    elif audio_mask is not None:
        mask = audio_mask.to(device=v.device, dtype=torch.bool).reshape(-1)
        if mask.shape[0] != v.shape[0]:
            raise ValueError(f"audio_mask has {mask.shape[0]} entries for a batch of {v.shape[0]}")
    else:
        mask = None
    a_sel = a if mask is None else a[mask]
    t_sel = t if mask is None else t[mask]
    v_sel = v if mask is None else v[mask]

    parts: dict[str, Tensor] = {}
    parts["mms_tv"] = mms_loss(t, v, cfg.margin)
    parts["mms_at"] = mms_loss(a_sel, t_sel, cfg.margin)
    parts["mms_av"] = mms_loss(a_sel, v_sel, cfg.margin)
    parts["mms"] = parts["mms_tv"] + parts["mms_at"] + parts["mms_av"]

    if labels is None or centroids is None:
        parts["cluster"] = zero
    else:
        labels = labels.to(device=v.device, dtype=torch.long).reshape(-1)
        if cfg.cluster_mode == "fused":
            parts["cluster"] = cluster_loss(out["fused"], centroids, labels, cfg.margin)
        else:
            l_v = cluster_loss(v, centroids, labels, cfg.margin)
            l_t = cluster_loss(t, centroids, labels, cfg.margin)
            if cfg.use_audio:
                l_a = cluster_loss(a_sel, centroids, labels if mask is None else labels[mask], cfg.margin)
                parts["cluster"] = (l_v + l_a + l_t) / 3
            else:
                parts["cluster"] = (l_v + l_t) / 2

    rec_v = _mse_per_clip(out["recon_video"], out["target_video"]).mean()
    rec_t = _mse_per_clip(out["recon_text"], out["target_text"]).mean()
    rec_a = _masked_mean(_mse_per_clip(out["recon_audio"], out["target_audio"]), mask)
    parts["recon"] = rec_v + rec_a + rec_t

    parts["total"] = parts["mms"] + cfg.cluster_weight * parts["cluster"] + cfg.recon_weight * parts["recon"]
    return parts
