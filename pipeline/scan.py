"""`scan`: walk a videos folder into the manifest, the shard plan and per-shard caption files."""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.captions import (
    SIDECAR_SUFFIXES,
    CaptionError,
    clean_captions,
    read_caption_file,
    read_sidecar,
)
from pipeline.probe import ProbeError, probe_video
from pipeline.runner import Workers, run_unit
from store import atomic
from store.claims import Claim
from store.ids import video_id
from store.layout import Workspace
from store.lineage import RUNTIME, Lineage, UnitState, config_dict, fingerprint, make_record, read_record, unit_state
from store.manifest import (
    Caption,
    VideoRecord,
    captions_text,
    group_by_shard,
    iter_manifest,
    manifest_text,
    plan_shard,
    write_captions,
    write_manifest,
)

#: Version of the scan's output in its lineage: bump it when a change alters the manifest or captions.
SCAN_VERSION = "scan-2"

logger = logging.getLogger(__name__)


@dataclass
class ScanConfig:
    extensions: list[str] = field(default_factory=lambda: [".mp4", ".mkv", ".webm", ".avi", ".mov"])
    shard_size: int = 64  # videos per shard (fixed at the first scan; later scans keep the plan)
    probe_workers: int = field(default=8, metadata=RUNTIME)  # concurrent ffprobe processes
    probe_timeout_s: float = field(default=120.0, metadata=RUNTIME)
    captions_file: str | None = None  # HowTo100M-style JSON/CSV: video id or stem → captions
    caption_encodings: list[str] = field(default_factory=list)  # fallbacks when a file is not UTF-8


@dataclass
class ScanResult:
    n_videos: int
    n_ok: int
    n_failed: int
    n_shards: int
    n_probed: int  # probes actually run (the rest came from the cache)
    failures: list[tuple[str, str]]
    up_to_date: bool = False  # the scan was done for exactly these files and config: nothing was written

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ScanResult":
        return cls(n_videos=record["n_videos"], n_ok=record["n_ok"], n_failed=record["n_failed"],
                   n_shards=record["n_shards"], n_probed=0,
                   failures=[(str(p), str(w)) for p, w in record.get("failures", [])], up_to_date=True)


def find_videos(root: Path, extensions: list[str]) -> list[str]:
    """Relative POSIX paths of the video files under `root`, sorted."""
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in exts:
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def find_sidecar(video: Path) -> Path | None:
    for suffix in SIDECAR_SUFFIXES:
        for cand in (video.with_suffix(suffix), video.with_suffix(suffix.upper())):
            if cand.is_file():
                return cand
    return None


class ProbeCache:
    """Append-only JSONL of probe results keyed by (path, size, mtime); tolerates a torn last line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.exists():
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        item = json.loads(line)
                        self.entries[item["key"]] = item
                    except (json.JSONDecodeError, KeyError):
                        continue
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")

    @staticmethod
    def key(abs_path: Path) -> str | None:
        try:
            st = abs_path.stat()
        except OSError:
            return None
        return f"{abs_path}|{st.st_size}|{st.st_mtime_ns}"

    def get(self, key: str | None) -> dict | None:
        return self.entries.get(key) if key else None

    def put(self, key: str | None, item: dict) -> None:
        if key is None:
            return
        item = {"key": key, **item}
        self.entries[key] = item
        self._fh.write(json.dumps(item) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _probe_one(abs_path: Path) -> dict:
    try:
        return {"ok": True, "info": probe_video(abs_path)}
    except ProbeError as exc:
        return {"ok": False, "error": str(exc)}


def probe_all(root: Path, paths: list[str], cache: ProbeCache, cfg: ScanConfig, progress: bool) -> tuple[dict[str, dict], int]:
    """Probe every path (cached ones skipped) with a thread pool and a per-file timeout."""
    results: dict[str, dict] = {}
    todo: list[tuple[str, str | None]] = []
    for rel in paths:
        key = ProbeCache.key(root / rel)
        hit = cache.get(key)
        if hit is not None:
            results[rel] = hit
        else:
            todo.append((rel, key))
    bar = tqdm(total=len(paths), initial=len(results), desc="scan", unit="video", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=max(1, cfg.probe_workers))
    running: dict[Future, tuple[str, str | None, float]] = {}
    queue = list(reversed(todo))
    try:
        while queue or running:
            while queue and len(running) < max(1, cfg.probe_workers):
                rel, key = queue.pop()
                running[pool.submit(_probe_one, root / rel)] = (rel, key, time.monotonic())
            done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
            now = time.monotonic()
            for fut in list(running):
                rel, key, started = running[fut]
                if fut in done:
                    item = fut.result()
                elif now - started > cfg.probe_timeout_s:
                    item = {"ok": False, "error": f"ffprobe timed out after {cfg.probe_timeout_s:.0f} s"}
                else:
                    continue
                del running[fut]
                results[rel] = item
                cache.put(key, item)
                bar.update(1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    return results, len(todo)


def _plan_shards(records: list[VideoRecord], previous: dict[str, int], shard_size: int) -> None:
    """Keep the shard of every video already planned; append new ones after them."""
    counts: dict[int, int] = {}
    for r in records:
        if r.id in previous:
            r.shard = previous[r.id]
            counts[r.shard] = counts.get(r.shard, 0) + 1
    next_shard = max(counts, default=-1)
    if next_shard < 0 or counts[next_shard] >= shard_size:
        next_shard += 1
    for r in records:
        if r.id in previous:
            continue
        while counts.get(next_shard, 0) >= shard_size:
            next_shard += 1
        r.shard = next_shard
        counts[next_shard] = counts.get(next_shard, 0) + 1


def list_inputs(root: Path, cfg: ScanConfig) -> tuple[list[str], list[list[Any]]]:
    """The video files under ``root`` and the identity of each with its side-car captions:
    ``[path, size, mtime_ns, side-car name or None, its size, its mtime_ns]`` (stat calls only)."""
    paths = find_videos(root, cfg.extensions)
    listing: list[list[Any]] = []
    for rel in paths:
        entry: list[Any] = [rel, None, None, None, None, None]
        try:
            st = (root / rel).stat()
            entry[1:3] = [st.st_size, st.st_mtime_ns]
        except OSError:
            pass
        sidecar = find_sidecar(root / rel)
        if sidecar is not None:
            try:
                sst = sidecar.stat()
                entry[3:6] = [sidecar.name, sst.st_size, sst.st_mtime_ns]
            except OSError:
                pass
        listing.append(entry)
    return paths, listing


def _file_stat(path: str | None) -> list[Any] | None:
    if not path:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return [str(Path(path).resolve()), None, None]
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def scan_lineage(root: Path, cfg: ScanConfig, listing: list[list[Any]] | None) -> Lineage:
    """Config (without runtime settings), code, and inputs: the videos root, the identity of every
    video file and side-car (``listing``; None: not walked, only the config is compared) and of the
    captions file."""
    inputs = {"videos_root": fingerprint(str(root)), "captions_file": fingerprint(_file_stat(cfg.captions_file))}
    if listing is not None:
        inputs["videos"] = fingerprint(listing)
    return Lineage(config=fingerprint(config_dict(cfg)), code=SCAN_VERSION, inputs=inputs)


def scan_state(ws: Workspace, root: Path, cfg: ScanConfig, listing: list[list[Any]] | None) -> UnitState:
    """done / stale / missing of the scan of ``root`` into ``ws`` (``listing``: see :func:`scan_lineage`)."""
    record = read_record(ws.scan_record)
    lineage = scan_lineage(root, cfg, listing)
    problems: list[str] = []
    if record is not None:
        if listing is None:  # compare what was not walked with the record's own inputs
            stored = (record.get("lineage") or {}).get("inputs", {})
            if "videos" in stored:
                lineage = Lineage(lineage.config, lineage.code, {**lineage.inputs, "videos": stored["videos"]})
        try:
            size = ws.manifest.stat().st_size
        except FileNotFoundError:
            size = None
        if size != record.get("manifest_bytes"):
            problems.append("manifest missing or changed since the scan")
        elif not {s["index"] for s in record.get("shards", [])} <= set(ws.caption_shards()):
            problems.append("caption files missing")
    return unit_state(record, lineage, problems)


def scan(videos_root: Path, ws: Workspace, cfg: ScanConfig, *, force: bool = False, progress: bool = True,
         workers: Workers | None = None) -> ScanResult:
    """Scan `videos_root` into `ws`: manifest.jsonl, scan.json and captions/shard-*.jsonl.

    The folder is walked (stat calls only) every time; when the files, their side-cars, the captions
    file and the config are the ones of the last scan, nothing is probed and nothing is written.
    """
    root = Path(videos_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"videos folder {root} does not exist or is not a folder")
    ws.root.mkdir(parents=True, exist_ok=True)
    paths, listing = list_inputs(root, cfg)
    workers = workers or Workers(ws)

    def work(claim: Claim, st: UnitState) -> ScanResult:
        if not st.done:
            logger.info("scan: %s", "; ".join(st.reasons) if st.status == "stale" else "first scan")
        workers.sweep()
        return _scan(root, ws, cfg, listing, scan_lineage(root, cfg, listing), force=force, progress=progress,
                     claim=claim)

    st, result = run_unit(workers, "scan", lambda: scan_state(ws, root, cfg, listing), work, force=force)
    if result is None:
        logger.info("scan: %d video files under %s, unchanged since the last scan", len(paths), root)
        return ScanResult.from_record(st.record or {})
    return result


def _scan(root: Path, ws: Workspace, cfg: ScanConfig, listing: list[list[Any]], lineage: Lineage, *,
          force: bool, progress: bool, claim: Claim) -> ScanResult:
    paths = [entry[0] for entry in listing]
    stats = {entry[0]: entry[1:3] for entry in listing}
    if force and ws.probe_cache.exists():
        ws.probe_cache.unlink()
    previous: dict[str, int] = {}
    if ws.manifest.exists() and not force:
        previous = {r.id: r.shard for r in iter_manifest(ws.manifest)}

    caption_map: dict[str, list[Caption]] = {}
    caption_file_error: str | None = None
    if cfg.captions_file:
        try:
            caption_map = read_caption_file(Path(cfg.captions_file), tuple(cfg.caption_encodings))
        except (CaptionError, OSError) as exc:
            caption_file_error = str(exc)
            logger.error("captions file %s unusable: %s", cfg.captions_file, exc)

    logger.info("scan: %d video files under %s", len(paths), root)
    cache = ProbeCache(ws.probe_cache)
    try:
        probes, n_probed = probe_all(root, paths, cache, cfg, progress)
    finally:
        cache.close()

    records: list[VideoRecord] = []
    captions: dict[str, list[Caption]] = {}
    seen: dict[str, str] = {}
    for rel in paths:
        vid = video_id(rel)
        rec = VideoRecord(id=vid, path=rel, size=stats[rel][0] or 0, mtime_ns=stats[rel][1] or 0)
        records.append(rec)
        if vid in seen:
            # Keep ids unique: the loser's id also encodes its extension (still injective).
            rec.id = video_id(rel + ".x")
            rec.fail(f"same name as {seen[vid]} (only the extension differs): id and captions would be ambiguous")
            continue
        seen[vid] = rel
        probe = probes[rel]
        if not probe["ok"]:
            rec.fail(probe["error"])
            continue
        for k, v in probe["info"].items():
            setattr(rec, k, v)
        try:
            caps, source = _captions_for(root / rel, rel, vid, caption_map, cfg, caption_file_error)
        except CaptionError as exc:
            rec.fail(f"captions: {exc}")
            continue
        if caps is None:
            rec.warnings.append("no captions found (side-car .srt/.vtt/.json or captions file)")
            continue
        try:
            kept, warns = clean_captions(caps, rec.duration, source)
        except CaptionError as exc:
            rec.fail(f"captions: {exc}")
            continue
        rec.caption_source, rec.n_captions = source, len(kept)
        rec.warnings.extend(warns)
        captions[vid] = kept

    _plan_shards(records, previous, cfg.shard_size)
    records.sort(key=lambda r: (r.shard, r.path))
    shards = group_by_shard(records)
    items = {index: [(r.id, captions.get(r.id, [])) for r in recs] for index, recs in shards.items()}
    claim.verify()
    # Outputs first (each only if its content changed), the record last: a scan killed midway leaves a
    # record that no longer matches its outputs, i.e. a stale scan, which the next run redoes.
    ws.scan_record.unlink(missing_ok=True)
    write_manifest(ws.manifest, records)
    ws.captions_dir.mkdir(parents=True, exist_ok=True)
    for index, its in items.items():
        write_captions(ws.captions(index), its)
    for stale in ws.caption_shards():
        if stale not in shards:
            ws.captions(stale).unlink()
    failures = [(r.path, r.error or "") for r in records if not r.ok]
    for rel, why in failures:
        logger.warning("scan: %s: %s", rel, why)
    result = ScanResult(
        n_videos=len(records),
        n_ok=len(records) - len(failures),
        n_failed=len(failures),
        n_shards=len(shards),
        n_probed=n_probed,
        failures=failures,
    )
    plan = [plan_shard(index, recs, items[index]).to_json() for index, recs in shards.items()]
    text = manifest_text(records)
    record = make_record(
        "scan", lineage,
        videos_root=str(root), n_videos=result.n_videos, n_ok=result.n_ok, n_failed=result.n_failed,
        n_shards=result.n_shards, shard_size=cfg.shard_size, captions_file=cfg.captions_file,
        captions_file_error=caption_file_error, failures=[list(f) for f in failures], shards=plan,
        manifest_bytes=len(text.encode("utf-8")),
        output=fingerprint(text, [captions_text(items[i]) for i in sorted(items)]),
    )
    atomic.write_json(ws.scan_record, record)
    return result


def _captions_for(
    abs_path: Path,
    rel: str,
    vid: str,
    caption_map: dict[str, list[Caption]],
    cfg: ScanConfig,
    caption_file_error: str | None,
) -> tuple[list[Caption] | None, str]:
    stem = Path(rel).stem
    for key in (vid, rel, str(Path(rel).with_suffix("")), stem):
        if key in caption_map:
            return caption_map[key], f"{Path(cfg.captions_file or '').name}[{key}]"
    sidecar = find_sidecar(abs_path)
    if sidecar is not None:
        return read_sidecar(sidecar, tuple(cfg.caption_encodings)), Path(rel).with_name(sidecar.name).as_posix()
    if caption_file_error:
        raise CaptionError(caption_file_error)
    return None, ""
