"""Feature extractors: a small registered contract (``FeatureExtractor``) and the built-in models.

The built-ins are ``resnet152_2d`` (video2d), ``resnext101_3d`` (video3d), ``logmel`` (audio),
``word2vec`` and ``hf_tokens`` (text); the registry imports them on first use. Attributes of this
package are loaded lazily, so that decoding worker processes (which import ``extractors.decode``)
do not pay for the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "extractors.base": ("FeatureExtractor", "VisualConfig", "available", "create", "get_extractor",
                        "register", "resolve_device"),
    "extractors.logmel": ("LogMelConfig", "LogMelExtractor"),
    "extractors.resnet2d": ("ResNet152Config", "ResNet152Extractor", "resnet152_trunk"),
    "extractors.resnext3d": ("ResNeXt3D", "ResNeXt101Config", "ResNeXt101Extractor", "resnext101_3d",
                             "windows_from_frames"),
    "extractors.text": ("HFTokensConfig", "HFTokensExtractor", "Word2VecConfig", "Word2VecExtractor",
                        "minilm_path", "tokenize"),
    "extractors.weights": ("MissingWeightsError", "WeightsRef", "load_state_dict_file",
                           "resolve_weights"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'extractors' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
