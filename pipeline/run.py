"""`mcn run`: scan → extract → train → evaluate, each stage redoing exactly what is not done.

Every stage decides from its records (store.lineage) what is done, stale or missing: a change of the
text extractor redoes the text shards, trains a new run beside the old one (whose features changed)
and re-evaluates; a re-run with nothing changed writes no file.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.ranks import rank_and_world
from store.layout import Workspace

if TYPE_CHECKING:  # importing the config tree imports torch; `mcn --help` takes STAGES from here
    from pipeline.config import Config

logger = logging.getLogger(__name__)

STAGES = ("scan", "extract", "train", "evaluate")  # in order


def selected_stages(from_stage: str | None, only: str | None) -> list[str]:
    if only:
        return [only]
    start = STAGES.index(from_stage) if from_stage else 0
    return list(STAGES[start:])


def run_pipeline(ws: Workspace, cfg: Config, videos: Path, *, from_stage: str | None = None,
                 only: str | None = None, force: set[str] = frozenset(), progress: bool = True) -> str:
    """Run the selected stages; returns a printable summary (metrics tables and report paths)."""
    from pipeline.config import write_resolved
    from pipeline.evaluate import evaluate_set, format_table
    from pipeline.scan import scan
    from pipeline.stages import extract_states, failure_summary, run_extract, workers_for
    from pipeline.training import run_train, train_state

    stages = selected_stages(from_stage, only)
    lines: list[str] = []
    timings: dict[str, float] = {}
    ws.root.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        start = time.monotonic()
        logger.info("run: stage %s", stage)
        if stage == "scan":
            result = scan(videos, ws, cfg.scan, force="scan" in force, progress=progress,
                          workers=workers_for(ws, cfg))
            write_resolved(ws.scan_config, cfg.scan, videos=str(Path(videos).resolve()))
            state = "unchanged" if result.up_to_date else f"{result.n_probed} probed"
            lines.append(f"scan: {result.n_videos} videos ({result.n_ok} ok, {result.n_failed} failed), "
                         f"{result.n_shards} shards; {state}")
            lines += [f"  failed: {p}: {why}" for p, why in result.failures]
            lines += [f"  skipped: {p}: {why}" for p, why in result.skipped]
        elif stage == "extract":
            _, world = rank_and_world()
            # Several ranks: claim shards dynamically, so that every rank returns only when every shard is
            # done and training starts on complete features.
            summary = run_extract(ws, cfg, force="extract" in force, progress=progress,
                                  dynamic=True if world > 1 else None)
            done = ", ".join(f"{f} {n}/{summary.shards_total}" for f, n in summary.processed.items())
            lines.append(f"extract: shards written this run: {done}")
            failed = failure_summary(extract_states(ws, cfg))
            if failed:
                lines.append("  failed videos by reason (`mcn status` lists them):")
                lines += [f"  {line}" for line in failed]
        elif stage == "train":
            if "train" in force:
                run_dir = train_state(ws, cfg).run_dir
                if run_dir.exists():
                    logger.info("run: --force train: removing %s", run_dir)
                    shutil.rmtree(run_dir)
            result = run_train(ws, cfg, progress=progress)
            losses = ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.losses.items()) if k in
                               ("total", "mms", "cluster", "recon"))
            what = "trained" if result.trained else "done already"
            lines.append(f"train: step {result.step} ({losses}) -> {result.checkpoint} [{what}]")
        elif stage == "evaluate":
            names = [s.name for s in cfg.evaluate.sets] or ["workspace"]
            for name in names:
                metrics = evaluate_set(ws, cfg, name, None, progress=progress)
                cached = " (unchanged since the last evaluation)" if metrics.get("cached") else ""
                if "localization" in metrics:
                    loc = metrics["localization"]
                    lines.append(f"evaluate {name}: step recall {100 * loc['recall']:.1f}% over "
                                 f"{loc['n_videos']} videos{cached}")
                    continue
                lines.append(f"evaluate {name}: {metrics['n_queries']} queries, {metrics['n_videos']} videos{cached}")
                lines.append(format_table(metrics))
                lines += [f"  note: {p}" for p in metrics["problems"]]
                lines.append(f"  report: {ws.eval_report(name)}")
        timings[stage] = time.monotonic() - start
    lines.append("time: " + ", ".join(f"{s} {t:.0f} s" for s, t in timings.items())
                 + f" (total {sum(timings.values()):.0f} s)")
    return "\n".join(lines)
