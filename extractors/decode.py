"""Video and audio decoding for the extract stage.

One visual decode pass per video feeds both visual streams (see DESIGN.md "Decoding"):

* 2D: frames at target times t_k = k / fps_2d, shorter side ``size_2d`` (aspect kept, even sizes);
* 3D: frames at t_k = k / fps_3d, shorter side ``size_3d`` then centre crop ``crop_3d`` × ``crop_3d``.

Sampling is by presentation timestamp, never by an assumed constant frame rate: target t_k takes the
last decoded frame whose presentation time is <= t_k (the first frame if none), for every t_k < D,
where times are seconds from the video stream's start time and D is the end of the last decoded
frame (its start plus its duration). A video with at least one decoded frame always yields the t = 0
targets. Output is streamed in ``VisualChunk``s covering ``chunk_seconds`` of target time each, so peak
memory does not grow with the video's length.

Decoding stops cleanly at the first frame that fails (truncated or corrupt data, containers whose
index promises more frames than there are): the frames before it are returned and a warning is
logged. A file that yields no frame at all raises ``DecodeError``.

Backends (``DecodeConfig.backend``, registry ``VISUAL_BACKENDS``):

* ``"decord"``: ``decord.VideoReader`` scaled to the 2D size in the decoder, batched ``get_batch`` per
  chunk over the frame indices the targets need (timestamps from ``get_frame_timestamp``). A file that
  decord cannot even index (e.g. a truncated faststart mp4: decord reads every packet on open) is
  handed to the PyAV backend when ``DecodeConfig.fallback_pyav`` is set.
* ``"pyav"``: sequential ``container.decode(video=0)``; only frames that some target needs are
  converted (``frame.to_ndarray(width=, height=, format="rgb24")``).
* ``"torchcodec"`` / ``"torchcodec-cuda"``: ``torchcodec.decoders.VideoDecoder.get_frames_at`` per
  chunk over the same frame indices as decord would read, with the frame index taken from PyAV's
  demuxer (no decoding) and handed to torchcodec as its frame mapping; decoded at the native size and
  resized with torch (on the GPU, after NVDEC, for ``-cuda``). Files the CPU one cannot open go to
  PyAV when ``fallback_pyav`` is set (never for ``-cuda``: a torchcodec built without CUDA must fail
  loudly, not turn into PyAV output under the ``-cuda`` fingerprint).

decord and torchcodec share the indexed sampling (``_plan_chunks``), PyAV streams (``_StreamSampler``);
both apply the rule above, so all backends choose the same source frame for every target (the tests
check this on constant- and variable-rate H.264). The backend is part of the extract fingerprint:
the scalers differ by a few grey levels, so the bytes do.

Audio: ``decode_audio`` streams an ``ffmpeg`` subprocess (or, without ffmpeg, a PyAV child process:
``extractors.libav``; ``audio_tool``) into a float32 file returned as ``np.memmap``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import ffmpeg
import numpy as np
import torch
import torch.nn.functional as F

from extractors.libav import NO_AUDIO_EXIT, PYAV, child_command, quarter_turns, resolve_tool, upright_rgb
from extractors.subproc import run_tool
from store.lineage import RUNTIME

logger = logging.getLogger(__name__)

# Two times closer than this (seconds, relative; at least 1 µs) are equal: decord reports float32
# timestamps, and a target that falls exactly on a frame's start must take that frame.
_REL_TOL = 1e-6
# A video with decoded frames but (near) zero duration still yields the t = 0 targets.
_MIN_DURATION = 1e-3
# Distinct decode-size frames handled per step (get_batch call, 3D resize): ~17 MB at 398×224.
_BATCH = 64
# The audio binaries (looked up on PATH at every call); without them PyAV decodes (``audio_tool``).
FFMPEG, FFPROBE = "ffmpeg", "ffprobe"


class DecodeError(Exception):
    """A video or audio stream that cannot be decoded; the message is a one-line reason."""


class DecodeTimeout(DecodeError):
    """A decoding subprocess ran past its time limit and was killed (perhaps not the file's fault)."""


class NoAudioError(DecodeError):
    """The file has no audio stream, or its audio stream decodes to zero samples."""


@dataclass
class DecodeConfig:
    """Decoding and sampling settings (rates in frames / s, sizes in pixels)."""

    # "decord" | "pyav" | "torchcodec" | "torchcodec-cuda" (keys of VISUAL_BACKENDS). Part of the
    # fingerprint: the backends scale (and NVDEC converts colours) differently, so pixels differ.
    backend: str = "decord"
    fps_2d: float = 1.0  # 2D sampling rate (frames / s)
    size_2d: int = 224  # shorter side of 2D frames (no crop, aspect kept, even sizes)
    fps_3d: float = 24.0  # 3D sampling rate
    size_3d: int = 112  # shorter side, then centre crop crop_3d × crop_3d
    crop_3d: int = 112
    chunk_seconds: float = field(default=10.0, metadata=RUNTIME)  # video decoded per chunk: bounded memory
    threads: int = field(default=1, metadata=RUNTIME)  # decoder threads
    audio_rate: int = 16000  # Hz, mono
    # Resource bounds of one decoded frame: a frame longer than max_aspect:1 is centre-cropped to that
    # aspect before the 2D and 3D sizes are applied (an 8192x16 video would otherwise give 2D frames of
    # 114688x224), and frames are decoded at no more than max_decode_pixels (scaled down otherwise).
    max_aspect: float = 4.0
    max_decode_pixels: int = 4_000_000
    # decord, torchcodec: PyAV for files they cannot open
    fallback_pyav: bool = field(default=True, metadata=RUNTIME)
    # ffprobe / ffmpeg audio subprocesses are killed after this long (s)
    audio_timeout_s: float = field(default=600.0, metadata=RUNTIME)
    # "auto" | "ffmpeg" | "pyav": what decodes audio (auto: ffmpeg when on PATH, else PyAV; see
    # extractors.libav.resolve_tool). The request is RUNTIME; the tool it resolves to enters the audio
    # field's fingerprint through audio_identity (the resamplers may differ in the last bits).
    audio_tool: str = field(default="auto", metadata=RUNTIME)

    def validate(self) -> None:
        """Raise ValueError on settings that cannot work."""
        if self.backend not in VISUAL_BACKENDS:
            raise ValueError(f"unknown decode backend {self.backend!r} (have {sorted(VISUAL_BACKENDS)})")
        if self.backend == "torchcodec-cuda" and not torch.cuda.is_available():
            raise ValueError("decode backend 'torchcodec-cuda' needs a CUDA device (none is available)")
        if self.fps_2d <= 0 or self.fps_3d <= 0 or self.chunk_seconds <= 0:
            raise ValueError("fps_2d, fps_3d and chunk_seconds must be > 0")
        if self.size_2d < 2 or self.size_2d % 2:
            raise ValueError(f"size_2d must be even and >= 2, got {self.size_2d}")
        if self.crop_3d < 1 or self.size_3d < self.crop_3d:
            raise ValueError(f"need 1 <= crop_3d <= size_3d, got crop {self.crop_3d}, size {self.size_3d}")
        if self.threads < 0 or self.audio_rate <= 0:
            raise ValueError("threads must be >= 0 and audio_rate > 0")
        resolve_tool(self.audio_tool, FFMPEG)  # ValueError on an unknown tool
        if self.max_aspect < 1.0 or self.max_decode_pixels < 4 * self.size_2d:
            raise ValueError(f"need max_aspect >= 1 and max_decode_pixels >= 4 x size_2d, got {self.max_aspect}, "
                             f"{self.max_decode_pixels}")


@dataclass
class VisualChunk:
    """Frames for the targets of one ``chunk_seconds`` window of target time.

    frames_2d: uint8 (n, H2, W2, 3) RGB, shorter side size_2d; times_2d: float64 (n,) = k / fps_2d.
    frames_3d: uint8 (m, crop_3d, crop_3d, 3) RGB; times_3d: float64 (m,) = k / fps_3d.
    Either stream may be empty in a chunk. The 3D frames of consecutive chunks form one contiguous
    sequence: consumers that cut 16-frame windows carry the remainder over to the next chunk.
    """

    frames_2d: np.ndarray
    times_2d: np.ndarray
    frames_3d: np.ndarray
    times_3d: np.ndarray
    warnings: list[str] = field(default_factory=list)  # on the first chunk: frames cropped or scaled down


@dataclass(frozen=True)
class VideoProbe:
    """Facts about the first video stream (PyAV). Sizes in pixels as displayed (after rotation),
    times in seconds."""

    width: int
    height: int
    codec: str
    duration: float | None  # container/stream duration, None when unknown
    avg_fps: float | None
    rotation: int = 0  # display rotation, degrees counter-clockwise: 0, 90, 180 or 270


# ---------------------------------------------------------------------------------------------------
# small helpers


def _one_line(exc: BaseException | str, last: bool = False) -> str:
    """One line of an error message: the first (or ``last``) non-empty one, without decord's
    "[time] file.cc:N:" prefixes or stack-trace lines, at most 300 characters."""
    if isinstance(exc, av.error.FFmpegError) and exc.strerror:
        return str(exc.strerror)[:300]
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("[bt]", "Stack trace"))]
    if not lines:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    line = lines[-1] if last else lines[0]
    line = re.sub(r"^(\[[\d:]+\]\s*\S+\.(cc|h|cpp):\d+:\s*)+", "", line)
    return line[:300]


def _tol(t: float) -> float:
    return _REL_TOL * max(1.0, abs(t))


def _n_before(x: float, fps: float) -> int:
    """Number of targets k >= 0 with k / fps < x (times closer than the tolerance count as equal)."""
    if x <= 0:
        return 0
    return max(0, math.ceil((x - _tol(x)) * fps))


def scaled_size(width: int, height: int, short: int, even: bool = True) -> tuple[int, int]:
    """(width, height) with the shorter side = ``short`` and the aspect kept (other side even)."""
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid frame size {width}x{height}")
    if height <= width:
        w = width * short / height
        return (max(2, 2 * round(w / 2)) if even else max(1, round(w))), short
    h = height * short / width
    return short, (max(2, 2 * round(h / 2)) if even else max(1, round(h)))


def _resize_tensor(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """uint8 tensor (u, H, W, 3) on any device -> uint8 (u, height, width, 3): bilinear with
    antialiasing. On the CPU torch's uint8 channels-last kernel (no float copy of the batch, ~25× faster
    than float32); elsewhere in float32, rounded."""
    if tuple(frames.shape[1:3]) == (height, width):
        return frames
    x = frames.permute(0, 3, 1, 2)  # NCHW view, channels-last
    if x.device.type != "cpu":
        x = x.float()
    y = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    if y.dtype != torch.uint8:
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous()


def _resize_batch(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (u, H, W, 3) -> uint8 (u, height, width, 3): bilinear with antialiasing (_resize_tensor)."""
    if frames.shape[1:3] == (height, width):
        return frames
    return _resize_tensor(torch.from_numpy(np.ascontiguousarray(frames)), width, height).numpy()


def _resize_crop_3d(frames: np.ndarray, cfg: DecodeConfig) -> np.ndarray:
    """uint8 (u, H, W, 3) -> uint8 (u, crop, crop, 3): shorter side size_3d, then centre crop."""
    if len(frames) == 0:
        return np.empty((0, cfg.crop_3d, cfg.crop_3d, 3), dtype=np.uint8)
    h, w = frames.shape[1:3]
    rw, rh = scaled_size(w, h, cfg.size_3d, even=False)
    resized = _resize_batch(frames, rw, rh)
    top, left = (rh - cfg.crop_3d) // 2, (rw - cfg.crop_3d) // 2
    return np.ascontiguousarray(resized[:, top : top + cfg.crop_3d, left : left + cfg.crop_3d])


class _ChunkBuilder:
    """Collects the frames of one chunk: distinct decoded frames arrive in time order, each with the
    number of 2D and 3D targets it serves. 3D crops are made per added batch, so a chunk holds only
    its outputs (plus one batch of decode-size frames), not all of its decoded frames."""

    def __init__(self, cfg: DecodeConfig, geometry: "_Geometry", k2_start: int, k3_start: int) -> None:
        self.cfg = cfg
        self.geometry = geometry
        self.size_2d = geometry.size_2d
        self.k2_start = k2_start
        self.k3_start = k3_start
        self._2d: list[np.ndarray] = []
        self._3d: list[np.ndarray] = []
        self.n2 = 0
        self.n3 = 0

    def add(self, frames: np.ndarray, n2: np.ndarray, n3: np.ndarray) -> None:
        """frames: uint8 (b, H, W, 3) at the decode size; n2, n3: int (b,) targets served by each."""
        n2, n3 = np.asarray(n2, dtype=np.int64), np.asarray(n3, dtype=np.int64)
        if self.geometry.crop is not None:
            left, top, cw, ch = self.geometry.crop
            frames = frames[:, top : top + ch, left : left + cw]
        if n2.sum():
            sel = n2 > 0
            frames_2d = _resize_batch(frames[sel], *self.size_2d)
            self._2d.append(np.repeat(frames_2d, n2[sel], axis=0))
            self.n2 += int(n2.sum())
        if n3.sum():
            sel = n3 > 0
            used = frames if sel.all() else frames[sel]
            self._3d.append(np.repeat(_resize_crop_3d(used, self.cfg), n3[sel], axis=0))
            self.n3 += int(n3.sum())

    def build(self) -> VisualChunk | None:
        """The chunk, or None when no target was added."""
        if self.n2 == 0 and self.n3 == 0:
            return None
        w2, h2 = self.size_2d
        c = self.cfg.crop_3d
        warnings, self.geometry.pending_warnings[:] = list(self.geometry.pending_warnings), []
        return VisualChunk(
            frames_2d=np.concatenate(self._2d) if self._2d else np.empty((0, h2, w2, 3), np.uint8),
            times_2d=np.arange(self.k2_start, self.k2_start + self.n2, dtype=np.float64) / self.cfg.fps_2d,
            frames_3d=np.concatenate(self._3d) if self._3d else np.empty((0, c, c, 3), np.uint8),
            times_3d=np.arange(self.k3_start, self.k3_start + self.n3, dtype=np.float64) / self.cfg.fps_3d,
            warnings=warnings,
        )


@dataclass
class _Geometry:
    """Sizes of one video's frames as (width, height): decoded at ``decode``, centre-cropped to
    ``crop`` (left, top, width, height in decode pixels) when its aspect is extreme, 2D frames of
    ``size_2d``. ``pending_warnings`` go out with the first chunk."""

    decode: tuple[int, int]
    size_2d: tuple[int, int]
    crop: tuple[int, int, int, int] | None = None
    pending_warnings: list[str] = field(default_factory=list)


def _geometry(probe: VideoProbe, cfg: DecodeConfig) -> _Geometry:
    """Decode at the larger of the 2D and 3D sizes, within cfg.max_decode_pixels; centre-crop frames
    longer than cfg.max_aspect:1 (see DecodeConfig)."""
    w, h = probe.width, probe.height
    if w <= 0 or h <= 0:
        raise DecodeError(f"invalid frame size {w}x{h}")
    warnings: list[str] = []
    short = max(cfg.size_2d, cfg.size_3d + (cfg.size_3d % 2))
    dw, dh = scaled_size(w, h, short)
    if dw * dh > cfg.max_decode_pixels:
        f = math.sqrt(cfg.max_decode_pixels / (dw * dh))
        dw, dh = max(2, 2 * int(dw * f / 2)), max(2, 2 * int(dh * f / 2))
        warnings.append(f"{w}x{h} frames decoded at {dw}x{dh} (over the {cfg.max_decode_pixels}-pixel cap)")
    aspect = max(w, h) / min(w, h)
    if aspect <= cfg.max_aspect:
        return _Geometry((dw, dh), scaled_size(w, h, cfg.size_2d), None, warnings)
    if dw >= dh:
        cw, ch = min(dw, max(2, 2 * round(dh * cfg.max_aspect / 2))), dh
    else:
        cw, ch = dw, min(dh, max(2, 2 * round(dw * cfg.max_aspect / 2)))
    warnings.append(f"aspect ratio {aspect:.1f}:1 is over {cfg.max_aspect:g}:1: frames centre-cropped to "
                    f"{cw}x{ch} of {dw}x{dh}")
    return _Geometry((dw, dh), scaled_size(cw, ch, cfg.size_2d), ((dw - cw) // 2, (dh - ch) // 2, cw, ch), warnings)


# ---------------------------------------------------------------------------------------------------
# probing


def probe_video(path: str | os.PathLike[str], rotation: bool = True) -> VideoProbe:
    """Size, codec, duration, average rate and (``rotation``: from the first decoded frame's display
    matrix) display rotation of the first video stream.

    Raises DecodeError when the file cannot be opened or has no video stream.
    """
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            duration: float | None = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            rate = stream.average_rate
            turns = 0
            if rotation:
                try:
                    for frame in container.decode(stream):
                        turns = quarter_turns(frame)
                        break
                except Exception:  # noqa: BLE001 - undecodable first frame: the decoders report it
                    pass
            width, height = int(ctx.width), int(ctx.height)
            if turns % 2:
                width, height = height, width
            return VideoProbe(
                width=width,
                height=height,
                codec=ctx.name,
                duration=duration,
                avg_fps=float(rate) if rate else None,
                rotation=90 * turns,
            )
    except DecodeError:
        raise
    except Exception as exc:  # av.error.FFmpegError, OSError, ...
        raise DecodeError(f"cannot open video: {_one_line(exc)}") from exc


def probe_duration(path: str | os.PathLike[str]) -> float:
    """Duration in seconds from the container header (video stream, else container); DecodeError when
    the file cannot be opened, ValueError when no duration is recorded."""
    probe = probe_video(path, rotation=False)
    if probe.duration is None:
        raise ValueError(f"{path}: no duration in the container")
    return probe.duration


# ---------------------------------------------------------------------------------------------------
# PyAV backend (streaming)


class _StreamSampler:
    """Assigns targets to frames arriving in presentation order and cuts the result into chunks.

    ``cover(get_rgb, hi)`` gives every not yet assigned target with time < hi to one frame (the frame
    shown until ``hi``) and returns the chunks that this completes.
    """

    def __init__(self, cfg: DecodeConfig, geometry: _Geometry) -> None:
        self.cfg = cfg
        self.geometry = geometry
        self.chunk = 0
        self.k2 = 0  # next 2D target index
        self.k3 = 0
        self._builder = _ChunkBuilder(cfg, geometry, 0, 0)
        self._pending: list[np.ndarray] = []
        self._n2: list[int] = []
        self._n3: list[int] = []

    def cover(self, get_rgb: Callable[[], np.ndarray], hi: float) -> list[VisualChunk]:
        cfg = self.cfg
        done: list[VisualChunk] = []
        while True:
            c_end = (self.chunk + 1) * cfg.chunk_seconds
            lim = min(hi, c_end)
            e2, e3 = _n_before(lim, cfg.fps_2d), _n_before(lim, cfg.fps_3d)
            if e2 > self.k2 or e3 > self.k3:
                self._pending.append(get_rgb())
                self._n2.append(e2 - self.k2)
                self._n3.append(e3 - self.k3)
                self.k2, self.k3 = e2, e3
                if len(self._pending) >= _BATCH:
                    self._drain()
            if hi < c_end:
                return done
            chunk = self.finish()
            if chunk is not None:
                done.append(chunk)
            self.chunk += 1

    def _drain(self) -> None:
        if self._pending:
            self._builder.add(np.stack(self._pending), np.asarray(self._n2), np.asarray(self._n3))
            self._pending, self._n2, self._n3 = [], [], []

    def finish(self) -> VisualChunk | None:
        """The current (possibly partial) chunk; a new one starts after it."""
        self._drain()
        chunk = self._builder.build()
        self._builder = _ChunkBuilder(self.cfg, self.geometry, self.k2, self.k3)
        return chunk


def _iter_pyav(path: Path, cfg: DecodeConfig, probe: VideoProbe | None = None) -> Iterator[VisualChunk]:
    """PyAV backend: sequential decode; a frame is converted to RGB only when some target needs it."""
    probe = probe or probe_video(path)
    geometry = _geometry(probe, cfg)
    dec_w, dec_h = geometry.decode
    sampler = _StreamSampler(cfg, geometry)
    try:
        container = av.open(str(path))
    except Exception as exc:
        raise DecodeError(f"cannot open video: {_one_line(exc)}") from exc
    with container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = cfg.threads
        if cfg.threads != 1:
            stream.thread_type = "AUTO"
        tb = float(stream.time_base) if stream.time_base else 0.0
        origin: float | None = float(stream.start_time) * tb if stream.start_time is not None else None
        nominal = 1.0 / probe.avg_fps if probe.avg_fps else 0.0

        turns = probe.rotation // 90

        def rgb_of(frame: av.VideoFrame) -> Callable[[], np.ndarray]:
            cache: list[np.ndarray] = []

            def get() -> np.ndarray:
                if not cache:  # a frame can serve targets of two chunks: convert once
                    cache.append(upright_rgb(frame, dec_w, dec_h, turns, interpolation="BILINEAR",
                                             threads=max(1, cfg.threads)))
                return cache[0]

            return get

        prev: Callable[[], np.ndarray] | None = None
        prev_start = prev_dur = 0.0
        n_decoded = 0
        error: str | None = None
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except Exception as exc:  # corrupt or truncated data: keep what was decoded
                error = _one_line(exc)
                break
            if frame.pts is None:
                start = prev_start + (prev_dur or nominal) if prev is not None else 0.0
            else:
                if origin is None:
                    origin = frame.pts * tb
                start = frame.pts * tb - origin
            if prev is not None:
                start = max(start, prev_start)  # broken (decreasing) pts: the later frame wins
                yield from sampler.cover(prev, start)
            dur = float(frame.duration) * tb if frame.duration else 0.0
            if dur <= 0:
                dur = start - prev_start if prev is not None and start > prev_start else nominal
            prev, prev_start, prev_dur = rgb_of(frame), start, dur
            n_decoded += 1

        if prev is None:
            raise DecodeError(f"no video frames decoded{': ' + error if error else ''}")
        if error is not None:
            logger.warning("%s: video decode stopped after %d frames (%.2f s): %s",
                           path, n_decoded, prev_start + prev_dur, error)
        yield from sampler.cover(prev, max(prev_start + prev_dur, _MIN_DURATION))
        last = sampler.finish()
        if last is not None:
            yield last


# ---------------------------------------------------------------------------------------------------
# decord backend (indexed, batched per chunk)


def _open_decord(path: Path, size: tuple[int, int], threads: int):  # -> decord.VideoReader
    import decord

    return decord.VideoReader(str(path), ctx=decord.cpu(0), width=size[0], height=size[1],
                              num_threads=threads)


def _decord_times(vr) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - decord.VideoReader
    """Frame start and stop times (s, float64, from the stream start), starts made non-decreasing."""
    n = len(vr)
    ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64).reshape(n, 2)
    starts = np.maximum.accumulate(ts[:, 0])
    stops = np.maximum(ts[:, 1], starts)
    return starts, stops


def _frame_stop(starts: np.ndarray, stops: np.ndarray, i: int, nominal: float) -> float:
    """End time of frame i: its stop, or (zero duration) the previous interval / nominal frame time."""
    if stops[i] > starts[i]:
        return float(stops[i])
    if i > 0 and starts[i] > starts[i - 1]:
        return float(starts[i] + (starts[i] - starts[i - 1]))
    return float(starts[i] + nominal)


def _decord_batch(vr, indices: np.ndarray) -> np.ndarray:  # noqa: ANN001 - decord.VideoReader
    """uint8 (b, H, W, 3) frames at ``indices`` (zero-copy from decord's buffer via DLPack)."""
    arr = vr.get_batch(indices.tolist())
    return torch.utils.dlpack.from_dlpack(arr.to_dlpack()).numpy()


def _decord_prefix(path: Path, size: tuple[int, int], threads: int, indices: np.ndarray) -> np.ndarray:
    """Re-open the file and read ``indices`` one at a time until the first failure: the frames before
    it, uint8 (good, H, W, 3)."""
    out: list[np.ndarray] = []
    try:
        vr = _open_decord(path, size, threads)
        for j in range(len(indices)):
            out.append(_decord_batch(vr, indices[j : j + 1])[0])
    except Exception as exc:
        logger.debug("%s: decord per-frame retry stopped after %d frames: %s", path, len(out), _one_line(exc))
    if not out:
        return np.empty((0, size[1], size[0], 3), dtype=np.uint8)
    return np.stack(out)


def _per_frame(idx: np.ndarray, unique: np.ndarray) -> np.ndarray:
    """Targets served by each frame of ``unique`` (sorted), given each target's frame ``idx``."""
    return np.bincount(np.searchsorted(unique, idx), minlength=len(unique))


@dataclass
class _ChunkPlan:
    """The targets of one chunk and the frames that serve them (an indexed backend's work list).

    k2, k3: target indices (t = k / fps); idx2, idx3: the frame index serving each target;
    unique: the distinct frame indices needed, increasing; per2, per3: targets served by each of them.
    """

    k2: np.ndarray
    k3: np.ndarray
    idx2: np.ndarray
    idx3: np.ndarray
    unique: np.ndarray
    per2: np.ndarray
    per3: np.ndarray


def _plan_chunks(starts: np.ndarray, duration: float, cfg: DecodeConfig) -> Iterator[_ChunkPlan]:
    """The sampling rule for backends that read frames by index: ``starts`` (s, non-decreasing) are
    the frames' presentation times from the stream start, ``duration`` the end of the last frame;
    target t_k takes the last frame with start <= t_k (within the tolerance; the first frame if none)."""
    n = len(starts)
    n2_total, n3_total = _n_before(duration, cfg.fps_2d), _n_before(duration, cfg.fps_3d)
    keys = starts - _REL_TOL * np.maximum(1.0, np.abs(starts))  # frame i serves targets t >= keys[i]
    for c in range(max(1, math.ceil(duration / cfg.chunk_seconds))):
        lo, hi = c * cfg.chunk_seconds, (c + 1) * cfg.chunk_seconds
        k2 = np.arange(_n_before(lo, cfg.fps_2d), min(_n_before(hi, cfg.fps_2d), n2_total))
        k3 = np.arange(_n_before(lo, cfg.fps_3d), min(_n_before(hi, cfg.fps_3d), n3_total))
        if len(k2) == 0 and len(k3) == 0:
            continue
        idx2 = np.clip(np.searchsorted(keys, k2 / cfg.fps_2d, side="right") - 1, 0, n - 1)
        idx3 = np.clip(np.searchsorted(keys, k3 / cfg.fps_3d, side="right") - 1, 0, n - 1)
        unique = np.unique(np.concatenate([idx2, idx3]))
        yield _ChunkPlan(k2, k3, idx2, idx3, unique, _per_frame(idx2, unique), _per_frame(idx3, unique))


def _iter_indexed(path: Path, cfg: DecodeConfig, geometry: _Geometry, starts: np.ndarray, stops: np.ndarray,
                  nominal: float, read: Callable[[np.ndarray], np.ndarray],
                  read_prefix: Callable[[np.ndarray], np.ndarray]) -> Iterator[VisualChunk]:
    """Chunks of an indexed backend: per chunk, ``read`` (in batches of _BATCH) the distinct frame
    indices its targets need, in increasing order. ``read(indices)`` returns uint8 (b, H, W, 3) at the
    decode size; when it raises, ``read_prefix(indices)`` returns the frames before the first one
    that fails, and decoding stops there (the targets after the last good frame's end are dropped)."""
    n = len(starts)
    duration = max(_frame_stop(starts, stops, n - 1, nominal), _MIN_DURATION)
    last_ok = -1  # highest frame index decoded so far
    for plan in _plan_chunks(starts, duration, cfg):
        k2, k3, idx2, idx3, unique = plan.k2, plan.k3, plan.idx2, plan.idx3, plan.unique
        per2, per3 = plan.per2, plan.per3
        builder = _ChunkBuilder(cfg, geometry, int(k2[0]) if len(k2) else 0, int(k3[0]) if len(k3) else 0)
        for s in range(0, len(unique), _BATCH):
            sub = unique[s : s + _BATCH]
            try:
                frames = read(sub)
            except Exception as exc:
                # stop at the first frame that fails; the reader's state is undefined after an error
                error = _one_line(exc)
                frames = read_prefix(sub)
                if len(frames):
                    last_ok = int(sub[len(frames) - 1])
                if last_ok < 0:
                    raise DecodeError(f"no video frames decoded: {error}") from exc
                end = _frame_stop(starts, stops, last_ok, nominal)
                good = s + len(frames)  # distinct frames of this chunk decoded
                lim = int(unique[good - 1]) if good else -1
                keep2 = int(np.sum((idx2 <= lim) & (k2 / cfg.fps_2d < end - _tol(end))))
                keep3 = int(np.sum((idx3 <= lim) & (k3 / cfg.fps_3d < end - _tol(end))))
                per2, per3 = _per_frame(idx2[:keep2], unique), _per_frame(idx3[:keep3], unique)
                if len(frames):
                    builder.add(frames, per2[s:good], per3[s:good])
                logger.warning("%s: video decode stopped after frame %d of %d (%.2f s): %s",
                               path, last_ok + 1, n, end, error)
                chunk = builder.build()
                if chunk is not None:
                    yield chunk
                return
            builder.add(frames, per2[s : s + _BATCH], per3[s : s + _BATCH])
            last_ok = int(sub[-1])
        chunk = builder.build()
        if chunk is not None:
            yield chunk


def _iter_decord(path: Path, cfg: DecodeConfig) -> Iterator[VisualChunk]:
    """decord backend: per chunk, ``get_batch`` (in batches) over the distinct frame indices its
    targets need, in increasing order."""
    probe = probe_video(path)
    geometry = _geometry(probe, cfg)
    dec_size = geometry.decode
    if probe.rotation:  # decord 0.6 returns 4-channel frames and fails in get_batch on these
        if cfg.fallback_pyav:
            logger.info("%s: display rotation %d°: decoding with PyAV", path, probe.rotation)
            yield from _iter_pyav(path, cfg, probe)
            return
        raise DecodeError(f"decord cannot decode rotated videos (display rotation {probe.rotation}°)")
    try:
        vr = _open_decord(path, dec_size, cfg.threads)
        n = len(vr)
        starts, stops = _decord_times(vr) if n > 0 else (np.empty(0), np.empty(0))
    except Exception as exc:
        reason = _one_line(exc)
        if cfg.fallback_pyav:
            logger.warning("%s: decord cannot open it (%s); decoding with PyAV instead", path, reason)
            yield from _iter_pyav(path, cfg, probe)
            return
        raise DecodeError(f"decord cannot open video: {reason}") from exc
    if n == 0:
        raise DecodeError("no video frames in the container")
    reader = [vr]
    del vr

    def read_prefix(indices: np.ndarray) -> np.ndarray:
        reader.clear()  # release the failed reader before re-opening the file
        return _decord_prefix(path, dec_size, cfg.threads, indices)

    nominal = 1.0 / probe.avg_fps if probe.avg_fps else 0.0
    yield from _iter_indexed(path, cfg, geometry, starts, stops, nominal,
                             lambda idx: _decord_batch(reader[0], idx), read_prefix)


# ---------------------------------------------------------------------------------------------------
# torchcodec backend (indexed, batched per chunk; CPU or NVDEC)


def _packet_index(path: Path) -> tuple[list[dict[str, int]], float, float]:
    """The video stream's frame index from its packets (PyAV demux, nothing decoded): one entry per
    packet ``{"pts", "duration", "key_frame"}`` in stream time-base units, sorted by pts (as
    torchcodec's own exact-mode scan builds it: pts, else dts; discarded packets left out), the time
    base (s) and the stream's start time (s; the smallest pts when the container has none).
    A demuxing error ends the index at the last good packet (truncated files)."""
    frames: list[dict[str, int]] = []
    try:
        container = av.open(str(path))
    except Exception as exc:
        raise DecodeError(f"cannot open video: {_one_line(exc)}") from exc
    with container:
        if not container.streams.video:
            raise DecodeError("no video stream")
        stream = container.streams.video[0]
        tb = float(stream.time_base) if stream.time_base else 0.0
        start = stream.start_time
        try:
            for packet in container.demux(stream):
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None or packet.is_discard:  # the flush packet has neither
                    continue
                frames.append({"pts": int(ts), "duration": int(packet.duration or 0),
                               "key_frame": int(packet.is_keyframe)})
        except Exception as exc:  # noqa: BLE001 - truncated data: keep the packets read so far
            logger.debug("%s: demuxing stopped after %d packets: %s", path, len(frames), _one_line(exc))
    frames.sort(key=lambda f: f["pts"])
    if start is None and frames:
        start = frames[0]["pts"]
    return frames, tb, float(start or 0) * tb


def _torchcodec_device(cfg: DecodeConfig) -> str:
    return "cuda" if cfg.backend == "torchcodec-cuda" else "cpu"


def _iter_torchcodec(path: Path, cfg: DecodeConfig) -> Iterator[VisualChunk]:
    """torchcodec backend: the same indexed sampling as decord (``_plan_chunks``), frames read with
    ``VideoDecoder.get_frames_at`` over the frame index that PyAV's demuxer gives
    (``custom_frame_mappings``: indices are ours by construction, no second scan).

    ``"torchcodec"`` decodes on the CPU with FFmpeg, ``"torchcodec-cuda"`` with NVDEC on the current
    CUDA device; frames come at the native displayed size (torchcodec applies the rotation) and are
    resized to the decode size on that device (bilinear, antialiased) before they reach host memory.
    """
    from torchcodec.decoders import VideoDecoder

    probe = probe_video(path)
    geometry = _geometry(probe, cfg)
    dec_w, dec_h = geometry.decode
    index, tb, origin = _packet_index(path)
    if not index:
        raise DecodeError("no video frames in the container")
    device = _torchcodec_device(cfg)
    try:
        # Frames come at the native (displayed) size: torchcodec's own Resize transform measured ~15×
        # slower than decoding here (0.13, CPU), so the batch is resized with torch like the 3D crops.
        decoder = VideoDecoder(str(path), dimension_order="NHWC", num_ffmpeg_threads=cfg.threads,
                               device=device, custom_frame_mappings=json.dumps({"frames": index}))
    except Exception as exc:
        reason = _one_line(exc)
        # not for -cuda: a torchcodec build without CUDA would silently turn every video into PyAV output
        if cfg.fallback_pyav and device == "cpu":
            logger.warning("%s: torchcodec cannot open it (%s); decoding with PyAV instead", path, reason)
            yield from _iter_pyav(path, cfg, probe)
            return
        raise DecodeError(f"torchcodec cannot open video: {reason}") from exc

    pts = np.array([f["pts"] for f in index], dtype=np.float64) * tb - origin
    dur = np.array([f["duration"] for f in index], dtype=np.float64) * tb
    starts = np.maximum.accumulate(pts)
    stops = np.maximum(pts + dur, starts)
    # native frames decoded per get_frames_at call: about 64 MB of RGB (a 4K video: 2 frames)
    step = max(1, min(_BATCH, (64 << 20) // (3 * probe.width * probe.height)))

    def read(indices: np.ndarray) -> np.ndarray:
        parts = []
        for i in range(0, len(indices), step):
            frames = decoder.get_frames_at(indices[i : i + step].tolist()).data  # uint8 (b, H, W, 3)
            parts.append(_resize_tensor(frames, dec_w, dec_h).cpu().numpy())
        return np.concatenate(parts)

    def read_prefix(indices: np.ndarray) -> np.ndarray:
        out: list[np.ndarray] = []
        try:
            for j in range(len(indices)):
                out.append(read(indices[j : j + 1])[0])
        except Exception as exc:  # noqa: BLE001 - the first failing frame ends the prefix
            logger.debug("%s: torchcodec per-frame retry stopped after %d frames: %s", path, len(out),
                         _one_line(exc))
        return np.stack(out) if out else np.empty((0, dec_h, dec_w, 3), dtype=np.uint8)

    nominal = 1.0 / probe.avg_fps if probe.avg_fps else 0.0
    yield from _iter_indexed(path, cfg, geometry, starts, stops, nominal, read, read_prefix)


VisualBackend = Callable[[Path, DecodeConfig], Iterator[VisualChunk]]
VISUAL_BACKENDS: dict[str, VisualBackend] = {"decord": _iter_decord, "pyav": _iter_pyav,
                                              "torchcodec": _iter_torchcodec,
                                              "torchcodec-cuda": _iter_torchcodec}


def iter_visual(path: str | os.PathLike[str], cfg: DecodeConfig) -> Iterator[VisualChunk]:
    """Decode a video once and stream its 2D and 3D frames in chunks of ``cfg.chunk_seconds``.

    Each chunk holds at most ceil(chunk_seconds × fps_2d) 2D and ceil(chunk_seconds × fps_3d) 3D
    frames. The settings are checked at once (ValueError); decoding starts at the first ``next()``.
    Raises DecodeError (one-line reason) for unreadable files, files without a video stream and files
    from which no frame can be decoded.
    """
    cfg.validate()
    return VISUAL_BACKENDS[cfg.backend](Path(path), cfg)


# ---------------------------------------------------------------------------------------------------
# audio


def _ffmpeg_reason(stderr: str, path: Path, code: int) -> str:
    """ffmpeg's last stderr line without the leading "<input path>: "."""
    line = _one_line(stderr, last=True)
    prefix = f"{path}: "
    if line.startswith(prefix):
        line = line[len(prefix):]
    return line or f"exit code {code}"


def _run(cmd: list[str], what: str, timeout_s: float, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    """Run a tool under :func:`extractors.subproc.run_tool` (its process group killed at the time
    limit or when this thread is interrupted): DecodeTimeout after ``timeout_s``, DecodeError when it
    cannot be started; its output as text."""
    try:
        rc, out, err = run_tool(cmd, timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise DecodeTimeout(f"{what} timed out after {timeout_s:g} s (killed)") from None
    except OSError as exc:
        raise DecodeError(f"cannot run {what}: {exc}") from exc
    return subprocess.CompletedProcess(cmd, rc, out.decode(errors="replace"), err.decode(errors="replace"))


def audio_tool(cfg: DecodeConfig) -> str:
    """The tool that decodes audio under ``cfg``: ``"ffmpeg"`` or ``"pyav"`` (``cfg.audio_tool`` resolved)."""
    return resolve_tool(cfg.audio_tool, FFMPEG)


def audio_identity(cfg: DecodeConfig) -> dict[str, object]:
    """What of the decoding determines the audio field's bytes: the rate, and the tool when it is PyAV
    (ffmpeg, the historical default, adds no key: fingerprints of workspaces made with it stay)."""
    out: dict[str, object] = {"audio_rate": cfg.audio_rate}
    if audio_tool(cfg) == PYAV:
        out["audio_tool"] = PYAV
    return out


def _audio_streams(path: Path, timeout_s: float) -> int:
    """Number of audio streams (ffprobe); DecodeError when ffprobe cannot read the file."""
    cmd = [FFPROBE, "-v", "error", "-select_streams", "a", "-show_entries", "stream=index",
           "-of", "csv=p=0", str(path)]
    proc = _run(cmd, "ffprobe", timeout_s)
    if proc.returncode != 0:
        raise DecodeError(f"ffprobe failed: {_ffmpeg_reason(proc.stderr, path, proc.returncode)}")
    return sum(1 for ln in proc.stdout.splitlines() if ln.strip())


def decode_audio(path: str | os.PathLike[str], cfg: DecodeConfig, workdir: Path) -> np.ndarray:
    """Decode the first audio stream to mono float32 at ``cfg.audio_rate``: a read-only np.memmap (S,).

    Any channel count and sample rate; ffmpeg (or PyAV in a child process, see :func:`audio_tool`)
    downmixes and resamples, streaming into a file in ``workdir`` (RAM stays bounded for hour-long
    videos). The caller owns that file (``arr.filename``) and deletes it, e.g. with its per-video
    workdir. Raises NoAudioError when the file has no audio stream or the stream decodes to zero
    samples (no empty arrays downstream), DecodeTimeout when a subprocess (ffprobe, ffmpeg, the PyAV
    child) runs past ``cfg.audio_timeout_s`` (it is killed), DecodeError with the tool's last stderr
    line for every other failure.
    """
    path = Path(path)
    tool = audio_tool(cfg)
    if tool != PYAV and _audio_streams(path, cfg.audio_timeout_s) == 0:
        raise NoAudioError("no audio stream")
    workdir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="audio-", suffix=".f32", dir=workdir)
    os.close(fd)
    out = Path(name)
    env = None
    if tool == PYAV:
        # the child finds the stream itself (exit code NO_AUDIO_EXIT without one): one process per file
        what = "PyAV audio decode"
        cmd, env = child_command("audio", str(path), str(out), str(cfg.audio_rate))
    else:
        what = "ffmpeg audio decode"
        # ffmpeg-python builds the command; it runs under _run's time limit (the library has none)
        cmd = (ffmpeg.input(str(path))
               .output(str(out), map="0:a:0", vn=None, ac=1, ar=cfg.audio_rate, f="f32le")
               .global_args("-nostdin", "-hide_banner", "-loglevel", "error")
               .overwrite_output()
               .compile(cmd=FFMPEG))
    try:
        proc = _run(cmd, what, cfg.audio_timeout_s, env)
    except DecodeError:
        out.unlink(missing_ok=True)
        raise
    if proc.returncode != 0:
        out.unlink(missing_ok=True)
        if tool == PYAV and proc.returncode == NO_AUDIO_EXIT:
            raise NoAudioError("no audio stream")
        label = "PyAV" if tool == PYAV else "ffmpeg"
        raise DecodeError(f"{label} failed: {_ffmpeg_reason(proc.stderr, path, proc.returncode)}")
    if proc.stderr.strip():
        logger.warning("%s: %s reported: %s", path, what, _one_line(proc.stderr, last=True))
    size = out.stat().st_size
    if size < 4:
        out.unlink(missing_ok=True)
        raise NoAudioError("audio stream decoded to 0 samples")
    return np.memmap(out, dtype="<f4", mode="r", shape=(size // 4,))


def visual_task(task: tuple[str, DecodeConfig]) -> Iterator[VisualChunk]:
    """Worker-pool entry point: ``(path, cfg)`` → the chunks of ``iter_visual``.

    A decode worker is one of several processes beside the models, so its torch ops (the resizes)
    run on ``cfg.threads`` threads like its decoder, not on torch's default of every core: idle
    OpenMP threads spin-wait, which competes with the models for the cores (one worker decoding a
    minute of 640×360 on the 2-core machine: 4.4 → 4.0 CPU s, start-up included). ``threads: 0`` (the
    decoder's choice) leaves torch's default.
    """
    path, cfg = task
    if cfg.threads > 0 and torch.get_num_threads() != cfg.threads:
        torch.set_num_threads(cfg.threads)
    yield from iter_visual(path, cfg)
