"""Shard atomicity, resume after SIGKILL, rank partitioning and stale detection."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from pipeline.manifest import VideoRecord
from pipeline.runner import ShardJob, field_status, run_stage
from pipeline.shards import ShardWriter, encode_json, encode_npy, fingerprint, iter_shard, read_record, shard_state
from pipeline.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]


class ToyStage:
    """Writes, per video, a deterministic array derived from its id and a config value."""

    name = "toy"
    fields = ["a", "b"]

    def __init__(self, ws: Workspace, scale: float = 1.0, delay: float = 0.0):
        self.ws, self.scale, self.delay = ws, scale, delay
        self.calls: list[tuple[int, tuple[str, ...]]] = []

    def fingerprint(self, field, job):
        return fingerprint(field, self.scale, [r.id for r in job.records])

    def process(self, job, fields):
        self.calls.append((job.index, tuple(fields)))
        for f in fields:
            w = ShardWriter(self.ws, f, job.index, self.fingerprint(f, job))
            for r in job.records:
                time.sleep(self.delay)
                arr = np.full((3, 2), self.scale * len(r.id), dtype=np.float16)
                w.add(r.id, {"json": encode_json({"id": r.id, "status": "failed" if "bad" in r.id else "ok"}),
                             "feat.npy": encode_npy(arr)},
                      status="failed" if "bad" in r.id else "ok",
                      error="broken" if "bad" in r.id else None)
            w.commit()


def make_jobs(n_shards=5, per_shard=3):
    jobs = []
    for s in range(n_shards):
        recs = [VideoRecord(id=f"v{s}_{i}" + ("_bad" if (s, i) == (1, 2) else ""), path=f"v{s}_{i}.mp4", shard=s)
                for i in range(per_shard)]
        jobs.append(ShardJob(s, recs))
    return jobs


def test_two_ranks_cover_every_shard_once(tmp_path):
    jobs = make_jobs()
    ws2 = Workspace(tmp_path / "two")
    stages = [ToyStage(ws2), ToyStage(ws2)]
    for rank in (0, 1):
        run_stage(stages[rank], ws2, jobs, rank=rank, world=2, progress=False)
    done = sorted(i for s in stages for i, _ in s.calls)
    assert done == [0, 1, 2, 3, 4]
    assert [i for i, _ in stages[0].calls] == [0, 2, 4]
    ws1 = Workspace(tmp_path / "one")
    run_stage(ToyStage(ws1), ws1, jobs, progress=False)
    for f in ("a", "b"):
        for j in jobs:
            assert ws1.shard_tar(f, j.index).read_bytes() == ws2.shard_tar(f, j.index).read_bytes()


def test_rerun_skips_done_and_redoes_stale(tmp_path):
    ws, jobs = Workspace(tmp_path), make_jobs()
    first = ToyStage(ws)
    s1 = run_stage(first, ws, jobs, progress=False)
    assert s1.processed == {"a": 5, "b": 5}
    again = ToyStage(ws)
    s2 = run_stage(again, ws, jobs, progress=False)
    assert again.calls == [] and s2.skipped == {"a": 5, "b": 5}
    # A field whose record holds another fingerprint is stale and is the only one redone.
    rec_path = ws.shard_record("b", 3)
    rec = read_record(rec_path)
    rec["fingerprint"] = "old"
    rec_path.write_text(__import__("json").dumps(rec))
    status = {s.field: s for s in field_status(again, ws, jobs)}
    assert (status["a"].done, status["b"].done, status["b"].stale) == (5, 4, 1)
    assert status["a"].failed == [("v1_2_bad", "failed: broken")]
    run_stage(again, ws, jobs, progress=False)
    assert again.calls == [(3, ("b",))]
    forced = ToyStage(ws)
    run_stage(forced, ws, jobs, force=True, progress=False)
    assert len(forced.calls) == 5


def test_shard_reads_back_with_safe_decoders(tmp_path):
    ws, jobs = Workspace(tmp_path), make_jobs(1)
    run_stage(ToyStage(ws, scale=2.0), ws, jobs, progress=False)
    samples = list(iter_shard(ws.shard_tar("a", 0)))
    assert [s["__key__"] for s in samples] == [r.id for r in jobs[0].records]
    assert samples[0]["feat.npy"].dtype == np.float16
    assert float(samples[0]["feat.npy"][0, 0]) == 2.0 * len("v0_0")
    record = read_record(ws.shard_record("a", 0))
    assert record["n_videos"] == 3 and record["n_ok"] == 3 and len(record["sha256"]) == 64


WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.pipeline.test_shards_runner import ToyStage, make_jobs
    from pipeline.runner import run_stage
    from pipeline.workspace import Workspace
    ws = Workspace({ws!r})
    run_stage(ToyStage(ws, delay=float(sys.argv[1])), ws, make_jobs(), progress=False)
    """
)


def test_sigkill_mid_shard_then_rerun_is_identical(tmp_path):
    script = tmp_path / "writer.py"
    killed_ws = tmp_path / "killed"
    script.write_text(WRITER.format(root=str(ROOT), ws=str(killed_ws)))
    proc = subprocess.Popen([sys.executable, str(script), "0.05"])
    ws = Workspace(killed_ws)
    deadline = time.monotonic() + 60
    # Wait until some shards are complete and a later one is being written.
    while time.monotonic() < deadline and read_record(ws.shard_record("a", 2)) is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    jobs = make_jobs()
    stage = ToyStage(ws)
    states = [shard_state(ws, f, j.index, stage.fingerprint(f, j)) for j in jobs for f in stage.fields]
    assert "done" in states and "missing" in states  # killed mid-way, nothing reads half-done
    for f in stage.fields:
        for j in jobs:
            if read_record(ws.shard_record(f, j.index)) is None:
                continue
            assert len(list(iter_shard(ws.shard_tar(f, j.index)))) == len(j.records)
    n_done_before = states.count("done")
    run_stage(stage, ws, jobs, progress=False)
    assert len(stage.calls) >= 1 and sum(len(fs) for _, fs in stage.calls) == 10 - n_done_before
    assert not list(ws.field_dir("a").glob(".*tmp*")) and not list(ws.field_dir("b").glob(".*tmp*"))
    clean = Workspace(tmp_path / "clean")
    run_stage(ToyStage(clean), clean, jobs, progress=False)
    for f in stage.fields:
        for j in jobs:
            assert ws.shard_tar(f, j.index).read_bytes() == clean.shard_tar(f, j.index).read_bytes()
