"""The one atomic writer: a temporary name in the same folder, fsync, rename, fsync the folder.

Temporary names are ``.<name>.tmp-<owner token>`` (:mod:`store.owner`): unique across hosts,
containers and PID reuse, never mistaken for a finished file, and traceable to the process that
writes them. :func:`sweep_temps` removes only the temporary files of owners that are gone, so a
restarted worker never deletes the file a live sibling is writing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from store import identity

TEMP_MARK = ".tmp-"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """``.<name>.tmp-<token>`` next to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{identity.current().token}")


def temp_owner(name: str) -> str | None:
    """The owner token of a temporary file name, None for any other name."""
    if not name.startswith(".") or TEMP_MARK not in name:
        return None
    return name.rsplit(TEMP_MARK, 1)[1] or None


def commit_file(tmp: Path, path: Path) -> None:
    """fsync an already-written temporary file and rename it onto ``path``."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file; when the block ends without an exception, fsync it and rename it onto
    ``path``. On an exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """The JSON text of every record and summary: sorted keys, one-space indent, UTF-8, final newline."""
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    write_text(path, dumps_json(obj))


def write_if_changed(path: Path, data: bytes | str) -> bool:
    """Write ``data`` atomically unless ``path`` already holds exactly these bytes; True when written.

    A re-run that produces the same output leaves the file (and its mtime) alone.
    """
    blob = data.encode("utf-8") if isinstance(data, str) else data
    try:
        if os.path.getsize(path) == len(blob) and Path(path).read_bytes() == blob:
            return False
    except OSError:
        pass
    write_bytes(path, blob)
    return True


def sweep_temps(folder: Path, keep: Callable[[str, float], bool]) -> int:
    """Remove the temporary files in ``folder`` unless ``keep(owner token, age in seconds)``; returns
    how many were removed. :meth:`store.owner.Registry.keeps` keeps every file of a live owner."""
    n = 0
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    now = time.time()
    for e in entries:
        token = temp_owner(e.name)
        if token is None:
            continue
        try:
            if keep(token, now - e.stat(follow_symlinks=False).st_mtime):
                continue
            os.unlink(e.path)
            n += 1
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
    return n
