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
* ``stage`` then runs the stage once more in the same process (``--warm-videos`` K > 0, default 3): a
  fresh workspace of K copies of the video (``make_copies``), all in one shard. Imports are done by
  then and the models' build is paid once for K videos, as in a real run over many videos;
  ``stage_warm_over_models`` = its wall / (K × the models' bound) is the steady-state cost of decode,
  audio, text and writing beside the backbones (the issue's "stage / models-alone").
* ``models``: the models alone on pre-decoded inputs = the compute bound. The video is decoded once
  (``iter_visual``, ``--backend``) into memory, audio once into a memmap; then ResNet-152 on the 2D
  frames, ResNeXt-101 on the 3D windows, log-mel on the waveform and MiniLM on the captions are timed
  (each after an untimed one-item warm-up, same batch sizes as the stage).
* ``decode``: ``iter_visual`` alone (one pass feeding both streams) with decord and with PyAV.

Rates are seconds of video per wall second (higher is better). Every figure is printed with the
1-minute load average (``os.getloadavg()``) measured right after it: on a shared machine a load above
the core count means the figure is pessimistic.

``--precision both`` (the default) runs the stage and the models parts once in fp32 and once in bf16
autocast (the 2D and 3D extractors' ``amp``; see extractors/precision.py), alternating, and prints
the bf16 / fp32 speed-ups of the stage and of the models: a side-by-side comparison in one run.
``--json`` prints one JSON line per figure (benchmarks/common.py) and nothing else on stdout.

    .venv/bin/python benchmarks/extract.py --repeats 1                 # CPU (a few minutes on 2 cores)
    .venv/bin/python benchmarks/extract.py --quick --json              # smoke run (4 s of 320x180, bf16 only)
    .venv/bin/python benchmarks/extract.py --device cuda --workers 4   # one GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import emit, parser, use_json  # standard library only

BENCH = "extract"
PRECISIONS = ("fp32", "bf16")

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
        print(f"generated {mp4} in {time.perf_counter() - t0:.1f} s (load {load1():.2f})", file=sys.stderr)
    if not srt.exists():
        lines, t, i = [], 0.0, 0
        while t + 0.5 < seconds:
            end = min(seconds, t + CAPTION_EVERY_S - 0.2)
            lines += [str(i + 1), f"{_srt_time(t)} --> {_srt_time(end)}", CAPTIONS[i % len(CAPTIONS)], ""]
            t, i = t + CAPTION_EVERY_S, i + 1
        srt.write_text("\n".join(lines), encoding="utf-8")
    return folder


def make_copies(folder: Path, k: int, into: Path) -> Path:
    """``folder``'s video and captions copied ``k`` times into ``into`` (``bench_<i>.mp4`` + ``.srt``).

    Real copies (the scan counts hard links of one file once), in a temporary folder rather than the
    cache, so that a cache carried to a GPU machine (tools/gpu_bundle.sh) stays one video."""
    into.mkdir(parents=True, exist_ok=True)
    for i in range(k):
        for ext in ("mp4", "srt"):
            shutil.copyfile(folder / f"bench.{ext}", into / f"bench_{i}.{ext}")
    return into


def overrides(args: argparse.Namespace) -> list[str]:
    """The stage's config: defaults + these (the same options build the models of the models part)."""
    out = ["extract.allow_random_weights=true", "extract.text.name=hf_tokens",
           f"extract.decode.backend={args.backend}", f"extract.torch_threads={args.threads}"]
    for f in ("video2d", "video3d", "text"):
        out.append(f"extract.{f}.options.device={args.device}")
    for f in ("video2d", "video3d"):
        out.append(f"extract.{f}.options.amp={args.precision}")
    if args.workers is not None:
        out.append(f"extract.workers.num_workers={args.workers}")
    return out + list(args.set)


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
        cpus: list[float] = []
        with ChildSampler() as children:
            for _ in range(args.repeats):
                c0 = _cpu_s()
                t0 = time.perf_counter()
                summary = run_extract(ws, cfg, force=True, progress=False)
                walls.append(time.perf_counter() - t0)
                cpus.append(_cpu_s() - c0)
                loads.append(load1())
        warm = {}
        if args.warm_videos > 0:
            many = make_copies(videos, args.warm_videos, Path(tmp) / "videos")  # (not timed)
            ws_many = Workspace(Path(tmp) / "many")
            found = scan(many, ws_many, cfg.scan, progress=False)
            if found.n_ok != args.warm_videos:
                raise RuntimeError(f"scan of {many} found {found.n_ok} usable videos, expected {args.warm_videos}")
            c0 = _cpu_s()
            t0 = time.perf_counter()
            done = run_extract(ws_many, cfg, force=True, progress=False)
            warm = {"warm_wall": time.perf_counter() - t0, "warm_cpu": _cpu_s() - c0, "warm_load": load1(),
                    "warm_videos": args.warm_videos, "warm_shards": done.processed.get("video2d", 0)}
        shapes, random, rates = {}, {}, {}
        for f in cfg.extract.fields:
            index = ws.shard_indices(f)[0]  # the one shard (one video)
            meta = next(iter_samples(ws.shard_tar(f, index)))["json"]
            shapes[f] = f"{meta['status']} {tuple(meta['shape'] or ())}"
            extractor = (read_record(ws.shard_record(f, index)) or {}).get("extractor") or {}
            random[f] = extractor.get("random_weights")
            rates[f] = extractor.get("rate")
    return {"walls": walls, "cpus": cpus, "loads": loads, "scan_s": scan_s, "shapes": shapes, "random_weights": random,
            "rates": rates,
            "written": summary.processed, "rss_self_mib": peak_rss_mib(),
            "rss_children_ru_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "rss_child_largest_mib": children.largest_mib, "rss_total_sampled_mib": children.total_mib,
            "n_children": children.n_children, "workers": cfg.extract.workers.num_workers,
            "torch_threads": _torch_threads(), **warm}


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its reaped children (decode workers, ffmpeg):
    the work done, which a busy shared machine inflates far less than the wall time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


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
    from extractors.decode import decode_audio, iter_visual
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
    builds, times, cpu, loads = {}, {}, {}, {}
    for field, x, warm in (("video2d", frames_2d, frames_2d[:1]), ("video3d", windows, windows[:1]),
                           ("audio", wave, wave[:16000]), ("text", captions, captions[:1])):
        spec = getattr(cfg.extract, field)
        t0 = time.perf_counter()
        ex = create(spec.name, stage.options(field))
        builds[field] = time.perf_counter() - t0
        ex(warm)
        _sync(args.device)
        best, best_cpu = float("inf"), float("inf")
        for _ in range(args.repeats):
            c0 = time.process_time()
            t0 = time.perf_counter()
            ex(x)
            _sync(args.device)
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        times[field], cpu[field], loads[field] = best, best_cpu, load1()
        del ex
    out.update(builds=builds, times=times, cpu=cpu, loads=loads, rss_self_mib=peak_rss_mib(),
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


def run_part(name: str, args: argparse.Namespace, videos: Path, precision: str = "fp32") -> dict | None:
    cmd = [sys.executable, __file__, "--_part", name, "--_videos", str(videos), "--device", args.device,
           "--backend", args.backend, "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--decode-threads", str(args.decode_threads), "--precision", precision,
           "--warm-videos", str(args.warm_videos)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    for override in args.set:
        cmd += ["--set", override]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        print(f"{name}: FAILED (exit {res.returncode})\n{res.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the generated video (default 60; "
                    "--quick: 4)")
    ap.add_argument("--size", default="640x360", help="WxH of the generated video (default 640x360; --quick: "
                    "320x180)")
    ap.add_argument("--fps", type=int, default=30, help="frame rate of the generated video (default 30)")
    ap.add_argument("--precision", default=None, choices=("fp32", "bf16", "both"),
                    help="the 2D and 3D models' amp: fp32, bf16 autocast, or both side by side (default both; "
                    "--quick: bf16, to stay within a minute)")
    ap.add_argument("--backend", default="decord", choices=("decord", "pyav"),
                    help="visual decode backend of the stage and of the models' pre-decode (default decord)")
    ap.add_argument("--workers", type=int, default=None,
                    help="decode worker processes of the stage (default: the config default, "
                    "extract.workers.num_workers: the CPUs but one, at least 2, started on demand)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the stage and the models (repeatable), e.g. "
                    "extract.workers.ramp_wait_s=0")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (extract.torch_threads; default 0 = torch's default)")
    ap.add_argument("--decode-threads", type=int, default=1, help="decoder threads of the decode part "
                    "(the stage uses extract.decode.threads = 1)")
    ap.add_argument("--warm-videos", type=int, default=None,
                    help="K: after the cold stage, run it again in the same process on K copies of the video "
                    "(the steady state; default 3, --quick: 1; 0: skip)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each part; the best is printed "
                    "(default 1)")
    ap.add_argument("--parts", nargs="+", default=None, choices=list(PARTS),
                    help="which parts to run (default all; --quick: stage and models)")
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

    use_json(args.json)
    if args.quick:
        args.seconds, args.size = min(args.seconds, 4.0), "320x180"
    parts = args.parts or (["stage", "models"] if args.quick else list(PARTS))
    if args.warm_videos is None:
        args.warm_videos = 1 if args.quick else 3
    args.precision = args.precision or ("bf16" if args.quick else "both")
    precisions = PRECISIONS if args.precision == "both" else (args.precision,)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    w, h = (int(v) for v in args.size.split("x"))
    videos = make_inputs(args.cache_dir, args.seconds, w, h, args.fps)
    from extractors.decode import probe_video

    probe = probe_video(videos / "bench.mp4")
    dur = probe.duration or args.seconds
    say(f"machine: {machine()}")
    say(f"video: {probe.width}x{probe.height} {probe.codec} {probe.avg_fps or 0:.2f} fps {dur:.1f} s + AAC "
        f"+ .srt ({videos}); device {args.device}, backend {args.backend}, repeats {args.repeats}, "
        f"precision {' + '.join(precisions)}")
    cond = {"device": args.device, "video": f"{probe.width}x{probe.height} {dur:.0f}s", "backend": args.backend}

    # fp32 and bf16 alternate part by part, so that a change of the machine's load hits both alike
    results: dict[tuple[str, str], dict | None] = {}
    for name in parts:
        for precision in (precisions if name != "decode" else ("fp32",)):
            say(f"-- {name} {precision if name != 'decode' else ''} (load {load1():.2f}) ...")
            results[name, precision] = run_part(name, args, videos, precision)

    stage_wall: dict[str, float] = {}
    warm_wall: dict[str, float] = {}
    bound: dict[str, float] = {}
    stage_cpu: dict[str, float] = {}
    bound_cpu: dict[str, float] = {}
    for precision in precisions:
        st, mo = results.get(("stage", precision)), results.get(("models", precision))
        c = {**cond, "precision": precision}
        if st:
            i = min(range(len(st["walls"])), key=st["walls"].__getitem__)
            stage_wall[precision] = st["walls"][i]
            emit(BENCH, "stage_wall_s", stage_wall[precision], "s", **c, workers=st["workers"],
                 threads=st["torch_threads"], load=round(st["loads"][i], 2))
            emit(BENCH, "stage_realtime", dur / stage_wall[precision], "video s/s", **c,
                 workers=st["workers"], load=round(st["loads"][i], 2))
            if "cpus" in st:
                stage_cpu[precision] = st["cpus"][i]
                emit(BENCH, "stage_cpu_s", stage_cpu[precision], "CPU s", **c, what="stage process + children")
            if "warm_wall" in st:
                k = st["warm_videos"]
                warm_wall[precision] = st["warm_wall"]
                emit(BENCH, "stage_warm_wall_s", st["warm_wall"], "s", **c, videos=k, shards=st["warm_shards"],
                     load=round(st["warm_load"], 2), what="the stage again in the same process, K copies")
                emit(BENCH, "stage_warm_realtime", k * dur / st["warm_wall"], "video s/s", **c, videos=k)
                emit(BENCH, "stage_warm_cpu_s", st["warm_cpu"], "CPU s", **c, videos=k)
            emit(BENCH, "stage_peak_rss_mib", st["rss_self_mib"], "MiB", **c)
            emit(BENCH, "stage_tree_rss_mib", st["rss_total_sampled_mib"], "MiB", **c)
        if mo:
            t = mo["times"]
            for field in ("video2d", "video3d", "audio", "text"):
                emit(BENCH, f"model_{field}_s", t[field], "s", **c, load=round(mo["loads"][field], 2))
            bound[precision] = t["video2d"] + t["video3d"] + t["audio"]
            emit(BENCH, "models_bound_s", bound[precision], "s", **c, what="2D + 3D + log-mel on pre-decoded input")
            emit(BENCH, "models_realtime", dur / bound[precision], "video s/s", **c)
            if "cpu" in mo:
                bound_cpu[precision] = mo["cpu"]["video2d"] + mo["cpu"]["video3d"] + mo["cpu"]["audio"]
                emit(BENCH, "models_bound_cpu_s", bound_cpu[precision], "CPU s", **c)
            emit(BENCH, "models_build_s", sum(mo["builds"].values()), "s", **c)
            if "peak_cuda_mib" in mo:
                emit(BENCH, "models_peak_cuda_mib", mo["peak_cuda_mib"], "MiB", **c, gpu=mo["gpu"])
        if precision in stage_wall and precision in bound:
            build = sum(mo["builds"].values())
            emit(BENCH, "stage_over_models", stage_wall[precision] / bound[precision], "ratio", **c,
                 target="<= 1.10")
            emit(BENCH, "stage_minus_build_over_models", (stage_wall[precision] - build) / bound[precision],
                 "ratio", **c)
            if precision in stage_cpu and precision in bound_cpu:
                emit(BENCH, "stage_over_models_cpu", stage_cpu[precision] / bound_cpu[precision], "ratio", **c,
                     what="CPU seconds: the stage's work beyond the models")
            if precision in warm_wall:
                k = st["warm_videos"]
                emit(BENCH, "stage_warm_over_models", warm_wall[precision] / (k * bound[precision]), "ratio", **c,
                     videos=k, target="<= 1.10", what="steady state: imports done, one build for K videos")
                if precision in bound_cpu:
                    emit(BENCH, "stage_warm_over_models_cpu", st["warm_cpu"] / (k * bound_cpu[precision]), "ratio",
                         **c, videos=k)
    if len(precisions) == 2:
        if len(stage_wall) == 2:
            emit(BENCH, "stage_speedup_bf16", stage_wall["fp32"] / stage_wall["bf16"], "x", **cond,
                 target=">= 2.0")
        if len(warm_wall) == 2:
            emit(BENCH, "stage_warm_speedup_bf16", warm_wall["fp32"] / warm_wall["bf16"], "x", **cond,
                 target=">= 2.0", videos=args.warm_videos)
        if len(stage_cpu) == 2:
            emit(BENCH, "stage_speedup_bf16_cpu", stage_cpu["fp32"] / stage_cpu["bf16"], "x", **cond,
                 what="ratio of CPU seconds")
        if len(bound_cpu) == 2:
            emit(BENCH, "models_speedup_bf16_cpu", bound_cpu["fp32"] / bound_cpu["bf16"], "x", **cond,
                 what="ratio of CPU seconds")
        if len(bound) == 2:
            emit(BENCH, "models_speedup_bf16", bound["fp32"] / bound["bf16"], "x", **cond)
            for field in ("video2d", "video3d"):
                emit(BENCH, f"model_{field}_speedup_bf16", results["models", "fp32"]["times"][field]
                     / results["models", "bf16"]["times"][field], "x", **cond)
    de = results.get(("decode", "fp32"))
    if de:
        for backend, r in de["rows"].items():
            emit(BENCH, f"decode_{backend}_realtime", dur / r["wall"], "video s/s", **cond,
                 frames=f"{r['n2']} 2D + {r['n3']} 3D", load=round(r["load"], 2))
    st = next((results.get(("stage", p)) for p in precisions if results.get(("stage", p))), None)
    if st:
        say(f"stage outputs: {st['shapes']}; random weights: {st['random_weights']}; "
            f"rates (rows/s, from the done records): {st['rates']}; scan {st['scan_s']:.1f} s (not in the wall)")
    la = os.getloadavg()
    say(f"load average at the end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")


if __name__ == "__main__":
    main()
