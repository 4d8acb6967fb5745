"""The feature-extractor contract and the registry of extractors by name.

An extractor is a class with a name, a field (``video2d``, ``video3d``, ``audio`` or ``text``), a
``version`` (bumped whenever its outputs change), a config dataclass ``Config``, and, once built,
``dim`` (width of an output row), ``rate`` (rows per second of media, None for text),
``weights_id`` (sha256 of the weights file, ``random-init-seed<N>``, or ``none``) and
``random_weights``. Calling it runs it on a batch.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from store.fields import FIELDS
from store.lineage import RUNTIME

from .precision import Amp, resolve_precision

logger = logging.getLogger(__name__)

__all__ = [
    "FeatureExtractor",
    "VisualConfig",
    "as_uint8_tensor",
    "available",
    "create",
    "get_extractor",
    "register",
    "resolve_device",
]


class FeatureExtractor(ABC):
    """Base class of all extractors (see the module docstring for the attributes)."""

    name: ClassVar[str]
    field: ClassVar[str]
    version: ClassVar[str]
    Config: ClassVar[type]

    dim: int
    rate: float | None
    weights_id: str = "none"
    random_weights: bool = False

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def __call__(self, batch: Any) -> Any:
        """Run the extractor on a batch (types and shapes are given by each subclass)."""

    def describe(self) -> dict[str, Any]:
        """Metadata recorded next to the features: extractor, version, weights, random_weights, rate, dim."""
        return {
            "extractor": self.name,
            "version": self.version,
            "weights": self.weights_id,
            "random_weights": self.random_weights,
            "rate": self.rate,
            "dim": self.dim,
        }

    @classmethod
    def describe_config(cls, config: Any) -> dict[str, Any]:
        """``describe()`` of the extractor that ``config`` would build, without building it.

        Used for cache fingerprints and ``mcn status``; subclasses override it with a cheap version
        (weights are resolved and hashed, never loaded). The default builds the extractor.
        """
        return cls(config).describe()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, field={self.field!r}, version={self.version!r}, "
            f"dim={self.dim}, rate={self.rate}, weights={self.weights_id!r})"
        )


_REGISTRY: dict[str, type[FeatureExtractor]] = {}

E = TypeVar("E", bound=type[FeatureExtractor])


def register(cls: E) -> E:
    """Class decorator: add an extractor class to the registry under ``cls.name``."""
    for attr in ("name", "field", "version", "Config"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} lacks the class attribute {attr!r}")
    if cls.field not in FIELDS:
        raise ValueError(f"{cls.__name__}.field = {cls.field!r}, expected one of {FIELDS}")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"extractor name {cls.name!r} already registered by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


BUILTIN_MODULES = ("extractors.resnet2d", "extractors.resnext3d", "extractors.logmel", "extractors.text")


def _load_builtins() -> None:
    """Import the built-in extractor modules (they register themselves); cheap after the first call."""
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def get_extractor(name: str) -> type[FeatureExtractor]:
    """The extractor class registered under ``name``; KeyError listing the known names otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown extractor {name!r}; available: {', '.join(available()) or 'none'}") from None


def available(field: str | None = None) -> list[str]:
    """Sorted names of the registered extractors, optionally only those of one field."""
    if field is not None and field not in FIELDS:
        raise ValueError(f"unknown field {field!r}, expected one of {FIELDS}")
    _load_builtins()
    return sorted(n for n, c in _REGISTRY.items() if field is None or c.field == field)


def create(name: str, config: Any = None) -> FeatureExtractor:
    """Build the extractor ``name`` from its ``Config`` instance, a mapping of its fields, or None
    (defaults). Unknown keys in a mapping raise TypeError naming them."""
    cls = get_extractor(name)
    if config is None:
        config = cls.Config()
    elif isinstance(config, Mapping):
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise TypeError(f"{name}: unknown config keys {unknown}; known: {sorted(known)}")
        config = cls.Config(**config)
    elif not isinstance(config, cls.Config):
        raise TypeError(f"{name}: config must be {cls.Config.__qualname__}, a mapping or None, not {type(config)}")
    return cls(config)


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclasses.dataclass
class VisualConfig:
    """Fields common to the visual extractors.

    weights: explicit weights file (or folder holding the default file name); None searches
        ``$TORCH_HOME/hub/checkpoints``.
    allow_random_weights: use seeded random weights when no file is found (smoke tests, CI).
    seed: seed of the random init.
    device: ``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:1``...
    batch_size: images or windows per forward pass.
    amp: ``auto`` (bf16 autocast on CUDA and on a CPU with native bf16, else float32), ``bf16`` or
        ``fp32``; old ``true``/``false`` mean ``auto``/``fp32`` (see extractors.precision). Runtime-only:
        the precision it resolves to on the device is part of ``describe()``, hence of fingerprints.
    fold_bn: fold every BatchNorm into the convolution before it for inference (extractors.fold):
        1.09–1.20× faster, the same features to float32 rounding. It changes the features' bytes, so
        it is part of the fingerprint; ``false`` runs the trunk exactly as loaded.
    """

    weights: str | None = None
    allow_random_weights: bool = False
    seed: int = 0
    device: str = dataclasses.field(default="auto", metadata=RUNTIME)
    batch_size: int = dataclasses.field(default=64, metadata=RUNTIME)
    amp: Amp = dataclasses.field(default="auto", metadata=RUNTIME)
    fold_bn: bool = True


class VisualExtractor(FeatureExtractor):
    """A visual backbone whose weights file is resolved by ``resolve_weights`` (see extractors.weights).

    Subclasses set ``WEIGHTS_FILENAME``, ``WEIGHTS_WHAT`` and ``WEIGHTS_HINT`` (for the error message),
    class-level ``dim`` and ``rate``, and use a ``VisualConfig``.
    """

    WEIGHTS_FILENAME: ClassVar[str]
    WEIGHTS_WHAT: ClassVar[str]
    WEIGHTS_HINT: ClassVar[str]
    #: ``bf16`` or ``fp32``: what ``config.amp`` resolved to on the device (set by the subclass)
    precision: str = "fp32"

    @classmethod
    def resolve(cls, config: VisualConfig) -> Any:
        """The ``WeightsRef`` of ``config`` (its file, or seeded random init when allowed)."""
        from extractors.weights import resolve_weights

        return resolve_weights(config.weights, cls.WEIGHTS_FILENAME, allow_random=config.allow_random_weights,
                               seed=config.seed, what=f"{cls.name} ({cls.WEIGHTS_WHAT})", hint=cls.WEIGHTS_HINT)

    def load_trunk(self, build: Any, config: VisualConfig, skip: tuple[str, ...] = ()) -> torch.nn.Module:
        """The trunk ``build()`` makes, in eval mode without gradients: random-init under
        ``seeded(config.seed)`` when ``config`` resolves to no file, else built from the file's tensors
        (``build_with_state``; keys starting with ``skip``, a head the trunk lacks, left out). Sets
        ``weights_id`` and ``random_weights``."""
        from extractors.weights import build_with_state, load_state_dict_file, seeded

        ref = self.resolve(config)
        self.weights_id = ref.identity
        self.random_weights = ref.random
        if ref.path is None:
            with seeded(config.seed):
                model = build()
        else:
            state = {k: v for k, v in load_state_dict_file(ref.path).items() if not (skip and k.startswith(skip))}
            model = build_with_state(build, state)
            logger.info("%s: loaded %s (sha256 %s)", self.name, ref.path, ref.identity[:12])
        return model.eval().requires_grad_(False)

    @classmethod
    def describe_config(cls, config: VisualConfig) -> dict[str, Any]:
        ref = cls.resolve(config)
        return {"extractor": cls.name, "version": cls.version, "weights": ref.identity,
                "random_weights": ref.random, "rate": cls.rate, "dim": cls.dim,
                "precision": resolve_precision(config.amp, resolve_device(config.device))}

    def describe(self) -> dict[str, Any]:
        """``FeatureExtractor.describe()`` plus ``precision``: ``bf16`` or ``fp32``, as resolved on the
        device (it changes the features' bytes, so it is part of the fingerprint and the records)."""
        return {**super().describe(), "precision": self.precision}


def as_uint8_tensor(x: Any, ndim: int, what: str) -> torch.Tensor:
    """Accept a torch tensor or numpy array of dtype uint8 with ``ndim`` dims and channels last (3)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype != torch.uint8 or t.ndim != ndim or t.shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 with {ndim} dims and 3 channels last, got {t.dtype} {tuple(t.shape)}")
    return t
