"""Peak memory vs video length: decoding + the visual pipeline's batching, and audio (prints figures only).

Run from the repository root: ``.venv/bin/python benchmarks/memory.py`` (``--help`` for options).
Videos of ``--minutes`` (default 1, 10 and 60) are generated once into ``--cache-dir`` (ffmpeg
``testsrc2`` + sine, H.264 ``-preset ultrafast -crf 32``, AAC 48 kb/s; default 320×180 30 fps so
that the hour-long one takes 1-2 minutes to make). For each length, each part runs in a fresh
subprocess that reports its own peak RSS:

* ``visual decord`` / ``visual pyav``: ``iter_visual`` over the whole video, its chunks fed exactly
  as ``ExtractStage._visual`` feeds them (2D frames and 16-frame 3D windows with the carry between
  chunks) into the stage's own ``_Batcher``s with the stage's batch sizes (64 frames, 16 windows).
  The model is replaced by a cheap stand-in returning (n, 2048) float32 rows, because running the
  full ResNet-152 and ResNeXt-101 over an hour of video takes over an hour on a 2-core CPU; the claim
  is about the streaming decode and the bounded batching, and a real model adds a constant (its
  weights and one batch of activations), not something that grows with the length. Decoding is
  in-process (the stage runs it in a worker, see ``benchmarks/extract.py`` for that process's peak).
* ``audio``: ``decode_audio`` (ffmpeg → float32 memmap file) + the log-mel extractor.
* ``baseline`` (once): the same imports, nothing else.

Each part is reported per phase (visual: ``decode+batch`` then ``result()``, the batchers'
concatenation into float16; audio: ``ffmpeg→memmap`` then ``log-mel``). Columns, MiB: peak RSS =
VmHWM of the subprocess during the phase (the kernel's high-water mark of its resident set, reset
between phases through ``/proc/self/clear_refs``); peak anon = largest sampled RssAnon (heap, no file
pages; every 20 ms); outputs = bytes of the arrays the stage keeps for the video at the end of the
phase (visual: the float32 feature rows the batchers collect, + the float16 results after
``result()``; audio: the float32 log-mel array); anon-out, RSS-out = the peaks minus outputs;
streamed = decoded frames (uint8) or samples (float32) that passed through. Every row carries the
1-minute load average right after it ran. ``--fixed-mmap-threshold`` runs the parts with glibc's
dynamic mmap threshold off, which tells memory glibc retains after ``free`` from data still held.

    .venv/bin/python benchmarks/memory.py                      # 1, 10, 60 min at 320x180
    .venv/bin/python benchmarks/memory.py --fixed-mmap-threshold
    .venv/bin/python benchmarks/memory.py --minutes 1 10 --size 640x360
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# benchmarks/extract.py (standard library only at import time)
from extract import ChildSampler, _status_kib, load1, machine, peak_rss_mib  # noqa: E402

MIB = 1024**2
DIM = 2048


def make_video(out: Path, minutes: float, width: int, height: int, fps: int) -> None:
    seconds = minutes * 60
    cmd = [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
        "-c:v", "libx264", "-preset", "ultrafast", "-crf", "32", "-g", str(5 * fps), "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "48k", "-shortest", str(out),
    ]
    subprocess.run(cmd, check=True)


class AnonSampler:
    """Largest RssAnon of this process, sampled every ``interval`` seconds (MiB); ``reset`` starts anew."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak_mib = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _now(self) -> None:
        self.peak_mib = max(self.peak_mib, (_status_kib("self", "RssAnon") or 0) / 1024)

    def _loop(self) -> None:
        while True:
            self._now()
            if self._stop.wait(self.interval):
                return

    def reset(self) -> None:
        self.peak_mib = 0.0
        self._now()

    def __enter__(self) -> "AnonSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._now()


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then later phases report the peak since the start


class Phases:
    """Per phase of a part: wall time, peak RSS (VmHWM, reset at each phase), peak anon, outputs."""

    def __init__(self, anon: AnonSampler) -> None:
        self.anon, self.rows = anon, []
        self._t0 = time.perf_counter()

    def end(self, name: str, out: int, streamed: int = 0, **extra: object) -> None:
        self.anon._now()
        self.rows.append({"phase": name, "wall": time.perf_counter() - self._t0, "peak_mib": peak_rss_mib(),
                          "anon_mib": self.anon.peak_mib, "out": out, "streamed": streamed, "load": load1(),
                          **extra})
        reset_peak()
        self.anon.reset()
        self._t0 = time.perf_counter()


# ------------------------------------------------------------------------------------------------
# parts (fresh subprocess each)


def _imports():  # noqa: ANN202 - the same heavy imports in every part, baseline included
    import numpy as np
    import torch

    from extractors import create
    from extractors.decode import DecodeConfig, decode_audio, iter_visual
    from extractors.resnet2d import ResNet152Config
    from extractors.resnext3d import ResNeXt101Config, windows_from_frames
    from pipeline.extract import _Batcher

    return (np, torch, create, DecodeConfig, decode_audio, iter_visual, ResNet152Config, ResNeXt101Config,
            windows_from_frames, _Batcher)


def part_baseline(video: Path, backend: str, ph: Phases) -> None:
    _imports()
    ph.end("imports", 0)


def part_visual(video: Path, backend: str, ph: Phases) -> None:
    (np, torch, _, DecodeConfig, _, iter_visual, ResNet152Config, ResNeXt101Config, windows_from_frames,
     _Batcher) = _imports()
    ph.end("imports", 0)

    def stand_in(rows: np.ndarray) -> torch.Tensor:  # the model: (n, ...) uint8 → (n, 2048) float32
        flat = rows.reshape(len(rows), -1)[:, :DIM]
        return torch.from_numpy(flat.astype(np.float32))

    window = 16
    b2 = _Batcher(stand_in, ResNet152Config().batch_size)
    b3 = _Batcher(stand_in, ResNeXt101Config().batch_size)
    carry: dict[int, np.ndarray] = {}
    streamed = 0
    for chunk in iter_visual(video, DecodeConfig(backend=backend)):  # as ExtractStage._visual, video 0
        streamed += chunk.frames_2d.nbytes + chunk.frames_3d.nbytes
        b2.add(0, chunk.frames_2d)
        frames = chunk.frames_3d
        if 0 in carry:
            frames = np.concatenate([carry.pop(0), frames])
        n_full = len(frames) // window * window
        if n_full < len(frames):
            carry[0] = frames[n_full:]
        b3.add(0, windows_from_frames(frames[:n_full], window))
        del chunk, frames
    b2.flush()
    b3.flush()
    parts = sum(p.nbytes for b in (b2, b3) for p in b.outputs.get(0, []))
    ph.end("decode+batch", parts, streamed)
    # _Batcher.result: np.concatenate(float32 parts).astype(float16), the parts still held: at its peak
    # the parts, their float32 concatenation and the float16 copy coexist.
    f2 = b2.result(0, DIM)
    f3 = b3.result(0, DIM)
    ph.end("result()", parts + f2.nbytes + f3.nbytes, rows=[len(f2), len(f3)],
           transient=max(f2.nbytes, f3.nbytes) * 2)


def part_audio(video: Path, backend: str, ph: Phases) -> None:
    (np, _, create, DecodeConfig, decode_audio, *_rest) = _imports()
    ex = create("logmel", None)
    ph.end("imports", 0)
    with tempfile.TemporaryDirectory(prefix="mcn-bench-audio-") as tmp:
        with ChildSampler(interval=0.1) as children:
            wave = decode_audio(video, DecodeConfig(), Path(tmp))
        ph.end("ffmpeg→memmap", 0, wave.nbytes, child_mib=children.largest_mib)
        feats = ex(wave)
        ph.end("log-mel", feats.nbytes, wave.nbytes, rows=[len(feats)],
               file_mib=(_status_kib("self", "RssFile") or 0) / 1024)
        del wave


PARTS = {"baseline": part_baseline, "visual": part_visual, "audio": part_audio}


def child_main(part: str, video: Path, backend: str) -> None:
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    with AnonSampler() as anon:
        ph = Phases(anon)
        PARTS[part](video, backend, ph)
    print(json.dumps(ph.rows))


# ------------------------------------------------------------------------------------------------
# driver (kept light: no torch/numpy here, so the children's figures are their own)


def run_child(part: str, video: Path, backend: str = "", fixed_mmap: bool = False) -> list[dict] | None:
    cmd = [sys.executable, __file__, "--_part", part, "--_video", str(video), "--_backend", backend]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072") if fixed_mmap else None
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode != 0:
        print(f"{part} {backend}: FAILED (exit {res.returncode})\n{res.stderr[-3000:]}")
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60],
                    help="video lengths (default 1 10 60)")
    ap.add_argument("--size", default="320x180", help="WxH of the generated videos (default 320x180)")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--backends", nargs="+", default=["decord", "pyav"], choices=["decord", "pyav"])
    ap.add_argument("--skip-audio", action="store_true")
    ap.add_argument("--fixed-mmap-threshold", action="store_true",
                    help="run the parts with MALLOC_MMAP_THRESHOLD_=131072 (glibc's dynamic mmap "
                    "threshold off: large buffers are mmapped and returned on free), to tell allocator "
                    "retention from data the pipeline holds")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "mcn-bench-cache",
                    help="where the generated videos are kept between runs (default $TMPDIR/mcn-bench-cache)")
    ap.add_argument("--_part", choices=list(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--_video", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_backend", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._part:
        child_main(args._part, args._video, args._backend)
        return

    w, h = (int(v) for v in args.size.split("x"))
    print(f"machine: {machine()}")
    folder = args.cache_dir / "memory"
    folder.mkdir(parents=True, exist_ok=True)
    videos = []
    for m in args.minutes:
        path = folder / f"mem-{w}x{h}-{args.fps}fps-{m:g}min.mp4"
        if not path.exists():
            t0 = time.perf_counter()
            tmp = path.with_name("." + path.name)
            make_video(tmp, m, w, h, args.fps)
            tmp.rename(path)
            print(f"generated {path.name} ({path.stat().st_size / MIB:.0f} MiB) in "
                  f"{time.perf_counter() - t0:.0f} s (load {load1():.2f})", flush=True)
        videos.append((m, path))

    if args.fixed_mmap_threshold:
        print("children run with MALLOC_MMAP_THRESHOLD_=131072")
    base = run_child("baseline", videos[0][1], fixed_mmap=args.fixed_mmap_threshold)
    if base:
        b = base[0]
        print(f"baseline (imports only): peak RSS {b['peak_mib']:.0f} MiB, anon {b['anon_mib']:.0f} MiB "
              f"(load {b['load']:.2f})")
    print()
    print(f"{'length':>7} {'part':<13} {'phase':<14} {'wall s':>6} {'load':>5} {'peak RSS':>8} "
          f"{'peak anon':>9} {'outputs':>7} {'anon-out':>8} {'RSS-out':>7} {'streamed':>8}  "
          f"notes (MiB throughout)", flush=True)
    for m, path in videos:
        parts = [("visual", b) for b in args.backends] + ([] if args.skip_audio else [("audio", "")])
        for part, backend in parts:
            rows = run_child(part, path, backend, args.fixed_mmap_threshold)
            for r in rows or []:
                if r["phase"] == "imports":
                    continue
                out = r["out"] / MIB
                notes = []
                if "rows" in r:
                    notes.append(f"rows {r['rows']}")
                if "transient" in r:
                    notes.append(f"+ float32 concatenation {r['transient'] / MIB:.0f} transient")
                if "child_mib" in r:
                    notes.append(f"ffmpeg peak {r['child_mib']:.0f}")
                if "file_mib" in r:
                    notes.append(f"RssFile at end {r['file_mib']:.0f} (libraries + memmap pages)")
                print(f"{m:>5g} m {f'{part} {backend}'.strip():<13} {r['phase']:<14} {r['wall']:>6.1f} "
                      f"{r['load']:>5.2f} {r['peak_mib']:>8,.0f} {r['anon_mib']:>9,.0f} {out:>7.1f} "
                      f"{r['anon_mib'] - out:>8,.0f} {r['peak_mib'] - out:>7,.0f} "
                      f"{r['streamed'] / MIB:>8,.0f}  "
                      f"{'; '.join(notes)}", flush=True)
    la = os.getloadavg()
    print(f"\nload average at the end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")


if __name__ == "__main__":
    main()
