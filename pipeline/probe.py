"""Probe one video file with ffmpeg-python's `ffmpeg.probe` (ffprobe) into manifest fields."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import ffmpeg


class ProbeError(Exception):
    """The file is not a usable video; the message is a one-line reason."""


def _rate(text: str | None) -> float:
    try:
        value = Fraction(text or "0")
    except (ValueError, ZeroDivisionError):
        return 0.0
    return float(value) if value.denominator else 0.0


def _last_line(stderr: bytes | None) -> str:
    lines = [ln.strip() for ln in (stderr or b"").decode("utf-8", "replace").splitlines() if ln.strip()]
    if not lines:
        return "ffprobe failed without a message"
    # ffprobe prints "path: reason"; keep the reason only.
    last = lines[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def probe_video(path: Path) -> dict[str, Any]:
    """Manifest fields of `path` (duration, fps, n_frames, size, codecs, audio facts).

    Raises ProbeError with a precise reason for unusable files.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise ProbeError(f"cannot stat file ({exc.strerror})") from None
    if st.st_size == 0:
        raise ProbeError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ProbeError("permission denied (file is not readable)")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ProbeError(f"cannot read file ({exc.strerror})") from None
    try:
        info = ffmpeg.probe(str(path))
    except ffmpeg.Error as exc:
        raise ProbeError(f"ffprobe: {_last_line(exc.stderr)}") from None
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not s.get("disposition", {}).get("attached_pic")), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if video is None:
        raise ProbeError("no video stream")
    fmt = info.get("format", {})
    duration = float(video.get("duration") or fmt.get("duration") or 0.0)
    if duration <= 0:
        raise ProbeError("zero or unknown duration")
    fps = _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))
    n_frames = int(video.get("nb_frames") or 0) or int(round(duration * fps))
    width, height = int(video.get("width") or 0), int(video.get("height") or 0)
    if width <= 0 or height <= 0:
        raise ProbeError("video stream has no frame size")
    return {
        "duration": round(duration, 4),
        "fps": round(fps, 4),
        "n_frames": n_frames,
        "width": width,
        "height": height,
        "video_codec": video.get("codec_name"),
        "audio_codec": audio.get("codec_name") if audio else None,
        "has_audio": audio is not None,
        "audio_rate": int(audio.get("sample_rate") or 0) or None if audio else None,
        "audio_channels": int(audio.get("channels") or 0) or None if audio else None,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }
