"""The retrieval protocol of `mcn evaluate` on fixture shards: which denominator the recalls take, and
how many annotated queries are reported missing (docs/formats.md, metrics.json)."""

from __future__ import annotations

import numpy as np
import pytest

from model.checkpoint import save_model_checkpoint
from model.mcn import MCN, MCNConfig
from pipeline.config import Config
from pipeline.evalsets import EvalSetConfig
from pipeline.evaluate import retrieve_set
from store.layout import Workspace
from store.reader import open_features
from tests.model.conftest import D2, D3, DW, N_MELS, random_video, write_shard


@pytest.fixture(scope="module")
def three_clips(tmp_path_factory: pytest.TempPathFactory):
    """A workspace whose shards hold 3 videos of one caption each (3 queries) and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("protocol")
    ws = Workspace(root / "ws")
    rng = np.random.default_rng(0)
    write_shard(ws, 0, [random_video(f"vid-{i}", rng, duration=8.0, n_captions=1) for i in range(3)])
    cfg = MCNConfig(embed_dim=16, video_dim=D2 + D3, text_dim=DW, n_mels=N_MELS, davenet_dim=16,
                    davenet_widths=(8, 8, 8, 16, 16), recon_dim=8)
    ckpt = save_model_checkpoint(root / "step-000001.pt", MCN(cfg))
    return ws, ckpt


def naive_ranks(ws: Workspace, name: str) -> np.ndarray:
    """0-based ranks of each true clip from the saved embeddings: text · (video + audio), pessimistic."""
    emb = np.load(ws.eval_embeddings(name))
    sim = emb["text"].astype(np.float64) @ (emb["video"] + emb["audio"]).astype(np.float64).T
    return np.array([sum(sim[i, j] >= sim[i, i] for j in range(len(sim)) if j != i) for i in range(len(sim))])


def evaluate(three_clips, spec: EvalSetConfig, n_annotated: int | None) -> tuple[dict, np.ndarray]:
    ws, ckpt = three_clips
    cfg = Config()
    cfg.evaluate.device = "cpu"
    metrics = retrieve_set(ws, cfg, spec, spec.name, ckpt, open_features(ws), [], n_annotated)
    return metrics, naive_ranks(ws, spec.name)


def test_recalls_are_over_the_clips_evaluated(three_clips) -> None:
    # YouCook2-style: 5 annotated clips, 2 of them without a local video: 3 evaluated.
    metrics, ranks = evaluate(three_clips, EvalSetConfig(name="yc", kind="youcook2"), 5)
    assert (metrics["n_queries"], metrics["n_total"]) == (3, 3)
    assert (metrics["n_annotated"], metrics["n_missing"]) == (5, 2)
    m = metrics["retrieval"]["text_to_video_audio"]
    # 3 candidates: every rank is < 5, so R@5 = R@10 = 3 / 3 (5 annotated would give 3 / 5)
    assert (m["R@5"], m["R@10"]) == (1.0, 1.0)
    assert m["R@1"] == pytest.approx(np.count_nonzero(ranks == 0) / 3)
    assert m["median_rank"] == np.median(ranks) + 1
    assert "median_rank_all" not in m  # nothing is counted beyond the clips evaluated


def test_a_fixed_n_total_counts_missing_clips_as_misses(three_clips) -> None:
    # MSR-VTT-style: the set fixes its size (n_total 5); the 2 clips not found are misses.
    metrics, ranks = evaluate(three_clips, EvalSetConfig(name="msr", kind="msrvtt", n_total=5), 5)
    assert (metrics["n_queries"], metrics["n_total"], metrics["n_missing"]) == (3, 5, 2)
    m = metrics["retrieval"]["text_to_video_audio"]
    assert (m["R@5"], m["R@10"]) == (pytest.approx(3 / 5), pytest.approx(3 / 5))
    assert m["R@1"] == pytest.approx(np.count_nonzero(ranks == 0) / 5)
    assert m["median_rank"] == np.median(ranks) + 1  # over the 3 evaluated, as the reference
    assert m["median_rank_all"] == np.median(list(ranks) + [3, 3]) + 1  # missing at 0-based rank M = 3
    assert m["mean_rank_all"] == pytest.approx((ranks.sum() + 6) / 5 + 1)


def test_clips_cut_by_max_clips_are_not_missing(three_clips) -> None:
    metrics, _ = evaluate(three_clips, EvalSetConfig(name="cut", kind="youcook2", max_clips=2), 5)
    assert (metrics["n_queries"], metrics["n_annotated"], metrics["n_missing"]) == (2, 5, 2)
    assert metrics["retrieval"]["text_to_video"]["R@5"] == 1.0
    # a set without an annotation file reports no n_annotated / n_missing
    metrics, _ = evaluate(three_clips, EvalSetConfig(name="plain"), None)
    assert "n_missing" not in metrics and metrics["n_total"] == 3


def test_query_words_keep_the_stored_width_or_the_sets_max_words(three_clips) -> None:
    """A set's queries keep the word rows its text shards store (the set's own ``max_words`` when its
    text was extracted with one), zero-padded; a narrower ``max_words`` cuts them."""
    from evaluation.clipset import ClipSetConfig, build_clipset
    from tests.model.conftest import MAX_WORDS

    ws, _ = three_clips
    stored = build_clipset(open_features(ws), ClipSetConfig())
    assert stored.text.shape == (3, MAX_WORDS, DW)
    wide = build_clipset(open_features(ws), ClipSetConfig(max_words=MAX_WORDS + 10))
    assert wide.text.shape == (3, MAX_WORDS + 10, DW)
    np.testing.assert_array_equal(wide.text[:, :MAX_WORDS], stored.text)
    assert not wide.text[:, MAX_WORDS:].any()
    narrow = build_clipset(open_features(ws), ClipSetConfig(max_words=1))
    assert narrow.text.shape == (3, 1, DW) and narrow.text_len.tolist() == [1, 1, 1]
    np.testing.assert_array_equal(narrow.text[:, 0], stored.text[:, 0])


def test_a_sets_max_words_is_its_text_extraction_and_enters_its_lineage_only_when_set(tmp_path) -> None:
    import dataclasses

    from pipeline.evaluate import set_extract_config

    cfg = Config()
    plain = EvalSetConfig(name="yc", kind="youcook2", videos=str(tmp_path))
    assert set_extract_config(cfg, plain) is cfg
    assert plain.lineage_dict() == {k: v for k, v in dataclasses.asdict(plain).items() if k != "max_words"}
    wide = EvalSetConfig(name="yc", kind="youcook2", videos=str(tmp_path), max_words=30)
    wide.validate()
    set_cfg = set_extract_config(cfg, wide)
    assert set_cfg.extract.text.options["max_words"] == 30 and set_cfg.extract.text.name == cfg.extract.text.name
    assert "max_words" not in cfg.extract.text.options  # the main config is untouched
    assert set_cfg.extract.video2d == cfg.extract.video2d and set_cfg.scan == cfg.scan
    assert wide.lineage_dict()["max_words"] == 30 and wide.lineage_dict() != plain.lineage_dict()
    for bad, match in ((EvalSetConfig(name="w", max_words=30), "own videos"),
                       (EvalSetConfig(name="c", kind="crosstask", videos=str(tmp_path), max_words=30), "own videos"),
                       (EvalSetConfig(name="z", videos=str(tmp_path), max_words=0), ">= 1")):
        with pytest.raises(ValueError, match=match):
            bad.validate()
