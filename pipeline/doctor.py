"""`mcn doctor`: what a run of a config on this machine will use, and what is missing.

One table: the ffmpeg/ffprobe binaries and their versions, the decoders that import (decord, PyAV,
torchcodec) and the one ``extract.decode.backend`` selects, torch with its CUDA build, the GPUs seen and
bf16 support on CPU and GPU, every weights file the config's extractors need (where it was found, its
sha256 and whether it is the file its name promises), the free disk of the workspace and the rank
variables of torchrun / SLURM / Kubernetes. Each problem that keeps a stage of the config from running
names the stages it blocks and how to get what is missing; :func:`exit_code` is 1 when there is one.

The checks ask the modules that own each rule: weights are looked up by
:func:`extractors.weights.locate_weights` (and described by the extractor itself when it has no single
file), the rank variables are read by :func:`pipeline.ranks.rank_and_world`, CPU bf16 by
:func:`extractors.precision.cpu_has_bf16`. Weights are hashed once per (path, size, mtime): the
sha256 are remembered in :func:`sha256_cache_path` (the only user of that file is this module).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.terminal import terminal_safe
from store import atomic
from store.fields import VISUAL_FIELDS
from store.layout import Workspace
from store.lineage import sha256_file

if TYPE_CHECKING:
    from pipeline.config import Config

logger = logging.getLogger(__name__)

OK, INFO, WARN, MISSING, WRONG = "ok", "info", "warn", "missing", "wrong"

#: How to get ffmpeg/ffprobe (the Debian package; `make system-packages` installs it).
FFMPEG_FIX = "install the Debian package ffmpeg: `sudo apt-get install ffmpeg` (or `make system-packages`)"

#: Decode backend name (``extract.decode.backend``) → (module to import, pip distribution).
DECODERS: dict[str, tuple[str, str]] = {"decord": ("decord", "decord"), "pyav": ("av", "av"),
                                        "torchcodec": ("torchcodec", "torchcodec")}

#: The rank variables shown (what torchrun, SLURM and Kubernetes indexed jobs set); which of them
#: decide the rank, and how, is pipeline.ranks' business.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                  "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID",
                  "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX")

LOW_DISK_BYTES = 1 << 30  # under 1 GiB free in the workspace: a warning


@dataclass
class Check:
    """One row of the doctor's table.

    ``blocks``: the stages of the config that cannot run because of this (empty: nothing blocked);
    ``fix``: how to get what is missing or wrong.
    """

    section: str
    item: str
    status: str  # ok | info | warn | missing | wrong
    found: str
    fix: str = ""
    blocks: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# sha256 cache


def sha256_cache_path() -> Path:
    """``$XDG_CACHE_HOME/mcn/sha256.json`` (``~/.cache/mcn/sha256.json``): the sha256 of weights files
    by path, size and mtime (weights are shared between workspaces, so the cache is the user's)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mcn" / "sha256.json"


class Sha256Cache:
    """sha256 of files remembered across runs, keyed by resolved path and valid while the file's size
    and mtime (ns) are unchanged. A cache that cannot be read counts as empty."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = sha256_cache_path() if path is None else Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                self.entries = {k: v for k, v in data.items() if isinstance(v, dict)}
        except (OSError, ValueError):
            pass

    def sha256(self, path: Path) -> tuple[str, bool]:
        """``(sha256 hex, True when it came from the cache)``."""
        key = str(Path(path).resolve())
        st = os.stat(key)
        hit = self.entries.get(key)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns and hit.get("sha256"):
            return str(hit["sha256"]), True
        digest = sha256_file(Path(key))
        self.entries[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest, False

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.path, self.entries)
            self.dirty = False
        except OSError as exc:  # a read-only home: the doctor still answers, it only hashes again
            logger.warning("cannot write the sha256 cache %s: %s", self.path, exc)


# --------------------------------------------------------------------------------------------------
# The checks


def _tool_version(exe: str) -> str:
    """``5.1.6-0+deb12u1`` from ``ffmpeg -version``'s first line (``ffmpeg version 5.1.6-0+deb12u1 ...``)."""
    try:
        out = subprocess.run([exe, "-version"], check=False, capture_output=True, text=True, timeout=20,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"does not run ({type(exc).__name__})"
    words = (out.stdout.splitlines() or [""])[0].split()
    return words[2] if len(words) > 2 and words[1] == "version" else "unknown version"


def check_binaries(cfg: Config, env: Mapping[str, str]) -> list[Check]:
    """ffprobe (probes every video in scan) and ffmpeg (audio decoding in extract, thumbnails).

    Without a binary, the stage uses PyAV instead when its setting is ``auto`` and PyAV is installed
    (:func:`extractors.libav.resolve_tool` decides): a warning naming the fallback. A missing binary
    blocks its stages only when nothing can replace it (PyAV absent, or the binary explicitly chosen)."""
    from extractors.libav import PYAV, pyav_available, resolve_tool

    path = env.get("PATH", os.defpath)
    needs = {"ffprobe": ("scan", "evaluate"),  # evaluation sets are scanned like the training videos
             "ffmpeg": ("extract",) if "audio" in cfg.extract.fields else ()}
    uses = {"ffprobe": "probes every video (scan)",
            "ffmpeg": "decodes audio (extract), clip thumbnails (report), demo videos"}
    setting = {"ffprobe": ("scan.probe_tool", cfg.scan.probe_tool),
               "ffmpeg": ("extract.decode.audio_tool", cfg.extract.decode.audio_tool)}
    fallback = {"ffprobe": "the scan probes with PyAV",
                "ffmpeg": "extract decodes audio and the report grabs thumbnails with PyAV"}
    out = []
    for name in ("ffmpeg", "ffprobe"):
        key, choice = setting[name]
        try:
            tool = resolve_tool(choice, name, path=path)
        except ValueError as exc:
            out.append(Check("tools", name, WRONG, f"{key}={choice}", str(exc), needs[name]))
            continue
        exe = shutil.which(name, path=path)
        if exe is not None:
            unused = f"; not used ({key}={PYAV})" if tool == PYAV else ""
            out.append(Check("tools", name, OK, f"{_tool_version(exe)} ({exe}){unused}"))
        elif tool == PYAV:
            out.append(Check("tools", name, INFO if choice == PYAV else WARN,
                             f"not on PATH: {fallback[name]} ({key}={choice}); {uses[name]}", FFMPEG_FIX))
        else:
            if choice == name:
                why = f"{key}={name} wants the binary"
                other = f"set {key}=auto to use PyAV" if pyav_available() else f"pip install av, set {key}=auto"
            else:
                why, other = "and PyAV (the fallback) is not installed", "pip install av"
            out.append(Check("tools", name, MISSING, f"not on PATH ({uses[name]}); {why}",
                             f"{FFMPEG_FIX}, or {other}", needs[name]))
    return out


def _import_version(module: str, dist: str) -> tuple[str | None, str]:
    """(version, "") when ``module`` imports, else (None, the one-line reason)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - an absent package, or one whose native library does not load
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    try:
        return version(dist), ""
    except PackageNotFoundError:
        return "unknown version", ""


def check_decoders(cfg: Config) -> list[Check]:
    """Which decoders import, and whether the selected backend (and its PyAV fallback) is one of them."""
    from extractors.decode import VISUAL_BACKENDS

    decode = cfg.extract.decode
    visual = any(f in VISUAL_FIELDS for f in cfg.extract.fields)
    out = []
    for name, (module, dist) in DECODERS.items():
        ver, why = _import_version(module, dist)
        roles = []
        fallback = name == "pyav" and decode.backend == "decord" and decode.fallback_pyav
        if name == decode.backend:
            roles.append("selected (extract.decode.backend)")
        elif fallback:
            roles.append("fallback for files decord cannot open")
        if name not in VISUAL_BACKENDS:
            roles.append("not a decode backend of this version")
        role = f"; {', '.join(roles)}" if roles else ""
        if ver is not None:
            out.append(Check("decoders", name, OK, f"{ver}{role}"))
            continue
        fix = f"pip install {dist} (installed by `make setup`; pinned in constraints.txt where it is)"
        if name == decode.backend:
            others = [b for b in VISUAL_BACKENDS if b != name]
            fix += f", or select another backend: extract.decode.backend={others[0]}" if others else ""
            out.append(Check("decoders", name, MISSING, f"{why}{role}", fix, ("extract",) if visual else ()))
        elif fallback:
            out.append(Check("decoders", name, WARN, f"{why}{role}", fix))
        else:
            out.append(Check("decoders", name, INFO, f"not available ({why})"))
    if decode.backend not in DECODERS:
        out.append(Check("decoders", decode.backend, MISSING, "unknown backend (extract.decode.backend)",
                         f"use one of {sorted(VISUAL_BACKENDS)}", ("extract",) if visual else ()))
    return out


def check_torch(cfg: Config) -> list[Check]:
    """torch, its CUDA build, the GPUs and bf16 on CPU and GPU; a stage configured for ``cuda`` (train,
    evaluate, an extractor's ``device`` option) is blocked when there is no GPU."""
    import torch

    from extractors.precision import cpu_has_bf16

    cuda = torch.version.cuda
    out = [Check("torch", "torch", OK, f"{torch.__version__}, CUDA build {cuda or 'none (CPU build)'}")]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        for i in range(n):
            with torch.cuda.device(i):
                bf16 = torch.cuda.is_bf16_supported()
            name = torch.cuda.get_device_name(i)
            out.append(Check("torch", f"GPU {i}", OK, f"{name}, bf16 {'yes' if bf16 else 'no'}"))
    else:
        why = "no CUDA device visible" if cuda else "torch is a CPU build"
        # the stages configured for a CUDA device (`auto` falls back to the CPU)
        devices = {"train.device": ("train", cfg.train.device),
                   "evaluate.device": ("evaluate", cfg.evaluate.device)}
        for f in cfg.extract.fields:
            option = getattr(cfg.extract, f).options.get("device", "auto")
            devices[f"extract.{f}.options.device"] = ("extract", option)
        want = {key: stage for key, (stage, dev) in devices.items() if str(dev).startswith("cuda")}
        fix = f"{', '.join(want)}: cuda needs a GPU and a CUDA build of torch; set auto or cpu" if want else ""
        out.append(Check("torch", "GPUs", MISSING if want else INFO, f"none ({why})", fix,
                         tuple(dict.fromkeys(want.values()))))
    out.append(Check("torch", "bf16 CPU", INFO, "yes (native)" if cpu_has_bf16() else
                     "no: amp auto computes in float32 on this CPU"))
    return out


def check_weights(ws: Workspace, cfg: Config, cache: Sha256Cache) -> list[Check]:
    """Every weights file the selected fields' extractors need: found where, sha256, expected or not.

    An extractor with a single weights file (``WEIGHTS_FILENAME``) is looked up with the search order of
    :mod:`extractors.weights`; the others (no weights, a model folder) are asked to describe
    themselves, which names their weights identity or raises the extractor's own error."""
    from extractors import get_extractor
    from extractors.weights import expected_sha256_prefix, locate_weights
    from pipeline.configtools import from_dict, to_dict
    from pipeline.extract import ExtractStage

    stage = ExtractStage(ws, cfg.extract, ws.root)
    out = []
    for f in stage.fields:
        cls = get_extractor(getattr(cfg.extract, f).name)
        conf = from_dict(cls.Config, to_dict(stage.options(f)))
        filename = getattr(cls, "WEIGHTS_FILENAME", None)
        item = f"{f} ({cls.name})"
        if filename is None or not hasattr(conf, "weights"):
            try:
                ident = str(stage.describe(f).get("weights"))
            except Exception as exc:  # noqa: BLE001 - the extractor's own message: what is missing, where to put it
                out.append(Check("weights", item, MISSING, str(exc).splitlines()[0], str(exc), ("extract",)))
                continue
            out.append(Check("weights", item, OK, "no weights file" if ident == "none" else f"identity {ident}"))
            continue
        found, looked = locate_weights(conf.weights, filename)
        if found is None:
            if getattr(conf, "allow_random_weights", False) and conf.weights is None:
                out.append(Check("weights", item, WARN, f"{filename} not found: seeded random init "
                                 "(allow_random_weights)", f"put {filename} at {looked[0]}"))
                continue
            try:
                stage.describe(f)  # raises the extractor's MissingWeightsError: where it looked, what to do
                fix = f"put {filename} at {looked[0]}"
            except Exception as exc:  # noqa: BLE001 - as above
                fix = str(exc)
            out.append(Check("weights", item, MISSING, f"{filename} not found in {looked[0].parent}", fix,
                             ("extract",)))
            continue
        digest, cached = cache.sha256(found)
        expected = expected_sha256_prefix(filename) if found.name == filename else None
        shown = f"{found} sha256 {digest[:16]}…{' (cached)' if cached else ''}"
        if expected is None:
            out.append(Check("weights", item, OK, f"{shown}; no checksum known for {found.name}"))
        elif digest.startswith(expected):
            out.append(Check("weights", item, OK, f"{shown}; expected {expected}… as its name says"))
        else:
            out.append(Check("weights", item, WRONG, f"{shown}; its name promises sha256 {expected}…",
                             f"the file is not {filename} (truncated or another file): replace it with the "
                             f"real one at {found}", ("extract",)))
    return out


def check_disk(ws: Workspace) -> Check:
    """Free space of the file system the workspace is (or will be) on."""
    where = Path(ws.root).resolve()
    while not where.exists() and where != where.parent:
        where = where.parent
    usage = shutil.disk_usage(where)
    text = f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB at {where}"
    if usage.free < LOW_DISK_BYTES:
        return Check("disk", "workspace", WARN, text, "free some space or use another --workspace")
    return Check("disk", "workspace", OK, text)


def check_ranks(cfg: Config, env: Mapping[str, str]) -> list[Check]:
    """The rank variables seen and what pipeline.ranks makes of them for the configured claim mode."""
    from pipeline.ranks import RankError, rank_and_world

    seen = [f"{k}={env[k]}" for k in RANK_VARIABLES if k in env]
    static = cfg.runner.mode == "static"
    out = [Check("ranks", "variables", INFO, " ".join(seen) if seen else "none (a single process)")]
    try:
        rank, world = rank_and_world(env, partition=static)
    except RankError as exc:
        out.append(Check("ranks", f"partition ({cfg.runner.mode})", WRONG, str(exc).split(":")[0], str(exc),
                         ("extract",)))
    else:
        how = "shards with index % world == rank" if static else "dynamic claims: the next free shard"
        out.append(Check("ranks", f"partition ({cfg.runner.mode})", OK, f"rank {rank} of {world}; {how}"))
    return out


def diagnose(ws: Workspace, cfg: Config, env: Mapping[str, str] | None = None,
             cache: Sha256Cache | None = None) -> list[Check]:
    """Every check of the doctor, in table order. ``env`` defaults to the process environment."""
    env = os.environ if env is None else env
    cache = Sha256Cache() if cache is None else cache
    checks = [*check_binaries(cfg, env), *check_decoders(cfg), *check_torch(cfg),
              *check_weights(ws, cfg, cache), check_disk(ws), *check_ranks(cfg, env)]
    cache.save()
    return checks


def blocked(checks: Sequence[Check]) -> dict[str, list[Check]]:
    """Stage → the checks that keep it from running (stages in pipeline order)."""
    from pipeline.run import STAGES

    out: dict[str, list[Check]] = {}
    for stage in STAGES:
        hits = [c for c in checks if stage in c.blocks]
        if hits:
            out[stage] = hits
    return out


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if blocked(checks) else 0


# --------------------------------------------------------------------------------------------------
# Output


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text columns padded to their widest cell (the last column unpadded).

    Hand-written: ten lines for an aligned table, where a table library would be a new dependency of
    the CLI."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for r in [headers, ["-" * w for w in widths], *rows]:
        cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths)] + [str(r[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_report(checks: Sequence[Check]) -> str:
    """The table, then what to do about each problem, then one line: what cannot run, or that all can."""
    rows = [[c.section, c.item, c.status, terminal_safe(c.found)] for c in checks]
    lines = [render_table(["section", "item", "status", "found"], rows)]
    todo = [c for c in checks if c.fix and c.status in (MISSING, WRONG, WARN)]
    if todo:
        lines.append("")
        for c in todo:  # a fix may be several lines (where it was looked for, what to do)
            first, *rest = c.fix.splitlines() or [""]
            lines.append(terminal_safe(f"{c.status}: {c.item}: {first}"))
            lines += ["    " + terminal_safe(r.strip()) for r in rest if r.strip()]
    stages = blocked(checks)
    lines.append("")
    if stages:
        lines.append("doctor: cannot run " + "; ".join(
            f"{stage} (needs {', '.join(c.item for c in hits)})" for stage, hits in stages.items()))
    else:
        lines.append("doctor: every stage of this config can run here")
    return "\n".join(lines)


__all__ = ["Check", "Sha256Cache", "blocked", "check_binaries", "check_decoders", "check_disk", "check_ranks",
           "check_torch", "check_weights", "diagnose", "exit_code", "format_report", "render_table",
           "sha256_cache_path"]
