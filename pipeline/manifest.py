"""The manifest: one `VideoRecord` per video found by `scan`, in shard-plan order."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from pipeline import atomic


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
    caption_source: str | None = None
    n_captions: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, reason: str) -> "VideoRecord":
        self.status = "failed"
        self.error = reason
        return self

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "VideoRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def write_manifest(path: Path, records: Iterable[VideoRecord]) -> None:
    with atomic.atomic_open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")


def iter_manifest(path: Path) -> Iterator[VideoRecord]:
    if not path.exists():
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


def write_captions(path: Path, items: list[tuple[str, list[Caption]]]) -> None:
    """`captions/shard-NNNNNN.jsonl`: one line per video of the shard, in manifest order."""
    with atomic.atomic_open(path, "w") as fh:
        for vid, caps in items:
            line = {"id": vid, "captions": [dataclasses.asdict(c) for c in caps]}
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")


def read_captions(path: Path) -> dict[str, list[Caption]]:
    out: dict[str, list[Caption]] = {}
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                data = json.loads(line)
                out[data["id"]] = [Caption(**c) for c in data["captions"]]
    return out
