"""Video thumbnails for the evaluation report: one JPEG frame per (video, time), via an ffmpeg subprocess
or, on a machine without the ffmpeg binary, a PyAV child process (``extractors.libav frame``).

Never raises on bad media: a missing file, a file libav cannot decode, a time past the end or neither
ffmpeg nor PyAV installed all give a generated grey placeholder PNG (and a warning in the log). Results,
placeholders included, are cached per ``(path, mtime, size, t, width)`` in a bounded in-process LRU.
"""

from __future__ import annotations

import logging
import shutil
import struct
import subprocess
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

from extractors.libav import PYAV, child_command, resolve_tool
from extractors.subproc import run_tool

logger = logging.getLogger(__name__)

__all__ = ["FFMPEG_TIMEOUT_S", "clear_cache", "image_mime", "placeholder", "thumbnail"]

FFMPEG_TIMEOUT_S: float = 30.0
_CACHE_SIZE = 2048
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_cache: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
_lock = threading.Lock()


def image_mime(data: bytes) -> str:
    """MIME type of PNG or JPEG bytes, from their magic number (``ValueError`` for anything else)."""
    if data.startswith(_PNG_MAGIC):
        return "image/png"
    if data.startswith(_JPEG_MAGIC):
        return "image/jpeg"
    raise ValueError("not a PNG or JPEG image")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def placeholder(width: int = 160, height: int | None = None) -> bytes:
    """A grey RGB PNG (16:9 by default) with a darker 1-pixel border and diagonals; no image library needed."""
    width = max(int(width), 2)
    height = max(int(height if height is not None else round(width * 9 / 16)), 2)
    fill, line = b"\xc8\xc8\xc8", b"\x8c\x8c\x8c"
    rows = []
    for y in range(height):
        if y in (0, height - 1):
            row = line * width
        else:
            px = bytearray(fill * width)
            d1 = round(y * (width - 1) / (height - 1))
            for x in (0, width - 1, d1, width - 1 - d1):
                px[3 * x: 3 * x + 3] = line
            row = bytes(px)
        rows.append(b"\x00" + row)  # filter type 0 per scanline
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (_PNG_MAGIC + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
            + _png_chunk(b"IEND", b""))


def _grab_frame(path: Path, t: float, width: int) -> bytes | None:
    """JPEG bytes of the frame at ``t`` seconds, or None (with a warning) when there is none.

    ffmpeg when it is on PATH, else a PyAV child (``extractors.libav frame``), either under
    ``run_tool``'s time limit and process-group kill (a hostile file that hangs libav is killed)."""
    tool = resolve_tool("auto", "ffmpeg")
    if tool == PYAV:
        cmd, env = child_command("frame", str(path), f"{t:.3f}", str(width))
    elif shutil.which("ffmpeg") is None:
        logger.warning("neither ffmpeg nor PyAV found: placeholder thumbnail for %s", path)
        return None
    else:
        cmd, env = ["ffmpeg", "-nostdin", "-v", "error", "-ss", f"{t:.3f}", "-i", str(path), "-frames:v", "1",
                    "-an", "-vf", f"scale={width}:-2", "-f", "image2pipe", "-vcodec", "mjpeg", "-"], None
    try:
        proc = run_tool(cmd, FFMPEG_TIMEOUT_S, env=env)
    except (subprocess.TimeoutExpired, OSError) as exc:
        logger.warning("%s failed on %s at %.3fs: %s", tool, path, t, exc)
        return None
    if proc.returncode != 0 or not proc.stdout.startswith(_JPEG_MAGIC):
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        logger.warning("no frame from %s at %.3fs (%s rc=%d%s)", path, t, tool, proc.returncode,
                       f": {err[-1]}" if err else "")
        return None
    return proc.stdout


def thumbnail(video_path: Path | str | None, t: float, width: int = 160) -> bytes:
    """JPEG of the frame at ``t`` seconds scaled to ``width`` pixels, or a grey placeholder PNG.

    The result is cached per (path, file mtime and size, t, width), so a re-encoded file is read again.
    """
    width = max(int(width), 2)
    t = max(float(t), 0.0) if t == t else 0.0  # NaN -> 0
    if video_path is None:
        return placeholder(width)
    path = Path(video_path)
    try:
        st = path.stat()
        ident: tuple[object, ...] = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        ident = (str(path), None, None)
    key = (*ident, round(t, 3), width)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    if ident[1] is None or not path.is_file():
        logger.warning("video not found: placeholder thumbnail for %s", path)
        data = placeholder(width)
    else:
        data = _grab_frame(path, round(t, 3), width) or placeholder(width)
    with _lock:
        _cache[key] = data
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return data


def clear_cache() -> None:
    """Forget every cached thumbnail."""
    with _lock:
        _cache.clear()
