"""The one safe shard reader, the zip of the four fields by key, and the feature set of a workspace.

Safety: only ``.npy`` (no pickle; the header must declare exactly the bytes that follow it, so a
crafted header cannot make a reader allocate more than the member's size), ``.json`` and ``.txt``
members are ever decoded. Everything else is refused.

Rates: a field's rate (rows per second) and dim come from its done records, never from constants of
the code. :func:`open_features` refuses shards of one field that disagree on them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
import zlib
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from store.fields import FIELDS, OK, unusable_reason
from store.index import FieldRecords, field_records
from store.layout import Workspace
from store.lineage import fingerprint, read_record

logger = logging.getLogger(__name__)

MAX_NDIM = 8


class CorruptMember(ValueError):
    """A member whose bytes cannot be what its name says (or that must not be decoded)."""


def decode_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` member as a read-only array, after checking that its header declares exactly the
    bytes that follow it (no object dtypes, at most 8 dims)."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise CorruptMember(f"npy format version {version} not supported")
    except CorruptMember:
        raise
    except (ValueError, EOFError, TypeError, SyntaxError) as exc:
        raise CorruptMember(f"bad npy header: {exc}") from None
    if dtype.hasobject:
        raise CorruptMember("npy holds Python objects (would need pickle)")
    if len(shape) > MAX_NDIM or any(int(n) < 0 for n in shape):
        raise CorruptMember(f"npy header declares an implausible shape {shape}")
    need = math.prod(int(n) for n in shape) * dtype.itemsize
    have = len(data) - fp.tell()
    if need != have:
        raise CorruptMember(f"npy header declares {shape} {dtype} = {need} bytes, the member holds {have}")
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=fp.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def decode_member(name: str, data: bytes) -> Any:
    """Decode one member by its extension: ``npy`` (:func:`decode_npy`), ``json``, ``txt``."""
    ext = name.rsplit(".", 1)[-1]
    if ext == "npy":
        return decode_npy(data)
    if ext == "json":
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptMember(f"bad json: {exc}") from None
    if ext == "txt":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptMember(f"bad text: {exc}") from None
    raise CorruptMember(f"refusing to decode member type {name!r} (only npy, json, txt)")


def _tar_files(tar_path: Path) -> Iterator[dict[str, Any]]:
    """``{"fname", "data", "__url__"}`` of every regular member of an uncompressed tar, in order, each
    read with one ``read`` at its offset. Raises ``tarfile.ReadError`` on a member cut short; when
    that member starts a new sample, an empty dict first tells ``group_by_keys`` that the sample before
    it is whole (webdataset's own iterator loses that sample too).

    Hand-written in place of webdataset's ``tar_file_iterator``, which opens the tar as a stream
    (``"r|*"``) and reads every member in 10 KB blocks joined together: reading and decoding the four
    tars of a video took 6.2 ms that way, 3.3 ms this way (benchmarks/loader.py, BENCHMARKS.md
    "Training data path"). Shards are plain tars on a seekable file (store.shards.ShardWriter). The
    grouping into samples stays webdataset's."""
    from webdataset.tariterators import base_plus_ext  # the key rule of group_by_keys

    key = None
    with open(tar_path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        for info in tar:
            if not info.isreg():
                continue
            fh.seek(info.offset_data)
            data = fh.read(info.size)
            if len(data) != info.size:
                if key is not None and base_plus_ext(info.name)[0] != key:
                    yield {}  # the sample before is complete: deliver it
                raise tarfile.ReadError(f"unexpected end of data in member {info.name!r}")
            key = base_plus_ext(info.name)[0]
            yield {"fname": info.name, "data": data, "__url__": str(tar_path)}


def iter_raw(tar_path: Path) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__": id, "<member>": bytes, ...}`` of one tar, in order (members grouped by
    webdataset's key rule). Raises on a broken tar; a damaged header in the middle of the archive ends
    it there (tarfile's rule)."""
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import group_by_keys

    yield from group_by_keys(_tar_files(tar_path), handler=reraise_exception)


def iter_samples(tar_path: Path) -> Iterator[dict[str, Any]]:
    """Decoded samples of one tar: ``{"__key__": id, "json": {...}, "feat.npy": array, ...}``."""
    for raw in iter_raw(tar_path):
        out: dict[str, Any] = {"__key__": raw["__key__"]}
        for name, data in raw.items():
            if not name.startswith("__"):
                out[name] = decode_member(name, data)
        yield out


# --------------------------------------------------------------------------------------------------
# The feature set of a workspace


@dataclass
class ShardInfo:
    """One shard index of a feature set, with what its done records say (paths made on demand: a
    feature set of 20,000 shards holds no Path objects)."""

    ws: Workspace
    index: int
    fields: tuple[str, ...]
    n_videos: int
    n_usable: int  # videos usable for training according to the done records

    @property
    def paths(self) -> dict[str, Path]:
        """field → its tar."""
        return {f: self.ws.shard_tar(f, self.index) for f in self.fields}

    @property
    def record(self) -> Path:
        """The first field's done record: the order of the samples."""
        return self.ws.shard_record(self.fields[0], self.index)


@dataclass
class FeatureSet:
    """The shards of a workspace complete in every field of ``fields``, with their rates and dims.

    ``rates[field]``: rows per second (None for text), ``dims[field]``: row width,
    ``fingerprints[field]``: hash of the done records (fingerprint, sha256, bytes) of the shards read,
    ``problems``: one line per shard left out (not complete, or a tar that is not its record's).
    """

    ws: Workspace
    fields: tuple[str, ...]
    shards: list[ShardInfo]
    rates: dict[str, float | None]
    dims: dict[str, int | None]
    extractors: dict[str, dict[str, Any]]
    fingerprints: dict[str, str]
    problems: list[str] = field(default_factory=list)

    @property
    def n_usable(self) -> int:
        return sum(s.n_usable for s in self.shards)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.fingerprints)

    def rate(self, f: str) -> float:
        r = self.rates.get(f)
        if r is None or not r > 0:
            raise ValueError(f"field {f} has no rate in its done records ({self.ws.field_dir(f)})")
        return float(r)


def open_features(ws: Workspace, *, fields: Sequence[str] = FIELDS, check_sizes: bool = True,
                  records: dict[str, FieldRecords] | None = None) -> FeatureSet:
    """The shards of ``ws`` whose done records exist for every field of ``fields``.

    A shard missing in some field, or (``check_sizes``) a tar whose size is not its record's, is left
    out, with a line in ``problems``. Shards of one field that disagree on the rate or the dim raise
    ValueError: features made by different extractors cannot be mixed. ``records``: the fields' record
    summaries when the caller has them already (:func:`store.index.field_records`).
    """
    fields = tuple(fields)
    interned: dict[str, str] = {}
    recs = {f: (records or {}).get(f) or field_records(ws, f, interned=interned) for f in fields}
    every = sorted(set().union(*(r.records for r in recs.values()))) if fields else []
    shards: list[ShardInfo] = []
    problems: list[str] = []
    seen: dict[str, dict[str, int]] = {f: {} for f in fields}  # field → extractor JSON → first shard
    parts: dict[str, list[Any]] = {f: [] for f in fields}
    all_fields = set(fields) == set(FIELDS)
    maps = [recs[f].records for f in fields]
    sizes = [recs[f].tar_sizes for f in fields]
    columns = [parts[f] for f in fields]
    firsts = [seen[f] for f in fields]
    for idx in every:
        sums = [m.get(idx) for m in maps]
        if None in sums:
            missing = [f for f, x in zip(fields, sums) if x is None]
            problems.append(f"shard {idx:06d}: no done record for {', '.join(missing)}")
            continue
        bad = None
        for f, summary, size in zip(fields, sums, (z.get(idx) for z in sizes)):
            if size is None:
                bad = f"{f}: tar missing"
            elif check_sizes and summary.bytes != size:
                bad = f"{f}: tar is {size} bytes, its record says {summary.bytes}"
            if bad:
                break
        if bad is not None:
            problems.append(f"shard {idx:06d}: {bad}")
            continue
        unusable: dict[str, dict[str, str]] = {}
        for f, summary, column, first in zip(fields, sums, columns, firsts):
            if summary.extractor not in first:
                first[summary.extractor] = idx
            column.append((idx, summary.fingerprint, summary.sha256, summary.bytes))
            for vid, status, *_ in summary.problems:
                unusable.setdefault(vid, {})[f] = status
        n_videos = max(x.n_videos for x in sums)
        # a video not listed among a field's problems is ok in it
        bad_videos = sum(unusable_reason({f: s.get(f, OK) for f in FIELDS}) is not None
                         for s in unusable.values()) if unusable else 0
        shards.append(ShardInfo(ws, idx, fields, n_videos, (n_videos - bad_videos) if all_fields else 0))
    extractors: dict[str, dict[str, Any]] = {}
    for f in fields:
        kinds = [json.loads(ex) for ex in seen[f]]
        if len({json.dumps([k.get("rate"), k.get("dim")]) for k in kinds}) > 1:
            listing = "; ".join(f"rate {k.get('rate')} rows/s, dim {k.get('dim')} (e.g. shard {i:06d})"
                                for k, i in zip(kinds, seen[f].values()))
            raise ValueError(f"field {f}: its shards were made by different extractors ({listing}); "
                             f"re-extract the field (`mcn extract --fields {f}`)")
        if kinds:
            extractors[f] = kinds[0]
    for p in problems:
        logger.warning("features %s: %s; left out", ws.features_dir, p)
    return FeatureSet(
        ws=ws, fields=fields, shards=shards,
        rates={f: extractors.get(f, {}).get("rate") for f in fields},
        dims={f: extractors.get(f, {}).get("dim") for f in fields},
        extractors=extractors,
        fingerprints={f: fingerprint(parts[f]) for f in fields},
        problems=problems,
    )


# --------------------------------------------------------------------------------------------------
# Zipping the fields of one shard


class _Stream:
    """One field's raw samples; remembers whether it ended on an error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.it = iter_raw(path)
        self.error: Exception | None = None

    def next(self) -> dict[str, Any] | None:
        try:
            return next(self.it)
        except StopIteration:
            return None
        except (tarfile.TarError, OSError, ValueError, EOFError, zlib.error) as exc:
            self.error = exc
            return None


def zip_shard(shard: ShardInfo, counts: MutableMapping[str, int]) -> Iterator[dict[str, dict[str, Any]]]:
    """Yield ``{field: raw sample}`` for the keys present in every field of a shard.

    Merge-join on the order of the shard's done record (its first field's, read now): when heads
    disagree, the heads earliest in that order (unknown keys first) are dropped and counted in
    ``counts["key_mismatch"]``. A tar that breaks mid-way ends the shard (``counts["corrupted_shards"]``).
    """
    paths = shard.paths
    fields = list(paths)
    first = read_record(shard.record) or {}
    videos = first.get("videos") if isinstance(first.get("videos"), list) else []
    order = {str(v.get("id")): i for i, v in enumerate(videos) if isinstance(v, dict)}
    its = {f: _Stream(paths[f]) for f in fields}
    heads = {f: its[f].next() for f in fields}
    while True:
        if any(h is None for h in heads.values()):
            broken = {f: it.error for f, it in its.items() if it.error is not None}
            early = [f for f, h in heads.items() if h is None and f not in broken]
            if broken or any(h is not None for h in heads.values()):
                # a tar that raised, or one that ended before the others (tarfile stops silently on a
                # damaged header in the middle of an archive): the rest of the shard is lost
                counts["corrupted_shards"] = counts.get("corrupted_shards", 0) + 1
                logger.warning("shard %06d: corrupted or truncated field tar(s) %s%s; rest of the shard "
                               "skipped", shard.index, sorted(broken) or early,
                               f" ({next(iter(broken.values()))})" if broken else "")
            return
        keys = {f: h["__key__"] for f, h in heads.items()}  # type: ignore[index]
        if len(set(keys.values())) == 1:
            yield heads  # type: ignore[misc]
            heads = {f: its[f].next() for f in fields}
            continue
        rank = {f: order.get(k, -1) for f, k in keys.items()}
        low = min(rank.values())
        for f in fields:
            if rank[f] == low:
                counts["key_mismatch"] = counts.get("key_mismatch", 0) + 1
                logger.warning("shard %06d: key %r of field %s has no partner in every field; skipped",
                               shard.index, keys[f], f)
                heads[f] = its[f].next()
