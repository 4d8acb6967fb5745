"""Decode rates of the three backends (decord, PyAV, torchcodec; + torchcodec NVDEC with ``--device cuda``)
on 360p and 720p H.264, in source frames per wall second and seconds of video per wall second (prints
figures, asserts nothing).

Run from the repository root: ``.venv/bin/python benchmarks/decode.py`` (``--help`` for options;
``--json`` for one JSON line per figure, ``--quick`` for a 10 s 360p smoke run). For each ``--sizes``
entry a ``--seconds`` long 30 fps H.264 video (keyframe every 5 s, B-frames, ``-preset veryfast``) is
generated with ffmpeg in a temporary directory, or ``--video`` names one to use. Figures per video,
backend and decoder thread count:

* ``iter_visual``: the extract stage's path, one pass feeding both streams (2D 1 fps at 224, 3D 24 fps
  112×112 crops), chunked, all frames materialised as numpy arrays;
* ``decode_only``: every frame decoded and converted to RGB at the 2D decode size, nothing else
  (decord ``get_batch`` over consecutive indices, PyAV ``container.decode`` + ``to_ndarray``,
  torchcodec ``get_frames_in_range`` at the native size + the same torch resize as ``iter_visual``).

Peak RSS growth is reported per row (coarse: ``ru_maxrss`` only grows past earlier peaks, so rows
after the first show 0 unless they need more).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, parser, use_json  # noqa: E402
from extractors.decode import DecodeConfig, iter_visual, probe_video, scaled_size  # noqa: E402

SIZES = {"360p": (640, 360), "720p": (1280, 720)}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def make_video(out: Path, seconds: float, width: int, height: int, fps: int,
               bitrate: str | None = None) -> None:
    """Moving test pattern + 440 Hz tone, H.264 (veryfast, keyframe every 5 s) + AAC. ``bitrate`` (e.g.
    ``"800k"``) caps the video bitrate (the GPU bundle's pre-made video must stay small); default: x264's
    CRF 23 (testsrc2 at 720p: ~2.7 Mbit/s)."""
    rate = ["-b:v", bitrate, "-maxrate", bitrate, "-bufsize", bitrate] if bitrate else []
    cmd = [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
        "-c:v", "libx264", "-preset", "veryfast", "-g", str(5 * fps), "-pix_fmt", "yuv420p", *rate,
        "-c:a", "aac", "-shortest", str(out),
    ]
    subprocess.run(cmd, check=True)


def run_iter_visual(path: Path, backend: str, threads: int) -> tuple[int, int]:
    n2 = n3 = 0
    for chunk in iter_visual(path, DecodeConfig(backend=backend, threads=threads)):
        n2 += len(chunk.frames_2d)
        n3 += len(chunk.frames_3d)
    return n2, n3


def decode_only_decord(path: Path, threads: int, size: tuple[int, int], batch: int = 64) -> int:
    import decord

    vr = decord.VideoReader(str(path), width=size[0], height=size[1], num_threads=threads)
    n = len(vr)
    for i in range(0, n, batch):
        vr.get_batch(list(range(i, min(n, i + batch)))).asnumpy()
    return n


def decode_only_pyav(path: Path, threads: int, size: tuple[int, int]) -> int:
    import av

    n = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        if threads != 1:
            stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frame.to_ndarray(width=size[0], height=size[1], format="rgb24", interpolation="BILINEAR",
                             threads=max(1, threads))
            n += 1
    return n


def decode_only_torchcodec(path: Path, threads: int, size: tuple[int, int], device: str = "cpu",
                           batch: int = 32) -> int:
    import torch
    from torchcodec.decoders import VideoDecoder

    from extractors.decode import _resize_tensor

    dec = VideoDecoder(str(path), dimension_order="NHWC", num_ffmpeg_threads=threads, device=device)
    n = len(dec)
    for i in range(0, n, batch):
        frames = dec.get_frames_in_range(i, min(n, i + batch)).data
        _resize_tensor(frames, size[0], size[1]).cpu()
    if device != "cpu":
        torch.cuda.synchronize()
    return n


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(best wall seconds, peak RSS growth MiB, result)."""
    best = float("inf")
    before = _peak_rss_mib()
    result: object = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, _peak_rss_mib() - before, result


def backends(device: str, video: Path) -> list[str]:
    """The visual backends to measure: all CPU ones, plus NVDEC on a CUDA device when torchcodec can
    decode there (PyPI's torchcodec wheels are CPU-only builds; NVDEC needs the CUDA one)."""
    out = ["decord", "pyav"]
    try:
        from torchcodec.decoders import VideoDecoder  # its FFmpeg libraries load here
    except Exception as exc:  # noqa: BLE001 - e.g. no FFmpeg libraries for it: reported, not fatal
        emit("decode", "backend_unavailable", str(exc).splitlines()[0][:200], "", backend="torchcodec",
             device=device)
        return out
    out.append("torchcodec")
    if device.startswith("cuda"):
        try:
            VideoDecoder(str(video), device=device).get_frame_at(0)
            out.append("torchcodec-cuda")
        except Exception as exc:  # noqa: BLE001
            emit("decode", "backend_unavailable", str(exc).splitlines()[0][:200], "",
                 backend="torchcodec-cuda", device=device)
    return out


def measure(figure: str, fn: Callable[[], object], repeats: int, duration: float, n_frames: int | None,
            **cond: object) -> None:
    """Emit ``<figure>_video_s_per_s`` and ``<figure>_frames_per_s`` of ``fn`` (or an ``error`` line)."""
    try:
        wall, rss, result = timed(fn, repeats)
    except Exception as exc:  # noqa: BLE001 - one backend failing must not stop the others
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        emit("decode", f"{figure}_error", reason, "", **cond)
        return
    frames = n_frames if n_frames is not None else int(result)  # type: ignore[call-overload]
    cond = {**cond, "peak_rss_mib": round(rss)}
    emit("decode", f"{figure}_video_s_per_s", round(duration / wall, 2), "video s/s", **cond)
    emit("decode", f"{figure}_frames_per_s", round(frames / wall, 1), "frames/s", **cond)


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--video", type=Path, help="video to decode (default: generate one per --sizes entry)")
    ap.add_argument("--seconds", type=float, default=None, help="length of the generated videos (default 60, "
                    "--quick 10)")
    ap.add_argument("--sizes", nargs="+", default=None, choices=sorted(SIZES),
                    help="generated video sizes (default 360p 720p, --quick 360p)")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="decoder threads to try")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    use_json(args.json)
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    sizes = args.sizes or (["360p"] if args.quick else ["360p", "720p"])

    with tempfile.TemporaryDirectory() as tmp:
        videos: list[tuple[str, Path]] = []
        if args.video is not None:
            videos.append(("given", args.video))
        else:
            for name in sizes:
                w, h = SIZES[name]
                video = Path(tmp) / f"bench_{w}x{h}_{args.fps}fps_{int(seconds)}s.mp4"
                make_video(video, seconds, w, h, args.fps)
                videos.append((name, video))
        for label, video in videos:
            names = backends(args.device, video)
            probe = probe_video(video)
            duration = probe.duration or seconds
            n_frames = round(duration * (probe.avg_fps or args.fps))
            size = scaled_size(probe.width, probe.height, DecodeConfig().size_2d)
            common = {"video": label, "width": probe.width, "height": probe.height, "codec": probe.codec,
                      "video_s": round(duration, 2), "device": args.device}
            for threads in args.threads:
                for backend in names:
                    measure("iter_visual", lambda: run_iter_visual(video, backend, threads),  # noqa: B023
                            args.repeats, duration, n_frames, backend=backend, threads=threads, **common)
                only: dict[str, Callable[[], int]] = {
                    "decord": lambda: decode_only_decord(video, threads, size),  # noqa: B023
                    "pyav": lambda: decode_only_pyav(video, threads, size),  # noqa: B023
                    "torchcodec": lambda: decode_only_torchcodec(video, threads, size),  # noqa: B023
                    "torchcodec-cuda": lambda: decode_only_torchcodec(video, threads, size, args.device),  # noqa: B023
                }
                for backend in names:
                    measure("decode_only", only[backend], args.repeats, duration, None, backend=backend,
                            threads=threads, **common)


if __name__ == "__main__":
    main()
