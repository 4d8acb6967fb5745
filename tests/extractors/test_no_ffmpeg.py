"""Machines without the ffmpeg/ffprobe binaries: the scan probes and the audio field decodes with PyAV
child processes (``extractors.libav``), giving the manifest fields and the audio of the binaries, killed
at their time limits like the binaries; the resolved tool is in the lineage only when it is PyAV.

"No binaries" is a real PATH holding neither (an empty folder): this Python is started by its absolute
path (``sys.executable``), so the PyAV children still run. The media are made with ffmpeg beforehand."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from extractors.decode import (
    DecodeConfig,
    DecodeError,
    DecodeTimeout,
    NoAudioError,
    audio_identity,
    decode_audio,
)
from extractors.libav import resolve_tool
from pipeline.config import load_config
from pipeline.extract import ExtractStage
from pipeline.probe import ProbeTimeout, run_ffprobe
from pipeline.scan import ScanConfig, scan, scan_lineage
from pipeline.stages import run_extract
from store.layout import Workspace
from store.lineage import config_dict, fingerprint, read_record
from store.manifest import read_manifest
from store.reader import iter_samples
from tests.support import process_gone

from .test_extract_stage import overrides

# PyAV's AudioResampler and ffmpeg's -ac 1 -ar 16000 are both libswresample with its defaults: measured
# equal length and a largest difference of 2.4e-7 (float32 rounding) on these files. The bounds leave
# room for another libswresample build without letting a different downmix or resampler through (a
# one-sample shift of the sweep already differs by > 1, a 3 dB downmix gain by > 0.1).
MAX_ABS_DIFF = 1e-4
LENGTH_SLACK = 16  # samples at 16 kHz (1 ms): libswresample's delay at its default filter size


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def sweep_mp4(media_dir: Path) -> Path:
    """3 s, 64×48 H.264 + AAC stereo 48 kHz: a different chirp per channel (200 Hz → 6.2 kHz and
    300 Hz → 4.3 kHz), so that the downmix and the anti-alias filter both show in the samples."""
    out = media_dir / "sweep48k.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25:duration=3",
            "-f", "lavfi", "-i", "aevalsrc=0.6*sin(2*PI*(200+1000*t)*t)|0.4*sin(2*PI*(300+667*t)*t):s=48000:d=3",
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "192k",
            "-shortest", str(out))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cfr_mp4, vfr_mp4, noaudio_mp4, vp9_webm, mpeg4_avi, short_mp4, audio_only_m4a,
           sweep_mp4) -> Path:
    root = tmp_path_factory.mktemp("no_ffmpeg_videos")
    for name, src in (("cfr.mp4", cfr_mp4), ("vfr.mp4", vfr_mp4), ("noaudio.mp4", noaudio_mp4),
                      ("vp9.webm", vp9_webm), ("mpeg4.avi", mpeg4_avi), ("short.mp4", short_mp4),
                      ("audio_only.mp4", audio_only_m4a), ("sweep.mp4", sweep_mp4)):
        shutil.copy(src, root / name)
    (root / "not_a_video.mp4").write_bytes(b"\x00\x01 definitely not a video " * 40)
    return root


@pytest.fixture
def no_binaries(tmp_path, monkeypatch) -> str:
    """PATH set to an empty folder; returns the PATH it had."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    old = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("ffmpeg") is None and shutil.which("ffprobe") is None
    return old


def test_resolve_tool():
    assert resolve_tool("auto", "ffprobe", path=os.environ["PATH"]) == "ffprobe"
    assert resolve_tool("auto", "ffprobe", path="") == "pyav"
    assert resolve_tool("ffprobe", "ffprobe", path="") == "ffprobe"  # asked for: its absence is the error
    assert resolve_tool("pyav", "ffmpeg", path=os.environ["PATH"]) == "pyav"
    with pytest.raises(ValueError, match="unknown tool 'avconv'"):
        resolve_tool("avconv", "ffmpeg")
    with pytest.raises(ValueError):
        DecodeConfig(audio_tool="ffprobe").validate()


def test_scan_without_ffprobe_gives_the_manifest_of_ffprobe(folder, tmp_path, monkeypatch, no_binaries):
    cfg = ScanConfig(probe_workers=4)
    pyav_ws = Workspace(tmp_path / "pyav")
    pyav = scan(folder, pyav_ws, cfg, progress=False)
    monkeypatch.setenv("PATH", no_binaries)
    ff_ws = Workspace(tmp_path / "ffprobe")
    ffprobe = scan(folder, ff_ws, cfg, progress=False)
    assert (pyav.n_videos, pyav.n_ok) == (ffprobe.n_videos, ffprobe.n_ok) == (9, 7)
    got = {r.path: r for r in read_manifest(pyav_ws.manifest)}
    want = {r.path: r for r in read_manifest(ff_ws.manifest)}
    for path, w in want.items():
        g = got[path]
        assert (g.id, g.status, g.shard) == (w.id, w.status, w.shard), path
        if not w.ok:
            # the same failure; the tool's own words for a file libav cannot open
            assert (g.error, w.error) in {("no video stream",) * 2, (
                "PyAV probe: Invalid data found when processing input",
                "ffprobe: Invalid data found when processing input")}, (path, g.error, w.error)
            continue
        assert abs(g.duration - w.duration) <= 1 / w.fps, (path, g.duration, w.duration)
        for key in ("fps", "n_frames", "width", "height", "video_codec", "audio_codec", "has_audio",
                    "audio_rate", "audio_channels", "size"):
            assert getattr(g, key) == getattr(w, key), (path, key, getattr(g, key), getattr(w, key))
    assert (got["sweep.mp4"].audio_rate, got["sweep.mp4"].audio_channels) == (48000, 2)
    assert (got["vp9.webm"].fps, got["vp9.webm"].audio_codec) == (25.0, "opus")
    assert got["noaudio.mp4"].has_audio is False and got["noaudio.mp4"].audio_rate is None
    # The tool is in the lineage only when it is PyAV: scans made with ffprobe keep their fingerprint
    # (the scan config without the RUNTIME probe settings, as before this setting existed).
    ff_lineage = read_record(ff_ws.scan_record)["lineage"]
    assert ff_lineage["config"] == fingerprint(config_dict(cfg)) == scan_lineage(folder, cfg, None).config
    assert read_record(pyav_ws.scan_record)["lineage"]["config"] == fingerprint({**config_dict(cfg),
                                                                               "probe_tool": "pyav"})
    # the probe cache keeps PyAV's results apart from ffprobe's
    assert all(line.split('"key": "', 1)[1].split('"')[0].endswith("|pyav")
               for line in pyav_ws.probe_cache.read_text().splitlines())
    # a workspace scanned with ffprobe is stale (config changed) once only PyAV is there
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))
    again = scan(folder, ff_ws, cfg, progress=False)
    assert not again.up_to_date and again.n_probed == 9


def test_pyav_audio_equals_ffmpeg_audio(cfr_mp4, sweep_mp4, mpeg4_avi, tmp_path):
    """16 kHz mono from 44.1 kHz stereo AAC, 48 kHz stereo AAC and 22.05 kHz mono PCM."""
    for src, rate in ((cfr_mp4, 44100), (sweep_mp4, 48000), (mpeg4_avi, 22050)):
        ff = decode_audio(src, DecodeConfig(audio_tool="ffmpeg"), tmp_path / "ff")
        av = decode_audio(src, DecodeConfig(audio_tool="pyav"), tmp_path / "av")
        assert abs(ff.size - av.size) <= LENGTH_SLACK, (src.name, ff.size, av.size)
        n = min(ff.size, av.size)
        assert abs(n - 16000 * (3 if src == sweep_mp4 else 5 if src == cfr_mp4 else 2)) < 1600  # ~seconds × 16 kHz
        assert float(np.abs(ff[:n]).max()) > 0.1  # real signal (lavfi sine: amplitude 1/8), not silence
        diff = float(np.abs(ff[:n] - av[:n]).max())
        assert diff <= MAX_ABS_DIFF, (src.name, rate, diff)
        assert av.dtype == np.dtype("<f4") and Path(av.filename).parent == tmp_path / "av"


def _outcome(src: Path, tool: str, workdir: Path) -> tuple[str, object]:
    try:
        return "ok", decode_audio(src, DecodeConfig(audio_tool=tool), workdir).size
    except DecodeError as exc:
        return type(exc).__name__, str(exc).replace("ffprobe failed", "PyAV failed").replace("ffmpeg failed", "PyAV failed")


def test_damaged_audio_has_the_outcome_of_ffmpeg(corrupt_tail_mp4, truncated_mp4, empty_audio_mkv, tmp_path):
    """A damaged tail (decoded up to it), a truncated file (unreadable), an audio stream without packets."""
    got = {src.name: _outcome(src, "pyav", tmp_path) for src in (corrupt_tail_mp4, truncated_mp4, empty_audio_mkv)}
    want = {src.name: _outcome(src, "ffmpeg", tmp_path) for src in (corrupt_tail_mp4, truncated_mp4, empty_audio_mkv)}
    assert got == want == {
        "corrupt_tail.mp4": ("ok", 32768),
        "truncated.mp4": ("DecodeError", "PyAV failed: Invalid data found when processing input"),
        "empty_audio.mkv": ("NoAudioError", "audio stream decoded to 0 samples")}


def test_pyav_audio_without_an_audio_stream(noaudio_mp4, tmp_path, no_binaries):
    cfg = DecodeConfig()  # auto: PyAV, there is no ffmpeg
    assert audio_identity(cfg) == {"audio_rate": 16000, "audio_tool": "pyav"}
    with pytest.raises(NoAudioError, match="^no audio stream$"):
        decode_audio(noaudio_mp4, cfg, tmp_path)
    assert not list(tmp_path.glob("audio-*"))  # its output file is removed


def test_audio_field_without_ffmpeg(folder, tmp_path, monkeypatch, no_binaries):
    """The extract stage's audio field on a PATH without ffmpeg/ffprobe: the same samples as with them,
    within the resampler tolerance, and a different fingerprint."""
    cfg = load_config(None, [*overrides(tmp_path, shard_size=16), "extract.fields=[audio]"])
    ws = {}
    for tool in ("pyav", "ffmpeg"):
        if tool == "ffmpeg":
            monkeypatch.setenv("PATH", no_binaries)
        ws[tool] = Workspace(tmp_path / tool)
        scan(folder, ws[tool], cfg.scan, progress=False)
        assert ExtractStage(ws[tool], cfg.extract, folder).field_config("audio")["decode"] == (
            {"audio_rate": 16000, "audio_tool": "pyav"} if tool == "pyav" else {"audio_rate": 16000})
        run_extract(ws[tool], cfg, progress=False)
    samples = {t: {s["__key__"]: s for s in iter_samples(w.shard_tar("audio", 0))} for t, w in ws.items()}
    assert samples["pyav"].keys() == samples["ffmpeg"].keys()
    n_ok = 0
    for key, want in samples["ffmpeg"].items():
        got = samples["pyav"][key]
        assert got["json"]["status"] == want["json"]["status"], key
        if want["json"]["status"] != "ok":
            continue
        n_ok += 1
        a, b = got["feat.npy"], want["feat.npy"]  # log-mel (T, 40) float16, values up to 80
        assert a.shape == b.shape and a.dtype == b.dtype == np.float16, key
        # measured: >= 99.6 % of the values bit-equal, the others 1-2 float16 steps apart (0.0625 at 32-64)
        ulps = np.abs(a.astype(np.float32) - b.astype(np.float32)) / np.spacing(np.abs(b)).astype(np.float32)
        assert ulps.max() <= 2 and (a == b).mean() >= 0.99, (key, float(ulps.max()), float((a == b).mean()))
    assert n_ok == 5  # cfr, sweep, vp9 (Opus), mpeg4 (PCM), short: the scanned videos with an audio stream
    rec = {t: read_record(w.shard_record("audio", 0))["lineage"]["config"] for t, w in ws.items()}
    assert rec["pyav"] != rec["ffmpeg"]


class _Seen:
    def __init__(self) -> None:
        self.pids: list[int] = []

    def add(self, proc: subprocess.Popen) -> None:
        self.pids.append(proc.pid)

    def discard(self, proc: subprocess.Popen) -> None:
        pass


def test_hung_pyav_children_are_killed(tmp_path):
    """A FIFO nobody writes blocks libav's open() for ever: the PyAV probe and audio children are
    killed at their time limits, as ffprobe and ffmpeg are."""
    fifo = tmp_path / "hang.mp4"
    os.mkfifo(fifo)
    seen = _Seen()
    t0 = time.monotonic()
    with pytest.raises(ProbeTimeout, match=r"^PyAV probe timed out after 1.5 s$"):
        run_ffprobe(fifo, 1.5, seen, tool="pyav")
    assert 1.5 <= time.monotonic() - t0 < 15
    assert len(seen.pids) == 1 and process_gone(seen.pids[0])
    t0 = time.monotonic()
    with pytest.raises(DecodeTimeout, match=r"^PyAV audio decode timed out after 1.5 s \(killed\)$"):
        decode_audio(fifo, DecodeConfig(audio_tool="pyav", audio_timeout_s=1.5), tmp_path / "work")
    assert 1.5 <= time.monotonic() - t0 < 15
    assert not list((tmp_path / "work").glob("audio-*"))


def test_report_thumbnails_without_ffmpeg_are_pyav_frames(cfr_mp4, short_mp4, rotated_mp4, tmp_path, monkeypatch):
    """Without the ffmpeg binary the report's thumbnails are JPEGs of the same frame from a PyAV child,
    not placeholders: same size as ffmpeg's (``scale=160:-2``), same picture to scaling differences
    (bicubic in both, libswscale), and a time past the end still gives the placeholder."""
    import io

    from PIL import Image

    from evaluation import thumbnails

    thumbnails.clear_cache()
    with_ffmpeg = {t: thumbnails.thumbnail(cfr_mp4, t) for t in (0.0, 2.0, 3.5)}
    rotated_ref = thumbnails.thumbnail(rotated_mp4, 0.0)
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("ffmpeg") is None
    thumbnails.clear_cache()
    for t, ref in with_ffmpeg.items():
        data = thumbnails.thumbnail(cfr_mp4, t)
        assert data[:3] == b"\xff\xd8\xff" and data != ref  # a JPEG, and another encoder's bytes
        got, want = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(ref))
        assert got.format == "JPEG" and got.size == want.size == (160, 120)
        a, b = np.asarray(got.convert("L"), float), np.asarray(want.convert("L"), float)
        assert a.std() > 20  # testsrc: bars and a moving pattern, not a flat frame
        assert np.abs(a - b).mean() < 2, (t, np.abs(a - b).mean())  # measured 0.29-0.34 grey levels
    # the frame at 0 s and at 3.5 s differ (testsrc moves): the time is honoured
    first, late = (np.asarray(Image.open(io.BytesIO(thumbnails.thumbnail(cfr_mp4, t))).convert("L"), float)
                   for t in (0.0, 3.5))
    assert np.abs(first - late).mean() > 2
    assert thumbnails.thumbnail(short_mp4, 100.0).startswith(b"\x89PNG")  # past the end: placeholder
    # a portrait phone video (a display matrix: 64×48 coded, shown 48×64) is shown upright, as ffmpeg does
    got = Image.open(io.BytesIO(thumbnails.thumbnail(rotated_mp4, 0.0)))
    want = Image.open(io.BytesIO(rotated_ref))
    assert got.size == want.size == (160, 214)
    a, b = np.asarray(got.convert("L"), float), np.asarray(want.convert("L"), float)
    sideways = np.asarray(got.convert("L").transpose(Image.Transpose.ROTATE_180), float)
    # measured 1.5 grey levels from ffmpeg's, and 63 for the picture turned the other way
    assert np.abs(a - b).mean() < 4 and np.abs(sideways - b).mean() > 20, (np.abs(a - b).mean(), np.abs(sideways - b).mean())
