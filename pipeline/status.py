"""`mcn status`: done / stale / missing for every stage of a workspace, with the reasons.

By default only cheap checks run: records, fingerprints, file sizes. ``--verify`` also re-walks the
videos folder (new, removed or replaced files) and checks the shards' checksums.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config
from store.layout import Workspace
from store.lineage import read_record
from store.manifest import read_scan

logger = logging.getLogger(__name__)


@dataclass
class StageLine:
    stage: str
    name: str
    status: str  # done | stale | missing | failed | note
    detail: str = ""
    items: list[str] = field(default_factory=list)  # indented lines below (failed videos...)

    def render(self, width: int = 10) -> list[str]:
        head = f"{self.stage:<9} {self.name:<{width}} {self.status:<8} {self.detail}".rstrip()
        return [head] + [f"    {x}" for x in self.items]


def workspace_status(ws: Workspace, cfg: Config, *, verify: bool = False, max_items: int = 20) -> list[StageLine]:
    """The state of every stage: scan, extract (per field), train (the run of the current config and
    features, and the other runs kept beside it), evaluate (per configured set)."""
    from pipeline.evaluate import eval_lineage, eval_state
    from pipeline.evalsets import find_set
    from pipeline.scan import list_inputs, scan_state
    from pipeline.stages import extract_states
    from pipeline.training import train_state

    lines: list[StageLine] = []
    try:
        scan = read_scan(ws)
    except FileNotFoundError:
        return [StageLine("scan", "", "missing", "no scan yet: run `mcn scan --videos DIR` (or `mcn run`)")]
    rec = scan.record
    listing = list_inputs(scan.videos_root, cfg.scan)[1] if verify and scan.videos_root.is_dir() else None
    st = scan_state(ws, scan.videos_root, cfg.scan, listing)
    detail = (f"{rec.get('n_videos')} videos ({rec.get('n_ok')} ok, {rec.get('n_failed')} failed) in "
              f"{rec.get('n_shards')} shards from {scan.videos_root}")
    if st.status == "stale":
        detail += f"; {st.why()}"
    elif not verify:
        detail += " (--verify re-walks the videos folder)"
    failures = [f"failed  {p}: {w}" for p, w in rec.get("failures", [])]
    failures += [f"skipped {p}: {w}" for p, w in rec.get("skipped", [])]
    lines.append(StageLine("scan", "", st.status, detail, _cap(failures, max_items)))

    try:
        fields = extract_states(ws, cfg, verify=verify)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:  # e.g. an extractor's weights are missing
        lines.append(StageLine("extract", "", "unknown", f"cannot describe the extractors: {exc}"))
        lines.append(StageLine("train", cfg.evaluate.run, "unknown", "waiting on extract"))
        return lines
    n_shards = len(scan.shards)
    for f, fs in fields.items():
        status = "done" if fs.complete else ("stale" if fs.stale else "missing")
        detail = f"{fs.done}/{n_shards} done" + (f", {fs.stale} stale" if fs.stale else "") + \
            (f", {fs.missing} missing" if fs.missing else "") + f"  ({fs.extractor})"
        if fs.reasons:
            detail += ": " + "; ".join(f"{r} ({n})" for r, n in sorted(fs.reasons.items()))
        items = [f"{s:<11} {vid}: {why}" + (" (transient: --retry-failed redoes it)" if transient else "")
                 for vid, s, why, transient in fs.failed]
        lines.append(StageLine("extract", f, status, detail, _cap(items, max_items)))

    ts = train_state(ws, cfg, extract=fields)
    name = ts.run_dir.name
    if ts.upstream:
        status, detail = ("stale" if ts.state.record is not None else "missing"), "waiting on " + "; ".join(ts.upstream)
    else:
        status = ts.state.status
        rec = ts.state.record or {}
        if ts.state.done:
            detail = f"step {rec.get('step')}, checkpoint {rec.get('checkpoint')}"
        elif ts.state.status == "stale":
            detail = ts.state.why()
        else:
            detail = "not trained yet"
    lines.append(StageLine("train", name, status, detail))
    for other in ws.run_names():
        if other == name:
            continue
        orec = read_record(ws.run_record(ws.run_dir(other)))
        if orec is None:
            continue
        lines.append(StageLine("train", other, "kept", f"another lineage (step {orec.get('step')}); not used"))

    names = [s.name for s in cfg.evaluate.sets] or ["workspace"]
    for set_name in names:
        spec = find_set(cfg.evaluate, set_name)
        record = read_record(ws.eval_record(set_name))
        if not ts.state.done or ts.upstream or ts.checkpoint is None:
            lines.append(StageLine("evaluate", set_name, "stale" if record else "missing", f"waiting on train {name}"))
            continue
        set_ws = ws.evalset(spec.name) if spec.videos else ws
        try:
            from store.reader import open_features

            if spec.videos and set_ws.scan_record.exists():
                upstream = [f"{f}: {fs.stale} stale, {fs.missing} missing" for f, fs in
                            extract_states(set_ws, cfg).items() if not fs.complete]
            elif spec.videos:
                upstream = ["the set's videos are not scanned yet"]
            else:
                upstream = []
            if upstream:
                lines.append(StageLine("evaluate", set_name, "stale" if record else "missing",
                                       "the set's features are not current: " + "; ".join(upstream)))
                continue
            features = ts.features if set_ws == ws else open_features(set_ws)
            lineage = eval_lineage(ws, cfg, spec, set_name, ts.checkpoint, features)
            est = eval_state(ws, set_name, lineage)
        except (FileNotFoundError, ValueError) as exc:
            lines.append(StageLine("evaluate", set_name, "missing", str(exc)))
            continue
        detail = est.why() if est.status == "stale" else ""
        if est.done:
            metrics = read_record(ws.eval_metrics(set_name)) or {}
            t2v = (metrics.get("retrieval") or {}).get("text_to_video")
            if t2v:
                detail = (f"{metrics.get('n_queries')} queries, text->video R@1 {100 * t2v['R@1']:.1f}% "
                          f"R@5 {100 * t2v['R@5']:.1f}%")
            elif metrics.get("localization"):
                detail = f"step recall {100 * metrics['localization']['recall']:.1f}%"
        lines.append(StageLine("evaluate", set_name, est.status, detail))
    return lines


def _cap(items: list[str], n: int) -> list[str]:
    return items if len(items) <= n else items[:n] + [f"... and {len(items) - n} more"]


def print_status(ws: Workspace, cfg: Config, *, verify: bool = False) -> int:
    from pipeline.terminal import terminal_safe

    print(terminal_safe(f"workspace {Path(ws.root).resolve()}"))
    lines = workspace_status(ws, cfg, verify=verify)
    width = max([len(x.name) for x in lines] + [8])
    for line in lines:
        for text in line.render(width):
            print(terminal_safe(text))  # file names and reasons come from the data
    return 0
