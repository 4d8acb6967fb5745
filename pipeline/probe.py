"""Probe one video file with ffprobe (or, without it, PyAV) into manifest fields.

Every problem is a :class:`ProbeError` whose message is the one-line reason recorded in the manifest;
:class:`ProbeTimeout` (the probe killed after ``timeout`` seconds) and :class:`ProbeUnavailable`
(the probe could not be started) are failures of this scan only: the scan does not cache them, so a
later scan probes the file again.

The probe is a subprocess either way: ``ffprobe``, or where ffprobe is absent (``tool="pyav"``, see
:func:`extractors.libav.resolve_tool`) a PyAV child process that prints the same JSON fields; both run
under :func:`run_ffprobe`'s time limit and process-group kill.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from fractions import Fraction
from pathlib import Path
from typing import Any

from tqdm import tqdm

from extractors.libav import PYAV, child_command, resolve_tool
from extractors.subproc import kill_group, run_tool
from pipeline.walk import display_path

logger = logging.getLogger(__name__)

FFPROBE = "ffprobe"  # looked up on PATH at every call


class ProbeError(Exception):
    """The file is not a usable video; the message is a one-line reason."""

    #: False for failures of the environment (timeout, no ffprobe): not to be cached.
    cacheable = True


class ProbeTimeout(ProbeError):
    """ffprobe did not finish in time and was killed."""

    cacheable = False


class ProbeUnavailable(ProbeError):
    """ffprobe could not be run at all."""

    cacheable = False


def _rate(text: str | None) -> float:
    try:
        value = Fraction(text or "0")
    except (ValueError, ZeroDivisionError):
        return 0.0
    return float(value) if value.denominator else 0.0


def probe_tool(choice: str = "auto") -> str:
    """``"ffprobe"`` or ``"pyav"``: the probe that runs for ``choice`` (``ScanConfig.probe_tool``)."""
    return resolve_tool(choice, FFPROBE)


def _label(tool: str) -> str:
    return "PyAV probe" if tool == PYAV else FFPROBE


def _last_line(stderr: bytes | None, tool: str = FFPROBE) -> str:
    lines = [ln.strip() for ln in (stderr or b"").decode("utf-8", "replace").splitlines() if ln.strip()]
    if not lines:
        return f"{_label(tool)} failed without a message"
    # ffprobe prints "path: reason"; keep the reason only.
    last = lines[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def run_ffprobe(path: Path, timeout: float | None, running: Any = None, tool: str = FFPROBE) -> dict[str, Any]:
    """``ffprobe -show_format -show_streams -of json path`` as a dict; ProbeError on failure.
    ``tool="pyav"``: the same JSON fields from a PyAV child process (``extractors.libav probe``), run
    and killed the same way.

    Not ffmpeg-python's ``ffmpeg.probe``, which has no timeout: a file that makes ffprobe hang would
    keep its thread (and the process at exit) forever. ffprobe runs under
    :func:`extractors.subproc.run_tool`: its process group is killed (SIGKILL) when it runs past
    ``timeout`` seconds, so no process or thread outlives the call. ``running`` (an object with
    ``add``/``discard``) is told of the process, so that a caller that is interrupted can kill it.
    """
    label = _label(tool)
    env = None
    if tool == PYAV:
        cmd, env = child_command("probe", str(path))
    else:
        cmd = [FFPROBE, "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)]
    try:
        returncode, out, err = run_tool(cmd, timeout, env=env, running=running)
    except OSError as exc:
        raise ProbeUnavailable(f"cannot run {label} ({exc.strerror or exc})") from None
    except subprocess.TimeoutExpired:
        raise ProbeTimeout(f"{label} timed out after {timeout:g} s") from None
    if returncode != 0:
        raise ProbeError(f"{label}: {_last_line(err, tool)}")
    try:
        info = json.loads(out.decode("utf-8", "replace"))
    except ValueError:
        raise ProbeError(f"{label}: unreadable output") from None
    if not isinstance(info, dict):
        raise ProbeError(f"{label}: unreadable output")
    return info


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def probe_video(path: Path, timeout: float | None = None, running: Any = None,
                tool: str | None = None) -> dict[str, Any]:
    """Manifest fields of `path` (duration, fps, n_frames, size, codecs, audio facts).

    Raises ProbeError with a precise reason for unusable files (ProbeTimeout when the probe ran past
    ``timeout`` seconds and was killed; ``running``: see :func:`run_ffprobe`). ``tool``: ``"ffprobe"``
    or ``"pyav"`` (None: :func:`probe_tool`'s choice for ``auto``).
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise ProbeError(f"cannot stat file ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((what for test, what in _KINDS if test(st.st_mode)), "a special file")
        raise ProbeError(f"not a regular file ({kind})")
    if st.st_size == 0:
        raise ProbeError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ProbeError("permission denied (file is not readable)")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ProbeError(f"cannot read file ({exc.strerror})") from None
    info = run_ffprobe(path, timeout, running, tool or probe_tool())
    streams = [s for s in info.get("streams") or [] if isinstance(s, dict)]
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not (s.get("disposition") or {}).get("attached_pic")), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if video is None:
        raise ProbeError("no video stream")
    fmt = info.get("format") or {}
    duration = _number(video.get("duration")) or _number(fmt.get("duration"))
    if duration <= 0:
        raise ProbeError("zero or unknown duration")
    fps = _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))
    n_frames = int(_number(video.get("nb_frames"))) or int(round(duration * fps))
    width, height = int(_number(video.get("width"))), int(_number(video.get("height")))
    if width <= 0 or height <= 0:
        raise ProbeError("video stream has no frame size")
    return {
        "duration": round(duration, 4),
        "fps": round(fps, 4),
        "n_frames": n_frames,
        "width": width,
        "height": height,
        "video_codec": video.get("codec_name"),
        "audio_codec": audio.get("codec_name") if audio else None,
        "has_audio": audio is not None,
        "audio_rate": int(_number(audio.get("sample_rate"))) or None if audio else None,
        "audio_channels": int(_number(audio.get("channels"))) or None if audio else None,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def _number(value: Any) -> float:
    """A field of ffprobe's JSON as a finite float; 0.0 when absent or not a number ("N/A")."""
    try:
        x = float(value or 0)
    except (TypeError, ValueError):
        return 0.0
    return x if x == x and x not in (float("inf"), float("-inf")) else 0.0


# --------------------------------------------------------------------------------------------------
# Probing a folder's files: the cache and the pool


class ProbeCache:
    """Append-only JSONL of probe results keyed by (path, size, mtime); tolerates a torn last line.
    Only definite results are cached: a probe that timed out is tried again by the next scan."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.exists():
            with open(path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        item = json.loads(line)
                        if not item.get("ok") and str(item.get("error", "")).startswith("ffprobe timed out"):
                            continue  # cached by scans before scan-3: a timeout says nothing of the file
                        self.entries[item["key"]] = item
                    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                        continue
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")

    @staticmethod
    def key(abs_path: Path, tool: str = FFPROBE) -> str | None:
        """``path|size|mtime_ns``, with ``|pyav`` appended for PyAV probes (their fields may differ
        from ffprobe's, e.g. nb_frames; ffprobe keys stay those of older scans)."""
        try:
            st = abs_path.stat()
        except OSError:
            return None
        return f"{abs_path}|{st.st_size}|{st.st_mtime_ns}" + (f"|{PYAV}" if tool == PYAV else "")

    def get(self, key: str | None) -> dict | None:
        return self.entries.get(key) if key else None

    def put(self, key: str | None, item: dict) -> None:
        if key is None or item.get("transient"):
            return
        item = {"key": key, **item}
        self.entries[key] = item
        self._fh.write(json.dumps(item) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class _Running:
    """The ffprobe processes of one :func:`probe_all`, killed all at once when it is interrupted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[Any] = set()
        self._closed = False

    def add(self, proc: Any) -> None:
        with self._lock:
            self._procs.add(proc)
            closed = self._closed
        if closed:
            kill_group(proc)

    def discard(self, proc: Any) -> None:
        with self._lock:
            self._procs.discard(proc)

    def kill_all(self) -> None:
        with self._lock:
            self._closed = True
            procs = list(self._procs)
        for proc in procs:
            kill_group(proc)


def _probe_one(abs_path: Path, timeout: float, running: _Running | None = None, tool: str = FFPROBE) -> dict:
    """``{"ok": True, "info": fields}`` or ``{"ok": False, "error": reason}``, with ``"transient":
    True`` for a failure of this run only (timeout, ffprobe not runnable, an unexpected error)."""
    try:
        return {"ok": True, "info": probe_video(abs_path, timeout=timeout, running=running, tool=tool)}
    except ProbeError as exc:
        item: dict[str, Any] = {"ok": False, "error": str(exc)}
        if not exc.cacheable:
            item["transient"] = True
        return item
    except Exception as exc:  # a bug or an odd file must cost that file only, never the scan
        logger.exception("scan: probing %s failed", display_path(str(abs_path)))
        return {"ok": False, "error": f"probe failed ({type(exc).__name__}: {exc})", "transient": True}


def probe_all(root: Path, paths: list[str], cache: ProbeCache, *, workers: int, timeout_s: float,
              progress: bool, tool: str = FFPROBE) -> tuple[dict[str, dict], int]:
    """Probe every path (cached ones skipped) with a thread pool, at most ``workers`` at once, with
    ``tool`` (``"ffprobe"`` or ``"pyav"``, resolved: see :func:`probe_tool`).

    Each ffprobe is killed after ``timeout_s`` (:func:`run_ffprobe`), so every
    thread ends; the pool is shut down with all its threads joined, also when interrupted (the running
    ffprobe processes are killed first). Returns (results by path, number of probes run).
    """
    results: dict[str, dict] = {}
    todo: list[tuple[str, str | None]] = []
    for rel in paths:
        key = ProbeCache.key(root / rel, tool)
        hit = cache.get(key)
        if hit is not None:
            results[rel] = hit
        else:
            todo.append((rel, key))
    bar = tqdm(total=len(paths), initial=len(results), desc="scan", unit="video", disable=not progress)
    n_workers = max(1, workers)
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="probe")
    running = _Running()
    pending: dict[Future, tuple[str, str | None]] = {}
    queue = list(reversed(todo))
    finished = False
    try:
        while queue or pending:
            while queue and len(pending) < n_workers:
                rel, key = queue.pop()
                pending[pool.submit(_probe_one, root / rel, timeout_s, running, tool)] = (rel, key)
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                rel, key = pending.pop(fut)
                item = fut.result()
                results[rel] = item
                cache.put(key, item)
                bar.update(1)
        finished = True
    finally:
        if not finished:
            running.kill_all()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return results, len(todo)
