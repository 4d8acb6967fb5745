"""Shard files: atomic webdataset tar writing, done records, fingerprints and safe reading.

A shard is done iff its done record exists and holds the current fingerprint. The writer removes an
old record first, writes the tar to a temporary name, fsyncs and renames it, then writes the record
the same way; a run killed at any point leaves either the old complete state or a shard that reads
as missing, never a half shard that reads as complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds

from pipeline import atomic
from pipeline.workspace import Workspace

logger = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able parts (configs, extractor name/version, weights id, inputs)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def shard_state(ws: Workspace, field: str, index: int, fp: str) -> str:
    """"done", "stale" (record with another fingerprint) or "missing"."""
    record = read_record(ws.shard_record(field, index))
    if record is None or not ws.shard_tar(field, index).exists():
        return "missing"
    return "done" if record.get("fingerprint") == fp else "stale"


@dataclass
class ShardWriter:
    """Writes one field's shard: `add` samples in order, then `commit` (or `abort`)."""

    ws: Workspace
    field: str
    index: int
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tar_path = self.ws.shard_tar(self.field, self.index)
        self.record_path = self.ws.shard_record(self.field, self.index)
        self.tar_path.parent.mkdir(parents=True, exist_ok=True)
        self.record_path.unlink(missing_ok=True)  # from now on the shard reads as missing
        self.tmp = atomic.temp_name(self.tar_path)
        self._fh = open(self.tmp, "wb")
        self._writer = wds.TarWriter(self._fh, encoder=False, mtime=0.0, user="mcn", group="mcn")
        self.videos: list[dict[str, Any]] = []

    def add(self, key: str, members: dict[str, bytes], status: str = "ok", error: str | None = None) -> None:
        """One sample: `members` maps extension (`json`, `feat.npy`, ...) to encoded bytes."""
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot")
        self._writer.write({"__key__": key, **members})
        self.videos.append({"id": key, "status": status, "error": error})

    def abort(self) -> None:
        self._writer.close()
        self.tmp.unlink(missing_ok=True)

    def commit(self) -> dict[str, Any]:
        self._writer.close()  # closes the tar stream and the file object
        atomic.commit_file(self.tmp, self.tar_path)
        n_ok = sum(v["status"] == "ok" for v in self.videos)
        record = {
            "shard": self.index,
            "field": self.field,
            "fingerprint": self.fingerprint,
            "n_videos": len(self.videos),
            "n_ok": n_ok,
            "n_failed": len(self.videos) - n_ok,
            "videos": self.videos,
            "bytes": self.tar_path.stat().st_size,
            "sha256": sha256_file(self.tar_path),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **self.extra,
        }
        atomic.write_json(self.record_path, record)
        return record


def _decode_member(name: str, data: bytes) -> Any:
    ext = name.rsplit(".", 1)[-1]
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "json":
        return json.loads(data)
    if ext == "txt":
        return data.decode("utf-8")
    raise ValueError(f"refusing to decode member type {name!r} (only npy, json, txt)")


def iter_shard(tar_path: Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as dicts `{"__key__": id, "json": {...}, "feat.npy": array, ...}`.

    Uses webdataset's tar grouping; decodes only .npy (no pickle), .json and .txt members.
    """
    for sample in wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False):
        out: dict[str, Any] = {"__key__": sample["__key__"]}
        for name, data in sample.items():
            if name.startswith("__"):
                continue
            out[name] = _decode_member(name, data)
        yield out


def tar_members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tf:
        return tf.getnames()
