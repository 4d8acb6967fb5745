"""Fidelity cost of bf16 autocast: per-row cosine of bf16 vs fp32 features, 2D and 3D (prints figures only).

Run from the repository root: ``.venv/bin/python benchmarks/precision.py`` (``--help`` for options).
A ``--seconds`` long ``--size`` H.264 clip of "real" footage is generated once with ffmpeg (a
zooming ``mandelbrot`` blended with ``testsrc2`` plus temporal noise: edges, texture, motion), decoded
once by the stage's decoder (``extractors.decode.iter_visual``: 2D at 1 fps shorter side 224, 3D at
24 fps 112 crop in 16-frame windows), and run through ResNet-152 and ResNeXt-101 in fp32 and in bf16
autocast (the extractors' ``amp`` = ``fp32`` / ``bf16``; same seeded weights).

The weights are random-initialised (no pretrained checkpoint can be downloaded here). Random deep
ResNets whose BatchNorm statistics are the init's (mean 0, variance 1) map all inputs to nearly one
direction (``fp32 inter-row`` = the median cosine between different fp32 rows is ~1), which flatters
bf16. So every figure is printed twice: ``init`` (the extractor's seeded weights as they are) and
``bn-calibrated`` (the same weights with every BatchNorm's running mean/variance re-estimated on this
footage by one train-mode pass, as trained weights would have them: rows no longer collapse). Also
printed: ``centred`` = the cosine after subtracting the fp32 rows' mean from both (the part of a row
that tells it apart from the others).

    .venv/bin/python benchmarks/precision.py            # 20 s of 640x360 (about a minute on 2 cores)
    .venv/bin/python benchmarks/precision.py --quick --json
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import emit, machine, parser, use_json

BENCH = "precision"


def make_footage(path: Path, seconds: float, width: int, height: int, fps: int = 30) -> Path:
    """``mandelbrot`` (zooming) blended with ``testsrc2``, plus temporal noise, as H.264 (made once)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    size = f"{width}x{height}"
    graph = "[0:v][1:v]blend=all_mode=overlay:all_opacity=0.6,noise=alls=25:allf=t+u,format=yuv420p[v]"
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-f", "lavfi", "-i", f"mandelbrot=size={size}:rate={fps}",
           "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}",
           "-filter_complex", graph, "-map", "[v]", "-t", f"{seconds:g}",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-f", "mp4", str(tmp)]
    subprocess.run(cmd, check=True)
    tmp.rename(path)
    return path


def cosines(fp32, bf16):
    """Per-row cosine (N,), the same after centring on the fp32 mean row, and the fp32 inter-row median."""
    import torch
    import torch.nn.functional as F

    raw = F.cosine_similarity(fp32, bf16, dim=1)
    mean = fp32.mean(0, keepdim=True)
    centred = F.cosine_similarity(fp32 - mean, bf16 - mean, dim=1)
    n = fp32.shape[0]
    gram = F.normalize(fp32, dim=1) @ F.normalize(fp32, dim=1).T
    inter = gram[~torch.eye(n, dtype=torch.bool)].median() if n > 1 else torch.tensor(float("nan"))
    return raw, centred, float(inter)


def calibrate_bn(ex, x) -> None:
    """Re-estimate every BatchNorm's running mean/variance of extractor ``ex`` (built with
    ``fold_bn: false``) on inputs ``x`` (one train-mode forward pass in fp32, cumulative average), then
    back to eval mode."""
    import torch
    from torch import nn

    model = ex.model
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    bs = ex.config.batch_size
    with torch.no_grad():
        for i in range(0, len(x), bs):
            xb = ex.preprocess(torch.from_numpy(x[i:i + bs]))
            model.forward_features(xb) if hasattr(model, "forward_features") else model(xb)
    model.eval()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the generated clip (default 20)")
    ap.add_argument("--size", default="640x360", help="WxH of the generated clip (default 640x360)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "mcn-bench-cache")
    args = ap.parse_args()
    use_json(args.json)
    if args.quick:
        args.seconds, args.size = 3.0, "320x180"

    import numpy as np
    import torch

    from extractors import create
    from extractors.decode import DecodeConfig, iter_visual
    from extractors.precision import cpu_has_bf16
    from extractors.resnext3d import windows_from_frames

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    clip = make_footage(args.cache_dir / f"footage-{w}x{h}-{args.seconds:g}s.mp4", args.seconds, w, h)
    f2, f3 = [], []
    for chunk in iter_visual(clip, DecodeConfig()):
        f2.append(chunk.frames_2d)
        f3.append(chunk.frames_3d)
    frames, windows = np.concatenate(f2), windows_from_frames(np.concatenate(f3))
    info = machine()
    cond = {"device": args.device, "cpu_bf16": cpu_has_bf16(), "clip": f"{w}x{h} {args.seconds:g}s"}
    if not args.json:
        print(f"machine: {info}; footage {clip}: 2D {frames.shape}, 3D {windows.shape}")
    for field, name, x in (("video2d", "resnet152_2d", frames), ("video3d", "resnext101_3d", windows)):
        opts = {"allow_random_weights": True, "seed": 0, "device": args.device,
                "batch_size": 16 if field == "video2d" else 4}
        for weights in ("init", "bn-calibrated"):
            if weights == "init":
                ex = {p: create(name, {**opts, "amp": p}) for p in ("fp32", "bf16")}
            else:  # calibrated on the trunk as loaded (fold_bn off), then loaded from a file and folded
                calibrated = create(name, {**opts, "amp": "fp32", "fold_bn": False})
                calibrate_bn(calibrated, x)
                file = Path(tempfile.mkdtemp(prefix="mcn-bench-precision-")) / "calibrated.pth"
                torch.save(calibrated.model.state_dict(), file)
                del calibrated
                loaded = {**opts, "allow_random_weights": False, "weights": str(file)}
                ex = {p: create(name, {**loaded, "amp": p}) for p in ("fp32", "bf16")}
                file.unlink()
                file.parent.rmdir()
            rows = {}
            for precision in ("fp32", "bf16"):
                t0 = time.perf_counter()
                rows[precision] = ex[precision](x).double()
                emit(BENCH, f"{field}_{precision}_s", time.perf_counter() - t0, "s", rows=int(x.shape[0]),
                     **cond, weights=weights)
            raw, centred, inter = cosines(rows["fp32"], rows["bf16"])
            for figure, value in (("cosine_min", raw.min()), ("cosine_median", raw.median()),
                                  ("centred_cosine_min", centred.min()),
                                  ("centred_cosine_median", centred.median()),
                                  ("fp32_interrow_cosine_median", inter)):
                emit(BENCH, f"{field}_{figure}", float(value), "cosine", rows=int(x.shape[0]), **cond,
                     weights=weights)
        del ex


if __name__ == "__main__":
    main()
