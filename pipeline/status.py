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
    """Lines for the stages after scan (extended as stages are added)."""
    return []
