"""The stage runner: shards as units, lineage, claims, static and dynamic sharing, kills and restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.runner import RunnerConfig, ShardJob, Workers, run_sharded
from store.layout import Workspace
from store.lineage import Lineage, fingerprint, read_record
from store.manifest import PlannedShard, VideoRecord
from store.reader import iter_samples
from store.shards import ShardWriter, encode_json, encode_npy, shard_state

ROOT = Path(__file__).resolve().parents[2]
FAST = RunnerConfig(poll_s=0.05)


class ToyStage:
    """Writes, per video, a deterministic array derived from its id and a config value; logs each shard
    it writes (one line per (shard, field), appended) to ``log`` when given."""

    name = "toy"
    fields = ["a", "b"]

    def __init__(self, ws: Workspace, scale: float = 1.0, delay: float = 0.0, log: Path | None = None):
        self.ws, self.scale, self.delay, self.log = ws, scale, delay, log
        self.calls: list[tuple[int, tuple[str, ...]]] = []

    def lineage(self, field, job):
        return Lineage(config=fingerprint(field, self.scale), code="toy-1", inputs={"videos": job.planned.videos})

    def process(self, job, claims, retry=None):
        self.calls.append((job.index, tuple(claims)))
        for f, claim in claims.items():
            w = ShardWriter(self.ws, f, job.index, self.lineage(f, job), {"extractor": "toy", "rate": 1.0, "dim": 2},
                            claim=claim)
            for r in job.records:
                time.sleep(self.delay)
                arr = np.full((3, 2), self.scale * len(r.id), dtype=np.float16)
                bad = "bad" in r.id
                w.add(r.id, {"json": encode_json({"id": r.id, "status": "failed" if bad else "ok"}),
                             "feat.npy": encode_npy(arr)},
                      status="failed" if bad else "ok", error="broken" if bad else None)
            w.commit()
            if self.log is not None:
                with open(self.log, "a") as fh:
                    fh.write(f"{job.index} {f} {os.getpid()}\n")


def make_jobs(n_shards: int = 5, per_shard: int = 3) -> list[ShardJob]:
    jobs = []
    for s in range(n_shards):
        recs = [VideoRecord(id=f"v{s}_{i}" + ("_bad" if (s, i) == (1, 2) else ""), path=f"v{s}_{i}.mp4", shard=s)
                for i in range(per_shard)]
        planned = PlannedShard(s, len(recs), fingerprint([r.identity() for r in recs]), fingerprint(""))
        jobs.append(ShardJob(s, planned, recs))
    return jobs


def tars(ws: Workspace, jobs, fields=("a", "b")) -> dict:
    # the toy fields are not among store.fields.FIELDS: read the files by name
    return {(f, j.index): (ws.root / "features" / f / f"shard-{j.index:06d}.tar").read_bytes()
            for f in fields for j in jobs}


@pytest.fixture(autouse=True)
def toy_fields(monkeypatch):
    """Let the layout accept the toy fields a and b."""
    import store.layout

    monkeypatch.setattr(store.layout, "check_field", lambda f: f)


def test_two_ranks_cover_every_shard_once(tmp_path):
    jobs = make_jobs()
    ws2 = Workspace(tmp_path / "two")
    stages = [ToyStage(ws2), ToyStage(ws2)]
    for rank in (0, 1):
        run_sharded(stages[rank], Workers(ws2, FAST), jobs, rank=rank, world=2, progress=False)
    assert sorted(i for s in stages for i, _ in s.calls) == [0, 1, 2, 3, 4]
    assert [i for i, _ in stages[0].calls] == [0, 2, 4]
    ws1 = Workspace(tmp_path / "one")
    run_sharded(ToyStage(ws1), Workers(ws1, FAST), jobs, progress=False)
    assert tars(ws1, jobs) == tars(ws2, jobs)


def test_rerun_skips_done_and_redoes_stale_with_its_reason(tmp_path):
    ws, jobs = Workspace(tmp_path), make_jobs()
    workers = Workers(ws, FAST)
    first = ToyStage(ws)
    s1 = run_sharded(first, workers, jobs, progress=False)
    assert s1.processed == {"a": 5, "b": 5}
    again = ToyStage(ws)
    s2 = run_sharded(again, workers, jobs, progress=False)
    assert again.calls == [] and s2.skipped == {"a": 5, "b": 5}
    # Another config for field b: b is stale ("config changed") and is the only field redone.
    changed = ToyStage(ws, scale=2.0)
    st = shard_state(ws, "b", 3, changed.lineage("b", jobs[3]))
    assert st.status == "stale" and st.reasons == ["config changed"]
    # A tar whose size is not its record's is stale, not skipped.
    tar = ws.root / "features" / "a" / "shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[:-512])
    st = shard_state(ws, "a", 2, again.lineage("a", jobs[2]))
    assert st.status == "stale" and "bytes, its record says" in st.reasons[0]
    run_sharded(again, workers, jobs, progress=False)
    assert again.calls == [(2, ("a",))]
    # Same size, other bytes: only a checksum tells (verify).
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert shard_state(ws, "a", 2, again.lineage("a", jobs[2])).done
    st = shard_state(ws, "a", 2, again.lineage("a", jobs[2]), verify=True)
    assert st.status == "stale" and st.reasons == ["tar checksum differs from its record"]
    # Inputs changed (a re-scan saw another file): reason names them.
    moved = make_jobs()
    moved[4].records[0].mtime_ns = 123
    moved[4].planned = PlannedShard(4, 3, fingerprint([r.identity() for r in moved[4].records]), fingerprint(""))
    assert shard_state(ws, "a", 4, again.lineage("a", moved[4])).reasons == ["videos changed"]
    forced = ToyStage(ws)
    run_sharded(forced, workers, jobs, force=True, progress=False)
    assert len(forced.calls) == 5


def test_shard_reads_back_with_safe_decoders_and_record_schema(tmp_path):
    ws, jobs = Workspace(tmp_path), make_jobs(1)
    run_sharded(ToyStage(ws, scale=2.0), Workers(ws, FAST), jobs, progress=False)
    samples = list(iter_samples(ws.shard_tar("a", 0)))
    assert [s["__key__"] for s in samples] == [r.id for r in jobs[0].records]
    assert samples[0]["feat.npy"].dtype == np.float16
    assert float(samples[0]["feat.npy"][0, 0]) == 2.0 * len("v0_0")
    record = read_record(ws.shard_record("a", 0))
    assert record["n_videos"] == 3 and record["n_ok"] == 3 and len(record["sha256"]) == 64
    assert record["bytes"] == ws.shard_tar("a", 0).stat().st_size
    assert record["extractor"] == {"extractor": "toy", "rate": 1.0, "dim": 2} and record["dtype"] == "float16"
    assert record["unit"] == "features/a/shard-000000"
    assert record["lineage"]["inputs"] == {"videos": jobs[0].planned.videos}
    assert set(record["provenance"]) >= {"version", "git_revision", "host", "pid", "created"}


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    import store.layout
    store.layout.check_field = lambda f: f
    from tests.pipeline.test_runner import ToyStage, make_jobs
    from pipeline.runner import RunnerConfig, Workers, run_sharded
    from store.layout import Workspace
    ws = Workspace({ws!r})
    mode, rank, world, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    workers = Workers(ws, RunnerConfig(mode=mode, poll_s=0.05, lease_s=30, heartbeat_s=1))
    s = run_sharded(ToyStage(ws, delay=delay, log={log!r}), workers, make_jobs(n_shards={n}), rank=rank,
                    world=world, progress=False)
    print(sum(s.processed.values()), sum(s.by_others.values()))
    """
)


def _script(tmp_path: Path, ws: Path, n: int = 5) -> tuple[Path, Path]:
    log = tmp_path / f"{ws.name}.log"
    script = tmp_path / f"{ws.name}.py"
    script.write_text(SCRIPT.format(root=str(ROOT), ws=str(ws), log=str(log), n=n))
    return script, log


def test_sigkill_mid_shard_then_rerun_is_identical(tmp_path):
    killed = tmp_path / "killed"
    script, _ = _script(tmp_path, killed)
    proc = subprocess.Popen([sys.executable, str(script), "static", "0", "1", "0.05"])
    ws = Workspace(killed)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and read_record(ws.shard_record("a", 2)) is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    jobs = make_jobs()
    stage = ToyStage(ws)
    states = [shard_state(ws, f, j.index, stage.lineage(f, j)).status for j in jobs for f in stage.fields]
    assert "done" in states and "missing" in states  # killed mid-way, nothing reads half-done
    assert list(ws.locks_dir.rglob("*.lock"))  # the dead writer's claim is still there
    for f in stage.fields:
        for j in jobs:
            if read_record(ws.shard_record(f, j.index)) is not None:
                assert len(list(iter_samples(ws.shard_tar(f, j.index)))) == len(j.records)
    n_done_before = states.count("done")
    run_sharded(stage, Workers(ws, FAST), jobs, progress=False)  # breaks the dead owner's claim
    assert sum(len(fs) for _, fs in stage.calls) == 10 - n_done_before
    assert not [p for p in ws.root.rglob("*") if ".tmp-" in p.name]
    assert not list(ws.locks_dir.rglob("*.lock"))
    clean = Workspace(tmp_path / "clean")
    run_sharded(ToyStage(clean), Workers(clean, FAST), jobs, progress=False)
    assert tars(ws, jobs) == tars(clean, jobs)


def _writes(log: Path) -> list[tuple[int, str]]:
    return sorted((int(i), f) for i, f, _ in (line.split() for line in log.read_text().splitlines()))


@pytest.mark.parametrize("namespaces", [False, True], ids=["same-pid-namespace", "own-pid-namespaces"])
def test_many_processes_each_shard_once(tmp_path, namespaces):
    """Static ranks (one duplicated), a dynamic worker joining late: every process exits 0, each (shard,
    field) is written exactly once, and the shards equal a single process's. With ``own-pid-namespaces``
    every process runs as PID 1 of its own namespace (equal PIDs), as in containers."""
    prefix: list[str] = []
    if namespaces:
        probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"unshare --pid not allowed here: {probe.stderr.decode().strip()}")
        prefix = ["unshare", "--pid", "--fork", "--mount-proc"]
    ws = tmp_path / "many"
    script, log = _script(tmp_path, ws, n=8)
    # starts closer together than a shard takes (3 videos x 0.1 s x 2 fields): without claims, the two
    # rank-0 processes and the dynamic one would write the same shards
    plan = [("static", 0, 2, 0.0), ("static", 0, 2, 0.05), ("static", 1, 2, 0.1), ("dynamic", 0, 1, 0.4)]
    procs = []
    for mode, rank, world, start in plan:
        time.sleep(start - (plan[len(procs) - 1][3] if procs else 0.0))
        procs.append(subprocess.Popen(prefix + [sys.executable, str(script), mode, str(rank), str(world), "0.1"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-1500:] for o in outs]
    written = _writes(log)
    assert written == sorted((i, f) for i in range(8) for f in ("a", "b"))  # each exactly once
    assert sum(int(o[0].split()[0]) for o in outs) == 16
    single = Workspace(tmp_path / "single")
    run_sharded(ToyStage(single), Workers(single, FAST), make_jobs(8), progress=False)
    assert tars(Workspace(ws), make_jobs(8)) == tars(single, make_jobs(8))
    assert not list(Workspace(ws).locks_dir.rglob("*.lock"))


def test_dynamic_worker_takes_over_the_shard_of_a_killed_one(tmp_path):
    ws = tmp_path / "takeover"
    script, log = _script(tmp_path, ws, n=3)
    slow = subprocess.Popen([sys.executable, str(script), "static", "0", "1", "0.5"])
    w = Workspace(ws)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(w.locks_dir.rglob("*.lock")):
        time.sleep(0.02)
    helper = subprocess.Popen([sys.executable, str(script), "dynamic", "0", "1", "0.0"],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    os.kill(slow.pid, signal.SIGKILL)  # dies holding a claim; the dynamic worker must not wait forever
    slow.wait()
    out, _ = helper.communicate(timeout=60)
    assert helper.returncode == 0
    stage = ToyStage(w)
    assert all(shard_state(w, f, j.index, stage.lineage(f, j)).done for j in make_jobs(3) for f in ("a", "b"))
    assert not list(w.locks_dir.rglob("*.lock"))
    assert json.loads("[" + out.split()[0] + "]")[0] >= 1
