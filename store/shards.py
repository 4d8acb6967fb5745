"""Feature shards: the writer, the done record and the done / stale / missing check.

A shard of one field is ``features/<field>/shard-NNNNNN.tar`` (plain webdataset tar) plus its done
record ``shard-NNNNNN.json``::

    {"unit", "fingerprint", "lineage", "provenance",          (store.lineage)
     "shard", "field", "format",
     "extractor": {"extractor", "version", "weights", "random_weights", "rate", "dim"},
     "dtype": "float16",                                      main array's dtype
     "n_videos", "n_ok", "n_failed",
     "videos": [{"id", "status", "error"}, ...],              in sample order
     "bytes", "sha256"}                                       of the tar

The writer first removes an old record (from then on the shard reads as missing), streams the tar to
a temporary file while hashing it, verifies its claim, renames the tar, then writes the record the
same way. A run killed at any point leaves either the old complete shard or one that reads as
missing, never a half shard that reads as complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from store import atomic
from store.claims import Claim
from store.fields import OK
from store.layout import Workspace
from store.lineage import Lineage, UnitState, make_record, read_record, sha256_file, unit_state

SHARD_FORMAT = "shard-2"


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    array = np.asarray(array)
    np.save(buf, np.ascontiguousarray(array) if array.ndim else array, allow_pickle=False)  # keep 0-d shapes
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()


class _HashingFile:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()


class ShardWriter:
    """Writes one field's shard: :meth:`add` samples in order, then :meth:`commit` (or :meth:`abort`).

    ``extractor``: the field's extractor description (``extractor``, ``version``, ``weights``,
    ``random_weights``, ``rate`` in rows per second or None, ``dim``); ``claim``: the claim on the
    shard's unit, verified before the commit.
    """

    def __init__(self, ws: Workspace, field: str, index: int, lineage: Lineage, extractor: Mapping[str, Any],
                 *, dtype: str = "float16", claim: Claim | None = None) -> None:
        import webdataset as wds

        self.ws, self.field, self.index = ws, field, index
        self.lineage, self.extractor, self.dtype, self.claim = lineage, dict(extractor), dtype, claim
        self.tar_path = ws.shard_tar(field, index)
        self.record_path = ws.shard_record(field, index)
        self.tar_path.parent.mkdir(parents=True, exist_ok=True)
        if claim is not None:
            claim.verify()
        self.record_path.unlink(missing_ok=True)  # from now on the shard reads as missing
        self.tmp = atomic.temp_path(self.tar_path)
        self._fh = _HashingFile(self.tmp)
        self._writer = wds.TarWriter(self._fh, encoder=False, mtime=0.0, user="mcn", group="mcn")
        self.videos: list[dict[str, Any]] = []

    def add(self, key: str, members: Mapping[str, bytes], status: str = OK, error: str | None = None) -> None:
        """One sample: ``members`` maps extension (``json``, ``feat.npy``...) to encoded bytes."""
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot")
        self._writer.write({"__key__": key, **members})
        self.videos.append({"id": key, "status": status, "error": error})

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._fh.close()
            self.tmp.unlink(missing_ok=True)

    def commit(self) -> dict[str, Any]:
        self._writer.close()
        self._fh.close()
        try:
            if self.claim is not None:
                self.claim.verify()
            atomic.commit_file(self.tmp, self.tar_path)
        finally:
            self.tmp.unlink(missing_ok=True)
        n_ok = sum(v["status"] == OK for v in self.videos)
        record = make_record(
            self.ws.shard_unit(self.field, self.index), self.lineage,
            shard=self.index, field=self.field, format=SHARD_FORMAT, extractor=self.extractor,
            dtype=self.dtype, n_videos=len(self.videos), n_ok=n_ok, n_failed=len(self.videos) - n_ok,
            videos=self.videos, bytes=self._fh.size, sha256=self._fh.sha.hexdigest(),
        )
        atomic.write_json(self.record_path, record)
        return record


def shard_problems(ws: Workspace, field: str, index: int, record: Mapping[str, Any], *,
                   verify: bool = False) -> list[str]:
    """What is wrong with a shard's tar given its record: absent, another size, (``verify``) another
    checksum. Empty when the tar is the one the record describes."""
    tar = ws.shard_tar(field, index)
    try:
        size = tar.stat().st_size
    except FileNotFoundError:
        return ["tar missing"]
    if record.get("bytes") != size:
        return [f"tar is {size} bytes, its record says {record.get('bytes')}"]
    if verify and record.get("sha256") != sha256_file(tar):
        return ["tar checksum differs from its record"]
    return []


def shard_state(ws: Workspace, field: str, index: int, lineage: Lineage, *, verify: bool = False,
                record: Mapping[str, Any] | None = None) -> UnitState:
    """done / stale (with reasons) / missing of one field's shard (``record``: already read)."""
    rec = dict(record) if record is not None else read_record(ws.shard_record(field, index))
    if rec is None:
        return UnitState("missing")
    return unit_state(rec, lineage, shard_problems(ws, field, index, rec, verify=verify))
