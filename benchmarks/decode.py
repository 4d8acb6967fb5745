"""Decode rates, decord vs PyAV, in seconds of video per wall second (prints figures, asserts nothing).

Run from the repository root: ``python benchmarks/decode.py`` (``--help`` for options). A 60 s
640×360 30 fps H.264 video (keyframe every 5 s, B-frames) is generated with ffmpeg in a temporary
directory, or ``--video`` names one to use. Rows:

* ``iter_visual``: the extract stage's path, one pass feeding both streams (2D 1 fps at 224, 3D 24 fps
  112×112 crops), chunked, all frames materialised as numpy arrays;
* ``decode only``: every frame decoded and converted to RGB at the 2D decode size, nothing else
  (decord ``get_batch`` over consecutive indices, PyAV ``container.decode`` + ``to_ndarray``).

Peak RSS growth is reported per row (coarse: ``ru_maxrss`` only grows past earlier peaks, so rows
after the first show 0 unless they need more).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extractors.decode import DecodeConfig, iter_visual, probe_video, scaled_size  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def make_video(out: Path, seconds: float, width: int, height: int, fps: int) -> None:
    """Moving test pattern + 440 Hz tone, H.264 (veryfast, keyframe every 5 s) + AAC."""
    cmd = [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
        "-c:v", "libx264", "-preset", "veryfast", "-g", str(5 * fps), "-pix_fmt", "yuv420p",
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", type=Path, help="video to decode (default: generate one)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", default="640x360", help="WxH of the generated video")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="decoder threads to try")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        video = args.video
        if video is None:
            w, h = (int(v) for v in args.size.split("x"))
            video = Path(tmp) / f"bench_{w}x{h}_{args.fps}fps_{int(args.seconds)}s.mp4"
            t0 = time.perf_counter()
            make_video(video, args.seconds, w, h, args.fps)
            print(f"generated {video.name} in {time.perf_counter() - t0:.1f} s")
        probe = probe_video(video)
        duration = probe.duration or args.seconds
        size = scaled_size(probe.width, probe.height, DecodeConfig().size_2d)
        print(f"video: {probe.width}x{probe.height} {probe.codec} {probe.avg_fps or 0:.2f} fps "
              f"{duration:.1f} s; decode size {size[0]}x{size[1]}")
        print(f"{'path':<12} {'backend':<8} {'threads':>7} {'wall s':>8} {'video s / s':>12} "
              f"{'frames':>12} {'peak RSS +MiB':>14}")
        for threads in args.threads:
            for backend in ("decord", "pyav"):
                wall, rss, (n2, n3) = timed(lambda: run_iter_visual(video, backend, threads), args.repeats)
                print(f"{'iter_visual':<12} {backend:<8} {threads:>7} {wall:>8.2f} {duration / wall:>12.1f} "
                      f"{f'{n2}+{n3}':>12} {rss:>14.0f}")
            for backend, fn in (("decord", decode_only_decord), ("pyav", decode_only_pyav)):
                wall, rss, n = timed(lambda: fn(video, threads, size), args.repeats)  # noqa: B023
                print(f"{'decode only':<12} {backend:<8} {threads:>7} {wall:>8.2f} {duration / wall:>12.1f} "
                      f"{n:>12} {rss:>14.0f}")


if __name__ == "__main__":
    main()
