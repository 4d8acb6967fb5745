"""Text from the data (file names, captions, error messages of ffmpeg) made safe for a terminal.

Control characters (C0, DEL, C1) and the Unicode bidirectional overrides could move the cursor,
recolour or rewrite the screen, or reorder what a line shows; they are written as visible escapes
(``\\x1b``, ``\\u202e``). Tabs and newlines inside one value become spaces: one value, one line.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_BREAKS = re.compile("[\t\n]")


def _escape(m: re.Match[str]) -> str:
    c = m.group(0)
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def terminal_safe(text: object) -> str:
    """``text`` as one printable line (see the module docstring)."""
    return _UNSAFE.sub(_escape, _BREAKS.sub(" ", str(text)))


def print_lines(text: str) -> None:
    """Print a multi-line report, every line made terminal-safe."""
    for line in str(text).split("\n"):
        print(terminal_safe(line))
