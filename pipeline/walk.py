"""Walking a videos folder: the video files, their side-car captions, and what is not walked.

Folder symlinks are followed only while their target stays inside the videos root and never twice
(real folders are tracked by device and inode, so a loop is walked once); the same real file reached
by two paths is found once. What is not walked is listed with a one-line reason. File names that are
not valid UTF-8 are found too (the scan records them as failed); :func:`display_path` writes them
with ``\\xNN`` escapes.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.captions import SIDECAR_SUFFIXES

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Names


def display_path(rel: str) -> str:
    """``rel`` as it is recorded (JSON/UTF-8-writable): bytes that are not UTF-8 become ``\\xNN``."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def name_problem(rel: str) -> str | None:
    """The reason a relative path cannot be used as a name (not valid UTF-8), None when it can."""
    try:
        rel.encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    data = os.fsencode(rel)
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as exc:
        where = "file" if data.rfind(b"/") < exc.start else "folder"
        return (f"{where} name is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start} of the "
                "path): rename it")


def _suffix(name: str) -> str:
    """The extension of a file name, lower-cased (``PurePosixPath.suffix`` rules)."""
    i = name.rfind(".")
    return name[i:].lower() if 0 < i < len(name) - 1 else ""


# --------------------------------------------------------------------------------------------------
# The walk


@dataclass
class Walk:
    """What :func:`walk_videos` found under a videos root."""

    paths: list[str]  # relative POSIX paths of the video files, sorted (str with surrogate escapes)
    skipped: list[tuple[str, str]]  # (relative path, reason) of what was not walked, sorted
    links: set[str] = field(default_factory=set)  # the video paths that are symlinks themselves


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def walk_videos(root: Path, extensions: list[str]) -> Walk:
    """Walk ``root`` for files with one of ``extensions`` (any case); hidden names are ignored.

    Real folders are walked first; then folder symlinks, in path order, are followed only while their
    target (resolved) stays inside the resolved root and was not walked yet (folders are known by
    ``(st_dev, st_ino)``), so loops and repeated folders are walked once. Every folder symlink not
    followed, broken symlink and unreadable folder is in ``skipped``. File symlinks are videos
    wherever they point (symlink farms); a broken one with a video extension is listed as a video
    (its probe records why it cannot be used).
    """
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    root_real = os.path.realpath(root)
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    links: set[str] = set()
    visited: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of every folder walked → its path
    folder_links: list[tuple[str, str]] = []  # (relative path, absolute path) of folder symlinks seen

    def walk_tree(rel_top: str, abs_top: str) -> None:
        stack = [(rel_top, abs_top)]
        while stack:
            rel_dir, abs_dir = stack.pop()
            try:
                with os.scandir(abs_dir) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                skipped.append((rel_dir or ".", f"cannot list folder ({exc.strerror or exc})"))
                continue
            subdirs: list[tuple[str, str]] = []
            for e in entries:
                if e.name.startswith("."):
                    continue
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                try:
                    is_link = e.is_symlink()
                    # a stat call for symlinks and folders only (files are known from the listing)
                    st = os.stat(e.path) if is_link else (e.stat(follow_symlinks=False)
                                                          if e.is_dir(follow_symlinks=False) else None)
                except OSError as exc:
                    if _suffix(e.name) in exts:
                        found.append(rel)  # a broken link named like a video: its probe says why
                        if is_link:
                            links.add(rel)
                    else:
                        why = "broken symlink" if is_link else f"cannot stat ({exc.strerror})"
                        skipped.append((rel, why))
                    continue
                if st is not None and stat.S_ISDIR(st.st_mode):
                    if is_link:
                        folder_links.append((rel, e.path))
                        continue
                    key = (st.st_dev, st.st_ino)
                    if key in visited:  # a bind mount, or a folder walked through a symlink before
                        skipped.append((rel, f"folder already walked (as {display_path(visited[key])})"))
                        continue
                    visited[key] = rel
                    subdirs.append((rel, e.path))
                elif _suffix(e.name) in exts:
                    found.append(rel)
                    if is_link:
                        links.add(rel)
            stack.extend(reversed(subdirs))

    try:
        st = os.stat(root)
        visited[(st.st_dev, st.st_ino)] = "."
    except OSError:
        pass
    walk_tree("", str(root))
    while folder_links:
        folder_links.sort()
        rel, link = folder_links.pop(0)
        try:
            target = os.path.realpath(link)
            st = os.stat(link)
        except OSError:
            skipped.append((rel, "broken symlink"))
            continue
        if not _within(target, root_real):
            skipped.append((rel, "symlink to a folder outside the videos root"))
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited:
            parent = os.path.realpath(os.path.dirname(link))
            if _within(parent, target):
                skipped.append((rel, "symlink to a folder already walked (loop)"))
            else:
                skipped.append((rel, f"symlink to a folder already walked (as {display_path(visited[key])})"))
            continue
        visited[key] = rel
        walk_tree(rel, target)
    return Walk(paths=sorted(found), skipped=sorted(skipped), links=links)


def find_videos(root: Path, extensions: list[str]) -> list[str]:
    """Relative POSIX paths of the video files under `root`, sorted (see :func:`walk_videos`)."""
    return walk_videos(root, extensions).paths


def find_sidecar(video: Path) -> Path | None:
    """The side-car caption file of ``video`` (same stem, ``.srt``/``.vtt``/``.json``, either case)."""
    for suffix in SIDECAR_SUFFIXES:
        for cand in (video.with_suffix(suffix), video.with_suffix(suffix.upper())):
            try:
                if cand.is_file():
                    return cand
            except OSError:  # e.g. a 255-byte video name whose ".json" side-car name is too long
                continue
    return None
