"""`mcn demo-data` through the runner: the synthetic videos are a unit with a lineage like any stage.

The unit is the output folder. Its record (``<out>/.mcn/record.json``, :func:`store.layout.folder_state`)
holds the generator's lineage (the plan-determining config and ``GENERATOR_VERSION``) and the size
and mtime of every file it made, so a re-run with the same config checks stat calls only and writes
nothing; a changed config, or a file removed or replaced, regenerates (the generator then keeps every
video that is still right).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.runner import RunnerConfig, Workers, run_unit
from store.claims import Claim
from store.layout import folder_state
from store.lineage import Lineage, UnitState, fingerprint, read_record, unit_state, write_record
from synthetic import GENERATOR_VERSION, DemoDataConfig, DemoDataSummary, generate_demo_data

logger = logging.getLogger(__name__)

UNIT = "demo-data"


def demo_lineage(cfg: DemoDataConfig) -> Lineage:
    return Lineage(config=fingerprint(cfg.plan_dict()), code=f"demo-data-{GENERATOR_VERSION}")


def _files(cfg: DemoDataConfig, summary: DemoDataSummary) -> list[list[Any]]:
    out = []
    for mp4 in summary.train_videos + summary.heldout_videos:
        for p in (mp4, mp4.with_suffix(".srt")):
            st = p.stat()
            out.append([p.relative_to(cfg.out_dir).as_posix(), st.st_size, st.st_mtime_ns])
    st = summary.index_path.stat()
    out.append([summary.index_path.relative_to(cfg.out_dir).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def demo_state(cfg: DemoDataConfig) -> UnitState:
    record = read_record(folder_state(cfg.out_dir).record)
    problems = []
    for rel, size, mtime in (record or {}).get("files", []):
        try:
            st = (cfg.out_dir / rel).stat()
        except OSError:
            problems.append(f"{rel} is missing")
            break
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            problems.append(f"{rel} changed")
            break
    return unit_state(record, demo_lineage(cfg), problems)


def _summary_from(cfg: DemoDataConfig, record: dict[str, Any]) -> DemoDataSummary:
    s = record["summary"]
    return DemoDataSummary(
        out_dir=cfg.out_dir, index_path=cfg.out_dir / s["index"],
        train_videos=[cfg.out_dir / p for p in s["train_videos"]],
        heldout_videos=[cfg.out_dir / p for p in s["heldout_videos"]],
        heldout_combinations=[tuple(c) for c in s["heldout_combinations"]], n_generated=0,
        n_skipped=len(s["train_videos"]) + len(s["heldout_videos"]), seconds_train=s["seconds_train"],
        seconds_heldout=s["seconds_heldout"], elapsed_s=0.0, n_segments=s["n_segments"])


def make_demo_data(cfg: DemoDataConfig, runner: RunnerConfig | None = None) -> DemoDataSummary:
    """Generate (or complete) the demo videos unless the folder's record says they are current."""
    t0 = time.perf_counter()
    workers = Workers(folder_state(cfg.out_dir), runner)
    lineage = demo_lineage(cfg)

    def work(claim: Claim, st: UnitState) -> DemoDataSummary:
        if st.status == "stale":
            logger.info("demo-data: %s", st.why())
        summary = generate_demo_data(cfg)
        claim.verify()
        rel = lambda p: p.relative_to(cfg.out_dir).as_posix()  # noqa: E731
        write_record(folder_state(cfg.out_dir).record, UNIT, lineage, files=_files(cfg, summary), summary={
            "index": rel(summary.index_path), "train_videos": [rel(p) for p in summary.train_videos],
            "heldout_videos": [rel(p) for p in summary.heldout_videos],
            "heldout_combinations": [list(c) for c in summary.heldout_combinations],
            "seconds_train": summary.seconds_train, "seconds_heldout": summary.seconds_heldout,
            "n_segments": summary.n_segments})
        return summary

    st, summary = run_unit(workers, UNIT, lambda: demo_state(cfg), work)
    if summary is None:
        summary = _summary_from(cfg, st.record or {})
        summary.elapsed_s = time.perf_counter() - t0
        logger.info("demo data in %s: %d videos, unchanged", cfg.out_dir, summary.n_videos)
    return summary


__all__ = ["demo_lineage", "demo_state", "make_demo_data"]
