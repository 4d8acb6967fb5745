"""Fault injection: `mcn extract`, `mcn train` and `mcn evaluate` killed with SIGKILL at seeded random
points, several times, then run to the end: the outputs equal those of an uninterrupted run, and
nothing of the killed processes is left (temporary files, claims). Scan: tests/pipeline/."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from store.fields import FIELDS
from store.lineage import read_record
from tests.support import ROOT, copy_stage_outputs, mcn, mcn_cmd

pytestmark = pytest.mark.slow


def kill_after(cmd: list[str], ready, extra_s: float, timeout_s: float = 120.0) -> bool:
    """Start ``cmd``, SIGKILL its process group ``extra_s`` seconds after ``ready()`` becomes true;
    False when it finished before."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(extra_s)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def done_records(ws: Path) -> int:
    return sum(1 for f in FIELDS for _ in (ws / "features" / f).glob("shard-*.json")) if (ws / "features").is_dir() else 0


def leftovers(ws: Path) -> list[str]:
    """Temporary files and claims of dead processes (the finishing run sweeps them)."""
    return [str(p.relative_to(ws)) for p in ws.rglob("*") if ".tmp-" in p.name or p.suffix == ".lock"]


def with_ws(common: list[str], ws: Path, old: Path) -> list[str]:
    return [c if c != str(old) else str(ws) for c in common]


def test_extract_killed_at_random_points(extracted, tmp_path):
    ws, common = extracted
    w = copy_stage_outputs(ws, tmp_path / "w", ("scan",))
    args = with_ws(common, w, ws)
    rng = random.Random(7)
    killed = 0
    for n in sorted(rng.sample(range(1, 12), 3)):  # after the n-th of the 12 done records, at random
        killed += kill_after(mcn_cmd("extract", *args), lambda: done_records(w) >= n, rng.uniform(0.0, 0.5))
    assert killed >= 2, "the runs finished before they could be killed: the test proves nothing"
    final = mcn("extract", *args)
    assert final.returncode == 0, final.stderr[-2000:]
    for f in FIELDS:
        for i in range(3):
            assert (w / "features" / f / f"shard-{i:06d}.tar").read_bytes() == \
                (ws / "features" / f / f"shard-{i:06d}.tar").read_bytes(), (f, i)
    assert leftovers(w) == []


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_train_killed_at_random_points_ends_as_uninterrupted(extracted, tmp_path):
    ws, common = extracted
    steps = ["train.epochs=6", "train.checkpoint_every=1"]  # 1 batch per epoch: 6 steps
    clean = copy_stage_outputs(ws, tmp_path / "clean")
    proc = mcn("train", "--name", "f", *with_ws(common, clean, ws), *steps)
    assert proc.returncode == 0, proc.stderr[-2000:]
    w = copy_stage_outputs(ws, tmp_path / "w")
    args = [*with_ws(common, w, ws), *steps]
    log = w / "runs" / "f" / "logs" / "train.jsonl"

    def logged(step: int) -> bool:
        try:
            return f'"step": {step},' in log.read_text()
        except FileNotFoundError:
            return False

    rng = random.Random(11)
    killed = 0
    for step in sorted(rng.sample(range(1, 6), 3)):  # killed at random points of the run
        killed += kill_after(mcn_cmd("train", "--name", "f", *args), lambda: logged(step), rng.uniform(0.0, 0.05))
    assert killed >= 2
    final = mcn("train", "--name", "f", *args)
    assert final.returncode == 0, final.stderr[-2000:]
    ref, got = read_record(clean / "runs" / "f" / "record.json"), read_record(w / "runs" / "f" / "record.json")
    assert got["step"] == ref["step"] == 6 and got["complete"] and got["fingerprint"] == ref["fingerprint"]
    a = _state(clean / "runs" / "f" / "checkpoints" / "step-000006.pt")
    b = _state(w / "runs" / "f" / "checkpoints" / "step-000006.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [line for line in (w / "runs" / "f" / "logs" / "train.jsonl").read_text().splitlines()]
    assert [int(x.split('"step": ')[1].split(",")[0]) for x in log] == [1, 2, 3, 4, 5, 6]  # one line per step
    assert leftovers(w) == []


def test_evaluate_killed_at_random_points_gives_the_same_metrics(extracted, tmp_path):
    ws, common = extracted
    base = copy_stage_outputs(ws, tmp_path / "base")
    trained = mcn("train", "--name", "e", *with_ws(common, base, ws), "train.max_steps=2")
    assert trained.returncode == 0, trained.stderr[-2000:]
    ckpt = base / "runs" / "e" / "checkpoints" / "step-000002.pt"
    clean = mcn("evaluate", "--checkpoint", str(ckpt), *with_ws(common, base, ws))
    assert clean.returncode == 0, clean.stderr[-2000:]
    w = copy_stage_outputs(ws, tmp_path / "w")
    args = ["--checkpoint", str(ckpt), *with_ws(common, w, ws)]
    rng = random.Random(3)
    evalset = w / "evalsets" / "heldout"
    k = rng.randint(1, 7)  # of the set's 8 done records
    points = [lambda: (evalset / "scan.json").exists(), lambda: done_records(evalset) >= k,
              lambda: (w / "eval" / "heldout").is_dir()]
    killed = sum(kill_after(mcn_cmd("evaluate", *args), ready, rng.uniform(0.0, 0.5)) for ready in points)
    assert killed >= 2
    final = mcn("evaluate", *args)
    assert final.returncode == 0, final.stderr[-2000:]
    ref = read_record(base / "eval" / "heldout" / "metrics.json")
    got = read_record(w / "eval" / "heldout" / "metrics.json")
    assert got["retrieval"] == ref["retrieval"] and got["n_queries"] == ref["n_queries"]
    for f in FIELDS:  # the set's own features, extracted across the kills, equal the clean ones
        for i in range(2):
            a = base / "evalsets" / "heldout" / "features" / f / f"shard-{i:06d}.tar"
            assert (w / "evalsets" / "heldout" / "features" / f / f"shard-{i:06d}.tar").read_bytes() == a.read_bytes()
    assert read_record(w / "eval" / "heldout" / "record.json")["fingerprint"] == \
        read_record(base / "eval" / "heldout" / "record.json")["fingerprint"]
    assert leftovers(w) == []
