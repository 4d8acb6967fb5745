"""The one way this project runs an external tool (ffprobe, ffmpeg, a PyAV child) under a time limit.

The tool starts in its own session, hence its own process group, with stdin at /dev/null and its
output captured. When it runs past the limit, or when the calling thread is interrupted (an
exception such as KeyboardInterrupt while it waits), the whole group is killed with SIGKILL and
reaped: no tool and nothing it started outlives the call. ``subprocess.run(timeout=...)`` is not
enough for that: it kills the direct child only, so a grandchild (ffmpeg's helpers, a shell's
children) would keep running and hold the output pipes open.

Hand-written on ``subprocess.Popen`` because neither subprocess nor ffmpeg-python offers a group
kill (ffmpeg-python's ``run``/``probe`` have no time limit at all).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from typing import NamedTuple, Protocol

__all__ = ["ToolResult", "kill_group", "run_tool"]

_REAP_S = 5.0  # after the kill: time for the pipes to close before the process is only waited for


class _Registry(Protocol):
    def add(self, proc: subprocess.Popen) -> None: ...
    def discard(self, proc: subprocess.Popen) -> None: ...


class ToolResult(NamedTuple):
    """What a tool left: its exit code and its output, as bytes."""

    returncode: int
    stdout: bytes
    stderr: bytes


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and whatever it started (its own process group, see :func:`run_tool`)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def run_tool(cmd: Sequence[str], timeout: float | None, *, env: dict[str, str] | None = None,
             running: _Registry | None = None) -> ToolResult:
    """Run ``cmd`` to completion and return its exit code and output.

    Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds (None: no limit), once the tool's
    process group is killed and reaped, and OSError when the tool cannot be started. ``running`` (an
    object with ``add``/``discard``) is told of the process while it runs, so that another thread can
    kill it (:func:`kill_group`) to interrupt this call.
    """
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env=env)
    if running is not None:
        running.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        try:
            proc.communicate(timeout=_REAP_S)
        except subprocess.TimeoutExpired:  # a grandchild that left the group still holds the pipes
            proc.wait()
        raise
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt...): leave no process behind
            kill_group(proc)
            proc.wait()
        if running is not None:
            running.discard(proc)
    return ToolResult(proc.returncode, out, err)
