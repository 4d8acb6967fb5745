"""Stable, injective video ids from paths relative to the videos root.

**Plain ids.** An id is made from the *bytes* of the relative path without its extension
(``os.fsencode``: UTF-8, and a file name that is not valid UTF-8 keeps its raw bytes): ASCII letters,
digits and ``_`` are kept, every other byte becomes ``-xx`` (two lower-case hex digits) and the folder
separator becomes ``--``. Read from the left, a plain id is a sequence of tokens ``c`` (a kept
character), ``--`` and ``-xx``, so the mapping is prefix-free, hence injective: ``a/b.mp4`` → ``a--b``,
``a-b.mp4`` → ``a-2db``, ``My clip.v2.mp4`` → ``My-20clip-2ev2``, ``caf\\xe9.mp4`` (Latin-1 bytes) →
``caf-e9``. Ids only hold ``[A-Za-z0-9_-]``: no dots (webdataset splits keys on the first dot), no
slashes, no spaces.

**Disambiguated ids.** Two files whose paths differ only by their extension (``a.mp4``, ``a.mkv``) have
the same plain id. The scan gives the plain id to the first and :func:`extension_id` to the others:
``<plain id>-x<encoded extension>`` (``a.mp4`` → ``a-xmp4``; the extension without its dot, encoded like
a path component). In a plain id a token ``-`` is only ever followed by ``-`` or by a hex digit, never
by ``x``, so no plain id has the token ``-x``: a disambiguated id never equals a plain id, and the first
``-x`` token splits it back into its plain part and its extension (:func:`split_id`).
"""

from __future__ import annotations

import os
import string

_KEEP = frozenset((string.ascii_letters + string.digits + "_").encode())
_HEX = frozenset(b"0123456789abcdef")
EXTENSION_MARK = "-x"  # the token that starts the extension of a disambiguated id


def _path_bytes(relative_path: str | bytes) -> bytes:
    """The bytes of a path: a str from ``os.walk`` (surrogate escapes for bytes that are not UTF-8)
    gets its original bytes back."""
    return os.fsencode(relative_path)


def _split_suffix(path: bytes) -> tuple[bytes, bytes]:
    """``(path without its extension, extension with its dot or b"")``, with the rules of
    ``PurePosixPath.suffix`` (``.hidden`` and ``name.`` have no extension)."""
    name = path.rsplit(b"/", 1)[-1]
    i = name.rfind(b".")
    if 0 < i < len(name) - 1:
        return path[: len(path) - len(name) + i], name[i:]
    return path, b""


def _encode(data: bytes, out: list[str]) -> None:
    for b in data:
        if b in _KEEP:
            out.append(chr(b))
        elif b == 0x2F:  # "/"
            out.append("--")
        else:
            out.append(f"-{b:02x}")


def video_id(relative_path: str | bytes) -> str:
    """Plain id of the video at ``relative_path`` (POSIX separators, relative to the videos root;
    a str with surrogate escapes, as ``os.walk`` gives for names that are not UTF-8, or bytes)."""
    stem, _ = _split_suffix(_path_bytes(relative_path))
    out: list[str] = []
    _encode(stem, out)
    return "".join(out)


def extension_id(relative_path: str | bytes) -> str:
    """Disambiguated id of ``relative_path``: its plain id, ``-x``, and its extension (without the dot)
    encoded like a path component. Never equal to any plain id (see the module's docstring)."""
    stem, suffix = _split_suffix(_path_bytes(relative_path))
    out: list[str] = []
    _encode(stem, out)
    out.append(EXTENSION_MARK)
    _encode(suffix[1:], out)
    return "".join(out)


def _decode(vid: str, start: int = 0) -> tuple[bytes, int | None]:
    """Decode tokens from ``start``: (bytes, index of an ``-x`` token or None when the id ended)."""
    data = bytearray()
    i = start
    while i < len(vid):
        ch = vid[i]
        if ch != "-":
            if ord(ch) > 0x7F or ord(ch) not in _KEEP:
                raise ValueError(f"not a video id: {vid!r} (character {ch!r} at {i})")
            data.append(ord(ch))
            i += 1
            continue
        nxt = vid[i + 1 : i + 2]
        if nxt == "-":
            data += b"/"
            i += 2
        elif nxt == "x":
            return bytes(data), i
        else:
            pair = vid[i + 1 : i + 3]
            if len(pair) != 2 or not all(ord(c) in _HEX for c in pair):
                raise ValueError(f"not a video id: {vid!r} (bad escape at {i})")
            data.append(int(pair, 16))
            i += 3
    return bytes(data), None


def split_id(vid: str) -> tuple[str, str | None]:
    """``(relative path without its extension, extension with its dot or None)`` of an id: None for a
    plain id, the extension for a disambiguated one. Paths whose bytes are not UTF-8 come back with
    surrogate escapes (``os.fsdecode``). ValueError for a string that no id function makes."""
    stem, mark = _decode(vid)
    if mark is None:
        return os.fsdecode(stem), None
    ext, again = _decode(vid, mark + len(EXTENSION_MARK))
    if again is not None or b"/" in ext:
        raise ValueError(f"not a video id: {vid!r}")
    return os.fsdecode(stem), "." + os.fsdecode(ext)


def path_of_id(vid: str) -> str:
    """Inverse of :func:`video_id`: the relative path without its extension (for a disambiguated id,
    the path of its plain part; :func:`split_id` also gives the extension)."""
    return split_id(vid)[0]
