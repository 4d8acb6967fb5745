"""Locating model weight files, their identity, and deterministic random initialisation.

Search order for a weights file (``resolve_weights``):

1. the explicit path from the extractor's config (a file, or a folder that holds ``filename``);
   when it is given it is authoritative: a missing explicit path is an error, never a fallback;
2. ``$TORCH_HOME/hub/checkpoints/<filename>`` (``TORCH_HOME`` defaults to ``~/.cache/torch``), where
   ``torch.hub`` / torchvision put downloaded checkpoints.

The identity of a real file is the sha256 of its bytes; of random weights ``random-init-seed<N>``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from store.lineage import sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "MissingWeightsError",
    "WeightsRef",
    "checkpoint_dir",
    "expected_sha256_prefix",
    "load_state_dict_file",
    "locate_weights",
    "random_identity",
    "resolve_weights",
    "seeded",
]


class MissingWeightsError(FileNotFoundError):
    """A weights file was required but not found; the message says where it was looked for."""


@dataclass(frozen=True)
class WeightsRef:
    """Resolved weights: ``path`` (None for random init), ``identity`` (sha256 hex or
    ``random-init-seed<N>``) and ``random`` (True when no file was found and random init is allowed)."""

    path: Path | None
    identity: str
    random: bool


def checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints``, where torch.hub and torchvision keep downloaded checkpoints.

    ``TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch``, i.e. ``~/.cache/torch`` (``torch.hub.get_dir``);
    read at call time.
    """
    return Path(torch.hub.get_dir()).expanduser() / "checkpoints"


def expected_sha256_prefix(filename: str) -> str | None:
    """The leading hex digits of the sha256 a weights file's name promises, by torch.hub's convention
    (``resnet152-394f9c45.pth`` → ``"394f9c45"``, what ``torch.hub`` checks on download); None for a
    name that carries none (``resnext-101-kinetics.pth``)."""
    m = torch.hub.HASH_REGEX.search(filename)
    return m.group(1) if m and m.group(1) else None


def locate_weights(path: str | os.PathLike[str] | None, filename: str) -> tuple[Path | None, list[Path]]:
    """Where :func:`resolve_weights` finds ``filename`` (the module docstring's search order), without
    reading it: ``(the file, or None when absent; the places looked in)``."""
    if path is not None:
        explicit = Path(path).expanduser()
        candidate = explicit / filename if explicit.is_dir() else explicit
    else:
        candidate = checkpoint_dir() / filename
    return (candidate if candidate.is_file() else None), [candidate]


def random_identity(seed: int) -> str:
    """Identity string of randomly initialised weights."""
    return f"random-init-seed{seed}"


_warned: set[tuple[str, str, int]] = set()


def resolve_weights(
    path: str | os.PathLike[str] | None,
    filename: str,
    *,
    allow_random: bool,
    seed: int = 0,
    what: str = "model weights",
    hint: str | None = None,
) -> WeightsRef:
    """Find ``filename`` (see the module docstring for the search order).

    Args:
        path: explicit file, or folder holding ``filename``; None to search the default place only.
        filename: the expected file name, e.g. ``resnet152-394f9c45.pth``.
        allow_random: when nothing is found, return a random-init reference (with a loud warning)
            instead of raising. Never applies to a missing explicit ``path``.
        seed: seed of the random init, recorded in the identity.
        what: human-readable name of the weights, used in messages.
        hint: extra sentence for the error message (e.g. where to download the file).

    Raises:
        MissingWeightsError: the file was not found (and random init not allowed or ``path`` given).
    """
    found, looked = locate_weights(path, filename)
    if found is not None:
        return WeightsRef(found, sha256_file(found), False)
    if path is not None:
        raise MissingWeightsError(_missing_message(what, filename, looked, hint, explicit=True))
    if allow_random:
        if (what, filename, seed) not in _warned:  # loudly, once per process (describing an extractor resolves it too)
            _warned.add((what, filename, seed))
            logger.warning(
                "!!! %s: %s not found (looked in %s); using RANDOMLY INITIALISED weights (seed %d). "
                "The features will be meaningless for real use. !!!",
                what,
                filename,
                ", ".join(str(p) for p in looked),
                seed,
            )
        return WeightsRef(None, random_identity(seed), True)
    raise MissingWeightsError(_missing_message(what, filename, looked, hint, explicit=False))


def _missing_message(what: str, filename: str, looked: list[Path], hint: str | None, *, explicit: bool) -> str:
    lines = [f"{what}: file {filename!r} not found. Looked in:"]
    lines += [f"  - {p}" for p in looked]
    if explicit:
        lines.append("The path was given explicitly in the config; fix it or remove it to use the default place.")
    else:
        lines.append(
            f"Put {filename} at {checkpoint_dir() / filename} (set TORCH_HOME to move that folder), "
            "or set the extractor's `weights` config to its path"
            " (visual extractors also accept allow_random_weights: true, for smoke tests only)."
        )
    if hint:
        lines.append(hint)
    return "\n".join(lines)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded to ``seed``, restoring the caller's RNG state after.

    Build random-init models on the CPU inside this block: the result is identical across runs.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely (``weights_only=True``) onto the CPU and return a flat state dict.

    Accepts a plain state dict or a dict holding one under ``state_dict`` (or ``model``); strips a
    ``module.`` prefix (DataParallel) when every key carries it.
    """
    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def build_with_state(build: Callable[[], torch.nn.Module], state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``build()`` on the meta device, then every parameter and buffer taken from ``state`` (strict).

    No random init is computed only to be overwritten (~0.9 s for ResNet-152 + ResNeXt-101 on 2
    cores). Each tensor is copied into its own float32 (floating point) or same-dtype storage, so that
    a checkpoint whose tensors share one storage (tied or packed weights) gives independent
    parameters, as ``load_state_dict`` without ``assign`` would.
    """
    with torch.device("meta"):
        model = build()
    owned = {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}
    model.load_state_dict(owned, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # a non-persistent buffer: nothing in a state dict can give it a value
        raise ValueError(f"no value for {left[:3]} in the state dict")
    return model
