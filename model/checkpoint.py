"""Checkpoint I/O: atomic saves, our checkpoint format, and loading of the reference ``e{N}.pth``.

Two formats are read by :func:`load_mcn`:

- the reference checkpoint: a flat state dict (``net.module.state_dict()``), keys as SPEC §7, possibly
  with a ``module.`` prefix (saved from a DataParallel/DDP wrapper);
- ours: ``{"model": state_dict, "mcn_config": asdict(MCNConfig), ...training state}``.

Everything is read with ``torch.load(weights_only=True)``: no pickle of arbitrary objects.

No checkpoint ever holds a non-finite value: :func:`save_model_checkpoint` checks every floating
tensor it is given (model parameters and buffers, optimizer state, k-means state, ...) and raises
:class:`NonFiniteCheckpoint`, naming the first bad tensor, instead of writing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.mcn import MCN, MCNConfig
from store import atomic

__all__ = [
    "NonFiniteCheckpoint",
    "atomic_torch_save",
    "first_nonfinite",
    "save_model_checkpoint",
    "load_checkpoint",
    "load_mcn",
    "strip_module_prefix",
    "config_from_state_dict",
    "check_state_dict",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 10


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` through :func:`store.atomic.atomic_open`: a reader never sees a partial file,
    either the previous version or the complete new one."""
    path = Path(path)
    with atomic.atomic_open(path, "wb") as fh:
        torch.save(obj, fh)
    return path


def _unwrap(model: nn.Module) -> nn.Module:
    """The MCN inside a DataParallel / DistributedDataParallel / torch.compile wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class NonFiniteCheckpoint(ValueError):
    """A checkpoint about to be written holds a NaN or infinite value; nothing was written."""


def _nonfinite_count(t: Tensor) -> int:
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0
    return int((~torch.isfinite(t)).sum().item())


def first_nonfinite(obj: Any, prefix: str = "") -> tuple[str, int] | None:
    """``(path, n_bad)`` of the first floating tensor in ``obj`` (tensors, mappings, lists, tuples,
    depth first in order) holding a NaN or an infinity; None when every value is finite."""
    if isinstance(obj, Tensor):
        n = _nonfinite_count(obj)
        return (prefix or "<tensor>", n) if n else None
    if isinstance(obj, Mapping):
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = first_nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
        if found is not None:
            return found
    return None


def _optimizer_names(inner: nn.Module, extra: Mapping[str, Any]) -> Mapping[str, Any]:
    """``extra`` with the optimizer state keyed by parameter names instead of indices (for messages),
    when the optimizer holds exactly the model's parameters in order."""
    opt = extra.get("optimizer")
    if not isinstance(opt, Mapping) or not isinstance(opt.get("state"), Mapping):
        return extra
    names = [n for n, _ in inner.named_parameters()]
    ids = [i for g in opt.get("param_groups", []) for i in g.get("params", [])]
    if sorted(ids) != list(range(len(names))):
        return extra
    state = {f"{names[i]}" if isinstance(i, int) and i < len(names) else str(i): v for i, v in opt["state"].items()}
    return {**extra, "optimizer": {**opt, "state": state}}


def check_finite(model_state: Mapping[str, Tensor], extra: Mapping[str, Any], path: Path,
                 inner: nn.Module | None = None) -> None:
    """Raise :class:`NonFiniteCheckpoint` when a floating tensor of the model state or of ``extra``
    holds a NaN or infinity (the first one found is named)."""
    found = first_nonfinite(model_state, "model")
    if found is None:
        found = first_nonfinite(_optimizer_names(inner, extra) if inner is not None else extra)
    if found is not None:
        name, n = found
        raise NonFiniteCheckpoint(f"refusing to write checkpoint {path}: {name} holds {n} non-finite value(s) "
                                  "(NaN or inf); no checkpoint is written with non-finite weights or state")


def save_model_checkpoint(path: str | os.PathLike[str], model: nn.Module, extra: Mapping[str, Any] | None = None) -> Path:
    """Atomically save ``{"model": state_dict, "mcn_config": dict, **extra}`` (our format).

    ``model`` may be wrapped (DDP, DataParallel, compiled): the saved keys never carry ``module.``.
    ``extra`` holds the rest of the training state (optimizer, scheduler, k-means, RNG, step, ...); it
    must only contain tensors and plain Python containers/scalars to load with ``weights_only=True``.
    Raises :class:`NonFiniteCheckpoint` (and writes nothing) when any floating tensor of the model or
    of ``extra`` is not finite: a path such as ``model.GU_video.fc.weight`` or
    ``optimizer.state.GU_video.fc.weight.exp_avg_sq`` names the first bad one.
    """
    inner = _unwrap(model)
    if not isinstance(inner, MCN):
        raise TypeError(f"expected an MCN (possibly wrapped), got {type(inner).__name__}")
    extra = dict(extra or {})
    clash = {"model", "mcn_config"} & set(extra)
    if clash:
        raise ValueError(f"extra must not contain the reserved keys {sorted(clash)}")
    state = inner.state_dict()
    check_finite(state, extra, Path(path), inner)
    obj = {"model": state, "mcn_config": asdict(inner.config), **extra}
    return atomic_torch_save(obj, path)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a FileNotFoundError that names the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def strip_module_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove a leading ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (compile) from every key."""
    out = dict(state)
    for prefix in ("module.", "_orig_mod."):
        while out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"cannot infer the MCN configuration: key {key!r} is missing from the checkpoint")
    return tuple(state[key].shape)


def config_from_state_dict(state: Mapping[str, Tensor]) -> MCNConfig:
    """Infer an :class:`MCNConfig` from the shapes of a (reference-style) MCN state dict."""
    embed_dim, video_dim = _shape(state, "GU_video.fc.weight")
    _, text_dim = _shape(state, "text_pooling_caption.fc.weight")
    conv1 = _shape(state, "DAVEnet.conv1.weight")  # (C0, 1, n_mels, 1)
    recon_dim = _shape(state, "recon_v.0.weight")[0]
    stage_re = re.compile(r"^DAVEnet\.layer(\d+)\.(\d+)\.conv1\.weight$")
    blocks: dict[int, int] = {}
    for key in state:
        m = stage_re.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise ValueError(f"cannot infer the DAVEnet stages from the checkpoint keys (found stages {sorted(blocks)})")
    widths = [conv1[0]] + [_shape(state, f"DAVEnet.layer{s}.0.conv1.weight")[0] for s in sorted(blocks)]
    kernel = _shape(state, "DAVEnet.layer1.0.conv1.weight")[-1]
    return MCNConfig(
        embed_dim=embed_dim,
        video_dim=video_dim,
        text_dim=text_dim,
        n_mels=conv1[2],
        davenet_dim=widths[-1],
        davenet_widths=tuple(widths),
        davenet_blocks=tuple(blocks[s] for s in sorted(blocks)),
        davenet_kernel=kernel,
        recon_dim=recon_dim,
        video_input_norm="video_input_norm.running_mean" in state,
    )


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {title}: {shown}{more}"


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Raise a ValueError naming missing / unexpected keys and shape mismatches (first 10 each)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = [
            _listing(title, items)
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if items
        ]
        raise ValueError("checkpoint does not fit the MCN model: " + "; ".join(parts))


def load_mcn(path: str | os.PathLike[str], config: MCNConfig | None = None, map_location: Any = "cpu") -> MCN:
    """Load an MCN from our checkpoint or from the reference ``e{N}.pth`` (flat state dict).

    ``config``: the architecture; when None it is taken from the checkpoint's ``mcn_config`` (ours) or
    inferred from the tensor shapes (reference). The returned model is in eval mode, on the device of
    ``map_location``, float32 parameters. Raises FileNotFoundError (missing file) or ValueError (keys
    or shapes that do not fit, listed).
    """
    obj = load_checkpoint(path, map_location)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    saved_cfg: MCNConfig | None = None
    if "model" in obj and isinstance(obj["model"], Mapping):
        state = obj["model"]
        if isinstance(obj.get("mcn_config"), Mapping):
            saved_cfg = MCNConfig.from_dict(dict(obj["mcn_config"]))
    else:
        state = obj
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict; {_listing('non-tensor entries', [str(k) for k in bad])}")
    state = strip_module_prefix(state)
    cfg = config or saved_cfg or config_from_state_dict(state)

    with torch.device("meta"):
        model = MCN(cfg)
    # Files from PyTorch < 0.4.1 have no BatchNorm step counters; they are not used (momentum is set).
    for key in model.state_dict():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    check_state_dict(model, state)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # pragma: no cover - strict loading makes this impossible
        raise ValueError(_listing("tensors not loaded", leftover))
    model.eval()
    logger.info("loaded MCN from %s (%s format)", path, "our" if saved_cfg is not None else "reference")
    return model
