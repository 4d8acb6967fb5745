"""Search index on fixture shards with a tiny random MCN: ranking against a direct numpy computation,
loading a saved index (the model is not called again), refusing a damaged one, queries without a
known word. When a saved index is stale (checkpoint, features, clip settings) is decided by the
pipeline (pipeline/search.py), and tested there."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluation.clipset import ClipSetConfig, build_clipset
from evaluation.embed import embed_clipset
from evaluation.search import SearchIndex, search_text
from extractors import create
from model.checkpoint import save_model_checkpoint
from model.mcn import MCN, MCNConfig
from store.layout import Workspace
from store.reader import FeatureSet, open_features
from tests.model.conftest import D2, D3, DW, N_MELS, make_features

CLIPS = ClipSetConfig(audio_frames=200)


def tiny_model(seed: int) -> MCN:
    torch.manual_seed(seed)
    return MCN(MCNConfig(embed_dim=32, video_dim=D2 + D3, text_dim=DW, n_mels=N_MELS, davenet_dim=32,
                         davenet_widths=(8, 8, 16, 16, 32), recon_dim=16))


class CallCounter:
    """Counts forward calls of the model's video head (every clip embedding goes through it)."""

    def __init__(self, model: MCN) -> None:
        self.calls = 0
        model.GU_video.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> FeatureSet:
    """2 shards with a no_audio, a no_captions, a failed and a corrupted video + a corrupted shard."""
    ws = Workspace(tmp_path_factory.mktemp("search") / "ws")
    make_features(ws, n_shards=2, per_shard=4, seed=3, duration=20.0)
    return open_features(ws)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory: pytest.TempPathFactory):
    from gensim.models import KeyedVectors

    vocab = ["cut", "the", "onion", "boil", "water"]
    kv = KeyedVectors(vector_size=DW)
    kv.add_vectors(vocab, np.random.default_rng(11).standard_normal((len(vocab), DW)).astype(np.float32))
    path = tmp_path_factory.mktemp("w2v") / "vectors.txt"
    kv.save_word2vec_format(str(path), binary=False)
    return create("word2vec", {"weights": str(path), "binary": False})


def direct_scores(model: MCN, features: FeatureSet, words: np.ndarray, n: int) -> tuple[object, np.ndarray]:
    """The clips and t·(v + a) (audio only where present) computed from scratch."""
    clips = build_clipset(features, CLIPS)
    emb = embed_clipset(model, clips)
    padded = np.zeros((1, 20, DW), np.float32)
    padded[0, :n] = words[:n]
    t = model.embed_text(torch.from_numpy(padded))[0].numpy().astype(np.float64)
    scores = emb["video"].astype(np.float64) @ t + clips.audio_mask * (emb["audio"].astype(np.float64) @ t)
    return clips, scores


def test_search_ranks_like_numpy_and_loads_the_saved_index(features: FeatureSet, tmp_path: Path) -> None:
    model = tiny_model(0)
    ckpt = save_model_checkpoint(tmp_path / "ckpt.pt", model)
    counter = CallCounter(model)
    cache = tmp_path / "cache"
    index = SearchIndex.build(features, ckpt, cache, model=model, clip_config=CLIPS)
    assert not index.from_cache and counter.calls > 0
    assert {p.name for p in cache.iterdir()} == {"index.json", "video.npy", "audio.npy", "audio_mask.npy"}
    assert index.audio_mask.sum() < len(index) and index.audio_mask.any()  # the no_audio video is there

    words = np.random.default_rng(4).standard_normal((20, DW)).astype(np.float32)
    clips, expected = direct_scores(model, features, words, 5)
    assert len(index) == len(clips) > 10
    hits = index.search(words, 5, top=7)
    assert len(hits) == 7
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    best = np.argsort(-expected, kind="stable")[:7]
    np.testing.assert_allclose(scores, expected[best], rtol=1e-5)
    assert [(h.video_id, h.start, h.end, h.caption) for h in hits] == [
        (clips.video_ids[i], clips.starts[i], clips.ends[i], clips.captions[i]) for i in best
    ]
    assert len(index.search(words, 5, top=10_000)) == len(index)

    calls = counter.calls
    again = SearchIndex.load(cache, ckpt, clip_config=CLIPS, model=model)
    assert again.from_cache and counter.calls == calls  # nothing re-embedded
    np.testing.assert_array_equal(again.video, index.video)
    np.testing.assert_array_equal(again.audio, index.audio)
    np.testing.assert_array_equal(again.audio_mask, index.audio_mask)
    assert again.video_ids == index.video_ids and again.captions == index.captions
    assert again.problems == index.problems
    np.testing.assert_array_equal(again.starts, index.starts)
    np.testing.assert_array_equal(again.ends, index.ends)
    assert again.search(words, 5, top=7) == hits

    lazy = SearchIndex.load(cache, ckpt, clip_config=CLIPS)  # no model: none loaded
    assert lazy.from_cache and lazy.model is None
    lazy_hits = lazy.search(words, 5, top=7)  # loads the checkpoint for the query
    assert lazy.model is not None
    assert [h.video_id for h in lazy_hits] == [h.video_id for h in hits]
    np.testing.assert_allclose([h.score for h in lazy_hits], scores, rtol=1e-5)

    with pytest.raises(ValueError, match="no known word in query"):
        index.search(words, 0)


def test_build_always_rebuilds_and_saves(features: FeatureSet, tmp_path: Path) -> None:
    ckpt, cache = tmp_path / "ckpt.pt", tmp_path / "cache"
    m1 = tiny_model(1)
    save_model_checkpoint(ckpt, m1)
    first = SearchIndex.build(features, ckpt, cache, model=m1, clip_config=CLIPS)
    video1 = np.array(first.video)

    m2 = tiny_model(2)  # new weights in the same file: build embeds again, whatever was saved
    save_model_checkpoint(ckpt, m2)
    counter = CallCounter(m2)
    second = SearchIndex.build(features, ckpt, cache, model=m2, clip_config=CLIPS)
    assert not second.from_cache and counter.calls > 0
    assert not np.allclose(second.video, video1)
    loaded = SearchIndex.load(cache, ckpt, clip_config=CLIPS, model=m2)
    np.testing.assert_array_equal(loaded.video, second.video)  # the saved index is the new one
    calls = counter.calls
    assert not SearchIndex.build(features, ckpt, cache, model=m2, clip_config=CLIPS).from_cache
    assert counter.calls > calls


def _damage_index_json(cache: Path, **changes: object) -> None:
    meta = json.loads((cache / "index.json").read_text())
    meta.update(changes)
    (cache / "index.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [
    pytest.param(lambda c: (c / "audio.npy").unlink(), id="array-missing"),
    pytest.param(lambda c: (c / "index.json").unlink(), id="index-json-missing"),
    pytest.param(lambda c: (c / "index.json").write_text("{not json"), id="index-json-unreadable"),
    pytest.param(lambda c: _damage_index_json(c, n_clips=3), id="n-clips-disagrees"),
    pytest.param(lambda c: _damage_index_json(c, dim=7), id="dim-disagrees"),
    pytest.param(lambda c: _damage_index_json(c, captions=["only one"]), id="clip-list-disagrees"),
    pytest.param(lambda c: np.save(c / "video.npy", np.zeros((2, 32), np.float32)), id="array-shape"),
    pytest.param(lambda c: np.save(c / "audio_mask.npy", np.load(c / "audio_mask.npy").astype(np.int8)),
                 id="mask-not-bool"),
    pytest.param(lambda c: (c / "video.npy").write_bytes(b"garbage"), id="array-unreadable"),
])
def test_load_refuses_a_damaged_index(features: FeatureSet, tmp_path: Path, damage) -> None:
    model = tiny_model(0)
    ckpt = save_model_checkpoint(tmp_path / "ckpt.pt", model)
    cache = tmp_path / "cache"
    SearchIndex.build(features, ckpt, cache, model=model, clip_config=CLIPS)
    assert len(SearchIndex.load(cache, ckpt, clip_config=CLIPS)) > 10  # intact: loads
    damage(cache)
    with pytest.raises(ValueError, match="damaged"):
        SearchIndex.load(cache, ckpt, clip_config=CLIPS)
    # a rebuild repairs it
    SearchIndex.build(features, ckpt, cache, model=model, clip_config=CLIPS)
    assert SearchIndex.load(cache, ckpt, clip_config=CLIPS).from_cache


def test_interrupted_build_leaves_no_index_that_loads(features: FeatureSet, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluation.search as search_mod
    from store import atomic

    model = tiny_model(0)
    ckpt = save_model_checkpoint(tmp_path / "ckpt.pt", model)
    cache = tmp_path / "cache"
    SearchIndex.build(features, ckpt, cache, model=model, clip_config=CLIPS)

    opened: list[Path] = []

    def killed_after_the_first_array(path, *args, **kwargs):  # the process dies while saving
        opened.append(Path(path))
        if len(opened) == 2:
            raise KeyboardInterrupt
        return atomic.atomic_open(path, *args, **kwargs)

    fake = SimpleNamespace(atomic_open=killed_after_the_first_array, write_json=atomic.write_json)
    monkeypatch.setattr(search_mod, "atomic", fake)
    with pytest.raises(KeyboardInterrupt):
        SearchIndex.build(features, ckpt, cache, model=tiny_model(5), clip_config=CLIPS)
    assert not (cache / "index.json").exists()
    with pytest.raises(ValueError, match="damaged"):
        SearchIndex.load(cache, ckpt, clip_config=CLIPS)


def test_load_without_a_saved_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="damaged"):
        SearchIndex.load(tmp_path / "nothing", tmp_path / "ckpt.pt")


def test_search_text(features: FeatureSet, tmp_path: Path, extractor) -> None:
    model = tiny_model(0)
    ckpt = save_model_checkpoint(tmp_path / "ckpt.pt", model)
    index = SearchIndex.build(features, ckpt, tmp_path / "cache", model=model, clip_config=CLIPS)
    with pytest.raises(ValueError, match="no known word in query 'zebra QUUX'"):
        search_text(index, model, extractor, "zebra QUUX", top=3)
    hits = search_text(index, model, extractor, "Cut the onion, then boil water", top=3)
    words, lengths = extractor(["the onion boil water"])
    assert lengths.tolist() == [4]  # "Cut" is not in the vocabulary (case kept)
    assert hits == index.search(words[0], 4, top=3)
    _, expected = direct_scores(model, features, words[0], 4)
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected)[::-1][:3], rtol=1e-5)
