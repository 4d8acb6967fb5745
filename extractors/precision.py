"""Numeric precision of the models: the ``amp`` setting, what it resolves to on a device, one autocast.

The one owner of the concept for the extractors and for training (``model.train`` asks this module).

``amp`` (a config value) is one of

- ``"auto"`` (default): bf16 autocast where the device computes bf16 natively — any CUDA device
  (as before) and a CPU with AVX-512 bf16 or AMX bf16 (asked of torch's CPU capability query, not
  guessed) — else float32;
- ``"bf16"``: bf16 autocast on every device (on a CPU without native bf16 it is emulated: slow);
- ``"fp32"``: no autocast.

Older configs said ``amp: true`` / ``false`` (YAML also reads ``on`` / ``off`` as booleans):
true means ``"auto"`` (bf16 on CUDA as before, and now on a bf16 CPU too), false means ``"fp32"``.

The *resolved* precision (``"bf16"`` or ``"fp32"``; ``"fp16"`` for training with
``amp_dtype: float16`` on CUDA) changes the outputs' bytes, so it is what enters fingerprints and
records; the ``amp`` setting itself is runtime-only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "AMP_MODES",
    "PRECISIONS",
    "Amp",
    "autocast",
    "cpu_has_bf16",
    "normalize_amp",
    "resolve_precision",
    "torch_dtype",
]

#: The values of an ``amp`` setting (booleans are accepted for old configs, see the module docstring).
AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp32")
Amp = Literal["auto", "bf16", "fp32"] | bool
#: Resolved precisions and their autocast dtypes (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {True: "auto", False: "fp32", "on": "auto", "off": "fp32", "true": "auto", "false": "fp32",
            "bfloat16": "bf16", "float32": "fp32"}


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX-512 bf16 or AMX bf16; Arm bf16/SVE bf16).

    Asked of ``torch.cpu.get_capabilities()`` (torch's cpuinfo query); older torch builds without it
    fall back to ``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``. oneDNN's own
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not used: it is also true on plain AVX-512,
    where bf16 is emulated and slower than float32.
    """
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        caps = get()
        keys = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
        return any(bool(caps.get(k, False)) for k in keys)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def normalize_amp(amp: Any) -> str:
    """An ``amp`` setting as one of :data:`AMP_MODES` (old booleans mapped); ValueError otherwise."""
    key = amp.lower() if isinstance(amp, str) else amp
    mode = _ALIASES.get(key, key) if isinstance(key, (str, bool)) else key
    if mode not in AMP_MODES:
        raise ValueError(f"amp: {amp!r} is not one of {list(AMP_MODES)} (or true/false)")
    return mode


def resolve_precision(amp: Any, device: torch.device | str) -> str:
    """The precision a model computes in on ``device`` under ``amp``: ``"bf16"`` or ``"fp32"``."""
    mode = normalize_amp(amp)
    kind = torch.device(device).type
    if mode == "fp32" or kind not in ("cpu", "cuda"):
        return "fp32"
    if mode == "bf16" or kind == "cuda":
        if kind == "cpu" and not cpu_has_bf16():
            logger.warning("amp: bf16 forced on a CPU without native bf16 (emulated: slower than fp32)")
        return "bf16"
    return "bf16" if cpu_has_bf16() else "fp32"


def torch_dtype(precision: str) -> torch.dtype:
    """The dtype a resolved precision computes in (float32 for ``"fp32"``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}, expected one of {list(PRECISIONS)}")
    return PRECISIONS[precision] or torch.float32


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device`` in a resolved precision; a no-op context for ``"fp32"``."""
    dtype = torch_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
