"""The on-disk contract: layout, owners and their liveness, atomic writes and the sweep, claims,
lineage, and the safe reader."""

from __future__ import annotations

import io
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

from store import atomic, identity
from store.claims import Claim, ClaimLost, Claims, Holder
from store.fields import unusable_reason, usable
from store.layout import Workspace, shard_index, shard_name
from store.lineage import RUNTIME, Lineage, config_dict, stale_reasons, unit_state
from store.owner import ClaimConfig, Registry
from store.reader import CorruptMember, decode_member, decode_npy

ROOT = Path(__file__).resolve().parents[2]

HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from store import atomic, identity
    from store.claims import Claims
    from store.layout import Workspace
    from store.owner import ClaimConfig, Registry
    ws = Workspace(sys.argv[1])
    reg = Registry(ws.owners_dir, ClaimConfig(lease_s=30, heartbeat_s=1))
    claims = Claims(ws.lock, reg, ws.locks_dir)
    got = claims.try_acquire(sys.argv[2])
    (ws.root / ("." + "x.bin" + atomic.TEMP_MARK + identity.current().token)).write_bytes(b"partial")
    print(identity.current().token, type(got).__name__, flush=True)
    time.sleep(float(sys.argv[3]))
    """
)


def _holder(tmp_path: Path, ws: Workspace, unit: str, sleep: float = 60.0) -> tuple[subprocess.Popen, str, str]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), str(ws.root), unit, str(sleep)], stdout=subprocess.PIPE,
                            text=True)
    token, got = proc.stdout.readline().split()
    return proc, token, got


def _claims(ws: Workspace, **kw) -> Claims:
    return Claims(ws.lock, Registry(ws.owners_dir, ClaimConfig(**kw)), ws.locks_dir)


def test_layout_names_and_units(tmp_path):
    ws = Workspace(tmp_path)
    assert shard_name(123) == "shard-000123" and shard_index("shard-000123.tar") == 123
    assert shard_index("shard-000123.json", "json") == 123 and shard_index("shard-000123.json") is None
    assert shard_index(".shard-000123.tar.tmp-x") is None and shard_index("shard-12.tar") is None
    assert ws.shard_tar("text", 7) == tmp_path / "features" / "text" / "shard-000007.tar"
    assert ws.lock(ws.shard_unit("audio", 3)) == tmp_path / "locks" / "features" / "audio" / "shard-000003.lock"
    with pytest.raises(ValueError):
        ws.field_dir("video4d")
    for bad in ("", "a/../b", "/abs"):
        with pytest.raises(ValueError):
            ws.lock(bad)
    assert ws.run_dirs("default", "0123456789abcdef") == [tmp_path / "runs" / "default",
                                                          tmp_path / "runs" / "default-01234567"]
    for f in ("video2d", "text"):
        ws.field_dir(f).mkdir(parents=True)
    for name in ("shard-000002.json", "shard-000000.json", "shard-000001.tar", ".shard-000005.json.tmp-x", "x.json"):
        (ws.field_dir("video2d") / name).write_text("{}")
    assert ws.shard_indices("video2d") == [0, 2] and ws.shard_indices("video2d", "tar") == [1]


def test_owner_tokens_and_liveness(tmp_path):
    me = identity.current()
    assert identity.local_alive(me.token) is True
    assert me.token.count("-") == 3 and identity.parse_token(me.token) == (me.machine, me.pid, me.start)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = identity.process_start(proc.pid)
    assert start is not None
    other = f"{me.machine}-{proc.pid}-{start}-abcd1234"
    assert identity.local_alive(other) is True
    assert identity.local_alive(f"{me.machine}-{proc.pid}-{start + 1}-abcd1234") is False  # pid reused
    proc.kill()
    proc.wait()
    assert identity.local_alive(other) is False
    assert identity.local_alive(f"00000000-{proc.pid}-{start}-abcd1234") is None  # another machine: cannot tell
    assert identity.local_alive("not-a-token") is None


def test_registry_heartbeat_decides_for_other_machines(tmp_path):
    reg = Registry(tmp_path / "owners", ClaimConfig(lease_s=10, heartbeat_s=1))
    foreign = "00000000-1-5-deadbeef"
    assert not reg.alive(foreign)  # never registered
    path = reg.path(foreign)
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    assert reg.alive(foreign)
    old = time.time() - 60
    os.utime(path, (old, old))
    assert not reg.alive(foreign) and reg.sweep() == 1 and not path.exists()
    reg.register()
    mine = reg.path(identity.current().token)
    os.utime(mine, (old, old))
    time.sleep(1.5)  # the heartbeat refreshes it
    assert time.time() - mine.stat().st_mtime < 5


def test_atomic_writes_leave_old_or_new(tmp_path):
    target = tmp_path / "out" / "data.bin"
    atomic.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target, "wb") as fh:
            fh.write(b"new but broken")
            assert atomic.temp_path(target).exists() and atomic.temp_owner(atomic.temp_path(target).name)
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["data.bin"]
    assert atomic.temp_path(target).name == f".data.bin.tmp-{identity.current().token}"
    mtime = target.stat().st_mtime_ns
    time.sleep(0.01)
    assert atomic.write_if_changed(target, b"old") is False and target.stat().st_mtime_ns == mtime
    assert atomic.write_if_changed(target, b"new") is True and target.read_bytes() == b"new"


def test_sweep_removes_only_temps_of_owners_that_are_gone(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    live, live_token, _ = _holder(tmp_path, ws, "unit-live")
    dead, dead_token, _ = _holder(tmp_path, ws, "unit-dead")
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    reg = Registry(ws.owners_dir, ClaimConfig(lease_s=30))
    foreign_fresh = ws.root / ".y.bin.tmp-00000000-7-7-aaaaaaaa"
    foreign_old = ws.root / ".z.bin.tmp-00000000-8-8-bbbbbbbb"
    for p in (foreign_fresh, foreign_old):
        p.write_bytes(b"x")
    old = time.time() - 600
    os.utime(foreign_old, (old, old))
    try:
        n = atomic.sweep_temps(ws.root, reg.keeps)
        left = sorted(p.name for p in ws.root.iterdir() if atomic.temp_owner(p.name))
        assert n == 2  # the dead local owner's and the foreign one past the lease
        assert left == sorted([f".x.bin.tmp-{live_token}", foreign_fresh.name])
    finally:
        live.kill()
        live.wait()


def test_claims_live_holders_are_never_broken_dead_ones_are(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    claims = _claims(ws, lease_s=30, poll_s=0.05)
    proc, token, got = _holder(tmp_path, ws, "features/text/shard-000001")
    assert got == "Claim"
    held = claims.try_acquire("features/text/shard-000001")
    assert isinstance(held, Holder) and held.token == token and held.pid == proc.pid
    assert claims.holder("features/text/shard-000001").token == token
    with pytest.raises(TimeoutError, match="held by"):
        claims.acquire("features/text/shard-000001", timeout_s=0.3)
    proc.kill()
    proc.wait()
    half = ws.lock("features/text/shard-000001").with_name(f".shard-000001.lock{atomic.TEMP_MARK}{token}")
    half.write_text("{}")  # a claim file the dead owner was making when it was killed
    assert claims.sweep() == 2 and not half.exists()  # its claim broken, its temporary file removed
    assert not ws.lock("features/text/shard-000001").exists()
    mine = claims.try_acquire("features/text/shard-000001")
    assert isinstance(mine, Claim) and mine.held()
    mine.verify()
    mine.release()
    assert not ws.lock("features/text/shard-000001").exists()


def test_a_claim_on_another_machine_is_broken_only_after_its_lease(tmp_path):
    ws = Workspace(tmp_path / "ws")
    claims = _claims(ws, lease_s=5)
    foreign = "00000000-1-5-cafecafe"
    lock = ws.lock("scan")
    lock.parent.mkdir(parents=True)
    lock.write_text('{"unit": "scan", "token": "%s", "host": "node7", "pid": 1, "since": "t"}' % foreign)
    reg = claims.registry.path(foreign)
    reg.parent.mkdir(parents=True, exist_ok=True)
    reg.write_text("{}")
    got = claims.try_acquire("scan")
    assert isinstance(got, Holder) and got.host == "node7"  # its heartbeat is fresh
    old = time.time() - 60
    os.utime(reg, (old, old))
    mine = claims.try_acquire("scan")
    assert isinstance(mine, Claim)


def test_broken_claim_is_noticed_before_commit(tmp_path):
    ws = Workspace(tmp_path / "ws")
    claims = _claims(ws)
    mine = claims.try_acquire("runs/default")
    assert isinstance(mine, Claim)
    ws.lock("runs/default").write_text('{"unit": "runs/default", "token": "other", "host": "h", "pid": 2, "since": "t"}')
    with pytest.raises(ClaimLost, match="now held by h pid 2"):
        mine.verify()


RACE = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from store.claims import Claim, Claims
    from store.layout import Workspace
    from store.owner import Registry
    ws = Workspace(sys.argv[1])
    claims = Claims(ws.lock, Registry(ws.owners_dir), ws.locks_dir)
    while time.time() < float(sys.argv[2]):
        pass
    print(isinstance(claims.try_acquire("eval/heldout"), Claim), flush=True)
    time.sleep(2)
    """
)


def test_racing_claims_one_winner(tmp_path):
    ws = Workspace(tmp_path / "ws")
    script = tmp_path / "race.py"
    script.write_text(RACE.format(root=str(ROOT)))
    go = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, str(script), str(ws.root), str(go)], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    results = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(results) == ["False"] * 5 + ["True"]


from dataclasses import dataclass, field  # noqa: E402


@dataclass
class _Inner:
    size: int = 3
    device: str = field(default="cpu", metadata=RUNTIME)


@dataclass
class _Cfg:
    lr: float = 0.1
    batch_size: int = field(default=8, metadata=RUNTIME)
    inner: _Inner = field(default_factory=_Inner)


def test_lineage_fingerprints_and_reasons():
    assert config_dict(_Cfg()) == {"lr": 0.1, "inner": {"size": 3}}  # runtime fields are not in it
    a = Lineage("c1", "code-1", {"videos": "v1", "captions": "k1"})
    assert a.fingerprint == Lineage("c1", "code-1", {"captions": "k1", "videos": "v1"}).fingerprint
    assert stale_reasons(a.to_json(), Lineage("c2", "code-1", {"videos": "v1", "captions": "k1"})) == ["config changed"]
    assert stale_reasons(a.to_json(), Lineage("c1", "code-2", {"videos": "v2", "captions": "k1"})) == [
        "code changed (code-1 -> code-2)", "videos changed"]
    assert stale_reasons(a.to_json(), Lineage("c1", "code-1", {"videos": "v1"})) == ["input captions no longer used"]
    assert stale_reasons(None, a) == ["record has no lineage (made by an older version)"]
    rec = {"fingerprint": a.fingerprint, "lineage": a.to_json()}
    assert unit_state(rec, a).status == "done" and unit_state(None, a).status == "missing"
    st = unit_state(rec, a, ["tar missing"])
    assert st.status == "stale" and st.reasons == ["tar missing"]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_iter_raw_reads_what_webdatasets_iterator_reads_and_stops_at_a_cut_member(tmp_path):
    """store.reader reads members with one read at their offset instead of webdataset's stream-mode
    iterator: the same samples, byte for byte; a member cut short raises after the whole samples before
    it."""
    import tarfile

    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from store.reader import iter_raw

    tar = tmp_path / "x.tar"
    rng = np.random.default_rng(0)
    with open(tar, "wb") as fh:
        w = wds.TarWriter(fh, encoder=False)
        for i in range(5):
            rows = rng.standard_normal((int(rng.integers(1, 400)), 2048)).astype(np.float16)
            w.write({"__key__": f"v{i:03d}", "json": b'{"i": %d}' % i, "feat.npy": _npy(rows)})
        w.close()
    with open(tar, "rb") as fh:
        want = [{k: v for k, v in s.items() if k != "__url__"}
                for s in group_by_keys(({**f, "__url__": str(tar)} for f in tar_file_iterator(fh)))]
    got = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_raw(tar)]
    assert [s["__key__"] for s in got] == [f"v{i:03d}" for i in range(5)] and got == want
    # cut inside the last sample's npy member: the samples before it, then ReadError
    cut = tmp_path / "cut.tar"
    with tarfile.open(tar) as t:
        last = [m for m in t.getmembers() if m.name == "v004.feat.npy"][0]
    cut.write_bytes(tar.read_bytes()[: last.offset_data + last.size // 2])
    seen, theirs = [], []
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        for s in iter_raw(cut):
            seen.append(s["__key__"])
    with open(cut, "rb") as fh, pytest.raises(tarfile.ReadError):
        for s in group_by_keys(({**f, "__url__": str(cut)} for f in tar_file_iterator(fh))):
            theirs.append(s["__key__"])
    # webdataset's iterator yields a sample once the next key's first member is read, so it loses
    # v003 too; ours knows v004's key before reading its bytes
    assert theirs == [f"v{i:03d}" for i in range(3)]
    assert seen == [f"v{i:03d}" for i in range(4)]
    # cut inside v004's second member: v004 is not whole and must not be delivered
    with tarfile.open(tar) as t:
        second = [m for m in t.getmembers() if m.name.startswith("v004.")][1]
    cut.write_bytes(tar.read_bytes()[: second.offset_data + second.size // 2])
    seen = []
    with pytest.raises(tarfile.ReadError):
        for s in iter_raw(cut):
            seen.append(s["__key__"])
    assert seen == [f"v{i:03d}" for i in range(4)]


def test_reader_decodes_only_safe_members_and_bounds_npy_headers():
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    out = decode_npy(_npy(a))
    assert out.dtype == np.float16 and np.array_equal(out, a) and not out.flags.writeable
    fortran = np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3))
    assert np.array_equal(decode_npy(_npy(fortran)), fortran)
    # a header that declares 10^12 floats in a 200-byte member: refused before any allocation
    huge = _npy(np.zeros(4, np.float32)).replace(b"(4,)", b"(1000000000000,)")
    with pytest.raises(CorruptMember, match="declares"):
        decode_npy(huge)
    with pytest.raises(CorruptMember, match="declares"):
        decode_npy(_npy(a)[:-2])  # truncated
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptMember, match="pickle"):
        decode_npy(buf.getvalue())
    with pytest.raises(CorruptMember, match="npy format version .* not supported|bad npy header"):
        decode_npy(b"\x93NUMPY garbage" + b"\x00" * 40)
    with pytest.raises(CorruptMember, match="bad npy header"):
        decode_npy(b"not an npy at all")
    with pytest.raises(CorruptMember, match="only npy, json, txt"):
        decode_member("x.pickle", b"\x80\x04K\x01.")
    assert decode_member("meta.json", b'{"a": 1}') == {"a": 1} and decode_member("t.txt", b"hi") == "hi"
    with pytest.raises(CorruptMember, match="bad json"):
        decode_member("meta.json", b"{")


@pytest.mark.parametrize("statuses, reason", [
    ({"video2d": "ok", "video3d": "ok", "audio": "ok", "text": "ok"}, None),
    ({"video2d": "ok", "video3d": "ok", "audio": "no_audio", "text": "ok"}, None),
    ({"video2d": "ok", "video3d": "ok", "audio": "ok", "text": "no_captions"}, "no_captions"),
    ({"video2d": "ok", "video3d": "failed", "audio": "ok", "text": "ok"}, "failed"),
    ({"video2d": "ok", "video3d": "ok", "audio": "failed", "text": "no_captions"}, "failed"),
    ({"video2d": "ok", "video3d": "ok", "text": "ok"}, "failed"),  # a field missing
])
def test_usable_video_rule(statuses, reason):
    assert unusable_reason(statuses) == reason and usable(statuses) == (reason is None)


def test_record_index_reads_each_record_once_and_sees_replacements(tmp_path, monkeypatch):
    import json

    import store.index as index_mod
    from store.index import field_records
    from store.shards import ShardWriter, encode_json

    ws = Workspace(tmp_path / "ws")
    lineage = Lineage("c", "code", {})
    for i in range(3):
        w = ShardWriter(ws, "audio", i, lineage, {"extractor": "x", "rate": 100.0, "dim": 40})
        w.add(f"v{i}", {"json": encode_json({})}, status="ok" if i else "no_audio", error=None if i else "silent")
        w.commit()
    reads: list[str] = []
    real = index_mod.read_record
    monkeypatch.setattr(index_mod, "read_record", lambda p: reads.append(Path(p).name) or real(p))
    first = field_records(ws, "audio")
    assert sorted(reads) == ["shard-000000.json", "shard-000001.json", "shard-000002.json"]
    assert ws.field_index("audio").is_file()
    assert first.records[0].problems == (("v0", "no_audio", "silent", False),) and first.records[1].problems == ()
    assert first.tar_sizes == {i: ws.shard_tar("audio", i).stat().st_size for i in range(3)}
    assert first.records[2].bytes == first.tar_sizes[2] and json.loads(first.records[2].extractor)["rate"] == 100.0
    reads.clear()
    mtime = ws.field_index("audio").stat().st_mtime_ns
    again = field_records(ws, "audio")
    assert reads == [] and again.records == first.records  # nothing re-read, index not rewritten
    assert ws.field_index("audio").stat().st_mtime_ns == mtime
    w = ShardWriter(ws, "audio", 1, Lineage("c2", "code", {}), {"extractor": "x", "rate": 100.0, "dim": 40})
    w.add("v1", {"json": encode_json({})}, status="failed", error="boom")
    w.commit()  # a replaced record: new inode, read again
    third = field_records(ws, "audio")
    assert reads == ["shard-000001.json"] and third.records[1].problems == (("v1", "failed", "boom", False),)
    assert third.records[1].fingerprint == Lineage("c2", "code", {}).fingerprint
    ws.shard_record("audio", 2).unlink()
    ws.field_index("audio").write_text("{not json")  # a damaged index is only a cache
    reads.clear()
    fourth = field_records(ws, "audio")
    assert sorted(fourth.records) == [0, 1] and sorted(reads) == ["shard-000000.json", "shard-000001.json"]


def test_the_index_and_the_layout_agree_on_shard_file_names():
    from store.index import _shard_file

    for name in ("shard-000123.tar", "shard-000123.json", "shard-1234567.tar", "shard-00012.tar", "shard-abcdef.json",
                 "shard-000123.tar.tmp-x", ".shard-000123.json", "shard-000123.jsonl", "shard-٠١٢٣٤٥.tar",
                 "shard-000123json", "x-000123.tar"):
        for suffix in ("tar", "json"):
            assert _shard_file(name, "." + suffix) == shard_index(name, suffix), (name, suffix)


def test_record_index_trusts_a_settled_folder_but_always_checks_tar_sizes(tmp_path, monkeypatch):
    """While a field's folder is unchanged (and was settled when listed), records are not stat'ed one
    by one; the tars always are; a record replaced by rename changes the folder and is seen."""
    import store.index as index_mod
    from store.index import field_records
    from store.shards import ShardWriter, encode_json

    ws = Workspace(tmp_path / "ws")
    lineage = Lineage("c", "code", {})

    def write(i: int, status: str = "ok") -> None:
        w = ShardWriter(ws, "video2d", i, lineage, {"extractor": "x", "rate": 1.0, "dim": 4})
        w.add(f"v{i}", {"json": encode_json({})}, status=status, error=None if status == "ok" else "boom")
        w.commit()

    for i in range(2):
        write(i)
    folder = ws.field_dir("video2d")
    old = time.time() - 60
    os.utime(folder, (old, old))  # settled: last changed a minute ago
    field_records(ws, "video2d")  # indexes, and records the folder as settled
    assert json.loads(ws.field_index("video2d").read_text())["folder"] is not None
    reads: list[str] = []
    real = index_mod.read_record
    monkeypatch.setattr(index_mod, "read_record", lambda p: reads.append(Path(p).name) or real(p))
    stats: list = []
    real_scandir = os.scandir
    monkeypatch.setattr(index_mod.os, "scandir", lambda *a: stats.append(a) or real_scandir(*a))
    tar = ws.shard_tar("video2d", 1)
    with open(tar, "r+b") as fh:  # truncated in place: the folder does not change
        fh.truncate(tar.stat().st_size - 512)
    os.utime(folder, (old, old))
    again = field_records(ws, "video2d")
    assert stats == [] and reads == []  # no listing, no record read
    assert again.tar_sizes[1] == tar.stat().st_size != again.records[1].bytes  # the size check still sees it
    write(1, "failed")  # replaced by rename: the folder changed
    third = field_records(ws, "video2d")
    assert stats and reads == ["shard-000001.json"] and third.records[1].problems == (("v1", "failed", "boom", False),)
    # listed within RACY_S of its last change: not trusted next time
    assert json.loads(ws.field_index("video2d").read_text())["folder"] is None
