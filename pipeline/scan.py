"""`scan`: walk a videos folder into the manifest, the shard plan and per-shard caption files.

Nothing in a videos folder stops a scan: every input that cannot be used ends as a one-line reason in
the scan's output, and the scan goes on and writes its manifest.

- A video that cannot be used is a manifest record with ``status: "failed"`` and its ``error``: a
  file name that is not valid UTF-8 (``file name is not valid UTF-8 (byte 0xe9 at offset 3 of the
  path): rename it``; its ``path`` is the name's bytes with ``\\xNN`` escapes, its id is made from
  the bytes), a second path to the same file (``same file as <path>``), a name that differs from
  another only by its extension (``same name as <path> (only the extension differs): ...``), an
  ffprobe failure or timeout (``ffprobe timed out after N s``), unusable captions (``captions:
  ...``, e.g. a side-car over ``max_caption_bytes``).
- A problem that leaves the video usable is one of its ``warnings`` (no captions; an entry of the
  captions file that is malformed, whose captions are then ignored; captions dropped or clipped).
- What the walk does not follow or cannot read is listed in ``skipped`` (scan record and
  :class:`ScanResult`) as ``[relative path, reason]``: folder symlinks whose target leaves the videos
  root or was walked already (a loop), broken symlinks, folders that cannot be listed.
- A probe that timed out is not cached and is named in the record's ``retry`` list: the scan is
  stale until a later scan has probed it again.

A killed scan leaves either the previous complete scan or no scan record at all (the record is
removed, durably, before any output is rewritten, and written last).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.captions import (
    CaptionError,
    clean_captions,
    read_caption_file,
    read_sidecar,
)
from pipeline.probe import PYAV, ProbeCache, probe_all, probe_tool
from pipeline.terminal import terminal_safe
from pipeline.walk import display_path, find_sidecar, name_problem, walk_videos
from pipeline.runner import Workers, run_unit
from store import atomic
from store.claims import Claim
from store.ids import extension_id, video_id
from store.layout import Workspace
from store.lineage import RUNTIME, Lineage, UnitState, config_dict, fingerprint, make_record, read_record, unit_state
from store.manifest import (
    Caption,
    VideoRecord,
    assign_shards,
    captions_text,
    group_by_shard,
    iter_manifest,
    manifest_text,
    plan_shard,
    write_captions,
    write_manifest,
)

#: Version of the scan's output in its lineage: bump it when a change alters the manifest or captions.
SCAN_VERSION = "scan-4"  # scan-4: new videos are planned in seeded-hash order, not path order

logger = logging.getLogger(__name__)


@dataclass
class ScanConfig:
    extensions: list[str] = field(default_factory=lambda: [".mp4", ".mkv", ".webm", ".avi", ".mov"])
    shard_size: int = 64  # videos per shard (fixed at the first scan; later scans keep the plan)
    plan_seed: int = 0  # order in which new videos fill the shards (store.manifest.assign_shards)
    probe_workers: int = field(default=8, metadata=RUNTIME)  # concurrent probe processes (ffprobe or PyAV)
    probe_timeout_s: float = field(default=120.0, metadata=RUNTIME)  # a probe is killed after this (s)
    # "auto" | "ffprobe" | "pyav": what probes the videos (auto: ffprobe when on PATH, else PyAV in a
    # child process). The request is RUNTIME; the tool it resolves to enters the scan's lineage
    # (scan_lineage) since fields such as n_frames may differ between the two.
    probe_tool: str = field(default="auto", metadata=RUNTIME)
    captions_file: str | None = None  # HowTo100M-style JSON/CSV: video id or stem → captions
    caption_encodings: list[str] = field(default_factory=list)  # fallbacks when a file is not UTF-8
    max_caption_bytes: int = 16 * 1024 * 1024  # a larger side-car caption file fails its video


@dataclass
class ScanResult:
    n_videos: int
    n_ok: int
    n_failed: int
    n_shards: int
    n_probed: int  # probes actually run (the rest came from the cache)
    failures: list[tuple[str, str]]
    up_to_date: bool = False  # the scan was done for exactly these files and config: nothing was written
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason): not walked

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ScanResult":
        return cls(n_videos=record["n_videos"], n_ok=record["n_ok"], n_failed=record["n_failed"],
                   n_shards=record["n_shards"], n_probed=0,
                   failures=[(str(p), str(w)) for p, w in record.get("failures", [])], up_to_date=True,
                   skipped=[(str(p), str(w)) for p, w in record.get("skipped", [])])


@dataclass
class Inputs:
    """The walk of a videos root with the identity of every input (stat calls only)."""

    paths: list[str]  # the video files, relative, sorted (str with surrogate escapes)
    listing: list[list[Any]]  # what the scan's lineage fingerprints (see list_inputs)
    stats: dict[str, tuple[int | None, int | None]]  # path → (size, mtime_ns); None: cannot be stat'ed
    same_file: dict[str, str]  # path → the recorded path of the same file, which is scanned instead
    skipped: list[tuple[str, str]]  # (recorded path, reason) of what the walk did not follow


def read_inputs(root: Path, cfg: ScanConfig) -> Inputs:
    """Walk ``root`` (:func:`walk_videos`) and stat every video and side-car once.

    Two paths of the same file (``st_dev``, ``st_ino``: symlinks, hard links, a folder reached twice)
    are scanned once: by the first path that is not a symlink, else the first path."""
    walk = walk_videos(root, cfg.extensions)
    listing: list[list[Any]] = []
    stats: dict[str, tuple[int | None, int | None]] = {}
    first: dict[int, str] = {}
    groups: dict[int, list[str]] = {}
    for rel in walk.paths:
        entry: list[Any] = [rel, None, None, None, None, None]
        try:
            st = os.stat(os.path.join(root, rel))
            entry[1:3] = [st.st_size, st.st_mtime_ns]
            ident = (st.st_dev << 64) | st.st_ino
            if ident in first:
                groups.setdefault(ident, [first[ident]]).append(rel)
            else:
                first[ident] = rel
        except OSError:
            pass
        sidecar = find_sidecar(root / rel)
        if sidecar is not None:
            try:
                sst = sidecar.stat()
                entry[3:6] = [sidecar.name, sst.st_size, sst.st_mtime_ns]
            except OSError:
                pass
        listing.append(entry)
        stats[rel] = (entry[1], entry[2])
    listing.extend([rel, why] for rel, why in walk.skipped)
    same_file: dict[str, str] = {}
    for group in groups.values():
        keep = min(group, key=lambda r: (r in walk.links, r))
        same_file.update((r, display_path(keep)) for r in group if r != keep)
    return Inputs(paths=walk.paths, listing=listing, stats=stats, same_file=same_file,
                  skipped=[(display_path(rel), terminal_safe(why)) for rel, why in walk.skipped])


def list_inputs(root: Path, cfg: ScanConfig) -> tuple[list[str], list[list[Any]]]:
    """The video files under ``root`` and the identity of the walk: one row per video with its
    side-car captions, ``[path, size, mtime_ns, side-car name or None, its size, its mtime_ns]``, then
    one row ``[path, reason]`` per thing the walk skipped (stat calls only)."""
    inputs = read_inputs(root, cfg)
    return inputs.paths, inputs.listing


def _file_stat(path: str | None) -> list[Any] | None:
    if not path:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return [str(Path(path).resolve()), None, None]
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def scan_lineage(root: Path, cfg: ScanConfig, listing: list[list[Any]] | None) -> Lineage:
    """Config (without runtime settings, with the probe tool when it resolves to PyAV: ffprobe, the
    historical tool, adds nothing, so scans made with it stay done), code, and inputs: the videos root,
    the identity of every video file and side-car and of what the walk skipped (``listing``; None: not
    walked, only the config is compared) and of the captions file."""
    inputs = {"videos_root": fingerprint(str(root)), "captions_file": fingerprint(_file_stat(cfg.captions_file))}
    if listing is not None:
        inputs["videos"] = fingerprint(listing)
    config = config_dict(cfg)
    if probe_tool(cfg.probe_tool) == PYAV:
        config["probe_tool"] = PYAV
    return Lineage(config=fingerprint(config), code=SCAN_VERSION, inputs=inputs)


def scan_state(ws: Workspace, root: Path, cfg: ScanConfig, listing: list[list[Any]] | None) -> UnitState:
    """done / stale / missing of the scan of ``root`` into ``ws`` (``listing``: see :func:`scan_lineage`).
    A scan whose record names probes to retry (ffprobe timed out) is stale."""
    record = read_record(ws.scan_record)
    lineage = scan_lineage(root, cfg, listing)
    problems: list[str] = []
    if record is not None:
        if listing is None:  # compare what was not walked with the record's own inputs
            stored = (record.get("lineage") or {}).get("inputs", {})
            if "videos" in stored:
                lineage = Lineage(lineage.config, lineage.code, {**lineage.inputs, "videos": stored["videos"]})
        try:
            size = ws.manifest.stat().st_size
        except FileNotFoundError:
            size = None
        if size != record.get("manifest_bytes"):
            problems.append("manifest missing or changed since the scan")
        elif not {s["index"] for s in record.get("shards", [])} <= set(ws.caption_shards()):
            problems.append("caption files missing")
        if record.get("retry"):
            problems.append(f"{len(record['retry'])} video(s) to probe again "
                            "(ffprobe timed out or could not run)")
    return unit_state(record, lineage, problems)


def scan(videos_root: Path, ws: Workspace, cfg: ScanConfig, *, force: bool = False, progress: bool = True,
         workers: Workers | None = None) -> ScanResult:
    """Scan `videos_root` into `ws`: manifest.jsonl, scan.json and captions/shard-*.jsonl.

    The folder is walked (stat calls only) every time; when the files, their side-cars, the captions
    file and the config are the ones of the last scan, nothing is probed and nothing is written.
    What is recorded for every kind of bad input is described in the module's docstring.
    """
    root = Path(videos_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"videos folder {root} does not exist or is not a folder")
    ws.root.mkdir(parents=True, exist_ok=True)
    inputs = read_inputs(root, cfg)
    workers = workers or Workers(ws)

    def work(claim: Claim, st: UnitState) -> ScanResult:
        if not st.done:
            logger.info("scan: %s", "; ".join(st.reasons) if st.status == "stale" else "first scan")
        return _scan(root, ws, cfg, inputs, scan_lineage(root, cfg, inputs.listing), force=force,
                     progress=progress, claim=claim)

    st, result = run_unit(workers, "scan", lambda: scan_state(ws, root, cfg, inputs.listing), work,
                          force=force)
    if result is None:
        logger.info("scan: %d video files under %s, unchanged since the last scan", len(inputs.paths), root)
        return ScanResult.from_record(st.record or {})
    return result


def _previous_plan(ws: Workspace) -> dict[str, int]:
    """id → shard of the manifest on disk (empty when there is none or it cannot be read)."""
    try:
        return {r.id: r.shard for r in iter_manifest(ws.manifest)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("scan: the previous manifest cannot be read (%s): planning the shards anew", exc)
        return {}


def _scan(root: Path, ws: Workspace, cfg: ScanConfig, inputs: Inputs, lineage: Lineage, *,
          force: bool, progress: bool, claim: Claim) -> ScanResult:
    paths, stats = inputs.paths, inputs.stats
    if force and ws.probe_cache.exists():
        ws.probe_cache.unlink()
    previous = {} if force else _previous_plan(ws)

    caption_map: dict[str, list[Caption]] = {}
    caption_errors: dict[str, str] = {}
    caption_file_error: str | None = None
    if cfg.captions_file:
        try:
            caption_map = read_caption_file(Path(cfg.captions_file), tuple(cfg.caption_encodings),
                                            errors=caption_errors)
        except (CaptionError, OSError) as exc:
            caption_file_error = str(exc)
            logger.error("captions file %s unusable: %s", cfg.captions_file, exc)

    logger.info("scan: %d video files under %s", len(paths), root)
    for rel, why in inputs.skipped:
        logger.warning("scan: skipped %s: %s", terminal_safe(rel), why)

    # Ids and the failures known before probing. The first path of a plain id keeps it; the others
    # (same path but for the extension) get the disambiguated id, which no plain id can equal.
    records: list[VideoRecord] = []
    by_plain: dict[str, str] = {}
    to_probe: list[str] = []
    rel_of: dict[int, str] = {}
    for rel in paths:
        shown = display_path(rel)
        size, mtime = stats[rel]
        vid = video_id(rel)
        rec = VideoRecord(id=vid, path=shown, size=size or 0, mtime_ns=mtime or 0)
        records.append(rec)
        rel_of[id(rec)] = rel
        reason = name_problem(rel)
        if vid in by_plain:
            rec.id = extension_id(rel)
            reason = reason or (f"same name as {by_plain[vid]} (only the extension differs): id and captions "
                                "would be ambiguous")
        else:
            by_plain[vid] = shown
        if reason is None and rel in inputs.same_file:
            reason = f"same file as {inputs.same_file[rel]}"
        if reason is not None:
            rec.fail(reason)
        else:
            to_probe.append(rel)

    cache = ProbeCache(ws.probe_cache)
    try:
        probes, n_probed = probe_all(root, to_probe, cache, workers=cfg.probe_workers, timeout_s=cfg.probe_timeout_s,
                                     progress=progress, tool=probe_tool(cfg.probe_tool))
    finally:
        cache.close()

    captions: dict[int, list[Caption]] = {}
    retry: list[str] = []
    for rec in records:
        if not rec.ok:
            continue
        rel = rel_of[id(rec)]
        probe = probes[rel]
        if not probe["ok"]:
            rec.fail(probe["error"])
            if probe.get("transient"):
                retry.append(rec.path)
            continue
        for k, v in probe["info"].items():
            setattr(rec, k, v)
        try:
            caps, source, warning = _captions_for(root / rel, rel, rec.id, caption_map, caption_errors, cfg,
                                                  caption_file_error)
        except CaptionError as exc:
            rec.fail(f"captions: {exc}")
            continue
        except Exception as exc:  # a caption file must cost its video only, never the scan
            logger.exception("scan: reading the captions of %s failed", rec.path)
            rec.fail(f"captions: unexpected error ({type(exc).__name__}: {exc})")
            continue
        if caps is None:
            rec.warnings.append(warning or "no captions found (side-car .srt/.vtt/.json or captions file)")
            continue
        try:
            kept, warns = clean_captions(caps, rec.duration, source)
        except CaptionError as exc:
            rec.fail(f"captions: {exc}")
            continue
        rec.caption_source, rec.n_captions = source, len(kept)
        rec.warnings.extend(warns)
        captions[id(rec)] = kept

    _unique_ids(records, rel_of, captions)
    for rec in records:  # every reason is one line, whatever the file names hold
        if rec.error is not None:
            rec.error = terminal_safe(rec.error)
        rec.warnings = [terminal_safe(w) for w in rec.warnings]

    records = assign_shards(records, previous, cfg.shard_size, cfg.plan_seed)
    shards = group_by_shard(records)
    items = {index: [(r.id, captions.get(id(r), [])) for r in recs] for index, recs in shards.items()}
    claim.verify()
    # The record first goes (durably), then the outputs are written (each only if its content
    # changed), the record last: a scan killed midway leaves no record (the next run redoes the scan),
    # never a record beside outputs it does not describe.
    ws.scan_record.unlink(missing_ok=True)
    atomic.fsync_dir(ws.root)
    write_manifest(ws.manifest, records)
    ws.captions_dir.mkdir(parents=True, exist_ok=True)
    for index, its in items.items():
        write_captions(ws.captions(index), its)
    for stale in ws.caption_shards():
        if stale not in shards:
            ws.captions(stale).unlink()
    failures = [(r.path, r.error or "") for r in records if not r.ok]
    for rel, why in failures:
        logger.warning("scan: %s: %s", terminal_safe(rel), why)
    result = ScanResult(
        n_videos=len(records),
        n_ok=len(records) - len(failures),
        n_failed=len(failures),
        n_shards=len(shards),
        n_probed=n_probed,
        failures=failures,
        skipped=list(inputs.skipped),
    )
    plan = [plan_shard(index, recs, items[index]).to_json() for index, recs in shards.items()]
    text = manifest_text(records)
    record = make_record(
        "scan", lineage,
        videos_root=str(root), n_videos=result.n_videos, n_ok=result.n_ok, n_failed=result.n_failed,
        n_shards=result.n_shards, shard_size=cfg.shard_size, plan_seed=cfg.plan_seed,
        captions_file=cfg.captions_file, captions_file_error=caption_file_error, failures=[list(f) for f in failures],
        skipped=[list(s) for s in inputs.skipped], retry=sorted(retry), shards=plan,
        manifest_bytes=len(text.encode("utf-8")),
        output=fingerprint(text, [captions_text(items[i]) for i in sorted(items)]),
    )
    atomic.write_json(ws.scan_record, record)
    return result


def _unique_ids(records: list[VideoRecord], rel_of: dict[int, str],
                captions: dict[int, list[Caption]]) -> None:
    """The check behind the construction: an id held by two records stays with the record whose id
    is the plain id of its path (else an ok one, else the first); every other holder is failed with a
    reason naming the keeper (or keeps its own failure, with a warning) and gets an id that no id
    function makes (``<id>-x--<n>``), unique in this manifest."""
    holders: dict[str, list[VideoRecord]] = {}
    for rec in records:
        holders.setdefault(rec.id, []).append(rec)
    used = set(holders)
    for vid, recs in holders.items():
        if len(recs) < 2:
            continue
        order = {id(r): i for i, r in enumerate(recs)}
        recs = sorted(recs, key=lambda r: (r.id != video_id(rel_of[id(r)]), not r.ok, order[id(r)]))
        keeper = recs[0]
        for rec in recs[1:]:
            n = 1
            while f"{vid}-x--{n}" in used:
                n += 1
            rec.id = f"{vid}-x--{n}"
            used.add(rec.id)
            why = f"id {vid} is also the id of {keeper.path}"
            logger.error("scan: %s: %s", terminal_safe(rec.path), why)
            if rec.ok:
                rec.fail(why)
                captions.pop(id(rec), None)
                rec.caption_source, rec.n_captions = None, 0
            else:
                rec.warnings.append(f"{why}: given the id {rec.id}")


def _captions_for(
    abs_path: Path,
    rel: str,
    vid: str,
    caption_map: dict[str, list[Caption]],
    caption_errors: dict[str, str],
    cfg: ScanConfig,
    caption_file_error: str | None,
) -> tuple[list[Caption] | None, str, str | None]:
    """``(captions or None, their source, warning)``: the entry of the captions file (by id, path,
    path without extension or stem), else the side-car file. A malformed entry of the captions file
    gives no captions and a warning naming it; a side-car over ``max_caption_bytes`` or unusable, or
    an unusable captions file and no side-car, raise CaptionError."""
    stem = Path(rel).stem
    for key in (vid, rel, str(Path(rel).with_suffix("")), stem):
        if key in caption_map:
            return caption_map[key], f"{Path(cfg.captions_file or '').name}[{key}]", None
        if key in caption_errors:
            return None, "", f"captions: {caption_errors[key]} (entry ignored: no captions for this video)"
    sidecar = find_sidecar(abs_path)
    if sidecar is not None:
        caps = read_sidecar(sidecar, tuple(cfg.caption_encodings), cfg.max_caption_bytes)
        return caps, Path(rel).with_name(sidecar.name).as_posix(), None
    if caption_file_error:
        raise CaptionError(caption_file_error)
    return None, "", None
