"""The MCN network (Chen et al., ICCV 2021): video / audio / text heads in a shared 6144-d space.

Module and parameter names follow the reference ``model_kmeans_ICCV.Net`` (tri-modal, ``recon=1``,
``withMLP=0``) so that its ``e{N}.pth`` state dict loads with ``strict=True`` (SPEC §7).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.davenet import ResDAVEnet

__all__ = ["MCNConfig", "MCN", "GatedEmbeddingUnit", "ContextGating", "SentenceMaxpool", "fuse_embeddings"]

logger = logging.getLogger(__name__)


@dataclass
class MCNConfig:
    """Architecture of MCN. Defaults are the reference (paper) settings: 223,776,770 state-dict values.

    ``eval_pool_ratio``: frames per DAVEnet output step used to turn ``nframes`` into a number of valid
    steps in eval mode. ``None`` reproduces the reference, ``round(T / T')`` computed from the padded
    input length T and the output length T' (= 16 for T = 1000, 3072, 5120 and any multiple of 16).
    """

    embed_dim: int = 6144
    video_dim: int = 4096  # 2D (2048) ‖ 3D (2048)
    text_dim: int = 300  # word2vec
    n_mels: int = 40
    davenet_dim: int = 1024  # = davenet_widths[-1]; GU_audio is davenet_dim → davenet_dim
    davenet_widths: tuple[int, ...] = (128, 128, 256, 512, 1024)  # conv1, then one per stage
    davenet_blocks: tuple[int, ...] = (2, 2, 2, 2)  # residual blocks per stage
    davenet_kernel: int = 9  # (1 × k) time kernels
    recon_dim: int = 1024  # hidden size of the reconstruction heads
    eval_pool_ratio: int | None = None
    # Standardise the video input per dimension (BatchNorm1d without affine parameters) before
    # GU_video. Not in the reference (default off, keys unchanged). Needed when the visual features
    # come from random backbones, whose rows all point almost the same way (cosine ~0.9999).
    video_input_norm: bool = False

    def __post_init__(self) -> None:
        self.davenet_widths = tuple(int(w) for w in self.davenet_widths)
        self.davenet_blocks = tuple(int(b) for b in self.davenet_blocks)
        if self.davenet_widths[-1] != self.davenet_dim:
            raise ValueError(
                f"davenet_dim ({self.davenet_dim}) must equal davenet_widths[-1] ({self.davenet_widths[-1]})"
            )
        if len(self.davenet_widths) != len(self.davenet_blocks) + 1:
            raise ValueError("davenet_widths needs one entry more than davenet_blocks")
        if self.eval_pool_ratio is not None and self.eval_pool_ratio < 1:
            raise ValueError(f"eval_pool_ratio must be >= 1 or None, got {self.eval_pool_ratio}")

    @classmethod
    def from_dict(cls, d: dict) -> MCNConfig:
        """Build from a dict (e.g. a checkpoint's ``mcn_config``); unknown keys are dropped with a warning."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            logger.warning("ignoring unknown MCNConfig fields: %s", unknown)
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def time_downsampling(self) -> int:
        """Nominal time stride of ResDAVEnet (2 per stage; 16 for the reference)."""
        return 2 ** len(self.davenet_blocks)


class ContextGating(nn.Module):
    """y = x · sigmoid(fc(x)); (B, D) → (B, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc(x))


class GatedEmbeddingUnit(nn.Module):
    """Linear in→out followed by context gating; (B, in) → (B, out). No L2 normalisation."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.cg = ContextGating(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.cg(self.fc(x))


class SentenceMaxpool(nn.Module):
    """Linear → ReLU per word, then max over the word axis; (B, N, in) → (B, out).

    As in the reference, zero-padded word slots take part in the max (they contribute ReLU(bias)).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(x)).amax(dim=1)


def _recon_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear, ReLU, Linear, ReLU (state-dict keys ``.0`` and ``.2``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim), nn.ReLU())


def fuse_embeddings(video: Tensor, audio: Tensor, text: Tensor, audio_mask: Tensor | None = None) -> Tensor:
    """Mean of the available modality embeddings, (B, D) each → (B, D).

    (v + a + t) / 3 for clips with audio, (v + t) / 2 for clips whose ``audio_mask`` is False.
    """
    if audio_mask is None:
        return (video + audio + text) / 3
    m = audio_mask.to(device=video.device, dtype=video.dtype).reshape(-1, 1)
    return (video + text + m * audio) / (2 + m)


class MCN(nn.Module):
    """Multimodal Clustering Network (reference architecture, SPEC §3).

    Inputs: video (B, video_dim) pooled 2D‖3D features; audio (B, n_mels, T) log-mel (zero-padded);
    nframes (B,) int64 valid audio frames before padding; text (B, N_words, text_dim) word vectors.
    """

    def __init__(self, config: MCNConfig | None = None) -> None:
        super().__init__()
        cfg = replace(config) if config is not None else MCNConfig()  # own copy: no aliasing
        self.config = cfg
        # Creation order = the reference's state-dict order.
        self.DAVEnet = ResDAVEnet(cfg.n_mels, cfg.davenet_widths, cfg.davenet_blocks, cfg.davenet_kernel)
        self.DAVEnet_projection = nn.Linear(cfg.davenet_dim, cfg.embed_dim)
        self.GU_audio = GatedEmbeddingUnit(cfg.davenet_dim, cfg.davenet_dim)
        self.GU_video = GatedEmbeddingUnit(cfg.video_dim, cfg.embed_dim)
        self.text_pooling_caption = SentenceMaxpool(cfg.text_dim, cfg.embed_dim)
        self.GU_text_captions = GatedEmbeddingUnit(cfg.embed_dim, cfg.embed_dim)
        self.recon_v = _recon_head(cfg.embed_dim, cfg.recon_dim, cfg.video_dim)
        self.recon_a = _recon_head(cfg.embed_dim, cfg.recon_dim, cfg.davenet_dim)
        self.recon_t = _recon_head(cfg.embed_dim, cfg.recon_dim, cfg.embed_dim)
        if cfg.video_input_norm:
            self.video_input_norm = nn.BatchNorm1d(cfg.video_dim, affine=False)

    # ------------------------------------------------------------------ building blocks
    def _dtype(self) -> torch.dtype:
        return self.GU_video.fc.weight.dtype

    def _video(self, video: Tensor) -> Tensor:
        """(B, video_dim) → (B, D)."""
        video = video.to(self._dtype())
        if self.config.video_input_norm:
            video = self.video_input_norm(video)
        return self.GU_video(video)

    def _text_pooled(self, text: Tensor) -> Tensor:
        """(B, N, text_dim) → (B, D) max-pooled word projections (the text reconstruction target)."""
        if text.dim() != 3 or text.shape[-1] != self.config.text_dim:
            raise ValueError(f"expected text (B, N, {self.config.text_dim}), got {tuple(text.shape)}")
        return self.text_pooling_caption(text.to(self._dtype()))

    def _audio_pooled(self, audio: Tensor, nframes: Tensor | None) -> Tensor:
        """(B, n_mels, T) → (B, davenet_dim) time-pooled ResDAVEnet features.

        Training mode: mean over all T' output steps (padding included, as the reference).
        Eval mode: mean over the first max(1, nframes // r) steps with r = ``eval_pool_ratio`` or the
        reference's round(T / T'); ``nframes`` is not modified (the reference divided it in place).
        """
        t_in = audio.shape[-1]
        feats = self.DAVEnet(audio.to(self._dtype()))  # (B, C, T')
        if self.training:
            return feats.mean(dim=-1)
        if nframes is None:
            raise ValueError("nframes is required to pool audio in eval mode")
        t_out = feats.shape[-1]
        ratio = self.config.eval_pool_ratio or max(1, round(t_in / t_out))
        n = torch.div(nframes.to(device=feats.device, dtype=torch.long).reshape(-1), ratio, rounding_mode="floor")
        n = n.clamp(min=1, max=t_out)
        valid = torch.arange(t_out, device=feats.device)[None, :] < n[:, None]  # (B, T')
        return (feats * valid[:, None, :].to(feats.dtype)).sum(dim=-1) / n[:, None].to(feats.dtype)

    def _audio_from_pooled(self, pooled: Tensor) -> Tensor:
        """(B, davenet_dim) → (B, D): GU_audio (gating in the low dimension), then the projection."""
        return self.DAVEnet_projection(self.GU_audio(pooled))

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        video: Tensor,
        audio: Tensor,
        nframes: Tensor,
        text: Tensor,
        audio_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Embeddings, fused vector and reconstruction pairs.

        Returns (B = batch of clips, D = embed_dim):
          "video", "audio", "text": (B, D) embeddings (not normalised);
          "fused": (B, D) :func:`fuse_embeddings` (clips with ``audio_mask`` False average v and t only;
            ``audio_mask`` None = every clip has audio);
          "recon_video"/"target_video": (B, video_dim), target = the input video vector;
          "recon_audio"/"target_audio": (B, davenet_dim), target = pooled DAVEnet output;
          "recon_text"/"target_text": (B, D), target = max-pooled text vector.
        Targets are NOT detached, as in the reference (gradients of the reconstruction loss also reach
        the DAVEnet and ``text_pooling_caption`` through the targets).
        """
        v = self._video(video)
        pooled_audio = self._audio_pooled(audio, nframes)
        a = self._audio_from_pooled(pooled_audio)
        pooled_text = self._text_pooled(text)
        t = self.GU_text_captions(pooled_text)
        return {
            "video": v,
            "audio": a,
            "text": t,
            "fused": fuse_embeddings(v, a, t, audio_mask),
            "recon_video": self.recon_v(v),
            "target_video": video,
            "recon_audio": self.recon_a(a),
            "target_audio": pooled_audio,
            "recon_text": self.recon_t(t),
            "target_text": pooled_text,
        }

    # ------------------------------------------------------------------ inference
    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode + no grad; every submodule's previous train/eval flag is restored afterwards."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in modes:
                m.training = mode

    def embed_video(self, video: Tensor) -> Tensor:
        """(B, video_dim) → (B, D), eval mode, no grad."""
        with self._inference():
            return self._video(video)

    def embed_text(self, text: Tensor) -> Tensor:
        """(B, N, text_dim) → (B, D), eval mode, no grad."""
        with self._inference():
            return self.GU_text_captions(self._text_pooled(text))

    def embed_audio(self, audio: Tensor, nframes: Tensor) -> Tensor:
        """(B, n_mels, T), (B,) → (B, D), eval mode (pooling over the first nframes // 16 steps), no grad."""
        with self._inference():
            return self._audio_from_pooled(self._audio_pooled(audio, nframes))

    def embed(self, video: Tensor, audio: Tensor, nframes: Tensor, text: Tensor) -> dict[str, Tensor]:
        """{"video", "audio", "text"}: (B, D) each, eval mode, no grad; train/eval mode restored."""
        return {
            "video": self.embed_video(video),
            "audio": self.embed_audio(audio, nframes),
            "text": self.embed_text(text),
        }
