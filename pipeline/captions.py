"""Caption readers: side-car `.srt`, `.vtt`, `.json` files and HowTo100M-style caption files.

Every reader returns `list[Caption]` (seconds) or raises `CaptionError` with a one-line reason.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from store.manifest import Caption

SIDECAR_SUFFIXES = (".srt", ".vtt", ".json")


class CaptionError(ValueError):
    """A caption file that cannot be used; the message says why."""


_TIME = re.compile(r"(?:(\d+):)?(\d{1,2}):(\d{2})[,.](\d{1,3})")
_TAG = re.compile(r"<[^>]+>|\{\\[^}]*\}")


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
    """SRT and WebVTT: blocks separated by blank lines, each with a `start --> end` line."""
    caps: list[Caption] = []
    blocks = re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    for block in blocks:
        lines = [ln for ln in block.strip().split("\n") if ln.strip()]
        arrow = next((i for i, ln in enumerate(lines) if "-->" in ln), None)
        if arrow is None:
            continue  # WEBVTT header, NOTE, STYLE or a bare index
        left, right = lines[arrow].split("-->", 1)
        try:
            start, end = _seconds(left), _seconds(right)
        except ValueError:
            raise CaptionError(f"{name}: malformed time line {lines[arrow]!r}") from None
        words = " ".join(_TAG.sub("", ln).strip() for ln in lines[arrow + 1 :]).strip()
        if words:
            caps.append(Caption(start, end, words))
    return caps


def _load_json(text: str, name: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CaptionError(f"{name}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def parse_json_captions(text: str, name: str) -> list[Caption]:
    """`[{"start": s, "end": s, "text": str}, ...]`."""
    data = _load_json(text, name)
    if not isinstance(data, list):
        raise CaptionError(f"{name}: expected a JSON list of {{start, end, text}} objects")
    return [_caption_from_obj(item, f"{name}[{i}]") for i, item in enumerate(data)]


def _caption_from_obj(item: object, where: str) -> Caption:
    if not isinstance(item, dict) or not {"start", "end", "text"} <= set(item):
        raise CaptionError(f"{where}: expected an object with start, end and text")
    try:
        return Caption(float(item["start"]), float(item["end"]), str(item["text"]).strip())
    except (TypeError, ValueError):
        raise CaptionError(f"{where}: start/end are not numbers") from None


def read_sidecar(path: Path, encoding_fallbacks: tuple[str, ...] = ()) -> list[Caption]:
    """Read a side-car caption file; raises CaptionError (malformed, empty, not UTF-8...)."""
    try:
        data = path.read_bytes()
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


def read_caption_file(path: Path, encoding_fallbacks: tuple[str, ...] = ()) -> dict[str, list[Caption]]:
    """A HowTo100M-style caption file: video key → captions.

    JSON: `{key: [{"start", "end", "text"}, ...]}` or HowTo100M's `{key: {"start": [...], "end": [...],
    "text": [...]}}`. CSV: rows `video_id,start,end,text` (header required). Keys are matched against
    video ids and file stems.
    """
    text = decode_text(path.read_bytes(), path.name, encoding_fallbacks)
    out: dict[str, list[Caption]] = {}
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        need = {"video_id", "start", "end", "text"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise CaptionError(f"{path.name}: CSV header must contain {sorted(need)}")
        for row_no, row in enumerate(reader, start=2):
            try:
                cap = Caption(float(row["start"]), float(row["end"]), (row["text"] or "").strip())
            except (TypeError, ValueError):
                raise CaptionError(f"{path.name}: line {row_no}: start/end are not numbers") from None
            out.setdefault(row["video_id"], []).append(cap)
        return out
    data = _load_json(text, path.name)
    if not isinstance(data, dict):
        raise CaptionError(f"{path.name}: expected a JSON object mapping video ids to captions")
    for key, value in data.items():
        if isinstance(value, dict) and {"start", "end", "text"} <= set(value):
            starts, ends, texts = value["start"], value["end"], value["text"]
            if not (len(starts) == len(ends) == len(texts)):
                raise CaptionError(f"{path.name}: {key}: start/end/text lists differ in length")
            out[key] = [Caption(float(s), float(e), str(t).strip()) for s, e, t in zip(starts, ends, texts)]
        elif isinstance(value, list):
            out[key] = [_caption_from_obj(item, f"{path.name}: {key}[{i}]") for i, item in enumerate(value)]
        else:
            raise CaptionError(f"{path.name}: {key}: expected a list of captions")
    return out


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
