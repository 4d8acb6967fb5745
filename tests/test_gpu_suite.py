"""The GPU suite's CPU smoke run (benchmarks/gpu_suite.py): it prints only JSON lines with the shared keys,
re-prints a real benchmark's figures, and reports a failing, a missing and a flag-refusing part
without stopping. Not ``gpu``-marked: it keeps the suite from rotting where no GPU is lent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"bench", "figure", "value", "unit"}


def run_suite(*args: str, timeout: float = 120) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--quick", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is one JSON object
    for line in lines:
        assert KEYS <= set(line), line
    assert lines[0]["bench"] == "suite" and lines[0]["figure"] == "machine"
    assert lines[-1]["bench"] == "suite" and lines[-1]["figure"] == "total_s" and lines[-1]["value"] > 0
    return lines


def parts(lines: list[dict]) -> dict[str, dict]:
    return {line["part"]: line for line in lines if line["bench"] == "suite" and line["figure"] == "part"}


def test_real_kmeans_figures_come_through() -> None:
    lines = run_suite("--only", "kmeans")
    figures = {line["figure"]: line for line in lines if line["bench"] == "kmeans"}
    expected = {"refit_s", "refit_s_per_iter", "first_refit_s", "assign_batch_s", "empty_clusters"}
    assert expected <= figures.keys()
    refit = figures["refit_s"]
    assert refit["unit"] == "s" and refit["value"] > 0
    # the --quick sizes of benchmarks/kmeans.py: 4,096 queued + 1,024 points, 512 dims, K 32, 5 iterations
    got = (refit["device"], refit["points"], refit["dim"], refit["k"], refit["iters"])
    assert got == ("cpu", 5120, 512, 32, 5)
    assert parts(lines) == {"kmeans": parts(lines)["kmeans"]} and parts(lines)["kmeans"]["value"] == "ok"


def test_failing_missing_and_flag_refusing_parts_do_not_stop_the_suite(tmp_path: Path) -> None:
    (tmp_path / "decode.py").write_text(  # refuses the suite's extra --video, works with the shared flags
        "import argparse, json\n"
        "ap = argparse.ArgumentParser()\n"
        "ap.add_argument('--device'); ap.add_argument('--json', action='store_true')\n"
        "ap.add_argument('--quick', action='store_true')\n"
        "a = ap.parse_args()\n"
        "print('a line that is not JSON')\n"
        "print(json.dumps({'bench': 'decode', 'figure': 'iter_visual_frames_per_s', 'value': 1.5,\n"
        "                  'unit': 'frames/s', 'device': a.device}))\n"
    )
    (tmp_path / "kmeans.py").write_text("import sys\nsys.exit('kmeans broke: no device')\n")
    pidfile = tmp_path / "grandchild.pid"
    (tmp_path / "child.py").write_text(
        f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    (tmp_path / "loader.py").write_text(  # hangs, and so does a child of it (as a benchmark's workers)
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(tmp_path / 'child.py')!r}])\n"
        "time.sleep(60)\n"
    )
    lines = run_suite("--only", "kmeans", "extract", "loader", "decode", "--scripts", str(tmp_path),
                      "--video", str(tmp_path / "given.mp4"), "--limit-scale", "0.2")
    status = parts(lines)
    assert status["kmeans"]["value"] == "failed" and status["kmeans"]["error"] == "kmeans broke: no device"
    assert status["kmeans"]["rc"] == 1
    assert status["extract"]["value"] == "missing"
    assert status["loader"]["value"] == "timeout" and status["loader"]["seconds"] < 10  # 0.2 × its 30 s
    assert status["decode"]["value"] == "ok" and status["decode"]["retried_without_extras"] is True
    assert [line for line in lines if line["bench"] == "decode"] == [
        {"bench": "decode", "figure": "iter_visual_frames_per_s", "value": 1.5, "unit": "frames/s",
         "device": "cpu"}]
    assert lines[-1]["value"] < 20
    grandchild = int(pidfile.read_text())  # killed with its part's process group, not left running
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, signal.SIGKILL)
        raise AssertionError("the timed-out part's child process was left running")
