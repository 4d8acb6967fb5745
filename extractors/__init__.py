"""Feature extractors: a small registered contract (``FeatureExtractor``) and the built-in models.

Importing the package registers ``resnet152_2d`` (video2d), ``resnext101_3d`` (video3d), ``logmel``
(audio), ``word2vec`` and ``hf_tokens`` (text). Heavy back-ends (gensim, transformers) are imported
only when those extractors are built.
"""

from .base import (
    FIELDS,
    FeatureExtractor,
    VisualConfig,
    available,
    create,
    get_extractor,
    register,
    resolve_device,
)
from .logmel import LogMelConfig, LogMelExtractor
from .resnet2d import ResNet152Config, ResNet152Extractor, resnet152_trunk
from .resnext3d import ResNeXt3D, ResNeXt101Config, ResNeXt101Extractor, resnext101_3d, windows_from_frames
from .text import HFTokensConfig, HFTokensExtractor, Word2VecConfig, Word2VecExtractor, minilm_path, tokenize
from .weights import MissingWeightsError, WeightsRef, file_sha256, load_state_dict_file, resolve_weights

__all__ = [
    "FIELDS",
    "FeatureExtractor",
    "HFTokensConfig",
    "HFTokensExtractor",
    "LogMelConfig",
    "LogMelExtractor",
    "MissingWeightsError",
    "ResNeXt101Config",
    "ResNeXt101Extractor",
    "ResNeXt3D",
    "ResNet152Config",
    "ResNet152Extractor",
    "VisualConfig",
    "WeightsRef",
    "Word2VecConfig",
    "Word2VecExtractor",
    "available",
    "create",
    "file_sha256",
    "get_extractor",
    "load_state_dict_file",
    "minilm_path",
    "register",
    "resnet152_trunk",
    "resnext101_3d",
    "resolve_device",
    "resolve_weights",
    "tokenize",
    "windows_from_frames",
]
