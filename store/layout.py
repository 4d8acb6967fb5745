"""The workspace layout: every path a stage reads or writes, and the only listings of the workspace.

::

    WS/manifest.jsonl                      one record per video (scan)
    WS/scan.json                           scan record: lineage, videos root, the shard plan
    WS/scan.config.yaml                    resolved scan config
    WS/captions/shard-NNNNNN.jsonl         normalised captions of the videos of one shard (scan)
    WS/cache/probe.jsonl                   ffprobe results keyed by (path, size, mtime) (scan)
    WS/cache/records/<field>.json          record index: a cache of a field's done-record summaries
    WS/features/<field>/shard-NNNNNN.tar   webdataset shard of one field (extract)
    WS/features/<field>/shard-NNNNNN.json  its done record (lineage, extractor, rate, dim, dtype, videos)
    WS/features/<field>/config.yaml        resolved extract config of that field
    WS/runs/<run>/record.json              training record: lineage (config, code, features), progress
    WS/runs/<run>/config.yaml              resolved training config (written once, at creation)
    WS/runs/<run>/checkpoints/step-NNNNNN.pt, latest
    WS/runs/<run>/logs/train.jsonl         + TensorBoard event files
    WS/eval/<set>/record.json              evaluation record: lineage (config, checkpoint, features)
    WS/eval/<set>/{metrics.json, report.html, embeddings.npz, config.yaml}
    WS/evalsets/<set>/                     an evaluation set's own workspace (scan + extract),
                                           with annotations.json: its benchmark annotations as captions
    WS/cache/search/                       search index: record.json, index.json, video/audio/audio_mask.npy
    WS/locks/<unit>.lock                   claims (advisory locks naming their owner)
    WS/locks/owners/<token>.json           registry of the processes working on the workspace
    WS/tmp/<token>/                        scratch space of one process

A generated folder that is not a workspace (``mcn demo-data``) keeps its record and claims in
``<folder>/.mcn/`` (:func:`folder_state`).

A run directory is ``runs/<name>`` for the first lineage trained under that name; a run of another
lineage (changed config or features) is trained beside it in ``runs/<name>-<fingerprint[:8]>``, so a
stale run is never overwritten (:meth:`Workspace.run_dirs`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from store.fields import check_field

_SHARD_RE = re.compile(r"^shard-([0-9]{6,})\.(tar|json|jsonl)$")
_CKPT_RE = re.compile(r"^step-([0-9]{6,})\.pt$")
LATEST = "latest"  # checkpoints/latest names the newest checkpoint file


def shard_name(index: int) -> str:
    """``shard-000123``: the stem of every file of shard ``index``."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"shard-{index:06d}"


def shard_index(name: str, suffix: str = "tar") -> int | None:
    """The index of a shard file name (``shard-000123.tar`` → 123), None for any other name."""
    # string tests first: a listing of 20,000 shards calls this 40,000 times
    if not (name.startswith("shard-") and name.endswith(suffix) and name[-len(suffix) - 1] == "."):
        return None
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m and m.group(2) == suffix else None


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}.pt"


def checkpoint_step(name: str) -> int | None:
    m = _CKPT_RE.match(name)
    return int(m.group(1)) if m else None


def find_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-*.pt`` files of a checkpoint folder, sorted by step."""
    if not Path(ckpt_dir).is_dir():
        return []
    out = [(step, Path(e.path)) for e in os.scandir(ckpt_dir) if (step := checkpoint_step(e.name)) is not None]
    return sorted(out)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The file named by ``checkpoints/latest``, else the newest ``step-*.pt``; None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    try:
        named = ckpt_dir / pointer.read_text().strip()
        if named.is_file():
            return named
    except (FileNotFoundError, IsADirectoryError):
        pass
    found = find_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


@dataclass(frozen=True)
class Workspace:
    """The folder of one workspace; every path below it comes from here."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- scan -------------------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def scan_record(self) -> Path:
        return self.root / "scan.json"

    @property
    def scan_config(self) -> Path:
        return self.root / "scan.config.yaml"

    @property
    def probe_cache(self) -> Path:
        return self.root / "cache" / "probe.jsonl"

    @property
    def captions_dir(self) -> Path:
        return self.root / "captions"

    def captions(self, shard: int) -> Path:
        return self.captions_dir / f"{shard_name(shard)}.jsonl"

    def caption_shards(self) -> list[int]:
        """Indices of the caption files present, sorted."""
        return _indices(self.captions_dir, "jsonl")

    # -- extract ----------------------------------------------------------------------------------
    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def field_dir(self, field: str) -> Path:
        return self.features_dir / check_field(field)

    def shard_tar(self, field: str, shard: int) -> Path:
        return self.field_dir(field) / f"{shard_name(shard)}.tar"

    def shard_record(self, field: str, shard: int) -> Path:
        return self.field_dir(field) / f"{shard_name(shard)}.json"

    def field_index(self, field: str) -> Path:
        """The record index of a field (store.index: a cache of its done records' summaries); outside
        the field's folder, whose modification time the index relies on."""
        return self.root / "cache" / "records" / f"{check_field(field)}.json"

    def field_config(self, field: str) -> Path:
        return self.field_dir(field) / "config.yaml"

    def shard_indices(self, field: str, suffix: str = "json") -> list[int]:
        """Indices of a field's shard files with this suffix (``json``: done records), sorted."""
        return _indices(self.field_dir(field), suffix)

    def shard_unit(self, field: str, shard: int) -> str:
        return f"features/{check_field(field)}/{shard_name(shard)}"

    # -- train ------------------------------------------------------------------------------------
    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad run name {name!r}")
        return self.runs_dir / name

    def run_dirs(self, name: str, fingerprint: str) -> list[Path]:
        """Where the run ``name`` of lineage ``fingerprint`` may live, in the order to look:
        ``runs/<name>``, then ``runs/<name>-<fingerprint[:8]>``."""
        return [self.run_dir(name), self.run_dir(f"{name}-{fingerprint[:8]}")]

    def run_names(self) -> list[str]:
        return _subdirs(self.runs_dir)

    def runs_of(self, name: str) -> list[Path]:
        """Every run folder of run ``name``, whatever its lineage: ``runs/<name>`` and the
        ``runs/<name>-<fingerprint[:8]>`` beside it (see :meth:`run_dirs`)."""
        pattern = re.compile(re.escape(name) + r"(-[0-9a-f]{8})?")
        return [self.run_dir(n) for n in self.run_names() if pattern.fullmatch(n)]

    @staticmethod
    def run_record(run_dir: Path) -> Path:
        return Path(run_dir) / "record.json"

    @staticmethod
    def run_config(run_dir: Path) -> Path:
        return Path(run_dir) / "config.yaml"

    @staticmethod
    def checkpoints_dir(run_dir: Path) -> Path:
        return Path(run_dir) / "checkpoints"

    @staticmethod
    def logs_dir(run_dir: Path) -> Path:
        return Path(run_dir) / "logs"

    @staticmethod
    def train_log(run_dir: Path) -> Path:
        return Path(run_dir) / "logs" / "train.jsonl"

    def run_unit(self, run_dir: Path) -> str:
        return f"runs/{Path(run_dir).name}"

    # -- evaluate ---------------------------------------------------------------------------------
    @property
    def eval_root(self) -> Path:
        return self.root / "eval"

    def eval_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad evaluation set name {name!r}")
        return self.eval_root / name

    def eval_record(self, name: str) -> Path:
        return self.eval_dir(name) / "record.json"

    def eval_metrics(self, name: str) -> Path:
        return self.eval_dir(name) / "metrics.json"

    def eval_report(self, name: str) -> Path:
        return self.eval_dir(name) / "report.html"

    def eval_embeddings(self, name: str) -> Path:
        return self.eval_dir(name) / "embeddings.npz"

    def eval_config(self, name: str) -> Path:
        return self.eval_dir(name) / "config.yaml"

    def eval_names(self) -> list[str]:
        return _subdirs(self.eval_root)

    def eval_unit(self, name: str) -> str:
        return f"eval/{self.eval_dir(name).name}"

    @property
    def annotation_captions(self) -> Path:
        """An evaluation set's benchmark annotations as a caption file for its scan."""
        return self.root / "annotations.json"

    def evalset(self, name: str) -> "Workspace":
        """The workspace of an evaluation set's own videos (scanned and extracted like this one)."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad evaluation set name {name!r}")
        return Workspace(self.root / "evalsets" / name)

    # -- caches -----------------------------------------------------------------------------------
    @property
    def record(self) -> Path:
        """The record of a folder tracked by :func:`folder_state`."""
        return self.root / "record.json"

    @property
    def search_cache(self) -> Path:
        return self.root / "cache" / "search"

    @property
    def search_record(self) -> Path:
        return self.search_cache / "record.json"

    search_unit = "cache/search"

    # -- many writers -----------------------------------------------------------------------------
    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    def lock(self, unit: str) -> Path:
        """The claim file of a unit of work (``features/video2d/shard-000001``, ``runs/default``...)."""
        parts = unit.split("/")
        if not unit or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad unit name {unit!r}")
        return self.locks_dir.joinpath(*parts[:-1], parts[-1] + ".lock")

    @property
    def owners_dir(self) -> Path:
        return self.locks_dir / "owners"

    @property
    def scratch_root(self) -> Path:
        return self.root / "tmp"

    def scratch(self, token: str) -> Path:
        """Scratch folder of the process whose owner token is ``token`` (see :mod:`store.owner`)."""
        return self.scratch_root / token

    def temp_folders(self) -> Iterator[Path]:
        """Folders where writers leave temporary files (swept by :func:`store.atomic.sweep_temps`)."""
        yield self.root
        for folder in (self.captions_dir, self.root / "cache", self.root / "cache" / "records", self.search_cache):
            yield folder
        for parent in (self.features_dir, self.eval_root):
            for name in _subdirs(parent):
                yield parent / name
        for name in self.run_names():
            run = self.run_dir(name)
            yield from (run, self.checkpoints_dir(run), self.logs_dir(run))


def folder_state(folder: Path) -> Workspace:
    """The bookkeeping of a generated folder that is not a workspace (the demo videos): its record
    (``<folder>/.mcn/record.json``) and its claims live in the hidden ``<folder>/.mcn``, which ``scan``
    never walks."""
    return Workspace(Path(folder) / ".mcn")


def _indices(folder: Path, suffix: str) -> list[int]:
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        return []
    with entries:
        return sorted(i for e in entries if (i := shard_index(e.name, suffix)) is not None)


def _subdirs(folder: Path) -> list[str]:
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        return []
    with entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
