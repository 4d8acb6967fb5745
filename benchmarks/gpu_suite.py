"""The GPU suite in one command (``make bench-gpu``): the ``gpu``-marked tests, then every benchmark script,
one JSON line per figure on stdout (prints figures, asserts nothing).

    python3 benchmarks/gpu_suite.py --device cuda                 # on a GPU machine, < 8 minutes
    .venv/bin/python benchmarks/gpu_suite.py --device cpu --quick # anywhere, ~2 minutes: it cannot rot

Parts, in this order (``--only`` picks some):

* ``tests``: ``pytest -m gpu tests`` (tests/gpu and the ``gpu``-marked tests elsewhere) in a subprocess,
  collection errors counted, not fatal (a module that cannot be imported on the GPU machine shows up as
  an error with its id); its counts as lines with ``bench: "gpu_tests"`` (``passed``, ``failed``,
  ``skipped``, ``errors``; the failing test ids in ``failed_ids``);
* ``kmeans``, ``train``, ``extract``, ``loader``, ``decode``: ``benchmarks/<part>.py --device D --json
  [--quick]`` (plus the part's own sizes, see ``PARTS``) in a subprocess; its JSON lines are re-printed.

A part that is missing, fails, or runs past its time limit gives a ``{"bench": "suite", "figure":
"part", "value": "missing" | "failed" | "timeout", ...}`` line (with the last line of its stderr) and
the suite goes on; every part ends with such a line (``"ok"`` when it exited 0). A part whose extra
arguments are refused (exit status 2: argparse) is retried once with the shared flags alone. The whole
suite keeps to ``--budget`` seconds: each part's limit is cut to what is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit, machine, parser, use_json  # noqa: E402


@dataclass(frozen=True)
class Part:
    """One benchmark script: its time limit (s) on a GPU and in a ``--quick`` run, and its extra
    arguments for the full run (the figures the suite is for) and for ``--quick``."""

    limit_s: float
    quick_limit_s: float
    extra: tuple[str, ...] = ()
    quick_extra: tuple[str, ...] = ()
    video_flag: str | None = None  # how the script takes a pre-made video (--video), if it does
    notes: dict = field(default_factory=dict)


# Expected times on one H200 + 16 cores (none measured yet: no GPU was lent; see BENCHMARKS.md): tests
# ~90 s, kmeans ~15 s, train ~60 s, extract ~120 s, loader ~30 s, decode ~30 s = ~345 s. The limits leave
# headroom and add up, with the tests', to more than the budget on purpose: the budget, not the sum,
# bounds the suite (450 s < 8 min), and the parts run most important first.
PARTS: dict[str, Part] = {
    "kmeans": Part(limit_s=45, quick_limit_s=30),
    "train": Part(limit_s=120, quick_limit_s=45, extra=("--batch", "4096")),
    "extract": Part(limit_s=150, quick_limit_s=45,
                    extra=("--size", "1280x720", "--seconds", "60", "--workers", "12", "--warm-videos", "16",
                           "--precision", "bf16", "--cache-dir", ".bench")),
    "loader": Part(limit_s=60, quick_limit_s=30),
    "decode": Part(limit_s=90, quick_limit_s=30, extra=("--threads", "0"), video_flag="--video"),
}
TESTS_LIMIT_S, TESTS_QUICK_LIMIT_S = 150.0, 60.0
BUDGET_S, QUICK_BUDGET_S = 450.0, 150.0  # the whole suite: < 8 min on a GPU, ~2 min for --quick
ORDER = ["tests", "kmeans", "train", "extract", "loader", "decode"]
_RESERVE_S = 5.0  # kept back for the suite's own lines


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _status(part: str, value: str, wall: float, **extra: object) -> None:
    emit("suite", "part", value, "", part=part, seconds=round(wall, 1), **extra)


def _run(cmd: list[str], limit: float, env: dict[str, str]) -> tuple[int | None, str, str, float]:
    """(exit status or None on timeout, stdout, stderr, wall s) of a subprocess killed at ``limit``.

    The part runs in its own process group and the whole group is killed at the limit: benchmark
    scripts start workers and per-size subprocesses, and a grandchild holding the output pipes open
    would otherwise keep the suite waiting past its budget."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, limit))
        return proc.returncode, out, err, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a process that left the group still holds the pipes
            proc.kill()
            out, err = "", ""
        return None, out or "", err or "", time.perf_counter() - t0


def _reprint(stdout: str) -> int:
    """Re-print the figure lines (JSON objects with a "bench" key) of a part; how many there were."""
    n = 0
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "bench" in obj:
            print(json.dumps(obj), flush=True)
            n += 1
    return n


def run_tests(device: str, limit: float, env: dict[str, str]) -> None:
    """``pytest -m gpu tests``: counts from its JUnit XML report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={report}", "-o", "addopts="]
        rc, out, err, wall = _run(cmd, limit, env)
        if not report.exists():
            _status("tests", "timeout" if rc is None else "failed", wall, rc=rc,
                    error=_last_line(err) or _last_line(out))
            return
        counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
        failed: list[str] = []
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None:
                counts["failed"] += 1
                failed.append(name)
            elif case.find("error") is not None:
                counts["errors"] += 1
                failed.append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
        for figure, value in counts.items():
            extra = {"failed_ids": failed} if figure == "failed" and failed else {}
            emit("gpu_tests", figure, value, "tests", device=device, **extra)
        _status("tests", "ok" if rc == 0 else ("timeout" if rc is None else "failed"), wall, rc=rc,
                error="" if rc == 0 else _last_line(out))


def run_part(name: str, part: Part, device: str, quick: bool, limit: float, video: Path | None,
             env: dict[str, str], scripts: Path) -> None:
    script = scripts / f"{name}.py"
    if not script.exists():
        _status(name, "missing", 0.0, error=f"{script} does not exist")
        return
    base = [sys.executable, str(script), "--device", device, "--json"] + (["--quick"] if quick else [])
    extra = list(part.quick_extra if quick else part.extra)
    if video is not None and part.video_flag:
        extra += [part.video_flag, str(video)]
    t_start = time.perf_counter()
    rc, out, err, _ = _run(base + extra, limit, env)
    retried = False
    if rc == 2 and extra and "usage:" in err:  # its flags changed: the shared ones alone
        retried = True
        rc, out, err, _ = _run(base, limit - (time.perf_counter() - t_start), env)
    n = _reprint(out)
    value = "ok" if rc == 0 else ("timeout" if rc is None else "failed")
    detail = {} if rc == 0 else {"error": _last_line(err) or _last_line(out)}
    _status(name, value, time.perf_counter() - t_start, rc=rc, lines=n, retried_without_extras=retried,
            **detail)


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=ORDER, default=None, help="parts to run (default all)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole suite (default {BUDGET_S:g}, --quick {QUICK_BUDGET_S:g})")
    ap.add_argument("--video", type=Path, default=None,
                    help="a pre-made H.264 video for the parts that take one (machines without ffmpeg); "
                    "default without --quick: .bench/bench_720p_60s.mp4 when present (tools/gpu_bundle.sh)")
    ap.add_argument("--limit-scale", type=float, default=1.0,
                    help="multiply every part's time limit (a slower or faster machine)")
    ap.add_argument("--scripts", type=Path, default=ROOT / "benchmarks",
                    help="folder of the benchmark scripts")
    args = ap.parse_args()
    use_json(True)  # the suite's output is JSON lines, with or without --json
    budget = args.budget or (QUICK_BUDGET_S if args.quick else BUDGET_S)
    t0 = time.perf_counter()
    video = args.video
    default_video = ROOT / ".bench" / "bench_720p_60s.mp4"
    if video is None and default_video.exists() and not args.quick:
        video = default_video
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    emit("suite", "machine", json.dumps(machine()), "", device=args.device, quick=args.quick)
    for name in [p for p in ORDER if args.only is None or p in args.only]:
        left = budget - (time.perf_counter() - t0) - _RESERVE_S
        if left < 5:
            _status(name, "timeout", 0.0, error="suite budget spent before this part")
            continue
        if name == "tests":
            tests_limit = TESTS_QUICK_LIMIT_S if args.quick else TESTS_LIMIT_S
            run_tests(args.device, min(args.limit_scale * tests_limit, left), env)
        else:
            part = PARTS[name]
            limit = min(args.limit_scale * (part.quick_limit_s if args.quick else part.limit_s), left)
            run_part(name, part, args.device, args.quick, limit, video, env, args.scripts)
    emit("suite", "total_s", round(time.perf_counter() - t0, 1), "s", device=args.device, quick=args.quick)


if __name__ == "__main__":
    main()
