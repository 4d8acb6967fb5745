"""The workspace layout (see docs/formats.md): every path a stage reads or writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FIELDS = ("video2d", "video3d", "audio", "text")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def scan_summary(self) -> Path:
        return self.root / "scan.json"

    @property
    def probe_cache(self) -> Path:
        return self.root / "cache" / "probe.jsonl"

    @property
    def captions_dir(self) -> Path:
        return self.root / "captions"

    def captions(self, shard: int) -> Path:
        return self.captions_dir / f"{shard_name(shard)}.jsonl"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def field_dir(self, field: str) -> Path:
        return self.features_dir / field

    def shard_tar(self, field: str, shard: int) -> Path:
        return self.field_dir(field) / f"{shard_name(shard)}.tar"

    def shard_record(self, field: str, shard: int) -> Path:
        return self.field_dir(field) / f"{shard_name(shard)}.json"

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def eval_dir(self, name: str) -> Path:
        return self.root / "eval" / name

    @property
    def scratch(self) -> Path:
        return self.root / "tmp"
