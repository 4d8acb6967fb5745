"""Tiny generated media for the decoder tests (made once per session with ffmpeg in a tmp dir).

Every fixture returns a ``Path``. Sizes and lengths are kept minimal: the whole set encodes in a few
seconds on two cores.
"""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest

# Colour of second s of the VFR video, and that second's frame rate (fps). Chosen so that sampling by
# an assumed constant rate (total frames / duration = 14.3 fps) picks frames from the wrong second.
VFR_COLOURS: list[tuple[int, int, int]] = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 255),
    (255, 255, 0),
    (255, 0, 255),
]
VFR_RATES: list[int] = [10, 30, 5, 24, 2, 15]

CFR_SECONDS = 5.0  # constant-fps H.264 + stereo 44.1 kHz AAC (440 Hz)
CFR_FPS = 25
SHORT_SECONDS = 0.5  # shorter than one 16-frame 3D window (0.667 s at 24 fps)


def _ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly; fail the test session with ffmpeg's stderr on error."""
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({' '.join(cmd)}):\n{proc.stderr}")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not on PATH")
    return tmp_path_factory.mktemp("media")


def _x264(fps: int) -> list[str]:
    # keyframe every second: seeking decoders have work to do, and files stay tiny
    return ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(fps)]


@pytest.fixture(scope="session")
def cfr_mp4(media_dir: Path) -> Path:
    """5 s, 320×240, 25 fps H.264 (moving test pattern) + AAC stereo 44.1 kHz 440 Hz sine."""
    out = media_dir / "cfr.mp4"
    _ffmpeg(
        "-f", "lavfi", "-i", f"testsrc2=size=320x240:rate={CFR_FPS}:duration={CFR_SECONDS}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={CFR_SECONDS}",
        *_x264(CFR_FPS), "-c:a", "aac", "-ac", "2", "-ar", "44100", "-shortest", str(out),
    )
    return out


@pytest.fixture(scope="session")
def vfr_mp4(media_dir: Path) -> Path:
    """6 s, 64×48 variable-frame-rate H.264: second s is a flat VFR_COLOURS[s] at VFR_RATES[s] fps."""
    out = media_dir / "vfr.mp4"
    inputs: list[str] = []
    for (r, g, b), rate in zip(VFR_COLOURS, VFR_RATES):
        inputs += ["-f", "lavfi", "-i", f"color=c=0x{r:02X}{g:02X}{b:02X}:size=64x48:rate={rate}:duration=1"]
    n = len(VFR_RATES)
    graph = "".join(f"[{i}:v]" for i in range(n)) + f"concat=n={n}:v=1:a=0[v]"
    _ffmpeg(*inputs, "-filter_complex", graph, "-map", "[v]", "-fps_mode", "vfr",
            *_x264(10), "-video_track_timescale", "600", str(out))
    return out


@pytest.fixture(scope="session")
def noaudio_mp4(media_dir: Path) -> Path:
    """2 s, 64×48, 25 fps H.264 without an audio stream."""
    out = media_dir / "noaudio.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25:duration=2", *_x264(25), "-an", str(out))
    return out


@pytest.fixture(scope="session")
def vp9_webm(media_dir: Path) -> Path:
    """2 s, 64×48, 25 fps VP9 + Opus 48 kHz mono in WebM."""
    out = media_dir / "vp9.webm"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25:duration=2",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=2",
        "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "200k",
        "-c:a", "libopus", "-ac", "1", "-shortest", str(out),
    )
    return out


@pytest.fixture(scope="session")
def mpeg4_avi(media_dir: Path) -> Path:
    """2 s, 64×48, 25 fps MPEG-4 part 2 + PCM mono 22.05 kHz in AVI."""
    out = media_dir / "mpeg4.avi"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25:duration=2",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=22050:duration=2",
        "-c:v", "mpeg4", "-q:v", "5", "-c:a", "pcm_s16le", "-ac", "1", "-shortest", str(out),
    )
    return out


@pytest.fixture(scope="session")
def short_mp4(media_dir: Path) -> Path:
    """0.5 s, 64×48, 25 fps H.264 + AAC: shorter than one 3D window (16 frames at 24 fps)."""
    out = media_dir / "short.mp4"
    _ffmpeg(
        "-f", "lavfi", "-i", f"testsrc2=size=64x48:rate=25:duration={SHORT_SECONDS}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={SHORT_SECONDS}",
        *_x264(25), "-c:a", "aac", "-shortest", str(out),
    )
    return out


@pytest.fixture(scope="session")
def _h264_4s(media_dir: Path) -> tuple[Path, Path]:
    """4 s 64×48 H.264 + AAC, written twice: moov atom at the end and at the front (faststart)."""
    tail = media_dir / "moov_tail.mp4"
    front = media_dir / "moov_front.mp4"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25:duration=4",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=4",
        *_x264(25), "-c:a", "aac", "-shortest", str(tail),
    )
    _ffmpeg("-i", str(tail), "-c", "copy", "-movflags", "+faststart", str(front))
    return tail, front


@pytest.fixture(scope="session")
def truncated_mp4(_h264_4s: tuple[Path, Path]) -> Path:
    """The first 60 % of an mp4 whose moov atom is at the end: no index, unreadable."""
    src = _h264_4s[0]
    out = src.with_name("truncated.mp4")
    data = src.read_bytes()
    out.write_bytes(data[: len(data) * 6 // 10])
    return out


@pytest.fixture(scope="session")
def truncated_faststart_mp4(_h264_4s: tuple[Path, Path]) -> Path:
    """The first 60 % of a faststart mp4: the index promises 4 s of frames, the data ends early."""
    src = _h264_4s[1]
    out = src.with_name("truncated_faststart.mp4")
    data = src.read_bytes()
    out.write_bytes(data[: len(data) * 6 // 10])
    return out


@pytest.fixture(scope="session")
def corrupt_tail_mp4(_h264_4s: tuple[Path, Path]) -> Path:
    """Complete index (moov at the end), but the second half of the media data is zeroed: the
    container promises 100 frames, about half of them decode."""
    src = _h264_4s[0]
    out = src.with_name("corrupt_tail.mp4")
    data = bytearray(src.read_bytes())
    moov = data.find(b"moov")
    assert moov > 0
    data[len(data) // 2 : moov - 8] = bytes(moov - 8 - len(data) // 2)
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="session")
def audio_only_m4a(media_dir: Path) -> Path:
    """1 s AAC, no video stream."""
    out = media_dir / "audio_only.m4a"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=1", "-c:a", "aac", str(out))
    return out


@pytest.fixture(scope="session")
def empty_audio_mkv(media_dir: Path) -> Path:
    """1 s video whose declared audio stream has no packets (decodes to zero samples)."""
    out = media_dir / "empty_audio.mkv"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25:duration=1",
        "-f", "lavfi", "-i", "sine=sample_rate=16000:duration=1",
        "-map", "0:v", "-map", "1:a", *_x264(25), "-c:a", "aac", "-frames:a", "0", str(out),
    )
    return out


@pytest.fixture(scope="session")
def rotated_mp4(noaudio_mp4: Path) -> Path:
    """The 64×48 no-audio video re-encoded with a display matrix: shown rotated 90° counter-clockwise
    (48×64), as phones write portrait videos."""
    import av

    out = noaudio_mp4.with_name("rotated.mp4")
    with av.open(str(noaudio_mp4)) as src, av.open(str(out), "w") as dst:
        stream = dst.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for i, frame in enumerate(src.decode(video=0)):
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out


@pytest.fixture(scope="session")
def text_mp4(media_dir: Path) -> Path:
    """A text file named .mp4."""
    out = media_dir / "text.mp4"
    out.write_text("this is not a video\n" * 20)
    return out


@pytest.fixture(scope="session")
def large_mp4(media_dir: Path) -> Path:
    """1 s, 3840×2160, 5 fps H.264 (5 frames): must be scaled down in the decoder."""
    out = media_dir / "large.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=3840x2160:rate=5:duration=1", *_x264(5), "-an", str(out))
    return out
