"""Probe one video file with ffprobe into manifest fields.

Every problem is a :class:`ProbeError` whose message is the one-line reason recorded in the manifest;
:class:`ProbeTimeout` (ffprobe killed after ``timeout`` seconds) and :class:`ProbeUnavailable`
(ffprobe could not be started) are failures of this scan only: the scan does not cache them, so a
later scan probes the file again.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

FFPROBE = "ffprobe"  # looked up on PATH at every call


class ProbeError(Exception):
    """The file is not a usable video; the message is a one-line reason."""

    #: False for failures of the environment (timeout, no ffprobe): not to be cached.
    cacheable = True


class ProbeTimeout(ProbeError):
    """ffprobe did not finish in time and was killed."""

    cacheable = False


class ProbeUnavailable(ProbeError):
    """ffprobe could not be run at all."""

    cacheable = False


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


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ffprobe and whatever it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def run_ffprobe(path: Path, timeout: float | None, running: Any = None) -> dict[str, Any]:
    """``ffprobe -show_format -show_streams -of json path`` as a dict; ProbeError on failure.

    Hand-written rather than ffmpeg-python's ``ffmpeg.probe``, which has no timeout: a file that makes
    ffprobe hang would keep its thread (and the process at exit) forever. Here ffprobe runs in its own
    process group, which is killed (SIGKILL) when it runs past ``timeout`` seconds, so no process or
    thread outlives the call. ``running`` (an object with ``add``/``discard``) is told of the process,
    so that a caller that is interrupted can kill it.
    """
    cmd = [FFPROBE, "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as exc:
        raise ProbeUnavailable(f"cannot run {FFPROBE} ({exc.strerror or exc})") from None
    if running is not None:
        running.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a grandchild that left the group still holds the pipes
            proc.wait()
        raise ProbeTimeout(f"ffprobe timed out after {timeout:g} s") from None
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt...): leave no process behind
            kill_group(proc)
            proc.wait()
        if running is not None:
            running.discard(proc)
    if proc.returncode != 0:
        raise ProbeError(f"ffprobe: {_last_line(err)}")
    try:
        info = json.loads(out.decode("utf-8", "replace"))
    except ValueError:
        raise ProbeError("ffprobe: unreadable output") from None
    if not isinstance(info, dict):
        raise ProbeError("ffprobe: unreadable output")
    return info


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def probe_video(path: Path, timeout: float | None = None, running: Any = None) -> dict[str, Any]:
    """Manifest fields of `path` (duration, fps, n_frames, size, codecs, audio facts).

    Raises ProbeError with a precise reason for unusable files (ProbeTimeout when ffprobe ran past
    ``timeout`` seconds and was killed; ``running``: see :func:`run_ffprobe`).
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise ProbeError(f"cannot stat file ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((what for test, what in _KINDS if test(st.st_mode)), "a special file")
        raise ProbeError(f"not a regular file ({kind})")
    if st.st_size == 0:
        raise ProbeError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ProbeError("permission denied (file is not readable)")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ProbeError(f"cannot read file ({exc.strerror})") from None
    info = run_ffprobe(path, timeout, running)
    streams = [s for s in info.get("streams") or [] if isinstance(s, dict)]
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not (s.get("disposition") or {}).get("attached_pic")), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if video is None:
        raise ProbeError("no video stream")
    fmt = info.get("format") or {}
    duration = _number(video.get("duration")) or _number(fmt.get("duration"))
    if duration <= 0:
        raise ProbeError("zero or unknown duration")
    fps = _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))
    n_frames = int(_number(video.get("nb_frames"))) or int(round(duration * fps))
    width, height = int(_number(video.get("width"))), int(_number(video.get("height")))
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
        "audio_rate": int(_number(audio.get("sample_rate"))) or None if audio else None,
        "audio_channels": int(_number(audio.get("channels"))) or None if audio else None,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def _number(value: Any) -> float:
    """A field of ffprobe's JSON as a finite float; 0.0 when absent or not a number ("N/A")."""
    try:
        x = float(value or 0)
    except (TypeError, ValueError):
        return 0.0
    return x if x == x and x not in (float("inf"), float("-inf")) else 0.0
