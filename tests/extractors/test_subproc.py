"""extractors.subproc.run_tool: the one runner of external tools (ffprobe, ffmpeg, PyAV children).

Real processes: a shell that starts a grandchild and hangs. ``subprocess.run(timeout=...)`` kills the
shell only and leaves the grandchild running; run_tool must leave neither."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from extractors.decode import DecodeConfig, DecodeTimeout, decode_audio
from extractors.subproc import kill_group, run_tool
from tests.support import process_gone


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return False


def _hanging_shell(pidfile: Path) -> list[str]:
    """A shell that starts a grandchild (``sleep 60``), writes its pid and waits for it."""
    return ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]


def _pid(pidfile: Path) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        if text:
            return int(text)
        time.sleep(0.02)
    raise AssertionError("the shell never wrote its grandchild's pid")


def test_output_and_exit_code() -> None:
    res = run_tool([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], 30)
    assert (res.returncode, res.stdout, res.stderr) == (3, b"out\n", b"err\n")
    assert tuple(res) == (3, b"out\n", b"err\n")


def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_tool(_hanging_shell(pidfile), 1.0)
    assert time.monotonic() - t0 < 10
    assert _gone(_pid(pidfile))  # the grandchild too, not only the shell


def test_subprocess_run_alone_would_leave_the_grandchild(tmp_path: Path) -> None:
    """The behaviour run_tool exists to avoid (so the test above can fail)."""
    pidfile = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(_hanging_shell(pidfile), capture_output=False, timeout=1.0)
    grandchild = _pid(pidfile)
    try:
        assert not process_gone(grandchild)
    finally:
        os.kill(grandchild, 9)


def test_killed_from_another_thread_through_the_registry(tmp_path: Path) -> None:
    """A caller interrupted elsewhere kills the tool through ``running``; the call then returns."""
    pidfile = tmp_path / "pid"

    class Registry:
        def __init__(self) -> None:
            self.procs: set = set()
            self.seen = threading.Event()

        def add(self, proc) -> None:
            self.procs.add(proc)
            self.seen.set()

        def discard(self, proc) -> None:
            self.procs.discard(proc)

    running = Registry()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(run_tool(_hanging_shell(pidfile), 60, running=running)))
    thread.start()
    assert running.seen.wait(5)
    grandchild = _pid(pidfile)
    for proc in list(running.procs):
        kill_group(proc)
    thread.join(10)
    assert not thread.is_alive() and result[0].returncode == -9
    assert not running.procs and _gone(grandchild)


def test_a_tool_that_cannot_start_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        run_tool([str(tmp_path / "no-such-tool")], 5)


def test_hanging_audio_decoder_is_killed_with_its_children(tmp_path: Path, cfr_mp4: Path, monkeypatch) -> None:
    """decode_audio runs ffmpeg under run_tool: an ffmpeg that hangs (here a stand-in on PATH that
    starts a child and waits) is killed with that child at ``audio_timeout_s``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pidfile = tmp_path / "pid"
    fake = bin_dir / "ffmpeg"
    fake.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\nwait\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # ffprobe stays the real one
    t0 = time.monotonic()
    with pytest.raises(DecodeTimeout, match=r"^ffmpeg audio decode timed out after 1 s \(killed\)$"):
        decode_audio(cfr_mp4, DecodeConfig(audio_timeout_s=1.0), tmp_path / "work")
    assert time.monotonic() - t0 < 15
    assert _gone(_pid(pidfile))
    # and the real ffmpeg, found again on PATH, decodes the same file
    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])
    wave = decode_audio(cfr_mp4, DecodeConfig(), tmp_path / "work2")
    assert isinstance(wave, np.ndarray) and wave.dtype == np.float32 and len(wave) > 16000
