"""`mcn doctor`: real weights files (present, absent, wrong), a PATH without ffprobe, rank variables,
a decoder that does not import; `mcn --version`."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.doctor import (
    MISSING,
    OK,
    WARN,
    WRONG,
    Check,
    Sha256Cache,
    blocked,
    check_binaries,
    check_decoders,
    check_ranks,
    check_torch,
    diagnose,
    exit_code,
    format_report,
    render_table,
)
from store import lineage
from store.layout import Workspace
from tests.support import ROOT

RESNET = "resnet152-394f9c45.pth"  # its name promises sha256 394f9c45...
RESNEXT = "resnext-101-kinetics.pth"  # no checksum in its name


def _rows(checks: list[Check], section: str) -> dict[str, Check]:
    return {c.item.split(" (")[0]: c for c in checks if c.section == section}


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME (where extractors.weights looks) and the sha256 cache in the test's temp dir."""
    home = tmp_path / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return home / "hub" / "checkpoints"


def test_weights_present_absent_and_wrong(tmp_path, torch_home):
    wrong = torch_home / RESNET
    wrong.write_bytes(b"an interrupted download, not ResNet-152\n" * 10)
    w2v = tmp_path / "my-vectors.bin"  # named in the config: found by its path
    w2v.write_bytes(bytes(range(256)) * 4)
    cfg = load_config(None, ["extract.fields=[video2d,video3d,text]",
                             f"extract.text.options={{weights: {w2v}}}"])
    ws = Workspace(tmp_path / "ws")
    checks = diagnose(ws, cfg, env={"PATH": os.environ["PATH"]})
    w = _rows(checks, "weights")

    assert w["video2d"].status == WRONG and w["video2d"].blocks == ("extract",)
    digest = hashlib.sha256(wrong.read_bytes()).hexdigest()
    assert not digest.startswith("394f9c45")
    assert f"sha256 {digest[:16]}" in w["video2d"].found and "394f9c45" in w["video2d"].found
    assert str(wrong) in w["video2d"].fix

    assert w["video3d"].status == MISSING and w["video3d"].blocks == ("extract",)
    assert str(torch_home / RESNEXT) in w["video3d"].fix  # where to put it, from extractors.weights

    assert w["text"].status == OK and not w["text"].blocks
    assert str(w2v) in w["text"].found and hashlib.sha256(w2v.read_bytes()).hexdigest()[:16] in w["text"].found

    assert exit_code(checks) == 1 and [c.item for c in blocked(checks)["extract"]] == [
        "video2d (resnet152_2d)", "video3d (resnext101_3d)"]
    report = format_report(checks)
    assert "cannot run extract (needs video2d (resnet152_2d), video3d (resnext101_3d))" in report
    assert f"Put {RESNEXT} at {torch_home / RESNEXT}" in report

    # random init allowed: the absent file is a warning; the wrong file still blocks (it would be loaded)
    cfg.extract.allow_random_weights = True
    checks = diagnose(ws, cfg, env={"PATH": os.environ["PATH"]})
    w = _rows(checks, "weights")
    assert w["video3d"].status == WARN and not w["video3d"].blocks
    assert w["video2d"].status == WRONG and exit_code(checks) == 1
    wrong.unlink()
    checks = diagnose(ws, cfg, env={"PATH": os.environ["PATH"]})
    assert _rows(checks, "weights")["video2d"].status == WARN and exit_code(checks) == 0


def test_sha256_cache_by_path_size_and_mtime(tmp_path, torch_home):
    f = torch_home / RESNEXT
    f.write_bytes(b"a" * 1000)
    st = f.stat()
    cfg = load_config(None, ["extract.fields=[video3d]"])
    ws = Workspace(tmp_path / "ws")
    first = _rows(diagnose(ws, cfg, env={}), "weights")["video3d"]
    sha_a = hashlib.sha256(b"a" * 1000).hexdigest()
    assert first.status == OK and f"sha256 {sha_a[:16]}…;" in first.found
    cache = Sha256Cache()
    assert cache.path == tmp_path / "cache" / "mcn" / "sha256.json"
    assert cache.entries[str(f.resolve())] == {"size": 1000, "mtime_ns": st.st_mtime_ns, "sha256": sha_a}

    # same path, size and mtime: the cached sha256 is believed (the bytes are not read again), also by a
    # new process (here: with store.lineage's per-process memo emptied)
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    lineage._sha256_cached.cache_clear()
    again = _rows(diagnose(ws, cfg, env={}), "weights")["video3d"]
    assert f"sha256 {sha_a[:16]}… (cached)" in again.found
    # a new mtime: hashed again
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = _rows(diagnose(ws, cfg, env={}), "weights")["video3d"]
    assert hashlib.sha256(b"b" * 1000).hexdigest()[:16] in fresh.found and "(cached)" not in fresh.found


def test_binaries_on_a_path_without_ffprobe(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ffmpeg = shutil.which("ffmpeg")
    (bin_dir / "ffmpeg").symlink_to(ffmpeg)
    cfg = load_config(None, [])
    rows = {c.item: c for c in check_binaries(cfg, {"PATH": str(bin_dir)})}
    line = subprocess.run([ffmpeg, "-version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    assert rows["ffmpeg"].status == OK and rows["ffmpeg"].found == f"{line.split()[2]} ({bin_dir / 'ffmpeg'})"
    # PyAV is installed: no ffprobe is a warning naming the fallback, and blocks nothing
    assert rows["ffprobe"].status == WARN and rows["ffprobe"].blocks == ()
    assert rows["ffprobe"].found.startswith("not on PATH: the scan probes with PyAV (scan.probe_tool=auto)")
    assert "apt-get install ffmpeg" in rows["ffprobe"].fix and "make system-packages" in rows["ffprobe"].fix
    # no ffmpeg: extract decodes audio with PyAV
    rows = {c.item: c for c in check_binaries(cfg, {"PATH": str(tmp_path / "empty")})}
    assert rows["ffmpeg"].status == WARN and rows["ffmpeg"].blocks == ()
    assert rows["ffmpeg"].found.startswith("not on PATH: extract decodes audio and the report grabs thumbnails "
                                           "with PyAV (extract.decode.audio_tool=auto)")
    # the binary chosen explicitly: its absence blocks its stages
    cfg.scan.probe_tool, cfg.extract.decode.audio_tool = "ffprobe", "ffmpeg"
    rows = {c.item: c for c in check_binaries(cfg, {"PATH": str(bin_dir)})}
    assert rows["ffprobe"].status == MISSING and rows["ffprobe"].blocks == ("scan", "evaluate")
    assert rows["ffprobe"].fix.endswith("or set scan.probe_tool=auto to use PyAV")
    assert rows["ffmpeg"].status == OK
    # no PyAV either: a missing binary blocks (extract only when the audio field is selected)
    cfg.scan.probe_tool, cfg.extract.decode.audio_tool = "auto", "auto"
    monkeypatch.setitem(sys.modules, "av", None)  # what `import av` does when it is not installed
    rows = {c.item: c for c in check_binaries(cfg, {"PATH": str(tmp_path / "empty")})}
    assert rows["ffprobe"].status == MISSING and rows["ffprobe"].blocks == ("scan", "evaluate")
    assert rows["ffmpeg"].status == MISSING and rows["ffmpeg"].blocks == ("extract",)
    assert rows["ffmpeg"].fix.endswith("or pip install av")
    cfg.extract.fields = ["video2d", "text"]
    assert {c.item: c for c in check_binaries(cfg, {"PATH": ""})}["ffmpeg"].blocks == ()


def test_ranks_from_pipeline_ranks():
    cfg = load_config(None, [])
    ok = {c.item: c for c in check_ranks(cfg, {"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node-a"})}
    assert ok["variables"].found == "RANK=1 WORLD_SIZE=4 MASTER_ADDR=node-a"
    assert ok["partition (static)"].status == OK and ok["partition (static)"].found.startswith("rank 1 of 4;")
    bad = {c.item: c for c in check_ranks(cfg, {"SLURM_PROCID": "2"})}["partition (static)"]
    assert bad.status == WRONG and bad.blocks == ("extract",) and "SLURM_NTASKS" in bad.fix
    cfg.runner.mode = "dynamic"  # array tasks need no partition with dynamic claims
    dyn = {c.item: c for c in check_ranks(cfg, {"SLURM_ARRAY_TASK_ID": "3"})}["partition (dynamic)"]
    assert dyn.status == OK and dyn.found.startswith("rank 0 of 1;")


def test_selected_decoder_that_does_not_import(monkeypatch):
    cfg = load_config(None, [])
    assert cfg.extract.decode.backend == "decord"
    rows = {c.item: c for c in check_decoders(cfg)}
    assert rows["decord"].status == OK and "selected" in rows["decord"].found
    monkeypatch.setitem(sys.modules, "decord", None)  # what `import decord` does when it is not installed
    monkeypatch.setitem(sys.modules, "av", None)
    rows = {c.item: c for c in check_decoders(cfg)}
    assert rows["decord"].status == MISSING and rows["decord"].blocks == ("extract",)
    assert "pip install decord" in rows["decord"].fix and "extract.decode.backend=" in rows["decord"].fix
    assert rows["pyav"].status == WARN and not rows["pyav"].blocks  # only the fallback
    cfg.extract.fields = ["audio", "text"]  # no visual field: no decoder needed
    assert not {c.item: c for c in check_decoders(cfg)}["decord"].blocks


def test_torch_row_and_cpu_bf16():
    from extractors.precision import cpu_has_bf16

    rows = {c.item: c for c in check_torch(load_config(None, []))}
    assert rows["torch"].found.startswith(f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}")
    assert rows["bf16 CPU"].found.startswith("yes" if cpu_has_bf16() else "no")
    if not torch.cuda.is_available():
        assert rows["GPUs"].found.startswith("none") and not rows["GPUs"].blocks
        cfg = load_config(None, ["train.device=cuda", "extract.video2d.options={device: cuda}"])
        cuda = {c.item: c for c in check_torch(cfg)}["GPUs"]
        assert cuda.status == MISSING and cuda.blocks == ("train", "extract")
        assert cuda.fix.startswith("train.device, extract.video2d.options.device: cuda needs a GPU")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpus_and_their_bf16():
    rows = {c.item: c for c in check_torch(load_config(None, ["train.device=cuda"]))}
    n = torch.cuda.device_count()
    assert n >= 1 and [f"GPU {i}" for i in range(n)] == [k for k in rows if k.startswith("GPU ")]
    for i in range(n):
        bf16 = torch.cuda.get_device_capability(i)[0] >= 8
        assert rows[f"GPU {i}"].found == f"{torch.cuda.get_device_name(i)}, bf16 {'yes' if bf16 else 'no'}"


def test_render_table():
    assert render_table(["a", "bb", "c"], [["xyz", "1", "last one"], ["q", "22", ""]]).splitlines() == [
        "a    bb  c", "---  --  --------", "xyz  1   last one", "q    22"]


def test_cli_doctor_exit_code(tmp_path, torch_home, monkeypatch, capsys):
    from pipeline.cli import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ffmpeg").symlink_to(shutil.which("ffmpeg"))
    monkeypatch.setenv("PATH", str(bin_dir))  # ffmpeg, no ffprobe
    rc = main(["doctor", "--workspace", str(tmp_path / "ws"), "extract.fields=[audio]"])
    out = capsys.readouterr().out
    assert rc == 0, out  # the scan probes with PyAV
    assert "warn: ffprobe: install the Debian package ffmpeg" in out
    assert out.rstrip().endswith("doctor: every stage of this config can run here")
    rc = main(["doctor", "--workspace", str(tmp_path / "ws"), "extract.fields=[audio]", "scan.probe_tool=ffprobe"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert out.splitlines()[0].split() == ["section", "item", "status", "found"]
    assert "missing: ffprobe: install the Debian package ffmpeg" in out
    assert out.rstrip().endswith("doctor: cannot run scan (needs ffprobe); evaluate (needs ffprobe)")


def test_version_names_the_package_version_and_git_revision():
    version = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], check=False, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], check=True, cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    from importlib.metadata import version as dist_version

    assert version.returncode == 0 and version.stdout == f"mcn {dist_version('mcn-pipeline')} (git {rev})\n"
