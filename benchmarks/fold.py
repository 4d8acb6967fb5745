"""BatchNorm folding (the visual extractors' ``fold_bn``): speed of the folded trunks vs as loaded.

Run from the repository root: ``.venv/bin/python benchmarks/fold.py`` (``--help`` for options).
ResNet-152 on ``--frames`` random frames 224×398 and ResNeXt-101 3D on ``--windows`` random 16-frame
windows 112×112, each built with ``fold_bn: false`` and ``true`` (the same seeded random weights, the
real extractors: ``extractors.create``), in fp32 and in bf16 autocast. Every configuration is timed
``--repeats`` times after one untimed call, alternating folded / as loaded, and the best time is
printed with the folded / as-loaded speed-up and the largest difference of the L2-normalised rows.
Prints figures only.

    .venv/bin/python benchmarks/fold.py                  # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/fold.py --quick --json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, machine, parser, use_json  # noqa: E402

BENCH = "fold"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--frames", type=int, default=32, help="2D frames 224x398 (default 32; --quick 4)")
    ap.add_argument("--windows", type=int, default=16, help="3D windows 16x112x112 (default 16; --quick 2)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per configuration, best kept (default 2)")
    args = ap.parse_args()
    use_json(args.json)
    if args.quick:
        args.frames, args.windows, args.repeats = 4, 2, 1

    import torch

    from extractors import create
    from extractors.precision import cpu_has_bf16

    if not args.json:
        print(f"machine: {machine()}")
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "resnet152_2d": torch.randint(0, 256, (args.frames, 224, 398, 3), dtype=torch.uint8, generator=gen),
        "resnext101_3d": torch.randint(0, 256, (args.windows, 16, 112, 112, 3), dtype=torch.uint8, generator=gen),
    }
    for name, x in inputs.items():
        for precision in ("fp32", "bf16"):
            ex = {fold: create(name, {"allow_random_weights": True, "seed": 0, "device": args.device,
                                      "amp": precision, "fold_bn": fold}) for fold in (False, True)}
            best, rows = {False: float("inf"), True: float("inf")}, {}
            for fold in (False, True):
                rows[fold] = ex[fold](x[:1])  # warm-up
            for _ in range(args.repeats):
                for fold in (False, True):
                    t0 = time.perf_counter()
                    rows[fold] = ex[fold](x)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    best[fold] = min(best[fold], time.perf_counter() - t0)
            cond = {"device": args.device, "precision": precision, "rows": int(x.shape[0]), "cpu_bf16": cpu_has_bf16()}
            for fold in (False, True):
                emit(BENCH, f"{name}_{'folded' if fold else 'as_loaded'}_s", best[fold], "s", **cond)
            emit(BENCH, f"{name}_speedup", best[False] / best[True], "x", **cond)
            emit(BENCH, f"{name}_max_abs_diff", float((rows[True] - rows[False]).abs().max()), "unit rows", **cond)
            del ex


if __name__ == "__main__":
    main()
