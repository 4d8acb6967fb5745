"""2D appearance features: torchvision ResNet-152 (ImageNet) trunk, global average pool, 2048-d.

Input frames come from the decoder at 1 fps, shorter side resized to 224 (no crop, any aspect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    VisualConfig,
    as_uint8_tensor,
    register,
    resolve_device,
    VisualExtractor,
)
from .fold import fold_batchnorm
from .precision import autocast, resolve_precision

__all__ = ["ResNet152Config", "ResNet152Extractor", "resnet152_trunk"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def resnet152_trunk() -> nn.Module:
    """torchvision ResNet-152 with ``fc`` replaced by Identity: (B, 3, H, W) → (B, 2048).

    Its state-dict keys are exactly torchvision's ``resnet152`` keys minus ``fc.*``. Randomly
    initialised (torchvision's init); seed the RNG around the call for reproducible weights.
    """
    import torchvision  # here, not at import: describing the extractor (status, fingerprints) needs no model

    model = torchvision.models.resnet152(weights=None)
    model.fc = nn.Identity()
    return model


@dataclass
class ResNet152Config(VisualConfig):
    """See ``VisualConfig``; ``batch_size`` = frames per forward pass."""

    batch_size: int = 64


@register
class ResNet152Extractor(VisualExtractor):
    """``resnet152_2d``: frames uint8 (N, H, W, 3) RGB → float32 (N, 2048) rows L2-normalised.

    One row per input frame (1 fps → rate 1.0). Frames are scaled to 0–1 and normalised with the
    ImageNet mean/std; the trunk's global average pool handles any H, W.
    """

    name: ClassVar[str] = "resnet152_2d"
    field: ClassVar[str] = "video2d"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = ResNet152Config
    WEIGHTS_FILENAME: ClassVar[str] = "resnet152-394f9c45.pth"
    WEIGHTS_URL: ClassVar[str] = "https://download.pytorch.org/models/resnet152-394f9c45.pth"
    WEIGHTS_WHAT: ClassVar[str] = "torchvision ResNet-152, ImageNet IMAGENET1K_V1"
    WEIGHTS_HINT: ClassVar[str] = f"It is torchvision's IMAGENET1K_V1 file, downloadable from {WEIGHTS_URL}"

    dim = 2048
    rate = 1.0

    def __init__(self, config: ResNet152Config) -> None:
        super().__init__(config)
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
        self.device = resolve_device(config.device)
        model = self.load_trunk(resnet152_trunk, config, skip=("fc.",))  # the trunk has no classifier
        if config.fold_bn:
            model = fold_batchnorm(model)  # float32, before the device move and any autocast
        self.precision = resolve_precision(config.amp, self.device)
        # channels-last on every device: faster on CUDA and, in both precisions, on CPU (oneDNN)
        #: the trunk as it runs: torchvision's module as loaded, or its BatchNorm-folded graph (fold_bn)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) → float32 (B, 3, H, W) on the device, ImageNet-normalised."""
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, frames: Any) -> torch.Tensor:
        """frames: uint8 (N, H, W, 3) torch tensor or numpy array → float32 (N, 2048) on the CPU.

        Computed in ``self.precision`` (bf16 autocast or float32); the rows are L2-normalised in float32.
        """
        frames = as_uint8_tensor(frames, 4, self.name)
        out = torch.empty(frames.shape[0], self.dim, dtype=torch.float32)
        bs = self.config.batch_size
        for i in range(0, frames.shape[0], bs):
            x = self.preprocess(frames[i : i + bs])
            with autocast(self.device, self.precision):
                y = self.model(x)
            out[i : i + bs] = F.normalize(y.float(), dim=1).cpu()
        return out
