"""`mcn status`: what every stage has done in a workspace."""

from __future__ import annotations

import json

from pipeline.config import Config
from pipeline.manifest import iter_manifest
from pipeline.workspace import Workspace


def print_status(ws: Workspace, cfg: Config) -> int:
    if not ws.manifest.exists():
        print(f"{ws.root}: no manifest yet (run `mcn scan`)")
        return 0
    records = list(iter_manifest(ws.manifest))
    failed = [r for r in records if not r.ok]
    summary = json.loads(ws.scan_summary.read_text()) if ws.scan_summary.exists() else {}
    n_shards = len({r.shard for r in records})
    print(f"scan     {len(records)} videos, {len(records) - len(failed)} ok, {len(failed)} failed, "
          f"{n_shards} shards (videos root {summary.get('videos_root', '?')})")
    for r in failed:
        print(f"  failed  {r.path}: {r.error}")
    for line in stage_lines(ws, cfg, records):
        print(line)
    return 0


def stage_lines(ws: Workspace, cfg: Config, records: list) -> list[str]:
    """extract: done / stale / missing shards per field (stale = made with another config) and the
    videos that failed; train: the latest checkpoint; evaluate: the sets with metrics."""
    from pipeline.runner import field_status
    from pipeline.stages import extract_stage, shard_jobs

    lines: list[str] = []
    stage = extract_stage(ws, cfg)
    for st in field_status(stage, ws, shard_jobs(ws)):
        lines.append(f"extract  {st.field:<8} done {st.done}, stale {st.stale}, missing {st.missing}"
                     f"  ({stage.describe(st.field)['extractor']})")
        for vid, why in st.failed:
            lines.append(f"  {why.split(':')[0]:<11} {vid}: {why.split(': ', 1)[-1]}")
    runs = sorted((ws.root / "runs").glob("*/checkpoints/latest")) if (ws.root / "runs").exists() else []
    for pointer in runs:
        lines.append(f"train    run {pointer.parent.parent.name}: latest checkpoint {pointer.read_text().strip()}")
    if not runs:
        lines.append("train    no checkpoint yet")
    for metrics in sorted((ws.root / "eval").glob("*/metrics.json")) if (ws.root / "eval").exists() else []:
        data = json.loads(metrics.read_text())
        t2v = data.get("retrieval", {}).get("text_to_video", {})
        lines.append(f"evaluate {metrics.parent.name}: {data.get('n_queries')} queries, text->video "
                     f"R@1 {100 * t2v.get('R@1', float('nan')):.1f}% R@5 {100 * t2v.get('R@5', float('nan')):.1f}%")
    return lines
