"""The manifest, the per-shard caption files and the shard plan written by ``scan``.

``manifest.jsonl`` holds one :class:`VideoRecord` per video in shard-plan order (which video goes
where is :func:`assign_shards`); ``captions/
shard-NNNNNN.jsonl`` one line per video of a shard (``{"id", "captions": [{"start", "end", "text"}]}``,
seconds); ``scan.json`` is the scan's record (:mod:`store.lineage`) whose payload holds the shard plan:
for every shard its index, its number of videos and the fingerprints of its inputs (the identity of
its video files, including size and mtime, and its captions). Downstream stages take their inputs'
fingerprints from the plan, so a video replaced in place (new size or mtime) makes its shards stale
after a re-scan, and ``mcn status`` never needs to read the manifest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store import atomic
from store.layout import Workspace
from store.lineage import fingerprint, read_record


@dataclass
class Caption:
    """One caption segment; times in seconds."""

    start: float
    end: float
    text: str


@dataclass
class VideoRecord:
    id: str
    path: str
    shard: int = -1
    status: str = "ok"  # "ok" | "failed"
    error: str | None = None
    duration: float = 0.0
    fps: float = 0.0
    n_frames: int = 0
    width: int = 0
    height: int = 0
    video_codec: str | None = None
    audio_codec: str | None = None
    has_audio: bool = False
    audio_rate: int | None = None
    audio_channels: int | None = None
    size: int = 0
    mtime_ns: int = 0
    caption_source: str | None = None
    n_captions: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, reason: str) -> VideoRecord:
        self.status = "failed"
        self.error = reason
        return self

    def identity(self) -> list[Any]:
        """What extraction depends on besides the config: the file (path, size, mtime) and its scan."""
        return [self.id, self.path, self.size, self.mtime_ns, self.status, self.error, self.duration,
                self.has_audio]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> VideoRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def manifest_text(records: Iterable[VideoRecord]) -> str:
    return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)


def write_manifest(path: Path, records: Iterable[VideoRecord]) -> bool:
    """Write the manifest unless it already holds exactly these records; True when written."""
    return atomic.write_if_changed(path, manifest_text(records))


def iter_manifest(path: Path) -> Iterator[VideoRecord]:
    if not Path(path).exists():
        raise FileNotFoundError(f"no manifest at {path}: run `mcn scan` first")
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield VideoRecord.from_json(json.loads(line))


def read_manifest(path: Path) -> list[VideoRecord]:
    return list(iter_manifest(path))


def group_by_shard(records: Iterable[VideoRecord]) -> dict[int, list[VideoRecord]]:
    """Shard index → its records in manifest order."""
    shards: dict[int, list[VideoRecord]] = {}
    for r in records:
        shards.setdefault(r.shard, []).append(r)
    return dict(sorted(shards.items()))


def captions_text(items: list[tuple[str, list[Caption]]]) -> str:
    return "".join(json.dumps({"id": vid, "captions": [dataclasses.asdict(c) for c in caps]}, ensure_ascii=False)
                   + "\n" for vid, caps in items)


def write_captions(path: Path, items: list[tuple[str, list[Caption]]]) -> bool:
    """``captions/shard-NNNNNN.jsonl`` (one line per video of the shard, in manifest order), unless it
    already holds exactly this; True when written."""
    return atomic.write_if_changed(path, captions_text(items))


def read_captions(path: Path) -> dict[str, list[Caption]]:
    out: dict[str, list[Caption]] = {}
    if not Path(path).exists():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                data = json.loads(line)
                out[data["id"]] = [Caption(**c) for c in data["captions"]]
    return out


# --------------------------------------------------------------------------------------------------
# The shard plan


def plan_key(video_id: str, seed: int) -> str:
    """Where a new video goes in the plan: a seeded hash of its id (blake2b, 16 hex digits). Sorting
    by it is a seeded permutation that does not depend on paths or on the other videos, so that a
    shard is a uniform sample of the collection however the folders are organised."""
    return hashlib.blake2b(f"{int(seed)}\x1f{video_id}".encode("utf-8", "surrogateescape"),
                           digest_size=8).hexdigest()


def assign_shards(records: list[VideoRecord], previous: dict[str, int], shard_size: int,
                  seed: int) -> list[VideoRecord]:
    """The shard rule of the plan: set ``record.shard`` of every record and return the records in
    plan order (the manifest's order: by shard, and within a shard in the order of the samples).

    A video planned before (``previous``: id → shard, in the order of the manifest on disk) keeps its
    shard and its place, so a re-scan never moves a video and the shards done stay done (a plan made
    under an older rule stays as it is). New videos, in the order of :func:`plan_key` (``seed``: the
    scan's ``plan_seed``), fill the last shard up to ``shard_size`` and then new shards after it. On
    a first scan every video is new: the shards are a seeded random partition of the collection and
    each shard's videos are in a seeded random order, so a shard's first videos are no more
    alike than its last.
    """
    place = {vid: i for i, vid in enumerate(previous)}
    counts: dict[int, int] = {}
    for r in records:
        if r.id in previous:
            r.shard = previous[r.id]
            counts[r.shard] = counts.get(r.shard, 0) + 1
    next_shard = max(counts, default=-1)
    if next_shard < 0 or counts[next_shard] >= shard_size:
        next_shard += 1
    new = sorted((r for r in records if r.id not in previous), key=lambda r: (plan_key(r.id, seed), r.id))
    for i, r in enumerate(new):
        while counts.get(next_shard, 0) >= shard_size:
            next_shard += 1
        r.shard = next_shard
        counts[next_shard] = counts.get(next_shard, 0) + 1
        place[r.id] = len(previous) + i
    return sorted(records, key=lambda r: (r.shard, place[r.id]))


@dataclass(frozen=True)
class PlannedShard:
    """One shard of the plan: its videos' identity and its captions, as fingerprints."""

    index: int
    n_videos: int
    videos: str  # fingerprint of the VideoRecord.identity() of its videos, in order
    captions: str  # fingerprint of its caption file's content

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_shard(index: int, records: list[VideoRecord], captions: list[tuple[str, list[Caption]]]) -> PlannedShard:
    return PlannedShard(index=index, n_videos=len(records),
                        videos=fingerprint([r.identity() for r in records]),
                        captions=fingerprint(captions_text(captions)))


@dataclass(frozen=True)
class ScanState:
    """What ``scan.json`` says: the videos root and the plan (shared between callers: do not modify)."""

    record: dict[str, Any]
    videos_root: Path
    shards: list[PlannedShard]

    @property
    def fingerprint(self) -> str:
        """The scan's output fingerprint: what its downstream stages were made from."""
        return str(self.record.get("output", ""))


def read_scan(ws: Workspace) -> ScanState:
    """The scan record of ``ws``; FileNotFoundError (saying to run `mcn scan`) when there is none.
    Parsed once per version of the file (a plan of 20,000 shards is a few MB of JSON)."""
    try:
        st = os.stat(ws.scan_record)
    except FileNotFoundError:
        raise FileNotFoundError(f"no scan record at {ws.scan_record}: run `mcn scan` first") from None
    return _read_scan(str(ws.scan_record), st.st_mtime_ns, st.st_size, st.st_ino)


@functools.lru_cache(maxsize=8)
def _read_scan(path: str, mtime_ns: int, size: int, inode: int) -> ScanState:
    ws = Workspace(Path(path).parent)
    rec = read_record(ws.scan_record)
    if rec is None or "videos_root" not in rec:
        raise FileNotFoundError(f"no scan record at {ws.scan_record}: run `mcn scan` first")
    shards = [PlannedShard(**s) for s in rec.get("shards", [])]
    return ScanState(record=rec, videos_root=Path(rec["videos_root"]), shards=shards)
