"""`mcn run`: scan → extract → train → evaluate, each stage skipping what is done and fresh."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from pipeline.config import Config, write_resolved
from pipeline.workspace import Workspace

logger = logging.getLogger(__name__)

STAGES = ("scan", "extract", "train", "evaluate")


def selected_stages(from_stage: str | None, only: str | None) -> list[str]:
    if only:
        return [only]
    start = STAGES.index(from_stage) if from_stage else 0
    return list(STAGES[start:])


def run_pipeline(ws: Workspace, cfg: Config, videos: Path, *, from_stage: str | None = None,
                 only: str | None = None, force: set[str] = frozenset(), progress: bool = True) -> str:
    """Run the selected stages; returns a printable summary (metrics tables and report paths)."""
    from pipeline.evaluate import evaluate_set, format_table
    from pipeline.scan import scan
    from pipeline.stages import run_extract, run_train

    stages = selected_stages(from_stage, only)
    lines: list[str] = []
    timings: dict[str, float] = {}
    ws.root.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        start = time.monotonic()
        logger.info("run: stage %s", stage)
        if stage == "scan":
            result = scan(videos, ws, cfg.scan, force="scan" in force, progress=progress)
            write_resolved(ws.root / "scan.config.yaml", cfg.scan, videos=str(Path(videos).resolve()))
            lines.append(f"scan: {result.n_videos} videos ({result.n_ok} ok, {result.n_failed} failed), "
                         f"{result.n_shards} shards")
            lines += [f"  failed: {p}: {why}" for p, why in result.failures]
        elif stage == "extract":
            summary = run_extract(ws, cfg, force="extract" in force, progress=progress)
            done = ", ".join(f"{f} {n}/{summary.shards_mine}" for f, n in summary.processed.items())
            lines.append(f"extract: shards written this run: {done}")
        elif stage == "train":
            run_dir = ws.run_dir(cfg.evaluate.run)
            if "train" in force and run_dir.exists():
                shutil.rmtree(run_dir)
            result = run_train(ws, cfg, resume="latest", progress=progress)
            losses = ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.losses.items()) if k in
                               ("total", "mms", "cluster", "recon"))
            lines.append(f"train: step {result.step} ({losses}) -> {result.checkpoint}")
        elif stage == "evaluate":
            names = [s.name for s in cfg.evaluate.sets] or ["workspace"]
            for name in names:
                metrics = evaluate_set(ws, cfg, name, None, progress=progress)
                if "localization" in metrics:
                    loc = metrics["localization"]
                    lines.append(f"evaluate {name}: step recall {100 * loc['recall']:.1f}% over "
                                 f"{loc['n_videos']} videos")
                    continue
                lines.append(f"evaluate {name}: {metrics['n_queries']} queries, {metrics['n_videos']} videos")
                lines.append(format_table(metrics))
                lines += [f"  note: {p}" for p in metrics["problems"]]
                lines.append(f"  report: {ws.eval_dir(name) / 'report.html'}")
        timings[stage] = time.monotonic() - start
    lines.append("time: " + ", ".join(f"{s} {t:.0f} s" for s, t in timings.items())
                 + f" (total {sum(timings.values()):.0f} s)")
    return "\n".join(lines)
