"""ResDAVEnet audio encoder (Harwath et al.), as used by AVLnet and MCN.

Parameter names match the reference ``model_davenet.py`` (``conv1``, ``bn1``, ``batchnorm1``,
``layer1``..``layer4`` of ``SpeechBasicBlock``-style blocks, ``layerK.0.downsample.{0,1}``) so that the
reference checkpoint loads unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["BasicBlock", "ResDAVEnet", "downsampled_length"]


class BasicBlock(nn.Module):
    """Residual block of two (1 × width) convolutions with BN; optional 1×1 downsample shortcut.

    Input (B, C_in, 1, T) → output (B, C_out, 1, ceil(T / stride)).
    """

    def __init__(self, in_ch: int, out_ch: int, width: int = 9, stride: int = 1) -> None:
        super().__init__()
        pad = width // 2
        self.conv1 = nn.Conv2d(in_ch, out_ch, (1, width), stride=(1, stride), padding=(0, pad), bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, (1, width), stride=1, padding=(0, pad), bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=(1, stride), bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class ResDAVEnet(nn.Module):
    """ResDAVEnet: (B, n_mels, T) or (B, 1, n_mels, T) log-mel → (B, widths[-1], T') features.

    ``conv1`` (kernel (n_mels, 1), no bias) collapses the frequency axis; each of the stages has
    ``blocks[i]`` residual blocks of width ``widths[i + 1]``, the first one with stride 2 in time, so
    T' = ceil(T / 2**len(blocks)) (16 for the reference).  ``batchnorm1`` exists (and is saved) but is
    not used in ``forward``, exactly as in the reference; its parameters have requires_grad False.
    """

    def __init__(
        self,
        n_mels: int = 40,
        widths: Sequence[int] = (128, 128, 256, 512, 1024),
        blocks: Sequence[int] = (2, 2, 2, 2),
        kernel_width: int = 9,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks) + 1:
            raise ValueError(f"widths needs len(blocks) + 1 = {len(blocks) + 1} entries, got {len(widths)}")
        if len(blocks) < 1 or any(b < 1 for b in blocks):
            raise ValueError(f"every stage needs at least one block, got {tuple(blocks)}")
        self.n_mels = n_mels
        self.n_stages = len(blocks)
        # Unused in forward (reference quirk), kept for the checkpoint keys; frozen so that DDP does not
        # wait for gradients that never come.
        self.batchnorm1 = nn.BatchNorm2d(1)
        self.batchnorm1.requires_grad_(False)
        self.conv1 = nn.Conv2d(1, widths[0], kernel_size=(n_mels, 1), stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_ch = widths[0]
        for i, n_blocks in enumerate(blocks):
            out_ch = widths[i + 1]
            stage = [BasicBlock(in_ch, out_ch, kernel_width, stride=2)]
            stage += [BasicBlock(out_ch, out_ch, kernel_width, stride=1) for _ in range(n_blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_ch = out_ch
        self.out_dim = in_ch
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: conv ~ N(0, 2 / (kh·kw·C_out)); BN weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, n_mels, T) or (B, 1, n_mels, T) → (B, out_dim, T')."""
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != self.n_mels:
            raise ValueError(f"expected audio (B, {self.n_mels}, T) or (B, 1, {self.n_mels}, T), got {tuple(x.shape)}")
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.squeeze(2)


def downsampled_length(t: int | Tensor, n_stages: int = 4) -> int | Tensor:
    """Number of ResDAVEnet output steps for T input frames: T' = ceil(T / 2) applied n_stages times."""
    for _ in range(n_stages):
        t = (t + 1) // 2
    return t

