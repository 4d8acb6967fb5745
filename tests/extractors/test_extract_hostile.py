"""The extract stage on hostile inputs: every failure of one video is that video's recorded status with
a one-line reason; the shard is committed and the other videos of the same shard are extracted.
Transient failures (a hung decoder, out of memory) are redone by `--retry-failed`, which keeps every
other sample byte for byte."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.scan import scan
from pipeline.stages import extract_states, failure_summary, run_extract, shard_jobs
from store.fields import FIELDS
from store.layout import Workspace
from store.lineage import read_record
from store.reader import iter_raw, iter_samples

from .test_extract_stage import CAPTIONS
from .test_extract_stage import overrides as stage_overrides

pytestmark = pytest.mark.slow


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def _video(path: Path, size: str, seconds: float = 2.0, audio: bool = True) -> Path:
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate=12:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=300:sample_rate=16000:duration={seconds}"]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    args += ["-c:a", "aac", "-shortest"] if audio else ["-an"]
    _ffmpeg(*args, str(path))
    return path


def overrides(tmp: Path, **extra: str) -> list[str]:
    """test_extract_stage's settings, every video in one shard, plus ``extra`` (dotted key → value)."""
    return [*stage_overrides(tmp, shard_size=64), *[f"{k}={v}" for k, v in extra.items()]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, cfr_mp4, noaudio_mp4, corrupt_tail_mp4, truncated_faststart_mp4, empty_audio_mkv,
           rotated_mp4, vfr_mp4, short_mp4, text_mp4) -> Path:
    """One shard of good videos among hostile ones."""
    root = tmp_path_factory.mktemp("hostile_extract")
    for name, src in (("good.mp4", cfr_mp4), ("noaudio.mp4", noaudio_mp4), ("corrupt_tail.mp4", corrupt_tail_mp4),
                      ("truncated_faststart.mp4", truncated_faststart_mp4), ("empty_audio.mkv", empty_audio_mkv),
                      ("rotated.mp4", rotated_mp4), ("vfr.mp4", vfr_mp4), ("short.mp4", short_mp4),
                      ("text.mp4", text_mp4)):
        shutil.copy(src, root / name)
    (root / "good.srt").write_text(CAPTIONS)
    (root / "vfr.srt").write_text(CAPTIONS)
    # audio holding NaN and inf samples (pcm_f32le keeps them through ffmpeg)
    wave = np.sin(np.arange(32000) / 7).astype("<f4")
    wave[1000], wave[2000] = np.nan, np.inf
    (root / "nan.f32").write_bytes(wave.tobytes())
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=12:duration=2", "-f", "f32le", "-ar", "16000", "-ac", "1",
            "-i", str(root / "nan.f32"), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "pcm_f32le", "-shortest",
            str(root / "nan_audio.mkv"))
    (root / "nan.f32").unlink()
    (root / "nan_audio.srt").write_text(CAPTIONS)
    _video(root / "wide.mp4", "2048x16", audio=False)  # 128:1: centre-cropped, not 114688-pixel-wide frames
    _video(root / "tall.mp4", "16x1024", audio=False)
    _video(root / "tiny.mp4", "16x16")
    _video(root / "one_frame.mp4", "64x48", seconds=1 / 12, audio=False)
    _video(root / "good2.mp4", "96x64")
    (root / "good2.srt").write_text(CAPTIONS)
    # a caption with no known word (the word2vec vocabulary): an ok sample with a 0 word count
    shutil.copy(root / "good2.mp4", root / "unknown_words.mp4")
    (root / "unknown_words.srt").write_text("1\n00:00:00,000 --> 00:00:01,500\nzzz qqq\n")
    return root


@pytest.fixture(scope="module")
def extracted(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_ws")
    ws = Workspace(tmp / "ws")
    cfg = load_config(None, overrides(tmp))
    scan(corpus, ws, cfg.scan, progress=False)
    summary = run_extract(ws, cfg, progress=False)
    samples = {f: {s["__key__"]: s for s in iter_samples(ws.shard_tar(f, 0))} for f in FIELDS}
    return ws, cfg, summary, samples


def status(samples, vid: str) -> dict[str, tuple[str, str | None]]:
    return {f: (samples[f][vid]["json"]["status"], samples[f][vid]["json"]["error"]) for f in FIELDS}


def test_one_shard_committed_with_every_video(extracted):
    ws, _, summary, samples = extracted
    assert summary.processed == {f: 1 for f in FIELDS}
    assert len(shard_jobs(ws)) == 1
    keys = [r.id for r in shard_jobs(ws)[0].records]
    assert len(keys) == 16
    for f in FIELDS:
        assert list(samples[f]) == keys and read_record(ws.shard_record(f, 0))["n_videos"] == 16


@pytest.mark.parametrize("vid, expected", [
    ("good", {"video2d": "ok", "video3d": "ok", "audio": "ok", "text": "ok"}),
    ("good2", {"video2d": "ok", "video3d": "ok", "audio": "ok", "text": "ok"}),
    ("vfr", {"video2d": "ok", "video3d": "ok", "audio": "no_audio", "text": "ok"}),
    ("noaudio", {"video2d": "ok", "video3d": "ok", "audio": "no_audio", "text": "no_captions"}),
    ("empty_audio", {"video2d": "ok", "video3d": "ok", "audio": "no_audio", "text": "no_captions"}),
    ("rotated", {"video2d": "ok", "video3d": "ok", "audio": "no_audio", "text": "no_captions"}),
    ("corrupt_tail", {"video2d": "ok", "video3d": "ok", "audio": "ok", "text": "no_captions"}),
    ("truncated_faststart", {"video2d": "ok", "video3d": "ok", "audio": "ok", "text": "no_captions"}),
    ("short", {"video2d": "ok", "video3d": "ok", "audio": "ok", "text": "no_captions"}),
    ("tiny", {"video2d": "ok", "video3d": "ok", "audio": "ok", "text": "no_captions"}),
    ("one_frame", {"video2d": "ok", "video3d": "ok", "audio": "no_audio", "text": "no_captions"}),
    ("wide", {"video2d": "ok", "video3d": "ok", "audio": "no_audio", "text": "no_captions"}),
    ("tall", {"video2d": "ok", "video3d": "ok", "audio": "no_audio", "text": "no_captions"}),
    ("unknown_words", {"video2d": "ok", "video3d": "ok", "audio": "ok", "text": "ok"}),
])
def test_statuses(extracted, vid, expected):
    _, _, _, samples = extracted
    assert {f: s for f, (s, _) in status(samples, vid).items()} == expected


def test_non_finite_audio_fails_only_its_audio(extracted):
    _, _, _, samples = extracted
    st = status(samples, "nan_audio")
    assert st["audio"] == ("failed", "audio: logmel: waveform contains non-finite samples")
    assert st["video2d"][0] == st["video3d"][0] == st["text"][0] == "ok"
    assert "feat.npy" not in samples["audio"]["nan_audio"]
    for f in ("video2d", "video3d"):
        assert np.isfinite(samples[f]["nan_audio"]["feat.npy"].astype(np.float32)).all()


def test_not_a_video_is_failed_in_every_field_with_the_scan_reason(extracted):
    _, _, _, samples = extracted
    for f, (s, why) in status(samples, "text").items():
        assert s == "failed" and why.startswith("scan: ffprobe"), (f, why)
        assert set(samples[f]["text"]) == {"__key__", "json"}


def test_extreme_aspect_ratios_are_cropped_with_a_warning(extracted):
    _, cfg, _, samples = extracted
    for vid, aspect in (("wide", "128.0:1"), ("tall", "64.0:1")):
        meta = samples["video2d"][vid]["json"]
        assert meta["warnings"] == [w for w in meta["warnings"] if w.startswith(f"aspect ratio {aspect} is over 4:1")]
        assert len(meta["warnings"]) == 1 and samples["video3d"][vid]["json"]["warnings"] == meta["warnings"]
        feat = samples["video2d"][vid]["feat.npy"]
        assert feat.shape == (2, 2048) and np.isfinite(feat.astype(np.float32)).all()
    assert "warnings" not in samples["video2d"]["good"]["json"]


def test_zero_word_caption_and_short_videos_are_samples_not_failures(extracted):
    _, _, _, samples = extracted
    assert samples["text"]["unknown_words"]["lengths.npy"].tolist() == [0]
    assert samples["video3d"]["short"]["feat.npy"].shape == (0, 2048)
    assert samples["video2d"]["one_frame"]["feat.npy"].shape == (1, 2048)


def test_failure_summary_by_reason(extracted):
    ws, cfg, _, _ = extracted
    lines = failure_summary(extract_states(ws, cfg))
    assert any(line.split() == ["1", "audio", "audio:", "logmel:", "waveform", "contains", "non-finite",
                                "samples"] for line in lines), lines
    assert any(line.split()[:2] == ["1", "video2d"] and "scan: ffprobe" in line for line in lines), lines


def _samples_raw(ws: Workspace, f: str) -> dict[str, dict]:
    return {s["__key__"]: s for s in iter_raw(ws.shard_tar(f, 0))}


def test_out_of_memory_on_one_batch_costs_one_video_and_retry_redoes_it(corpus, tmp_path, monkeypatch):
    """A batch that runs out of memory is retried video by video; the video whose frames do not fit
    is failed as transient; `--retry-failed` redoes only it and keeps the other samples' bytes."""
    import extractors.resnet2d as r2d

    root = tmp_path / "v"
    root.mkdir()
    for name in ("good.mp4", "good2.mp4", "tiny.mp4"):
        shutil.copy(corpus / name, root / name)
    ws = Workspace(tmp_path / "ws")
    cfg = load_config(None, overrides(tmp_path, **{"extract.fields": "[video2d, audio]"}))
    scan(root, ws, cfg.scan, progress=False)
    real = r2d.ResNet152Extractor.__call__

    def flaky(self, frames):
        if np.asarray(frames).shape[2] == 96:  # good2's 96x64 frames: out of memory, every time
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, frames)

    monkeypatch.setattr(r2d.ResNet152Extractor, "__call__", flaky)
    first = run_extract(ws, cfg, progress=False)
    assert first.processed == {"video2d": 1, "audio": 1}
    rec = read_record(ws.shard_record("video2d", 0))
    bad = [v for v in rec["videos"] if v["status"] != "ok"]
    assert bad == [{"id": "good2", "status": "failed", "transient": True,
                    "error": "video2d model: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)"}]
    before = {f: _samples_raw(ws, f) for f in ("video2d", "audio")}
    audio_tar = ws.shard_tar("audio", 0).read_bytes()
    # a plain re-run does not retry (the shard is done); --retry-failed does, once the cause is gone
    monkeypatch.setattr(r2d.ResNet152Extractor, "__call__", real)
    assert run_extract(ws, cfg, progress=False).processed == {"video2d": 0, "audio": 0}
    again = run_extract(ws, cfg, progress=False, retry_failed=True)
    assert again.retried == {"video2d": 1, "audio": 0} and again.processed == {"video2d": 0, "audio": 0}
    rec = read_record(ws.shard_record("video2d", 0))
    assert all(v["status"] == "ok" for v in rec["videos"]) and rec["n_ok"] == 3
    after = _samples_raw(ws, "video2d")
    assert list(after) == list(before["video2d"])
    for key in ("good", "tiny"):
        assert after[key] == before["video2d"][key]  # kept byte for byte
    redone = next(s for s in iter_samples(ws.shard_tar("video2d", 0)) if s["__key__"] == "good2")
    assert redone["json"]["status"] == "ok" and redone["feat.npy"].shape == (2, 2048)
    assert ws.shard_tar("audio", 0).read_bytes() == audio_tar  # other fields untouched
    assert rec["sha256"] != read_record(ws.shard_record("audio", 0))["sha256"]


def test_hung_decoder_is_killed_and_retried(corpus, tmp_path):
    """A file that blocks every reader (a FIFO put in place of a scanned video): the decode worker and
    the audio ffprobe are killed at their timeouts, the video is failed as transient, its shard mates
    are extracted; once the file is back, --retry-failed redoes it."""
    root = tmp_path / "v"
    root.mkdir()
    for name in ("good.mp4", "good2.mp4", "good2.srt"):
        shutil.copy(corpus / name, root / name)
    ws = Workspace(tmp_path / "ws")
    cfg = load_config(None, overrides(tmp_path, **{"extract.workers.timeout_s": "3",
                                                   "extract.decode.audio_timeout_s": "3"}))
    scan(root, ws, cfg.scan, progress=False)
    saved = (root / "good2.mp4").read_bytes()
    (root / "good2.mp4").unlink()
    os.mkfifo(root / "good2.mp4")
    t0 = time.monotonic()
    first = run_extract(ws, cfg, progress=False)
    assert time.monotonic() - t0 < 60
    assert first.processed == {f: 1 for f in FIELDS}
    rec = {f: {v["id"]: v for v in read_record(ws.shard_record(f, 0))["videos"]} for f in FIELDS}
    for f in ("video2d", "video3d"):
        assert rec[f]["good2"]["error"].startswith("decode: timeout: no progress for 3.0 s")
        assert rec[f]["good2"]["transient"] is True and rec[f]["good"]["status"] == "ok"
    assert rec["audio"]["good2"] == {"id": "good2", "status": "failed", "transient": True,
                                     "error": "audio decode: ffprobe timed out after 3 s (killed)"}
    assert rec["text"]["good2"]["status"] == "ok"  # text needs no decoding
    (root / "good2.mp4").unlink()
    (root / "good2.mp4").write_bytes(saved)
    again = run_extract(ws, cfg, progress=False, retry_failed=True)
    assert again.retried == {"video2d": 1, "video3d": 1, "audio": 1, "text": 0}
    for f in FIELDS:
        rec = read_record(ws.shard_record(f, 0))
        assert all(v["status"] != "failed" and not v.get("transient") for v in rec["videos"]), (f, rec["videos"])
    # nothing transient is left: a further --retry-failed does nothing
    assert sum(run_extract(ws, cfg, progress=False, retry_failed=True).retried.values()) == 0
