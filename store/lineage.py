"""Lineage: what every output was made from, and the done / stale / missing decision.

Every unit of work (a shard of one field, the scan, a training run, an evaluation set, the search
index, the demo videos) writes a **record** next to its output::

    {"unit": "features/text/shard-000003", "fingerprint": "...",
     "lineage": {"config": "<fingerprint of the result-determining config>",
                 "code": "<version of the code that makes it>",
                 "inputs": {"<name>": "<fingerprint of that input>", ...}},
     "provenance": {"version", "git_revision", "decoder", "host", "pid", "created"},
     ...the unit's own payload}

A unit is **done** iff its record exists, its ``fingerprint`` equals the fingerprint of the current
:class:`Lineage` and the cheap checks of its output pass (sizes, files present); **stale** when a
record exists but one of these differs, with the reasons (which of config / code / inputs changed);
**missing** without a record. The fingerprint covers only what determines the result: config fields
marked ``metadata=RUNTIME`` (devices, batch sizes, worker counts, progress bars) are left out, so a
move to another machine or batch size keeps every output done.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from store import atomic

#: ``field(default=..., metadata=RUNTIME)``: a config field that changes speed, not results.
RUNTIME: Mapping[str, bool] = {"runtime": True}

DONE, STALE, MISSING = "done", "stale", "missing"


def fingerprint(*parts: Any) -> str:
    """Stable 24-hex hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def config_dict(cfg: Any, *, runtime: bool = False) -> Any:
    """A (nested) config dataclass as plain data (dicts, lists, str for paths). Without ``runtime``
    only its result-determining part: every field but those marked ``metadata=RUNTIME``."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_dict(getattr(cfg, f.name), runtime=runtime) for f in dataclasses.fields(cfg)
                if runtime or not f.metadata.get("runtime")}
    if isinstance(cfg, Mapping):
        return {str(k): config_dict(v, runtime=runtime) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_dict(v, runtime=runtime) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def runtime_fields(cls: type) -> set[str]:
    """Names of the fields of a config dataclass marked ``metadata=RUNTIME``."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime")}


@dataclass(frozen=True)
class Lineage:
    """What a unit's output is made from: config fingerprint, code version, input fingerprints."""

    config: str
    code: str
    inputs: Mapping[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        # sha256 of "config\x1fcode\x1fk=v\x1f...": a plain joined string rather than JSON, and the
        # config/code prefix hashed once (status computes one fingerprint per shard and field).
        h = _prefix(self.config, self.code).copy()
        h.update("".join(f"\x1f{k}={v}" for k, v in sorted(self.inputs.items())).encode())
        return h.hexdigest()[:24]

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "code": self.code, "inputs": dict(sorted(self.inputs.items()))}


@functools.lru_cache(maxsize=64)
def _prefix(config: str, code: str) -> Any:
    return hashlib.sha256(f"{config}\x1f{code}".encode())


def stale_reasons(stored: Mapping[str, Any] | None, current: Lineage) -> list[str]:
    """Why a record of lineage ``stored`` (its ``lineage`` dict) is not of lineage ``current``."""
    if not isinstance(stored, Mapping):
        return ["record has no lineage (made by an older version)"]
    reasons = []
    if stored.get("code") != current.code:
        reasons.append(f"code changed ({stored.get('code')} -> {current.code})")
    if stored.get("config") != current.config:
        reasons.append("config changed")
    old = stored.get("inputs") if isinstance(stored.get("inputs"), Mapping) else {}
    for name in sorted(set(old) | set(current.inputs)):
        if name not in current.inputs:
            reasons.append(f"input {name} no longer used")
        elif name not in old:
            reasons.append(f"new input {name}")
        elif old[name] != current.inputs[name]:
            reasons.append(f"{name} changed")
    return reasons or ["fingerprint differs"]


@dataclass
class UnitState:
    """done / stale / missing, with the reasons for stale, and the record read (if any)."""

    status: Literal["done", "stale", "missing"]
    reasons: list[str] = field(default_factory=list)
    record: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.status == DONE

    def why(self) -> str:
        return "; ".join(self.reasons)


def read_record(path: Path) -> dict[str, Any] | None:
    """A record (any JSON object written by :func:`write_record`), None when absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def unit_state(record: Mapping[str, Any] | None, lineage: Lineage, problems: list[str] | None = None) -> UnitState:
    """The state of a unit from its record, the current lineage and the output checks' problems
    (each a reason to call it stale: a size that differs, a file that is gone)."""
    if record is None:
        return UnitState(MISSING)
    rec = dict(record)
    if problems:
        return UnitState(STALE, list(problems), rec)
    if rec.get("fingerprint") != lineage.fingerprint:
        return UnitState(STALE, stale_reasons(rec.get("lineage"), lineage), rec)
    return UnitState(DONE, [], rec)


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The git revision of the code, when it runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("mcn-pipeline")
    except Exception:  # not installed (a bare checkout on sys.path)
        return "unknown"


def provenance(decoder: str | None = None) -> dict[str, Any]:
    """Who made an output, when and with which code (not part of any fingerprint).

    ``decoder``: the visual decode backend the writer was configured with (``extract.decode.backend``,
    e.g. ``"decord"``), passed in by the caller (the store knows no extractor); None for a writer that
    has no decode configuration (the scan, which probes with ffprobe; the demo videos, which are only
    encoded). Decoders are meant to give the same frames, so it is provenance, not lineage.
    """
    return {
        "version": package_version(),
        "git_revision": git_revision(),
        "decoder": decoder,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def make_record(unit: str, lineage: Lineage, *, decoder: str | None = None, **payload: Any) -> dict[str, Any]:
    """A unit's record: its fingerprint, lineage, :func:`provenance` (with ``decoder``) and payload."""
    return {"unit": unit, "fingerprint": lineage.fingerprint, "lineage": lineage.to_json(),
            "provenance": provenance(decoder), **payload}


def write_record(path: Path, unit: str, lineage: Lineage, *, decoder: str | None = None,
                 **payload: Any) -> dict[str, Any]:
    """Write a unit's record atomically (last, after its output); returns it."""
    record = make_record(unit, lineage, decoder=decoder, **payload)
    atomic.write_json(path, record)
    return record


def remember_identity(path: Path, record: Mapping[str, Any] | None, key: str, ident: Mapping[str, Any]) -> bool:
    """Store a file's new identity in a done record whose lineage did not change (same sha256: the file
    was only touched or moved), so that the next run need not hash it again; True when rewritten."""
    if record is None or record.get(key) == dict(ident):
        return False
    atomic.write_json(path, {**record, key: dict(ident)})
    return True


def file_identity(path: Path, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns", "sha256"}`` of a file. The sha256 of ``previous`` (an identity
    stored earlier) is reused when path, size and mtime are unchanged; otherwise the file is hashed."""
    path = Path(path)
    st = path.stat()
    ident: dict[str, Any] = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if previous and previous.get("sha256") and all(previous.get(k) == ident[k] for k in ("path", "size", "mtime_ns")):
        ident["sha256"] = previous["sha256"]
    else:
        ident["sha256"] = sha256_file(path)
    return ident


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (memoised per process by path, size and mtime)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
