"""The `extract` stage end to end on generated media: shards, rates, norms, bad inputs, caching. Killed and
resumed: tests/test_faults.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.scan import scan
from pipeline.stages import extract_states, run_extract, shard_jobs
from store.fields import FIELDS
from store.layout import Workspace
from store.lineage import read_record
from store.manifest import read_scan
from store.reader import iter_samples as iter_shard

pytestmark = pytest.mark.slow

CAPTIONS = "1\n00:00:00,000 --> 00:00:02,000\nthe red circle moves left\n\n2\n00:00:02,000 --> 00:00:04,500\na blue square grows\n"


def make_word2vec(path: Path) -> Path:
    from gensim.models import KeyedVectors

    words = ["the", "red", "circle", "moves", "left", "a", "blue", "square", "grows"]
    kv = KeyedVectors(vector_size=300)
    kv.add_vectors(words, np.random.default_rng(0).standard_normal((len(words), 300)).astype(np.float32))
    kv.save_word2vec_format(str(path), binary=True)
    return path


def overrides(tmp: Path, shard_size: int = 3) -> list[str]:
    return [
        f"scan.shard_size={shard_size}",
        "extract.allow_random_weights=true",
        "extract.decode.size_2d=64",
        "extract.workers.num_workers=1",
        "extract.workers.timeout_s=120",
        f"extract.text.options={{weights: {make_word2vec(tmp / 'w2v.bin')}}}",
        "extract.video2d.options={batch_size: 8}",
        "extract.video3d.options={batch_size: 4}",
    ]


@pytest.fixture(scope="module")
def videos(tmp_path_factory, cfr_mp4, noaudio_mp4, short_mp4, vp9_webm, mpeg4_avi, truncated_mp4, text_mp4):
    root = tmp_path_factory.mktemp("extract_videos")
    for name, src in (("cfr.mp4", cfr_mp4), ("noaudio.mp4", noaudio_mp4), ("short.mp4", short_mp4),
                      ("vp9.webm", vp9_webm), ("mpeg4.avi", mpeg4_avi), ("truncated.mp4", truncated_mp4),
                      ("text.mp4", text_mp4)):
        (root / name).symlink_to(src)
    (root / "cfr.srt").write_text(CAPTIONS)
    (root / "vp9.srt").write_text("1\n00:00:00,000 --> 00:00:01,500\nred square\n")
    return root


@pytest.fixture(scope="module")
def extracted(videos, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract_ws")
    ws = Workspace(tmp / "ws")
    cfg = load_config(None, overrides(tmp))
    scan(videos, ws, cfg.scan, progress=False)
    summary = run_extract(ws, cfg, progress=False)
    return ws, cfg, summary, tmp


def samples(ws: Workspace, field: str) -> dict[str, dict]:
    out = {}
    for job in shard_jobs(ws):
        for s in iter_shard(ws.shard_tar(field, job.index)):
            out[s["__key__"]] = s
    return out


def test_every_field_has_the_same_keys_in_manifest_order(extracted):
    ws, _, summary, _ = extracted
    assert summary.processed == {f: 3 for f in FIELDS}
    for job in shard_jobs(ws):
        expected = [r.id for r in job.records]
        for f in FIELDS:
            keys = [s["__key__"] for s in iter_shard(ws.shard_tar(f, job.index))]
            assert keys == expected, f
            record = read_record(ws.shard_record(f, job.index))
            assert [v["id"] for v in record["videos"]] == expected


def test_rates_norms_and_dtypes(extracted):
    ws, *_ = extracted
    v2, v3, au = samples(ws, "video2d")["cfr"], samples(ws, "video3d")["cfr"], samples(ws, "audio")["cfr"]
    duration = v2["json"]["duration"]
    assert abs(duration - 5.0) < 0.1
    for s, rate in ((v2, 1.0), (v3, 1.5), (au, 100.0)):
        feat = s["feat.npy"]
        assert s["json"]["status"] == "ok" and s["json"]["rate"] == rate
        assert feat.dtype == np.float16
        assert abs(len(feat) - duration * rate) <= max(1, 0.01 * duration * rate), (rate, feat.shape)
    assert v2["feat.npy"].shape[1] == v3["feat.npy"].shape[1] == 2048 and au["feat.npy"].shape[1] == 40
    for feat in (v2["feat.npy"], v3["feat.npy"]):
        norms = np.linalg.norm(feat.astype(np.float32), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    mel = au["feat.npy"].astype(np.float32)
    assert mel.max() == 0.0 and mel.min() >= -80.0
    assert v2["json"]["random_weights"] is True and v2["json"]["weights"] == "random-init-seed0"


def test_text_field(extracted):
    ws, *_ = extracted
    text = samples(ws, "text")
    cfr = text["cfr"]
    assert cfr["words.npy"].shape == (2, 20, 300) and cfr["words.npy"].dtype == np.float16
    assert cfr["lengths.npy"].tolist() == [5, 4]
    assert [c["text"] for c in cfr["json"]["captions"]] == ["the red circle moves left", "a blue square grows"]
    assert np.all(cfr["words.npy"][0, 5:] == 0) and np.any(cfr["words.npy"][0, 4] != 0)
    assert text["vp9"]["lengths.npy"].tolist() == [2]
    assert text["noaudio"]["json"]["status"] == "no_captions"


def test_bad_and_odd_inputs(extracted):
    ws, *_ = extracted
    v2, v3, au = samples(ws, "video2d"), samples(ws, "video3d"), samples(ws, "audio")
    # shorter than one 3D window: an empty (0, 2048) array, not a failure
    assert v3["short"]["json"]["status"] == "ok" and v3["short"]["feat.npy"].shape == (0, 2048)
    assert v2["short"]["feat.npy"].shape == (1, 2048)
    assert au["noaudio"]["json"]["status"] == "no_audio" and "feat.npy" not in au["noaudio"]
    assert v2["noaudio"]["json"]["status"] == "ok"
    for vid in ("vp9", "mpeg4"):
        assert v2[vid]["json"]["status"] == v3[vid]["json"]["status"] == au[vid]["json"]["status"] == "ok"
        assert len(v2[vid]["feat.npy"]) == 2
    for vid in ("truncated", "text"):
        for field in FIELDS:
            s = samples(ws, field)[vid]
            assert s["json"]["status"] == "failed" and s["json"]["error"].startswith("scan: ffprobe")
            assert set(s) == {"__key__", "json"}


def test_rerun_skips_and_text_change_redoes_only_text(extracted, videos):
    ws, cfg, _, tmp = extracted
    again = run_extract(ws, cfg, progress=False)
    assert again.processed == {f: 0 for f in FIELDS} and again.skipped == {f: 3 for f in FIELDS}
    before = {f: ws.shard_tar(f, 0).read_bytes() for f in FIELDS}
    changed = load_config(None, overrides(tmp) + [f"extract.text.options={{weights: {tmp / 'w2v.bin'}, max_words: 3}}"])
    status = extract_states(ws, changed)
    assert status["text"].stale == 3 and status["video2d"].done == 3 and status["audio"].done == 3
    assert status["text"].reasons == {"config changed": 3}
    redo = run_extract(ws, changed, progress=False)
    assert redo.processed == {"video2d": 0, "video3d": 0, "audio": 0, "text": 3}
    assert samples(ws, "text")["cfr"]["lengths.npy"].tolist() == [3, 3]
    for f in ("video2d", "video3d", "audio"):
        assert ws.shard_tar(f, 0).read_bytes() == before[f]


def test_cheap_describe_equals_the_built_extractors(extracted):
    ws, cfg, _, _ = extracted
    from pipeline.stages import extract_stage

    stage = extract_stage(ws, cfg)
    cheap = {f: stage.describe(f) for f in FIELDS}
    assert not stage._extractors  # nothing was built to describe them
    for f in FIELDS:
        assert stage.extractor(f).describe() == cheap[f], f


def test_video_replaced_in_place_is_redone_after_a_rescan(tmp_path, cfr_mp4, short_mp4):
    """The extract fingerprint includes each file's size and mtime: a replaced file makes its shard stale."""
    root = tmp_path / "v"
    root.mkdir()
    for name, src in (("a.mp4", cfr_mp4), ("b.mp4", short_mp4)):
        (root / name).write_bytes(Path(src).read_bytes())  # real copies: their mtime is ours to change
    ws = Workspace(tmp_path / "ws")
    cfg = load_config(None, overrides(tmp_path, shard_size=1) + ["extract.fields=[video2d, audio]"])
    scan(root, ws, cfg.scan, progress=False)
    run_extract(ws, cfg, progress=False)
    a_id = next(j.index for j in shard_jobs(ws) if j.records[0].path == "a.mp4")
    b_id = 1 - a_id
    before = {f: ws.shard_tar(f, b_id).read_bytes() for f in ("video2d", "audio")}
    st = (root / "a.mp4").stat()
    os.utime(root / "a.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, new mtime
    assert all(fs.complete for fs in extract_states(ws, cfg).values())  # nothing knows before a re-scan
    result = scan(root, ws, cfg.scan, progress=False)
    assert not result.up_to_date and result.n_probed == 1
    states = extract_states(ws, cfg)
    assert {f: (s.done, s.stale) for f, s in states.items()} == {"video2d": (1, 1), "audio": (1, 1)}
    assert states["video2d"].reasons == {"videos changed": 1}
    redo = run_extract(ws, cfg, progress=False)
    assert redo.processed == {"video2d": 1, "audio": 1}
    plan = {p.index: p for p in read_scan(ws).shards}
    assert read_record(ws.shard_record("video2d", a_id))["lineage"]["inputs"]["videos"] == plan[a_id].videos
    for f in ("video2d", "audio"):
        assert ws.shard_tar(f, b_id).read_bytes() == before[f]


def test_one_decode_worker_serves_every_shard_of_a_run(tmp_path, cfr_mp4, short_mp4, monkeypatch):
    """The stage keeps its decode workers from shard to shard (no new process, imports and ramp per
    shard) and stops them when the run ends."""
    import multiprocessing

    from extractors.workers import WorkerPool

    root = tmp_path / "v"
    root.mkdir()
    for name, src in (("a.mp4", cfr_mp4), ("b.mp4", short_mp4), ("c.mp4", cfr_mp4)):
        (root / name).write_bytes(Path(src).read_bytes())
    ws = Workspace(tmp_path / "ws")
    cfg = load_config(None, overrides(tmp_path, shard_size=1) + ["extract.fields=[video2d]"])
    scan(root, ws, cfg.scan, progress=False)
    started: list[int] = []
    start = WorkerPool._start

    def counting_start(self):  # noqa: ANN001, ANN202 - the real start, counted
        w = start(self)
        started.append(w.proc.pid)
        return w

    monkeypatch.setattr(WorkerPool, "_start", counting_start)
    summary = run_extract(ws, cfg, progress=False)
    assert summary.processed == {"video2d": 3}
    assert len(started) == 1  # one worker for the three shards (it was one per shard)
    assert multiprocessing.active_children() == []
    assert sorted(s["json"]["status"] for j in shard_jobs(ws) for s in iter_shard(ws.shard_tar("video2d", j.index))) \
        == ["ok", "ok", "ok"]


def test_audio_and_text_run_beside_the_visual_pass_and_write_the_same_bytes(extracted, videos, tmp_path, monkeypatch):
    """Audio and text run in the ``extract-side`` thread while the visual pass is still running, and their
    shards are byte for byte those of a run without visual fields (where they run inline)."""
    from pipeline.extract import ExtractStage

    seen: list[tuple[str, bool]] = []
    visual_running = threading.Event()
    visual, side = ExtractStage._visual, ExtractStage._side

    def visual_spy(self, *args, **kwargs):
        visual_running.set()
        try:
            return visual(self, *args, **kwargs)
        finally:
            visual_running.clear()

    def side_spy(self, *args, **kwargs):
        seen.append((threading.current_thread().name, visual_running.is_set()))
        return side(self, *args, **kwargs)

    monkeypatch.setattr(ExtractStage, "_visual", visual_spy)
    monkeypatch.setattr(ExtractStage, "_side", side_spy)
    tmp = extracted[3]  # (its word vectors)
    ws = Workspace(tmp_path / "ws")
    cfg = load_config(None, overrides(tmp) + ["extract.fields=[video2d, audio, text]"])
    scan(videos, ws, cfg.scan, progress=False)
    run_extract(ws, cfg, progress=False)
    jobs = shard_jobs(ws)
    # a shard whose videos all failed at the scan has no visual pass: its audio and text run inline
    beside = [any(r.ok for r in job.records) for job in jobs]
    assert len(seen) == len(jobs) == 3 and any(beside)
    for (name, during), expected in zip(seen, beside):
        assert (name.startswith("extract-side") and during) if expected else name == threading.main_thread().name
    alone = Workspace(tmp_path / "alone")
    cfg_alone = load_config(None, overrides(tmp) + ["extract.fields=[audio, text]"])
    scan(videos, alone, cfg_alone.scan, progress=False)
    seen.clear()
    run_extract(alone, cfg_alone, progress=False)
    assert [name for name, _ in seen] == [threading.main_thread().name] * 3  # no visual pass: inline
    for job in shard_jobs(ws):
        for f in ("audio", "text"):
            data = ws.shard_tar(f, job.index).read_bytes()
            assert data == alone.shard_tar(f, job.index).read_bytes()


def test_a_failure_beside_the_visual_pass_fails_the_shard_and_a_visual_failure_stops_it(videos, tmp_path,
                                                                                        monkeypatch):
    """An exception of the side thread is the shard's (nothing of it is written); an exception of the
    visual pass stops the side thread before its next video."""
    from pipeline.extract import ExtractStage

    ws = Workspace(tmp_path / "ws")
    cfg = load_config(None, overrides(tmp_path, shard_size=7) + ["extract.fields=[video2d, audio, text]"])
    scan(videos, ws, cfg.scan, progress=False)

    def broken_text(self, *args, **kwargs):
        raise RuntimeError("text model exploded")

    with monkeypatch.context() as m:
        m.setattr(ExtractStage, "_text", broken_text)
        with pytest.raises(RuntimeError, match="text model exploded"):
            run_extract(ws, cfg, progress=False)
    assert not any(ws.shard_tar(f, 0).exists() for f in ("video2d", "audio", "text"))

    started, audio_calls = threading.Event(), []
    audio_one = ExtractStage._audio_one

    def slow_audio_one(self, *args, **kwargs):
        audio_calls.append(args[1].id)
        started.set()
        time.sleep(0.3)  # the visual pass fails meanwhile
        return audio_one(self, *args, **kwargs)

    def failing_visual(self, records, todo, results, models_ready):
        models_ready()
        assert started.wait(60)
        raise RuntimeError("visual pass exploded")

    monkeypatch.setattr(ExtractStage, "_audio_one", slow_audio_one)
    monkeypatch.setattr(ExtractStage, "_visual", failing_visual)
    with pytest.raises(RuntimeError, match="visual pass exploded"):
        run_extract(ws, cfg, progress=False)
    assert len(audio_calls) == 1  # of the shard's 7 videos (5 with a scan that went well)
    assert not any(ws.shard_tar(f, 0).exists() for f in ("video2d", "audio", "text"))
