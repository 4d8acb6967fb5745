"""The record index of a field: what every done record says, read from one file instead of N.

``mcn status``, the start of training and every evaluation look at every done record of every field:
at HowTo100M scale 4 x 20,000 small JSON files, seconds to parse. The index
``cache/records/<field>.json`` keeps a slim summary of each record (fingerprint, tar bytes and
sha256, extractor, video count and the videos that are not ``ok``) keyed by the record file's
(mtime_ns, size, inode). A reader lists the folder once (``scandir``: the tars' sizes come with it),
takes the summary of every record whose stat is unchanged and reads only the others. Records are
replaced by rename, so a new record always has a new inode: a stale summary is never served.

The folder's own (mtime, inode) is kept too. Every writer creates, replaces or removes records by
rename or unlink, which changes the folder's mtime: while it is unchanged the records' summaries are
taken without a stat of each record (the tars are still stat'ed: their sizes are checked every time).
As in git's "racy" rule, a folder modified less than ``RACY_S`` seconds before it was listed is not
trusted this way (file system timestamps are coarse): the next reader stats every record.

The index is a cache, rewritten (atomically, last writer wins) only when something changed; deleting
it is always safe.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from store import atomic
from store.fields import OK
from store.layout import Workspace
from store.lineage import read_record

logger = logging.getLogger(__name__)

INDEX_VERSION = 4
RACY_S = 2.0


class RecordSummary(NamedTuple):
    """What a shard's done record says, without its per-video list of ``ok`` videos."""

    fingerprint: str
    bytes: int | None
    sha256: str | None
    extractor: str  # the record's extractor description, as canonical JSON (shared between shards)
    n_videos: int
    problems: tuple[tuple[str, str, str, bool], ...]  # (video id, status, error, transient) of those not ok

    @property
    def extractor_dict(self) -> dict[str, Any]:
        return json.loads(self.extractor)

    @classmethod
    def of(cls, record: dict[str, Any], interned: dict[str, str]) -> "RecordSummary | None":
        videos = record.get("videos")
        if not isinstance(videos, list):
            return None
        ex = json.dumps(record.get("extractor") or {}, sort_keys=True)
        ex = interned.setdefault(ex, ex)
        problems = tuple((str(v.get("id")), str(v.get("status")), str(v.get("error")), bool(v.get("transient")))
                         for v in videos if isinstance(v, dict) and v.get("status") != OK)
        return cls(str(record.get("fingerprint")), record.get("bytes"), record.get("sha256"), ex, len(videos),
                   problems)


@dataclass
class FieldRecords:
    """The done records of one field: summaries by shard index, and the size of every tar present."""

    field: str
    records: dict[int, RecordSummary]
    tar_sizes: dict[int, int]


def _shard_file(name: str, suffix: str) -> int | None:
    # ``shard-NNNNNN.<suffix>`` by string tests (this runs for every file of a field); the layout's
    # shard_index agrees on every name (tests/store)
    if name.startswith("shard-") and name.endswith(suffix):
        digits = name[6:-len(suffix)]
        if len(digits) >= 6 and digits.isdigit() and digits.isascii():
            return int(digits)
    return None


def _from_settled_folder(fd: int, cached: dict[str, Any], table: list[str], field: str) -> FieldRecords | None:
    """The records of a folder unchanged since the index was written: summaries from the index, tar
    sizes from a stat of each tar (None when something does not add up: the caller lists the folder)."""
    records: dict[int, RecordSummary] = {}
    tar_sizes: dict[int, int] = {}
    try:
        for name, hit in cached.items():
            i = int(name[6:-5])
            records[i] = RecordSummary(hit[3], hit[4], hit[5], table[hit[6]], hit[7],
                                       tuple(tuple(p) for p in hit[8]) if hit[8] else ())
            try:
                tar_sizes[i] = os.stat(f"{name[:-5]}.tar", dir_fd=fd).st_size
            except FileNotFoundError:
                pass
    except (IndexError, TypeError, ValueError):
        return None
    return FieldRecords(field, records, tar_sizes)


def field_records(ws: Workspace, field: str, *, interned: dict[str, str] | None = None) -> FieldRecords:
    """Every done record of ``field`` (see the module docstring); unreadable records are absent.

    Index file: ``{"version", "folder": [mtime_ns, inode] or null, "extractors": [JSON, ...],
    "entries": {name: [mtime_ns, size, inode, fingerprint, bytes, sha256, extractor number, n_videos,
    [[id, status, error, transient], ...]]}}``.
    """
    folder = ws.field_dir(field)
    interned = {} if interned is None else interned
    path = ws.field_index(field)
    cached: dict[str, Any] = {}
    table: list[str] = []
    known_folder = None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") == INDEX_VERSION:
            cached, table = data["entries"], [interned.setdefault(x, x) for x in data["extractors"]]
            known_folder = data.get("folder")
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    records: dict[int, RecordSummary] = {}
    tar_sizes: dict[int, int] = {}
    entries: dict[str, list[Any]] = {}
    numbers = {ex: k for k, ex in enumerate(table)}
    changed = False
    try:  # listing through a folder descriptor: every stat below is an fstatat of a bare name
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:
        return FieldRecords(field, records, tar_sizes)
    fst = os.fstat(fd)
    folder_key = [fst.st_mtime_ns, fst.st_ino]
    settled = time.time() - fst.st_mtime_ns / 1e9 > RACY_S
    if known_folder == folder_key and cached:
        try:
            out = _from_settled_folder(fd, cached, table, field)
        finally:
            os.close(fd)
        if out is not None:
            return out
        fd = os.open(folder, os.O_RDONLY)
    try:
        listing = os.scandir(fd)
    except OSError:
        os.close(fd)
        raise
    with listing:
        for e in listing:
            name = e.name
            # shard-NNNNNN.tar / shard-NNNNNN.json by string tests (this runs for every file of a field;
            # _shard_file, which the layout's shard_index agrees with, spelled out inline)
            if not name.startswith("shard-"):
                continue
            if name.endswith(".tar"):
                digits = name[6:-4]
                if len(digits) >= 6 and digits.isdigit() and digits.isascii():
                    try:
                        tar_sizes[int(digits)] = e.stat().st_size
                    except FileNotFoundError:
                        pass
                continue
            digits = name[6:-5]
            if not (name.endswith(".json") and len(digits) >= 6 and digits.isdigit() and digits.isascii()):
                continue
            i = int(digits)
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            hit = cached.get(name)
            summary = None
            if hit is not None and hit[0] == st.st_mtime_ns and hit[1] == st.st_size and hit[2] == st.st_ino:
                try:
                    summary = RecordSummary(hit[3], hit[4], hit[5], table[hit[6]], hit[7],
                                            tuple(tuple(p) for p in hit[8]) if hit[8] else ())
                    entries[name] = hit
                except (IndexError, TypeError):
                    summary = None
            if summary is None:
                changed = True
                rec = read_record(folder / name)
                summary = RecordSummary.of(rec, interned) if rec is not None else None
                if summary is None:
                    continue
                if summary.extractor not in numbers:
                    numbers[summary.extractor] = len(table)
                    table.append(summary.extractor)
                entries[name] = [st.st_mtime_ns, st.st_size, st.st_ino, summary.fingerprint, summary.bytes,
                                 summary.sha256, numbers[summary.extractor], summary.n_videos,
                                 [list(p) for p in summary.problems]]
            records[i] = summary
    os.close(fd)
    new_folder = folder_key if settled else None
    if changed or len(entries) != len(cached) or new_folder != known_folder:
        try:
            atomic.write_text(path, json.dumps({"version": INDEX_VERSION, "folder": new_folder, "extractors": table,
                                                "entries": entries}, separators=(",", ":")))
        except OSError as exc:  # a read-only workspace: the index is only a cache
            logger.debug("record index %s not written: %s", path, exc)
    return FieldRecords(field, records, tar_sizes)
