"""Caption readers: side-car `.srt`, `.vtt`, `.json` files and HowTo100M-style caption files.

Every reader returns `list[Caption]` (seconds) or raises `CaptionError` with a one-line reason (quoted
text from the file is shortened and its control characters escaped, so a reason is always one short
line). Parsing is linear in the size of the file whatever its content (bounded tag patterns, blank-line
block splitting by a pattern that never backtracks over a line), and a side-car file over
``max_bytes`` is refused before it is read. A HowTo100M-style caption file is read entry by entry: a
bad entry (a time that is not a number, a value that is not a list, lists of different lengths) is
reported for its key only (``read_caption_file(..., errors=...)``), the other entries are kept.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from pathlib import Path

from store.manifest import Caption

logger = logging.getLogger(__name__)

SIDECAR_SUFFIXES = (".srt", ".vtt", ".json")


class CaptionError(ValueError):
    """A caption file that cannot be used; the message says why."""


_TIME = re.compile(r"(?:(\d{1,7}):)?(\d{1,2}):(\d{2})[,.](\d{1,3})")
# Bounded, and unable to run past the next opening character: a line of 200 k "<" without ">" is
# scanned once (the unbounded "<[^>]+>" rescans to the end of the line for every "<": quadratic).
_TAG = re.compile(r"<[^<>\n]{1,512}>|\{\\[^{}\n]{0,512}\}")
# A blank-line separator: a newline, then one or more lines holding only spaces/tabs. The horizontal
# whitespace cannot hold a newline, so no text is scanned twice (linear, unlike "\n\s*\n").
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")
_MiB = 1 << 20


def show(text: object, limit: int = 60) -> str:
    """``text`` for a one-line reason: control characters escaped, cut to ``limit`` characters."""
    s = str(text)
    cut = len(s) > limit
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s[:limit])
    return s + "..." if cut else s


def quote(value: object, limit: int = 20) -> str:
    """A value from a caption file for a one-line reason: ``'text'`` for a string, its repr otherwise."""
    return f"'{show(value, limit)}'" if isinstance(value, str) else show(repr(value), limit)


def format_bytes(n: int) -> str:
    """``16 MiB``, ``512 KiB`` or ``1000 bytes``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", _MiB), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _seconds(text: str) -> float:
    m = _TIME.fullmatch(text.strip().split(" ")[0])
    if not m:
        raise ValueError(text)
    h, mnt, s, frac = m.groups()
    return int(h or 0) * 3600 + int(mnt) * 60 + int(s) + int(frac.ljust(3, "0")) / 1000


def decode_text(data: bytes, name: str, fallbacks: tuple[str, ...] = ()) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        for enc in fallbacks:
            try:
                return data.decode(enc)
            except UnicodeDecodeError:
                continue
        raise CaptionError(
            f"{name}: not UTF-8 (invalid byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def parse_timed_blocks(text: str, name: str) -> list[Caption]:
    """SRT and WebVTT: blocks separated by blank lines, each with a `start --> end` line (linear time)."""
    caps: list[Caption] = []
    blocks = _BLANK_LINES.split(text.replace("\r\n", "\n").replace("\r", "\n"))
    for block in blocks:
        lines = [ln for ln in block.split("\n") if ln.strip()]
        arrow = next((i for i, ln in enumerate(lines) if "-->" in ln), None)
        if arrow is None:
            continue  # WEBVTT header, NOTE, STYLE or a bare index
        left, right = lines[arrow].split("-->", 1)
        try:
            start, end = _seconds(left), _seconds(right)
        except ValueError:
            raise CaptionError(f"{name}: malformed time line {quote(lines[arrow].strip(), 60)}") from None
        words = " ".join(_TAG.sub("", ln).strip() for ln in lines[arrow + 1 :]).strip()
        if words:
            caps.append(Caption(start, end, words))
    return caps


def _load_json(text: str, name: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CaptionError(f"{name}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise CaptionError(f"{name}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise CaptionError(f"{name}: invalid JSON ({show(exc)})") from None


def parse_json_captions(text: str, name: str) -> list[Caption]:
    """`[{"start": s, "end": s, "text": str}, ...]`."""
    data = _load_json(text, name)
    if not isinstance(data, list):
        raise CaptionError(f"{name}: expected a JSON list of {{start, end, text}} objects")
    return [_caption_from_obj(item, f"{name}[{i}]") for i, item in enumerate(data)]


def _time(value: object) -> float:
    """A caption time in seconds: a finite number (or a string of one); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(value)
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(value)
    return x


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _caption_from_obj(item: object, where: str) -> Caption:
    if not isinstance(item, dict) or not {"start", "end", "text"} <= set(item):
        raise CaptionError(f"{where}: expected an object with start, end and text")
    try:
        return Caption(_time(item["start"]), _time(item["end"]), _text(item["text"]))
    except (TypeError, ValueError):
        raise CaptionError(f"{where}: start/end are not numbers "
                           f"({quote(item['start'])}, {quote(item['end'])})") from None


def read_sidecar(path: Path, encoding_fallbacks: tuple[str, ...] = (),
                 max_bytes: int | None = None) -> list[Caption]:
    """Read a side-car caption file; raises CaptionError (malformed, empty, not UTF-8, over
    ``max_bytes``: ``X.srt: file is N bytes, over the 16 MiB cap``...)."""
    try:
        with open(path, "rb") as fh:
            if max_bytes is not None:
                data = fh.read(max_bytes + 1)  # never more than the cap, even for a file that grows
                if len(data) > max_bytes:
                    size = max(len(data), os.fstat(fh.fileno()).st_size)
                    raise CaptionError(f"{path.name}: file is {size} bytes, over the "
                                       f"{format_bytes(max_bytes)} cap")
            else:
                data = fh.read()
    except OSError as exc:
        raise CaptionError(f"{path.name}: cannot read ({exc.strerror})") from None
    text = decode_text(data, path.name, encoding_fallbacks)
    if not text.strip():
        raise CaptionError(f"{path.name}: empty caption file")
    if path.suffix.lower() == ".json":
        caps = parse_json_captions(text, path.name)
    else:
        caps = parse_timed_blocks(text, path.name)
    if not caps:
        raise CaptionError(f"{path.name}: no caption with a time line and text")
    return caps


def read_caption_file(path: Path, encoding_fallbacks: tuple[str, ...] = (),
                      errors: dict[str, str] | None = None) -> dict[str, list[Caption]]:
    """A HowTo100M-style caption file: video key → captions.

    JSON: `{key: [{"start", "end", "text"}, ...]}` or HowTo100M's `{key: {"start": [...], "end": [...],
    "text": [...]}}`. CSV: rows `video_id,start,end,text` (header required). Keys are matched against
    video ids and file stems. The file is not size-capped (HowTo100M's is gigabytes).

    A file that cannot be used as a whole (unreadable, not UTF-8, invalid JSON or CSV, wrong top-level
    shape or header) raises CaptionError. A bad entry raises it too, unless ``errors`` is given: then
    the entry is left out of the result and ``errors[key]`` holds its one-line reason
    (``caps.json: yt_1: start[1] is not a number ('abc')``); the other entries are kept.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaptionError(f"{path.name}: cannot read ({exc.strerror})") from None
    text = decode_text(data, path.name, encoding_fallbacks)
    out: dict[str, list[Caption]] = {}
    bad: dict[str, str] = {}

    def reject(key: str, reason: str) -> None:
        if errors is None:
            raise CaptionError(reason)
        out.pop(key, None)
        bad.setdefault(key, reason)

    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        need = {"video_id", "start", "end", "text"}
        try:
            if not reader.fieldnames or not need <= set(reader.fieldnames):
                raise CaptionError(f"{path.name}: CSV header must contain {sorted(need)}")
            for row_no, row in enumerate(reader, start=2):
                key = row.get("video_id")
                if not key:
                    if errors is None:
                        raise CaptionError(f"{path.name}: line {row_no}: no video_id")
                    logger.warning("%s: line %d: no video_id: row ignored", path.name, row_no)
                    continue
                if key in bad:
                    continue
                try:
                    cap = Caption(_time(row["start"]), _time(row["end"]), _text(row["text"]))
                except (TypeError, ValueError):
                    reject(key, f"{path.name}: line {row_no}: start/end are not numbers "
                                f"({quote(row['start'])}, {quote(row['end'])})")
                    continue
                out.setdefault(key, []).append(cap)
        except csv.Error as exc:
            raise CaptionError(f"{path.name}: invalid CSV at line {reader.line_num} ({show(exc)})") from None
    else:
        parsed = _load_json(text, path.name)
        if not isinstance(parsed, dict):
            raise CaptionError(f"{path.name}: expected a JSON object mapping video ids to captions")
        for key, value in parsed.items():
            try:
                out[key] = _entry(value, f"{path.name}: {show(key)}")
            except CaptionError as exc:
                reject(key, str(exc))
    if errors is not None:
        errors.update(bad)
        if bad:
            logger.warning("%s: %d malformed entr%s ignored (each is a warning of its video), e.g. %s",
                           path.name, len(bad), "y" if len(bad) == 1 else "ies", next(iter(bad.values())))
    return out


def _entry(value: object, where: str) -> list[Caption]:
    """The captions of one entry of a caption file; CaptionError saying what is wrong with it."""
    if isinstance(value, dict) and {"start", "end", "text"} <= set(value):
        starts, ends, texts = value["start"], value["end"], value["text"]
        for what, items in (("start", starts), ("end", ends), ("text", texts)):
            if not isinstance(items, list):
                raise CaptionError(f"{where}: {what} is not a list ({type(items).__name__})")
        if not (len(starts) == len(ends) == len(texts)):
            raise CaptionError(f"{where}: start/end/text lists differ in length "
                               f"({len(starts)}, {len(ends)}, {len(texts)})")
        caps = []
        for i, (s, e, t) in enumerate(zip(starts, ends, texts)):
            times = []
            for what, x in (("start", s), ("end", e)):
                try:
                    times.append(_time(x))
                except (TypeError, ValueError):
                    raise CaptionError(f"{where}: {what}[{i}] is not a number ({quote(x)})") from None
            caps.append(Caption(times[0], times[1], _text(t)))
        return caps
    if isinstance(value, list):
        return [_caption_from_obj(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise CaptionError(f"{where}: expected a list of captions or {{start, end, text}} lists, "
                       f"got {type(value).__name__}")


def clean_captions(caps: list[Caption], duration: float, name: str) -> tuple[list[Caption], list[str]]:
    """Sort, clip to [0, duration], drop empty/inverted/outside ones.

    Returns (kept captions, warnings). Raises CaptionError when none is left.
    """
    warnings: list[str] = []
    kept: list[Caption] = []
    outside = inverted = empty = clipped = 0
    for c in sorted(caps, key=lambda c: (c.start, c.end)):
        if not c.text.strip():
            empty += 1
            continue
        if c.end <= c.start:
            inverted += 1
            continue
        if duration > 0 and (c.start >= duration or c.end <= 0):
            outside += 1
            continue
        start, end = max(0.0, c.start), min(duration, c.end) if duration > 0 else c.end
        if (start, end) != (c.start, c.end):
            clipped += 1
        kept.append(Caption(round(start, 3), round(end, 3), c.text.strip()))
    if outside:
        warnings.append(f"{name}: {outside} caption(s) outside the video (0-{duration:.2f} s) dropped")
    if inverted:
        warnings.append(f"{name}: {inverted} caption(s) with end <= start dropped")
    if empty:
        warnings.append(f"{name}: {empty} empty caption(s) dropped")
    if clipped:
        warnings.append(f"{name}: {clipped} caption(s) clipped to the video's duration")
    if not kept:
        detail = "; ".join(warnings) or "no captions"
        raise CaptionError(f"{name}: no usable caption ({detail})")
    return kept, warnings
