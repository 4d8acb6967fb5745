"""A scan killed at any point leaves either the previous complete scan or no scan record, and a re-run
gives exactly the result of an uninterrupted scan."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.scan import scan
from store.layout import Workspace
from store.manifest import group_by_shard, plan_shard, read_captions, read_manifest

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ["scan.shard_size=4", "scan.probe_workers=2"]
# The same CLI with every atomic write slowed down by 50 ms, so that a kill triggered by a file event
# lands in the middle of the writing of the outputs even where writes take microseconds (tmpfs).
SLOW_WRITES = ("import sys, time, store.atomic as a; w = a.write_bytes; "
               "a.write_bytes = lambda p, d: (time.sleep(0.05), w(p, d))[1]; "
               "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
SRT = "1\n00:00:00,000 --> 00:00:00,800\n{}\n"


def _outputs(ws: Workspace) -> dict[str, bytes]:
    """What a scan writes: the manifest and every caption file."""
    out = {"manifest.jsonl": ws.manifest.read_bytes()}
    for i in ws.caption_shards():
        out[ws.captions(i).name] = ws.captions(i).read_bytes()
    return out


def _consistent(ws: Workspace) -> str | None:
    """The ``output`` fingerprint of the scan record after checking that it describes the files on
    disk (manifest size, every planned shard's caption file and videos); None without a record."""
    if not ws.scan_record.exists():
        return None
    record = json.loads(ws.scan_record.read_text(encoding="utf-8"))
    assert record["manifest_bytes"] == ws.manifest.stat().st_size
    shards = group_by_shard(read_manifest(ws.manifest))
    assert [p["index"] for p in record["shards"]] == list(shards)
    for planned in record["shards"]:
        index = planned["index"]
        assert ws.captions(index).exists(), f"planned shard {index} has no caption file"
        caps = read_captions(ws.captions(index))
        recs = shards[index]
        assert list(caps) == [r.id for r in recs]
        assert plan_shard(index, recs, [(r.id, caps[r.id]) for r in recs]).to_json() == planned
    return record["output"]


def _kill_when(proc: subprocess.Popen, due: Callable[[], bool], limit_s: float = 20.0) -> bool:
    """SIGKILL ``proc`` as soon as ``due()``; False when it ended first."""
    deadline = time.monotonic() + limit_s
    while proc.poll() is None and time.monotonic() < deadline:
        if due():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return False


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _caption_files(ws: Workspace) -> set[tuple[str, int | None]]:
    return {(p.name, _inode(p)) for p in ws.captions_dir.glob("shard-*.jsonl")}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_mid_scan_leaves_the_previous_scan_or_none(tiny_video, tmp_path):
    started = time.monotonic()
    root = tmp_path / "videos"
    root.mkdir()
    for i in range(12):
        shutil.copy(tiny_video, root / f"v{i:02d}.mp4")
        if i % 2 == 0:
            (root / f"v{i:02d}.srt").write_text(SRT.format(f"caption {i}"))
    cfg = load_config(None, OVERRIDES).scan
    ref, snapshot = Workspace(tmp_path / "ref"), Workspace(tmp_path / "snapshot")
    for ws in (ref, snapshot):
        scan(root, ws, cfg, progress=False)
    previous = _consistent(snapshot)
    # The tree changes: new videos (to probe), removed ones, edited captions, a replaced video.
    for i in range(12, 17):
        shutil.copy(tiny_video, root / f"v{i:02d}.mp4")
    for i in (3, 7):
        (root / f"v{i:02d}.mp4").unlink()
    for i in (0, 4, 8):
        (root / f"v{i:02d}.srt").write_text(SRT.format(f"edited caption {i}"))
    os.utime(root / "v05.mp4", ns=(1_000_000_000, 1_000_000_000))
    scan(root, ref, cfg, progress=False)  # the uninterrupted result
    expected = _outputs(ref)
    current = _consistent(ref)
    assert current != previous

    Due = Callable[[Workspace, float], Callable[[], bool]]
    points: list[tuple[str, bool, Due]] = [
        (f"after {delay} s", False, lambda ws, t0, d=delay: lambda: time.monotonic() - t0 >= d)
        for delay in (0.2, 0.5, 1.0, 1.5, 2.0)
    ]
    points += [
        ("when probing starts", True, lambda ws, t0: (lambda size=ws.probe_cache.stat().st_size:
                                                       lambda: ws.probe_cache.stat().st_size != size)()),
        ("when the record is removed", True, lambda ws, t0: lambda: not ws.scan_record.exists()),
        ("when the manifest is replaced", True, lambda ws, t0: (lambda ino=_inode(ws.manifest):
                                                                 lambda: _inode(ws.manifest) != ino)()),
        ("when a caption file is replaced", True, lambda ws, t0: (lambda files=_caption_files(ws):
                                                                   lambda: _caption_files(ws) != files)()),
    ]
    outcomes = []
    for i, (what, slow, make_due) in enumerate(points):
        ws = Workspace(tmp_path / f"ws{i}")
        shutil.copytree(snapshot.root, ws.root)
        args = ["scan", "--videos", str(root), "--workspace", str(ws.root), "--no-progress", *OVERRIDES]
        cmd = [sys.executable, *(["-c", SLOW_WRITES] if slow else ["-m", "pipeline.cli"]), *args]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            killed = _kill_when(proc, make_due(ws, t0))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        state = _consistent(ws)  # a record is there only if it describes the files on disk
        assert state in (None, previous, current), what
        outcomes.append((what, killed, {None: "no record", previous: "previous", current: "new"}[state]))
        scan(root, ws, cfg, progress=False)  # the re-run
        assert _outputs(ws) == expected, (what, outcomes[-1])
        assert _consistent(ws) == current
    # at least one kill landed between the removal of the old record and the writing of the new one
    assert any(state == "no record" for _, killed, state in outcomes if killed), outcomes
    assert time.monotonic() - started < 60, outcomes
