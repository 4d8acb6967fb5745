"""Tiny media made with ffmpeg for the pipeline tests (session temp dir, generated once)."""

import shutil
import subprocess
from pathlib import Path

import pytest


def ffmpeg_video(path: Path, seconds: float = 2.0, size: str = "64x48", fps: int = 12,
                 audio: bool = True, vcodec: str = "libx264") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size={size}:rate={fps}:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={seconds}"]
    cmd += ["-c:v", vcodec, "-pix_fmt", "yuv420p"]
    if audio:
        cmd += ["-c:a", "aac", "-shortest"]
    cmd += [str(path)]
    subprocess.run(cmd, check=True)
    return path


SRT = """1
00:00:00,000 --> 00:00:01,000
the red circle moves

2
00:00:01,000 --> 00:00:01,900
a <i>blue</i> square
"""

VTT = """WEBVTT

00:00.000 --> 00:01.500
hello there
"""


@pytest.fixture(scope="session")
def scan_tree(tmp_path_factory) -> Path:
    """A videos folder with good and bad inputs of every kind the scan must handle."""
    root = tmp_path_factory.mktemp("videos")
    base = ffmpeg_video(root / "good.mp4")
    (root / "good.srt").write_text(SRT)
    shutil.copy(base, root / "cooking" / "a.mp4") if (root / "cooking").mkdir() is None else None
    (root / "cooking" / "a.vtt").write_text(VTT)
    (root / "other").mkdir()
    shutil.copy(base, root / "other" / "a.mp4")
    (root / "other" / "a.json").write_text('[{"start": 0.2, "end": 1.2, "text": "json caption"}]')
    shutil.copy(base, root / "my clip.v2 ünï.mp4")
    ffmpeg_video(root / "silent.mkv", audio=False)
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("this is a text file, not a video\n" * 20)
    data = base.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1",
                    "-c:a", "aac", str(root / "audio_only.mp4")], check=True)
    for name, caption_name, content in (
        ("badjson", "badjson.json", b'[{"start": 0, "end": '),
        ("emptycap", "emptycap.srt", b""),
        ("outside", "outside.srt", b"1\n00:01:00,000 --> 00:01:02,000\nlate caption\n"),
        ("latin1", "latin1.srt", "1\n00:00:00,000 --> 00:00:01,000\ncaf\u00e9\n".encode("latin-1")),
        ("partial", "partial.srt", (SRT + "\n3\n00:00:05,000 --> 00:00:06,000\nafter the end\n").encode()),
    ):
        shutil.copy(base, root / f"{name}.mp4")
        (root / caption_name).write_bytes(content)
    shutil.copy(base, root / "twin.mp4")
    shutil.copy(base, root / "twin.mov")
    return root


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory) -> Path:
    """A 64x48, 1 s h264 + aac video to copy into test trees (copies: links to one file are one video)."""
    return ffmpeg_video(tmp_path_factory.mktemp("tiny") / "tiny.mp4", seconds=1.0)
