"""The libav tools: the ``ffprobe`` / ``ffmpeg`` binaries, or PyAV in a child process where they are absent.

Machines without the binaries (GPU nodes that cannot install them) probe videos, decode audio and grab
the report's thumbnails with PyAV. The PyAV jobs run in a **child Python process** (``python -m
extractors.libav probe|audio|frame ...``) so that the callers keep one subprocess runner
(``extractors.subproc.run_tool``) with its time limit and kill: a file that hangs libav is killed
exactly like a hung ffprobe/ffmpeg, and no thread of the caller stays stuck inside libav.

- ``probe PATH``: prints the part of ``ffprobe -show_format -show_streams -of json`` that the scan
  reads (``streams[]``: codec_type, codec_name, width, height, avg_frame_rate, r_frame_rate,
  nb_frames, duration, sample_rate, channels, disposition.attached_pic; ``format.duration``), from the
  same libavformat fields ffprobe prints, so ``pipeline.probe`` parses either the same way.
- ``audio PATH OUT RATE``: decodes the first audio stream, downmixed to mono and resampled to ``RATE``
  Hz by ``av.AudioResampler`` (libswresample, as ffmpeg), streamed as float32 little-endian into
  ``OUT`` (bounded memory). Exit code :data:`NO_AUDIO_EXIT` when the file has no audio stream.
- ``frame PATH T WIDTH``: the first video frame at or after ``T`` seconds, scaled to ``WIDTH`` pixels
  (height by the frame's aspect, even, as ffmpeg's ``scale=WIDTH:-2``) and written to stdout as a
  JPEG (libavcodec's mjpeg): what the report's thumbnails ask of ``ffmpeg -ss T -i PATH -frames:v 1``.
  A display rotation (a phone's portrait video) is applied, as the ffmpeg binary does, by quarter turns
  of the scaled picture (the rule of ``extractors.decode``'s PyAV backend).

Errors: exit code 1 and a one-line reason as the last line of stderr (as the binaries do).

:func:`resolve_tool` owns the choice between a binary and PyAV (``auto``: the binary when it is on
PATH, else PyAV); the resolved tool can change output bytes, so the callers put it in their lineage.
This module imports no other project module and no torch: the children start in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

PYAV = "pyav"
#: Exit code of the ``audio`` child for a file without an audio stream.
NO_AUDIO_EXIT = 3
_ROOT = str(Path(__file__).resolve().parents[1])  # the project root, for the child's sys.path


def resolve_tool(choice: str, binary: str, path: str | None = None) -> str:
    """The tool that runs: ``binary`` (e.g. ``"ffprobe"``) or ``"pyav"``.

    ``choice`` is ``"auto"``, ``binary`` or ``"pyav"``; ``auto`` is the binary when it is on ``path``
    (default: $PATH), else PyAV when it imports, else the binary (whose absence is then the error)."""
    if choice not in ("auto", binary, PYAV):
        raise ValueError(f"unknown tool {choice!r}: use auto, {binary} or {PYAV}")
    if choice != "auto":
        return choice
    if shutil.which(binary, path=path) is None and pyav_available():
        return PYAV
    return binary


def pyav_available() -> bool:
    """Whether PyAV is installed (found, not imported: cheap)."""
    return importlib.util.find_spec("av") is not None


def child_command(job: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """``(argv, env)`` of a PyAV child: this Python, ``-m extractors.libav job args``, with the project
    root on PYTHONPATH (the caller's working directory may be anywhere)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", "extractors.libav", job, *args], env


# --------------------------------------------------------------------------------------------------
# The children (run in the child process only)


def _ratio(value: Fraction | None) -> str:
    """A rate as ffprobe prints it: ``"25/1"``; ``"0/0"`` when unknown."""
    return f"{value.numerator}/{value.denominator}" if value else "0/0"


def probe_json(path: str) -> dict[str, Any]:
    """The ffprobe-shaped dict described in the module docstring (durations in seconds, as strings)."""
    import av

    with av.open(path) as container:
        streams = []
        for s in container.streams:
            cc = s.codec_context
            item: dict[str, Any] = {"index": s.index, "codec_type": s.type,
                                    "codec_name": cc.name if cc is not None else None,
                                    "disposition": {"attached_pic": int(bool(
                                        s.disposition & av.stream.Disposition.attached_pic))}}
            if s.duration is not None and s.time_base is not None:
                item["duration"] = f"{float(s.duration * s.time_base):.6f}"
            if s.frames:
                item["nb_frames"] = str(s.frames)
            if s.type == "video" and cc is not None:
                item.update(width=cc.width, height=cc.height, avg_frame_rate=_ratio(s.average_rate),
                            r_frame_rate=_ratio(s.base_rate))
            elif s.type == "audio" and cc is not None:
                item.update(sample_rate=str(cc.sample_rate), channels=cc.channels)
            streams.append(item)
        fmt = {}
        if container.duration is not None:
            fmt["duration"] = f"{container.duration / av.time_base:.6f}"
    return {"streams": streams, "format": fmt}


def decode_audio_to(path: str, out: str, rate: int) -> int:
    """Write the first audio stream of ``path`` as mono float32 LE at ``rate`` Hz into ``out``; the
    number of samples written. Packets that fail to decode are skipped with a warning on stderr (as
    ffmpeg does); SystemExit(NO_AUDIO_EXIT) without an audio stream."""
    import av

    n = bad = 0
    with av.open(path) as container, open(out, "wb") as fh:
        if not container.streams.audio:
            print("no audio stream", file=sys.stderr)
            raise SystemExit(NO_AUDIO_EXIT)
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)

        def write(frames: list) -> None:
            nonlocal n
            for frame in frames:
                samples = frame.to_ndarray().reshape(-1).astype("<f4", copy=False)
                fh.write(samples.tobytes())
                n += samples.size

        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:  # a damaged packet costs its samples, not the file
                bad += 1
                if bad <= 3:
                    print(f"skipped an undecodable audio packet: {exc}", file=sys.stderr)
                continue
            for frame in frames:
                write(resampler.resample(frame))
        write(resampler.resample(None))  # flush the resampler's delay
    return n


def even_height(width: int, src_width: int, src_height: int) -> int:
    """ffmpeg's ``scale=WIDTH:-2`` height: the source aspect kept, rounded to the nearest even number."""
    return max(2, int(width * src_height / (src_width * 2) + 0.5) * 2)


def quarter_turns(frame: Any) -> int:
    """Counter-clockwise quarter turns (0-3) that show a decoded ``av.VideoFrame`` upright: its display
    matrix (a phone's portrait video), rounded to a multiple of 90 degrees."""
    return round((frame.rotation or 0) / 90) % 4


def upright_rgb(frame: Any, width: int, height: int, turns: int, **options: Any) -> Any:
    """uint8 (height, width, 3) RGB of ``frame`` as displayed: converted and scaled at the coded
    geometry (width and height swapped for an odd ``turns``) by ``frame.to_ndarray(**options)``
    (interpolation, threads), then turned ``turns`` quarter turns counter-clockwise."""
    import numpy as np

    coded_w, coded_h = (height, width) if turns % 2 else (width, height)
    rgb = frame.to_ndarray(width=coded_w, height=coded_h, format="rgb24", **options)
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def frame_jpeg(path: str, t: float, width: int) -> bytes:
    """JPEG bytes of the first video frame of ``path`` at or after ``t`` seconds, ``width`` pixels wide
    (see the module docstring). ValueError when the file has no video stream or no frame at ``t``."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        if t > 0 and stream.time_base:
            container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
        chosen = None
        for frame in container.decode(stream):
            if frame.time is None or frame.time >= t - 1e-3:
                chosen = frame
                break
        if chosen is None:
            raise ValueError(f"no frame at {t:.3f} s")
        turns = quarter_turns(chosen)
        shown_w, shown_h = (chosen.height, chosen.width) if turns % 2 else (chosen.width, chosen.height)
        height = even_height(width, shown_w, shown_h)
        codec = av.CodecContext.create("mjpeg", "w")
        codec.width, codec.height, codec.pix_fmt = width, height, "yuvj420p"
        codec.time_base = Fraction(1, 25)
        if turns:
            rgb = upright_rgb(chosen, width, height, turns, interpolation="BICUBIC")
            scaled = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
        else:
            scaled = chosen.reformat(width=width, height=height, format="yuvj420p", interpolation="BICUBIC")
        return b"".join(bytes(p) for p in (*codec.encode(scaled), *codec.encode(None)))


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """``probe PATH`` | ``audio PATH OUT RATE`` | ``frame PATH T WIDTH``; exit code 0, NO_AUDIO_EXIT or 1
    (reason on stderr)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) == 2 and args[0] == "probe":
            print(json.dumps(probe_json(args[1])))
        elif len(args) == 4 and args[0] == "audio":
            decode_audio_to(args[1], args[2], int(args[3]))
        elif len(args) == 4 and args[0] == "frame":
            sys.stdout.buffer.write(frame_jpeg(args[1], float(args[2]), int(args[3])))
        else:
            print("usage: python -m extractors.libav probe PATH | audio PATH OUT RATE | frame PATH T WIDTH",
                  file=sys.stderr)
            return 2
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is the one-line reason the parent records
        print(_reason(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
