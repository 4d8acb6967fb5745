"""Extract-stage throughput: the whole stage vs the models alone on one video (prints figures only).

Run from the repository root: ``.venv/bin/python benchmarks/extract.py`` (``--help`` for options).
A ``--seconds`` long ``--size`` H.264 + AAC video (ffmpeg ``testsrc2`` + a sine tone, made by
``benchmarks/decode.py``'s ``make_video``) and a side-car ``.srt`` (one caption every 3 s) are generated
once into ``--cache-dir``. Each part then runs in a fresh subprocess, so that its peak RSS is its own:

* ``stage``: the WHOLE extract stage (``pipeline.scan.scan`` + ``pipeline.stages.run_extract`` into a
  temporary workspace, all four fields, ``--repeats`` times with ``force``): worker-pool decoding,
  full-size ResNet-152 (2D, 1 fps, shorter side 224) and ResNeXt-101 3D (24 fps, 16-frame windows at
  112), ffmpeg audio → memmap → log-mel, MiniLM token vectors (``hf_tokens``, offline), shard writing.
  Visual weights are random-initialised on purpose (``extract.allow_random_weights=true``): the
  compute is the same as with the real checkpoints. Wall time includes building the models (once
  per run of the stage) and starting the decode workers; ``build`` in the models part says how much
  of it that is. Peak RSS: VmHWM of the stage process (models, batches); of its largest descendant
  (decode worker, ffmpeg; sampled every 0.2 s, each child's own VmHWM) and the largest sampled sum
  over the process tree. ``RUSAGE_CHILDREN``'s ``ru_maxrss`` is printed too, but on Linux it is at
  least the parent's RSS when the child was started (see ``peak_rss_mib``), so it says nothing here.
* ``models``: the models alone on pre-decoded inputs = the compute bound. The video is decoded once
  (``iter_visual``, ``--backend``) into memory, audio once into a memmap; then ResNet-152 on the 2D
  frames, ResNeXt-101 on the 3D windows, log-mel on the waveform and MiniLM on the captions are timed
  (each after an untimed one-item warm-up, same batch sizes as the stage).
* ``decode``: ``iter_visual`` alone (one pass feeding both streams) with decord and with PyAV.

Rates are seconds of video per wall second (higher is better). Every figure is printed with the
1-minute load average (``os.getloadavg()``) measured right after it: on a shared machine a load above
the core count means the figure is pessimistic.

    .venv/bin/python benchmarks/extract.py --repeats 1                 # CPU (a few minutes on 2 cores)
    .venv/bin/python benchmarks/extract.py --device cuda --workers 4   # one GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Only the standard library at import time: benchmarks/memory.py imports the helpers below into its
# light driver process. benchmarks/decode.py (and torch with it) is imported where it is used.

CAPTIONS = (
    "the red circle moves to the left", "a blue square is spinning", "now the green star grows bigger",
    "look, the yellow triangle bounces", "the white cross slides to the right",
    "a purple diamond is shrinking",
    "here the orange circle rises up", "the cyan square drops down",
)
CAPTION_EVERY_S = 3.0


# ------------------------------------------------------------------------------------------------
# helpers


def load1() -> float:
    return os.getloadavg()[0]


def _status_kib(pid: int | str, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmHWM, VmRSS, RssAnon, ...), None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mib() -> float:
    """This process's own peak RSS, MiB: VmHWM of its address space.

    Not ``ru_maxrss``: on Linux that also counts the parent's RSS at the moment this process was
    started (``exec`` folds the old address space's high-water mark into it), so a child started by a
    big process "peaks" at least at the parent's size. That is also why ``RUSAGE_CHILDREN`` of a
    process holding the models is useless for its decode workers (see ``ChildSampler``).
    """
    kib = _status_kib("self", "VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


class ChildSampler:
    """Samples this process's descendants (decode workers, ffmpeg) every ``interval`` seconds.

    ``largest_mib``: the largest VmHWM seen of any descendant (its own peak, measured by the kernel, as
    long as it was alive at some sample); ``total_mib``: the largest sampled sum of VmRSS over this
    process and all its descendants (sampled, so it can miss short spikes).
    """

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.interval = interval
        self.largest_mib = 0.0
        self.total_mib = 0.0
        self.n_children = 0
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _descendants(self) -> list[int]:
        parent: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                    parent[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
                except (OSError, ValueError, IndexError):
                    pass
        me, out, frontier = os.getpid(), [], {os.getpid()}
        while frontier:
            frontier = {pid for pid, pp in parent.items() if pp in frontier and pid != me}
            out += sorted(frontier)
        return out

    def sample(self) -> None:
        total = _status_kib("self", "VmRSS") or 0
        for pid in self._descendants():
            hwm, rss = _status_kib(pid, "VmHWM"), _status_kib(pid, "VmRSS")
            if hwm is not None:
                self.largest_mib = max(self.largest_mib, hwm / 1024)
                self._seen.add(pid)
            total += rss or 0
        self.total_mib = max(self.total_mib, total / 1024)
        self.n_children = len(self._seen)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "ChildSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")).split()[1])
        ram = f"{kb / 1024**2:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    la = os.getloadavg()
    return f"{cpu}, {os.cpu_count()} cores, {ram} RAM; load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"


def _srt_time(t: float) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def make_inputs(cache: Path, seconds: float, width: int, height: int, fps: int) -> Path:
    """The cached video folder (``bench.mp4`` + ``bench.srt``, nothing else: it is scanned whole)."""
    folder = cache / f"extract-{width}x{height}-{fps}fps-{seconds:g}s"
    mp4, srt = folder / "bench.mp4", folder / "bench.srt"
    folder.mkdir(parents=True, exist_ok=True)
    if not mp4.exists():
        import decode as decode_bench  # benchmarks/decode.py

        tmp = folder / ".bench.tmp.mp4"
        t0 = time.perf_counter()
        decode_bench.make_video(tmp, seconds, width, height, fps)
        tmp.rename(mp4)
        print(f"generated {mp4} in {time.perf_counter() - t0:.1f} s (load {load1():.2f})")
    if not srt.exists():
        lines, t, i = [], 0.0, 0
        while t + 0.5 < seconds:
            end = min(seconds, t + CAPTION_EVERY_S - 0.2)
            lines += [str(i + 1), f"{_srt_time(t)} --> {_srt_time(end)}", CAPTIONS[i % len(CAPTIONS)], ""]
            t, i = t + CAPTION_EVERY_S, i + 1
        srt.write_text("\n".join(lines), encoding="utf-8")
    return folder


def overrides(args: argparse.Namespace) -> list[str]:
    """The stage's config: defaults + these (the same options build the models of the models part)."""
    out = ["extract.allow_random_weights=true", "extract.text.name=hf_tokens",
           f"extract.decode.backend={args.backend}", f"extract.torch_threads={args.threads}"]
    for f in ("video2d", "video3d", "text"):
        out.append(f"extract.{f}.options.device={args.device}")
    if args.workers is not None:
        out.append(f"extract.workers.num_workers={args.workers}")
    return out


# ------------------------------------------------------------------------------------------------
# parts (each runs in its own subprocess and prints one JSON line)


def part_stage(args: argparse.Namespace, videos: Path) -> dict:
    from pipeline.config import load_config
    from pipeline.scan import scan
    from pipeline.stages import run_extract
    from store.layout import Workspace
    from store.lineage import read_record
    from store.reader import iter_samples

    cfg = load_config(None, overrides(args))
    walls, loads = [], []
    with tempfile.TemporaryDirectory(prefix="mcn-bench-ws-") as tmp:
        ws = Workspace(Path(tmp))
        t0 = time.perf_counter()
        res = scan(videos, ws, cfg.scan, progress=False)
        scan_s = time.perf_counter() - t0
        if res.n_ok != 1:
            raise RuntimeError(f"scan found {res.n_ok} usable videos, expected 1: {res.failures}")
        with ChildSampler() as children:
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                summary = run_extract(ws, cfg, force=True, progress=False)
                walls.append(time.perf_counter() - t0)
                loads.append(load1())
        shapes, random, rates = {}, {}, {}
        for f in cfg.extract.fields:
            index = ws.shard_indices(f)[0]  # the one shard (one video)
            meta = next(iter_samples(ws.shard_tar(f, index)))["json"]
            shapes[f] = f"{meta['status']} {tuple(meta['shape'] or ())}"
            extractor = (read_record(ws.shard_record(f, index)) or {}).get("extractor") or {}
            random[f] = extractor.get("random_weights")
            rates[f] = extractor.get("rate")
    return {"walls": walls, "loads": loads, "scan_s": scan_s, "shapes": shapes, "random_weights": random,
            "rates": rates,
            "written": summary.processed, "rss_self_mib": peak_rss_mib(),
            "rss_children_ru_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "rss_child_largest_mib": children.largest_mib, "rss_total_sampled_mib": children.total_mib,
            "n_children": children.n_children, "workers": cfg.extract.workers.num_workers,
            "torch_threads": _torch_threads()}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def part_models(args: argparse.Namespace, videos: Path) -> dict:
    import numpy as np
    import torch

    from extractors import create
    from extractors.decode import iter_visual, decode_audio
    from extractors.resnext3d import windows_from_frames
    from pipeline.captions import read_sidecar
    from pipeline.config import load_config
    from pipeline.extract import ExtractStage
    from store.layout import Workspace

    cfg = load_config(None, overrides(args))
    if cfg.extract.torch_threads > 0:
        torch.set_num_threads(cfg.extract.torch_threads)
    mp4 = videos / "bench.mp4"
    out: dict = {}

    t0 = time.perf_counter()
    f2, f3 = [], []
    for chunk in iter_visual(mp4, cfg.extract.decode):
        f2.append(chunk.frames_2d)
        f3.append(chunk.frames_3d)
    frames_2d = np.concatenate(f2)
    windows = windows_from_frames(np.concatenate(f3))
    del f2, f3
    with tempfile.TemporaryDirectory(prefix="mcn-bench-audio-") as tmp:
        wave = decode_audio(mp4, cfg.extract.decode, Path(tmp))
        wave = np.array(wave)  # into memory: the log-mel timing is compute only
    out["predecode_s"] = time.perf_counter() - t0
    out["inputs"] = {"2d": list(frames_2d.shape), "3d": list(windows.shape), "audio": list(wave.shape)}
    captions = [c.text for c in read_sidecar(videos / "bench.srt")]
    out["inputs"]["text"] = [len(captions)]

    # the stage's own extractor options (allow_random_weights, device, ...)
    stage = ExtractStage(Workspace(videos), cfg.extract, videos)  # only its options(): no I/O
    builds, times, loads = {}, {}, {}
    for field, x, warm in (("video2d", frames_2d, frames_2d[:1]), ("video3d", windows, windows[:1]),
                           ("audio", wave, wave[:16000]), ("text", captions, captions[:1])):
        spec = getattr(cfg.extract, field)
        t0 = time.perf_counter()
        ex = create(spec.name, stage.options(field))
        builds[field] = time.perf_counter() - t0
        ex(warm)
        _sync(args.device)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ex(x)
            _sync(args.device)
            best = min(best, time.perf_counter() - t0)
        times[field], loads[field] = best, load1()
        del ex
    out.update(builds=builds, times=times, loads=loads, rss_self_mib=peak_rss_mib(),
               torch_threads=torch.get_num_threads())
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 1024**2
    return out


def part_decode(args: argparse.Namespace, videos: Path) -> dict:
    import decode as decode_bench  # benchmarks/decode.py

    mp4 = videos / "bench.mp4"
    rows = {}
    for backend in ("decord", "pyav"):
        wall, rss, (n2, n3) = decode_bench.timed(
            lambda b=backend: decode_bench.run_iter_visual(mp4, b, args.decode_threads), args.repeats)
        rows[backend] = {"wall": wall, "n2": n2, "n3": n3, "load": load1()}
    return {"rows": rows, "rss_self_mib": peak_rss_mib()}


PARTS = {"stage": part_stage, "models": part_models, "decode": part_decode}


# ------------------------------------------------------------------------------------------------
# driver


def run_part(name: str, args: argparse.Namespace, videos: Path) -> dict | None:
    cmd = [sys.executable, __file__, "--_part", name, "--_videos", str(videos), "--device", args.device,
           "--backend", args.backend, "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--decode-threads", str(args.decode_threads)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        print(f"{name}: FAILED (exit {res.returncode})\n{res.stderr[-3000:]}")
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the generated video (default 60)")
    ap.add_argument("--size", default="640x360", help="WxH of the generated video (default 640x360)")
    ap.add_argument("--fps", type=int, default=30, help="frame rate of the generated video (default 30)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N, for the 2D, 3D and text models "
                    "(default cpu)")
    ap.add_argument("--backend", default="decord", choices=("decord", "pyav"),
                    help="visual decode backend of the stage and of the models' pre-decode (default decord)")
    ap.add_argument("--workers", type=int, default=None,
                    help="decode worker processes of the stage (default: the config default, "
                    "extract.workers.num_workers = 2)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (extract.torch_threads; default 0 = torch's default)")
    ap.add_argument("--decode-threads", type=int, default=1, help="decoder threads of the decode part "
                    "(the stage uses extract.decode.threads = 1)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each part; the best is printed "
                    "(default 1)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS),
                    help="which parts to run (default all)")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "mcn-bench-cache",
                    help="where the generated video is kept between runs (default $TMPDIR/mcn-bench-cache)")
    ap.add_argument("--_part", choices=list(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--_videos", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._part:
        logging.basicConfig(level=logging.ERROR)
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        print(json.dumps(PARTS[args._part](args, args._videos)))
        return

    w, h = (int(v) for v in args.size.split("x"))
    videos = make_inputs(args.cache_dir, args.seconds, w, h, args.fps)
    from extractors.decode import probe_video

    probe = probe_video(videos / "bench.mp4")
    dur = probe.duration or args.seconds
    print(f"machine: {machine()}")
    print(f"video: {probe.width}x{probe.height} {probe.codec} {probe.avg_fps or 0:.2f} fps {dur:.1f} s + AAC "
          f"+ .srt ({videos}); device {args.device}, backend {args.backend}, repeats {args.repeats}")

    results: dict[str, dict | None] = {}
    for name in args.parts:
        print(f"-- {name} (load {load1():.2f}) ...", flush=True)
        results[name] = run_part(name, args, videos)

    st, mo, de = results.get("stage"), results.get("models"), results.get("decode")
    print()
    print(f"{'row':<44} {'wall s':>8} {'video s / s':>12} {'load':>6}")
    stage_wall = None
    if st:
        i = min(range(len(st["walls"])), key=st["walls"].__getitem__)
        stage_wall = st["walls"][i]
        print(f"{'whole extract stage (4 fields, incl. build)':<44} {stage_wall:>8.1f} "
              f"{dur / stage_wall:>12.2f} {st['loads'][i]:>6.2f}")
    if mo:
        t = mo["times"]
        for field, label in (("video2d", "ResNet-152 2D alone"), ("video3d", "ResNeXt-101 3D alone"),
                             ("audio", "log-mel alone"), ("text", "MiniLM text alone")):
            print(f"{label:<44} {t[field]:>8.2f} {dur / t[field]:>12.2f} {mo['loads'][field]:>6.2f}")
        bound = t["video2d"] + t["video3d"] + t["audio"]
        print(f"{'models alone: 2D + 3D + log-mel (bound)':<44} {bound:>8.1f} {dur / bound:>12.2f} "
              f"{mo['loads']['audio']:>6.2f}")
        build = sum(mo["builds"].values())
        print(f"{'model build (all 4 extractors)':<44} {build:>8.1f} {'':>12} {mo['loads']['text']:>6.2f}")
        if stage_wall:
            print(f"ratio stage / models alone: {stage_wall / bound:.2f}  "
                  f"(stage minus model build: {(stage_wall - build) / bound:.2f})")
    if de:
        for backend, r in de["rows"].items():
            print(f"{'iter_visual decode ' + backend:<44} {r['wall']:>8.2f} {dur / r['wall']:>12.1f} "
                  f"{r['load']:>6.2f}")
    print()
    if st:
        print(f"stage: peak RSS {st['rss_self_mib']:.0f} MiB stage process (VmHWM); largest child "
              f"{st['rss_child_largest_mib']:.0f} MiB (VmHWM of {st['n_children']} sampled decode workers / "
              f"ffmpeg); process tree {st['rss_total_sampled_mib']:.0f} MiB (sampled sum of RSS); "
              f"RUSAGE_CHILDREN ru_maxrss {st['rss_children_ru_mib']:.0f} MiB (inflated: counts the parent "
              f"at exec)")
        print(f"stage: workers {st['workers']}, torch threads {st['torch_threads']}; "
              f"scan {st['scan_s']:.1f} s (not in the stage wall)")
        print(f"stage outputs: {st['shapes']}; random weights: {st['random_weights']}; "
              f"rates (rows/s, from the done records): {st['rates']}")
    if mo:
        builds = {k: round(v, 1) for k, v in mo["builds"].items()}
        print(f"models part: inputs {mo['inputs']}, pre-decode {mo['predecode_s']:.1f} s, builds {builds}, "
              f"peak RSS {mo['rss_self_mib']:.0f} MiB, torch threads {mo['torch_threads']}"
              + (f", {mo['gpu']}, peak CUDA {mo['peak_cuda_mib']:.0f} MiB" if "gpu" in mo else ""))
    if de:
        r = de["rows"]["decord"]
        print(f"decode part: {r['n2']} 2D + {r['n3']} 3D frames per pass, decoder threads "
              f"{args.decode_threads}, peak RSS {de['rss_self_mib']:.0f} MiB")
    la = os.getloadavg()
    print(f"load average at the end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")


if __name__ == "__main__":
    main()
