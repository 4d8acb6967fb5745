"""`scan`: walk a videos folder into the manifest, the shard plan and per-shard caption files."""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline import atomic
from pipeline.captions import (
    SIDECAR_SUFFIXES,
    CaptionError,
    clean_captions,
    read_caption_file,
    read_sidecar,
)
from pipeline.ids import video_id
from pipeline.manifest import Caption, VideoRecord, group_by_shard, iter_manifest, write_captions, write_manifest
from pipeline.probe import ProbeError, probe_video
from pipeline.workspace import Workspace

logger = logging.getLogger(__name__)


@dataclass
class ScanConfig:
    extensions: list[str] = field(default_factory=lambda: [".mp4", ".mkv", ".webm", ".avi", ".mov"])
    shard_size: int = 64  # videos per shard (fixed at the first scan; later scans keep the plan)
    probe_workers: int = 8  # concurrent ffprobe processes
    probe_timeout_s: float = 120.0
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


def scan(videos_root: Path, ws: Workspace, cfg: ScanConfig, *, force: bool = False, progress: bool = True) -> ScanResult:
    """Scan `videos_root` into `ws`: manifest.jsonl, scan.json and captions/shard-*.jsonl."""
    root = Path(videos_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"videos folder {root} does not exist or is not a folder")
    ws.root.mkdir(parents=True, exist_ok=True)
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

    paths = find_videos(root, cfg.extensions)
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
        rec = VideoRecord(id=vid, path=rel)
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
    write_manifest(ws.manifest, records)
    ws.captions_dir.mkdir(parents=True, exist_ok=True)
    shards = group_by_shard(records)
    for index, recs in shards.items():
        write_captions(ws.captions(index), [(r.id, captions.get(r.id, [])) for r in recs])
    for stale in ws.captions_dir.glob("shard-*.jsonl"):
        if int(stale.stem.split("-")[1]) not in shards:
            stale.unlink()
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
    atomic.write_json(
        ws.scan_summary,
        {
            "videos_root": str(root),
            "n_videos": result.n_videos,
            "n_ok": result.n_ok,
            "n_failed": result.n_failed,
            "n_shards": result.n_shards,
            "shard_size": cfg.shard_size,
            "captions_file": cfg.captions_file,
            "captions_file_error": caption_file_error,
        },
    )
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
