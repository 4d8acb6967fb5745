"""3D motion features: K. Hara's 3D-ResNets-PyTorch ResNeXt-101 (Kinetics), pooled 2048-d.

Architecture (cardinality 32, shortcut B, layers [3, 4, 23, 3], 16×112×112 input), with module
names such that the public checkpoint ``resnext-101-kinetics.pth`` (``{"state_dict": {"module.…"}}``,
fc included) loads after stripping the ``module.`` prefix, strictly.

Input windows come from the decoder: 24 fps, shorter side 112, centre crop 112×112, cut into
non-overlapping 16-frame windows (``windows_from_frames``) → 1.5 rows per second; row ``i`` starts at
``i / 1.5`` s. A video of F frames gives ``F // 16`` rows, or ``ceil(F / 16)`` with
``ResNeXt101Config.pad_tail`` (the last window zero-padded, as the reference extractor did).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
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

__all__ = [
    "KINETICS_MEAN",
    "ResNeXt3D",
    "ResNeXt101Config",
    "ResNeXt101Extractor",
    "ResNeXtBottleneck",
    "resnext101_3d",
    "windows_from_frames",
]

WINDOW = 16
SIZE = 112
KINETICS_MEAN: tuple[float, float, float] = (110.6, 103.2, 96.3)


class ResNeXtBottleneck(nn.Module):
    """Hara's ResNeXt bottleneck: 1×1×1 → grouped 3×3×3 (stride) → 1×1×1, expansion 2."""

    expansion = 2

    def __init__(
        self, inplanes: int, planes: int, cardinality: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        mid = cardinality * (planes // 32)
        self.conv1 = nn.Conv3d(inplanes, mid, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.conv2 = nn.Conv3d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm3d(mid)
        self.conv3 = nn.Conv3d(mid, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class ResNeXt3D(nn.Module):
    """Hara's ResNeXt (shortcut type B) for (B, 3, 16, 112, 112) clips.

    ``forward_features`` → (B, 2048) pooled vector; ``forward`` → (B, num_classes) logits.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int] = (3, 4, 23, 3),
        cardinality: int = 32,
        num_classes: int = 400,
        sample_size: int = SIZE,
        sample_duration: int = WINDOW,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv3d(3, 64, kernel_size=7, stride=(1, 2, 2), padding=(3, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(128, layers[0], cardinality, stride=1)
        self.layer2 = self._make_layer(256, layers[1], cardinality, stride=2)
        self.layer3 = self._make_layer(512, layers[2], cardinality, stride=2)
        self.layer4 = self._make_layer(1024, layers[3], cardinality, stride=2)
        last_duration = math.ceil(sample_duration / 16)
        last_size = math.ceil(sample_size / 32)
        self.avgpool = nn.AvgPool3d((last_duration, last_size, last_size), stride=1)
        self.fc = nn.Linear(cardinality * 32 * ResNeXtBottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, cardinality: int, stride: int) -> nn.Sequential:
        out_planes = planes * ResNeXtBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(out_planes),
            )
        layers = [ResNeXtBottleneck(self.inplanes, planes, cardinality, stride, downsample)]
        self.inplanes = out_planes
        layers += [ResNeXtBottleneck(self.inplanes, planes, cardinality) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 16, 112, 112) float → (B, 2048) pooled features (before fc)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def resnext101_3d() -> ResNeXt3D:
    """Hara's ResNeXt-101 (32 groups, shortcut B, 400 Kinetics classes), randomly initialised."""
    return ResNeXt3D((3, 4, 23, 3), cardinality=32, num_classes=400)


A = TypeVar("A", torch.Tensor, np.ndarray)


def windows_from_frames(frames: A, window: int = WINDOW, pad_tail: bool = False) -> A:
    """(F, H, W, 3) frames → (n, window, H, W, 3) non-overlapping windows.

    Without ``pad_tail``: n = F // window, the incomplete tail (F % window frames) is dropped (a view;
    F < window gives n = 0). With ``pad_tail``: n = ceil(F / window), the tail is completed with zero
    frames (a copy), which become −mean after the extractor's mean subtraction, as in the reference
    extractor (video_feature_extractor's ``Preprocessing._zero_pad`` before ``Normalize``).
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be (F, H, W, C), got shape {tuple(frames.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    n, tail = divmod(frames.shape[0], window)
    if not (pad_tail and tail):
        return frames[: n * window].reshape(n, window, *frames.shape[1:])
    shape = (n + 1, window, *frames.shape[1:])
    if isinstance(frames, torch.Tensor):
        out = torch.zeros(shape, dtype=frames.dtype, device=frames.device)
    else:
        out = np.zeros(shape, dtype=frames.dtype)
    out.reshape(-1, *frames.shape[1:])[: frames.shape[0]] = frames
    return out


@dataclass
class ResNeXt101Config(VisualConfig):
    """See ``VisualConfig``; ``batch_size`` = 16-frame windows per forward pass.

    pad_tail: zero-pad a video's last incomplete 16-frame window into one more row (the reference
        extractor's behaviour, configs/paper.yaml) instead of dropping it (the default). Changes the
        rows, so it is part of the field's fingerprint.
    """

    batch_size: int = 16
    pad_tail: bool = False


@register
class ResNeXt101Extractor(VisualExtractor):
    """``resnext101_3d``: windows uint8 (W, 16, 112, 112, 3) RGB → float32 (W, 2048) rows L2-normalised.

    Each window is converted to (3, 16, 112, 112) on the 0–255 scale minus the Kinetics mean
    [110.6, 103.2, 96.3] (std 1), run through the trunk and average-pooled (before fc).
    """

    name: ClassVar[str] = "resnext101_3d"
    field: ClassVar[str] = "video3d"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = ResNeXt101Config
    WEIGHTS_FILENAME: ClassVar[str] = "resnext-101-kinetics.pth"
    WEIGHTS_WHAT: ClassVar[str] = "Hara 3D-ResNets-PyTorch ResNeXt-101, Kinetics"
    WEIGHTS_HINT: ClassVar[str] = "It is the public Kinetics checkpoint of github.com/kenshohara/3D-ResNets-PyTorch."

    dim = 2048
    rate = 24.0 / WINDOW  # 1.5 windows per second at 24 fps

    def __init__(self, config: ResNeXt101Config) -> None:
        super().__init__(config)
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
        self.device = resolve_device(config.device)
        model = self.load_trunk(resnext101_3d, config)
        if config.fold_bn:  # float32, before the device move and any autocast; fc is not traced
            model = fold_batchnorm(model, "forward_features")
        self.precision = resolve_precision(config.amp, self.device)
        # channels-last-3d on every device: on CPU (oneDNN) it is ~2x faster in fp32 and ~5x in bf16
        #: the trunk as it runs: Hara's module as loaded, or the BatchNorm-folded graph of its
        #: forward_features (fold_bn)
        self.model = model.to(self.device, memory_format=torch.channels_last_3d)
        self._features = self.model if config.fold_bn else self.model.forward_features
        self._mean = torch.tensor(KINETICS_MEAN, device=self.device).view(1, 3, 1, 1, 1)

    def preprocess(self, windows: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 16, 112, 112, 3) → float32 (B, 3, 16, 112, 112) on the device, mean subtracted."""
        x = windows.to(self.device, non_blocking=True).permute(0, 4, 1, 2, 3).float() - self._mean
        return x.contiguous(memory_format=torch.channels_last_3d)

    @torch.inference_mode()
    def __call__(self, windows: Any) -> torch.Tensor:
        """windows: uint8 (W, 16, 112, 112, 3) tensor or numpy array → float32 (W, 2048) on the CPU."""
        windows = as_uint8_tensor(windows, 5, self.name)
        if tuple(windows.shape[1:]) != (WINDOW, SIZE, SIZE, 3):
            raise ValueError(f"{self.name}: expected (W, {WINDOW}, {SIZE}, {SIZE}, 3), got {tuple(windows.shape)}")
        out = torch.empty(windows.shape[0], self.dim, dtype=torch.float32)
        bs = self.config.batch_size
        for i in range(0, windows.shape[0], bs):
            x = self.preprocess(windows[i : i + bs])
            with autocast(self.device, self.precision):
                y = self._features(x)
            out[i : i + bs] = F.normalize(y.float(), dim=1).cpu()
        return out
