"""Stable, injective video ids from paths relative to the videos root.

An id keeps ASCII letters, digits and `_`; every other byte of the UTF-8 relative path (without its
extension) becomes `-xx` (lower-case hex) and the folder separator becomes `--`. The mapping is
prefix-free, hence injective: `a/b.mp4` → `a--b`, `a-b.mp4` → `a-2db`, `My clip.v2.mp4` →
`My-20clip-2ev2`. Ids never contain dots (webdataset splits keys on the first dot).
"""

from __future__ import annotations

import string
from pathlib import PurePosixPath

_KEEP = frozenset(string.ascii_letters + string.digits + "_")


def video_id(relative_path: str) -> str:
    """Id of the video at `relative_path` (POSIX separators, relative to the videos root)."""
    path = PurePosixPath(relative_path)
    stem = str(path.with_suffix("")) if path.suffix else str(path)
    out: list[str] = []
    for part_index, part in enumerate(stem.split("/")):
        if part_index:
            out.append("--")
        for ch in part:
            if ch in _KEEP:
                out.append(ch)
            else:
                out.extend(f"-{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def path_of_id(vid: str) -> str:
    """Inverse of `video_id` (the relative path without its extension)."""
    data = bytearray()
    i = 0
    while i < len(vid):
        ch = vid[i]
        if ch != "-":
            data += ch.encode()
            i += 1
        elif vid[i + 1] == "-":
            data += b"/"
            i += 2
        else:
            data.append(int(vid[i + 1 : i + 3], 16))
            i += 3
    return data.decode("utf-8")
