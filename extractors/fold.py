"""Inference copies of the visual backbones with every BatchNorm folded into the convolution before it.

At inference a BatchNorm after a convolution is an affine map per channel, so it can be folded into
that convolution's weights and bias (``w' = w·γ/σ``, ``b' = (b − μ)·γ/σ + β``). That removes one
full read and write of every activation map: on the 2-core CPU (``benchmarks/fold.py``), ResNet-152
runs 1.16× faster in fp32 and 1.09× in bf16 autocast, ResNeXt-101 3D 1.20× and 1.10×
(BENCHMARKS.md, "BatchNorm folding").

The folding is torch.fx's ``torch.fx.experimental.optimization.fuse`` (graph pattern conv → bn, only
where the convolution's output feeds nothing else), not a hand-written walk over module names. It is
computed in float32 before any device move or autocast, so the folded weights differ from the
original only by float32 rounding (relative ~1e-7); the features' bytes change, which is why the
extractors' ``fold_bn`` option is part of their fingerprint.

Tracing patches torch globally (``torch.nn.Module.__call__`` and friends) for its duration, so no
other thread may build or run a torch module while an extractor with ``fold_bn`` is built: the
extract stage starts its audio/text thread only once the visual models exist.
"""

from __future__ import annotations

from torch import fx, nn

__all__ = ["fold_batchnorm", "n_batchnorms"]


class _Method(nn.Module):
    """``module.<method>`` as a module's ``forward``, so that fx traces that method."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, x):  # noqa: ANN001, ANN201 - traced by fx
        return getattr(self.module, self.method)(x)


def fold_batchnorm(module: nn.Module, method: str = "forward") -> fx.GraphModule:
    """An eval-mode ``module``'s ``method`` as a graph module whose BatchNorms are folded into the
    convolutions before them. The returned module's ``forward`` computes ``module.<method>(x)``.

    ``module`` is consumed: its convolutions are replaced in place by the folded ones (no second copy
    of the weights is made), so only the returned module is to be used afterwards. Raises ValueError
    on a module in training mode (its BatchNorms normalise with batch statistics: nothing to fold).
    """
    from torch.fx.experimental.optimization import fuse

    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode")
    root = module if method == "forward" else _Method(module, method)
    return fuse(root, inplace=True)


def n_batchnorms(module: nn.Module) -> int:
    """How many BatchNorm layers ``module`` holds (0 once folded)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
