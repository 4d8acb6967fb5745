"""Feature shards: the writer, the done record and the done / stale / missing check.

A shard of one field is ``features/<field>/shard-NNNNNN.tar`` (plain webdataset tar) plus its done
record ``shard-NNNNNN.json``::

    {"unit", "fingerprint", "lineage", "provenance",          (store.lineage)
     "shard", "field", "format",
     "extractor": {"extractor", "version", "weights", "random_weights", "rate", "dim"},
     "dtype": "float16",                                      main array's dtype
     "n_videos", "n_ok", "n_failed",
     "videos": [{"id", "status", "error"[, "transient": true]}, ...],   in sample order
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
from store.index import RecordSummary
from store.lineage import DONE, MISSING, STALE, Lineage, UnitState, make_record, read_record, sha256_file, stale_reasons

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
    shard's unit, verified before the commit; ``decoder``: the configured decode backend, recorded in
    the done record's provenance.
    """

    def __init__(self, ws: Workspace, field: str, index: int, lineage: Lineage, extractor: Mapping[str, Any],
                 *, dtype: str = "float16", claim: Claim | None = None, decoder: str | None = None) -> None:
        import webdataset as wds

        self.ws, self.field, self.index = ws, field, index
        self.lineage, self.extractor, self.dtype, self.claim = lineage, dict(extractor), dtype, claim
        self.decoder = decoder
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

    def add(self, key: str, members: Mapping[str, bytes], status: str = OK, error: str | None = None,
            transient: bool = False) -> None:
        """One sample: ``members`` maps extension (``json``, ``feat.npy``...) to encoded bytes.
        ``transient``: a failure that may not happen again (a timeout, a crashed worker, out of
        memory): ``mcn extract --retry-failed`` redoes such videos."""
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot")
        self._writer.write({"__key__": key, **members})
        entry: dict[str, Any] = {"id": key, "status": status, "error": error}
        if transient:
            entry["transient"] = True
        self.videos.append(entry)

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
            self.ws.shard_unit(self.field, self.index), self.lineage, decoder=self.decoder,
            shard=self.index, field=self.field, format=SHARD_FORMAT, extractor=self.extractor,
            dtype=self.dtype, n_videos=len(self.videos), n_ok=n_ok, n_failed=len(self.videos) - n_ok,
            videos=self.videos, bytes=self._fh.size, sha256=self._fh.sha.hexdigest(),
        )
        atomic.write_json(self.record_path, record)
        return record


def check_shard(ws: Workspace, field: str, index: int, lineage: Lineage, summary: RecordSummary | None,
                tar_size: int | None, *, verify: bool = False) -> UnitState:
    """done / stale (with reasons) / missing of one field's shard from its record's summary and its
    tar's size (``None``: absent). ``verify`` also compares the tar's sha256 with the record's."""
    if summary is None:
        return UnitState(MISSING)
    if tar_size is None:
        return UnitState(STALE, ["tar missing"])
    if summary.bytes != tar_size:
        return UnitState(STALE, [f"tar is {tar_size} bytes, its record says {summary.bytes}"])
    if verify and summary.sha256 != sha256_file(ws.shard_tar(field, index)):
        return UnitState(STALE, ["tar checksum differs from its record"])
    if summary.fingerprint == lineage.fingerprint:
        return UnitState(DONE)
    record = read_record(ws.shard_record(field, index))  # only now: its lineage says why
    return UnitState(STALE, stale_reasons((record or {}).get("lineage"), lineage), record)


def shard_state(ws: Workspace, field: str, index: int, lineage: Lineage, *, verify: bool = False) -> UnitState:
    """done / stale (with reasons) / missing of one field's shard, read from its files."""
    record = read_record(ws.shard_record(field, index))
    summary = RecordSummary.of(record, {}) if record is not None else None
    try:
        size: int | None = ws.shard_tar(field, index).stat().st_size
    except FileNotFoundError:
        size = None
    state = check_shard(ws, field, index, lineage, summary, size, verify=verify)
    state.record = record
    return state
