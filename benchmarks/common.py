"""What every benchmark script shares: the ``--device/--quick/--json`` flags and one JSON line per figure.

The GPU suite (``make bench-gpu``) runs each benchmark script as a subprocess with ``--json`` and
collects the lines it prints; a human runs the same scripts without ``--json`` and reads a table.
One figure is one line::

    {"bench": "train", "figure": "step_clips_per_s", "value": 812.4, "unit": "clips/s",
     "device": "cuda", "batch": 4096, ...}

``bench`` names the script, ``figure`` the quantity, ``unit`` its unit; any further keys say under what
conditions it was measured (batch size, workers, precision). Benchmarks print figures and assert
nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from typing import Any

_JSON = False


def parser(description: str | None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared flags:

    ``--device`` (cpu | cuda | cuda:N), ``--quick`` (a small, fast variant of every measurement, so that
    the CPU run of the GPU suite keeps the script from rotting) and ``--json`` (figures as JSON lines).
    """
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run of the suite")
    ap.add_argument("--json", action="store_true", help="print one JSON line per figure instead of a table")
    return ap


def use_json(flag: bool) -> None:
    """Set by the script from ``args.json``: whether :func:`emit` prints JSON lines or readable lines."""
    global _JSON
    _JSON = bool(flag)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def emit(bench: str, figure: str, value: float | int | str | None, unit: str, **conditions: Any) -> dict:
    """Print one figure (a JSON line under ``--json``, a readable line otherwise) and return it as a dict."""
    line = {"bench": bench, "figure": figure, "value": _clean(value), "unit": unit,
            **{k: _clean(v) for k, v in conditions.items()}}
    if _JSON:
        print(json.dumps(line, sort_keys=False), flush=True)
    else:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        extra = " ".join(f"{k}={v}" for k, v in conditions.items())
        print(f"{bench:<10} {figure:<32} {shown:>12} {unit:<12} {extra}", flush=True)
    return line


def machine() -> dict[str, Any]:
    """Where the figures were measured: CPU model, cores, torch version, GPU name if any."""
    info: dict[str, Any] = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    info["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover - torch is a requirement
        pass
    return info


if __name__ == "__main__":  # pragma: no cover
    use_json("--json" in sys.argv)
    emit("machine", "info", json.dumps(machine()), "")
