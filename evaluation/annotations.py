"""Parsers for the evaluation sets' annotation files (SPEC §6).

Every parser is robust to bad rows: a malformed line, an unknown video id or an out-of-range step
is skipped and reported in ``problems`` (one human-readable line each, also logged) instead of
raising. Only a file that cannot be read at all (missing, not JSON, no usable header) raises.

- YouCook2: ``youcookii_annotations_trainval.json`` -> the clips of one subset (validation).
- MSR-VTT 1k-A test: ``MSRVTT_JSFUSION_test.csv`` (or a JSON list of ``{"video_id", "caption"}``)
  -> one whole-video clip per row.
- CrossTask: ``tasks_primary.txt`` -> tasks and their ordered steps; ``annotations/<task>_<video>.csv``
  -> per video, the ``(step_index 0-based, start_s, end_s)`` intervals.
- Mining YouTube: our own adapter format, see :func:`parse_mining_youtube`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

__all__ = [
    "Clip",
    "ClipAnnotations",
    "StepAnnotations",
    "StepSegment",
    "Task",
    "TaskList",
    "parse_crosstask_annotations",
    "parse_crosstask_tasks",
    "parse_mining_youtube",
    "parse_msrvtt_test",
    "parse_youcook2",
]

BACKGROUND_LABELS = frozenset({"sil", "background", "bg"})
"""Step labels of the Mining YouTube adapter format that mean "no step" (rows silently skipped)."""


@dataclass(frozen=True)
class Clip:
    """One retrieval query: a sentence and the video segment it describes (None = whole video)."""

    key: str
    video_id: str
    sentence: str
    start: float | None = None
    end: float | None = None


@dataclass
class ClipAnnotations:
    """Parsed clips, in file order, plus what was skipped and why."""

    clips: list[Clip] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unknown_video_ids: list[str] = field(default_factory=list)
    n_malformed: int = 0


@dataclass(frozen=True)
class Task:
    """A CrossTask (or Mining YouTube) task with its steps in their canonical order."""

    task_id: str
    name: str
    url: str
    steps: tuple[str, ...]


@dataclass
class TaskList:
    tasks: dict[str, Task] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class StepSegment(NamedTuple):
    """A ground-truth interval of one step; unpacks as ``(step, start, end)``."""

    step: int  # 0-based index into the task's steps
    start: float  # seconds
    end: float  # seconds


@dataclass
class StepAnnotations:
    """Per video, its step intervals (sorted by start) and its task, plus what was skipped and why."""

    segments: dict[str, list[StepSegment]] = field(default_factory=dict)
    task_of: dict[str, str] = field(default_factory=dict)
    task_steps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unknown_video_ids: list[str] = field(default_factory=list)
    n_malformed: int = 0


class _Report:
    """Collects problems (and logs each one) for one parse."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.problems: list[str] = []
        self.n_malformed = 0
        self.unknown: list[str] = []

    def bad(self, where: str, reason: str) -> None:
        self.n_malformed += 1
        self.note(where, reason)

    def note(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        self.problems.append(message)
        logger.warning("%s", message)

    def unknown_video(self, where: str, video_id: str) -> None:
        if video_id not in self.unknown:
            self.unknown.append(video_id)
        self.note(where, f"unknown video id {video_id!r}: skipped")

    def summary(self) -> None:
        if self.n_malformed or self.unknown:
            logger.warning(
                "%s: %d malformed entries, %d unknown video ids skipped",
                self.source, self.n_malformed, len(self.unknown),
            )


def _number(value: Any) -> float | None:
    """A finite float from a JSON number or numeric string, else None (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _interval(start_raw: Any, end_raw: Any) -> tuple[float, float] | str:
    """Validated ``(start, end)`` seconds with ``0 <= start < end``, or the reason it is invalid."""
    start, end = _number(start_raw), _number(end_raw)
    if start is None or end is None:
        return f"start/end not finite numbers ({start_raw!r}, {end_raw!r})"
    if start < 0:
        return f"negative start {start}"
    if end <= start:
        return f"empty or reversed interval [{start}, {end}]"
    return start, end


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


# --------------------------------------------------------------------------------------- YouCook2


def parse_youcook2(
    path: str | Path, *, subset: str = "validation", video_ids: Collection[str] | None = None
) -> ClipAnnotations:
    """Clips of one subset of ``youcookii_annotations_trainval.json``.

    Format: ``{"database": {video_id: {"subset": "validation", "annotations": [{"segment": [s, e],
    "sentence": str, "id": int}, ...]}}}``. Each clip's key is ``"<video_id>_<id>"`` (the annotation's
    position when ``id`` is missing). Videos of other subsets are ignored silently; a video not in
    ``video_ids`` (when given, e.g. the videos we have features for) is skipped and reported.
    """
    path = Path(path)
    report = _Report(path)
    data = _load_json(path)
    database = data.get("database") if isinstance(data, dict) else None
    if not isinstance(database, dict):
        raise ValueError(f"{path}: expected an object with a 'database' object")
    known = None if video_ids is None else set(video_ids)
    clips: list[Clip] = []
    for video_id, entry in database.items():
        if not isinstance(entry, dict):
            report.bad(f"database[{video_id!r}]", "entry is not an object")
            continue
        if entry.get("subset") != subset:
            continue
        if known is not None and video_id not in known:
            report.unknown_video(f"database[{video_id!r}]", video_id)
            continue
        annotations = entry.get("annotations")
        if not isinstance(annotations, list):
            report.bad(f"database[{video_id!r}]", "'annotations' is not a list")
            continue
        for i, ann in enumerate(annotations):
            where = f"database[{video_id!r}].annotations[{i}]"
            if not isinstance(ann, dict):
                report.bad(where, "not an object")
                continue
            segment = ann.get("segment")
            if not isinstance(segment, list) or len(segment) != 2:
                report.bad(where, f"'segment' is not a [start, end] pair: {segment!r}")
                continue
            interval = _interval(*segment)
            if isinstance(interval, str):
                report.bad(where, interval)
                continue
            sentence = ann.get("sentence")
            if not isinstance(sentence, str) or not sentence.strip():
                report.bad(where, f"missing or empty sentence: {sentence!r}")
                continue
            clip_id = ann.get("id", i)
            clips.append(Clip(f"{video_id}_{clip_id}", video_id, sentence.strip(), *interval))
    report.summary()
    return ClipAnnotations(clips, report.problems, report.unknown, report.n_malformed)


# ---------------------------------------------------------------------------------------- MSR-VTT


def parse_msrvtt_test(
    path: str | Path,
    *,
    video_ids: Collection[str] | None = None,
    expected_count: int | None = 1000,
    unique_videos: bool = True,
) -> ClipAnnotations:
    """MSR-VTT 1k-A test queries: one sentence per video, the clip is the whole video.

    Two layouts, chosen by the file suffix: ``.json`` is a list of ``{"video_id": str, "caption":
    str}``; anything else is the CSV ``MSRVTT_JSFUSION_test.csv`` with header
    ``key,vid_key,video_id,sentence`` (only ``video_id`` and ``sentence`` are required; ``key`` is
    the clip key when present, else the video id). With ``unique_videos`` a repeated video id is
    reported and skipped (retrieval needs one query per video). A count different from
    ``expected_count`` (1000 for 1k-A) is reported, not fatal. Unknown videos (not in ``video_ids``)
    are skipped and reported: the caller then evaluates with ``n_total=1000``.
    """
    path = Path(path)
    report = _Report(path)
    known = None if video_ids is None else set(video_ids)
    rows: list[tuple[str, str | None, Any, Any]] = []  # (where, key, video_id, sentence)
    if path.suffix.lower() == ".json":
        data = _load_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {{'video_id', 'caption'}} objects")
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                report.bad(f"{path.name}[{i}]", "not an object")
                continue
            rows.append((f"{path.name}[{i}]", None, item.get("video_id"), item.get("caption")))
    else:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if "video_id" not in header or "sentence" not in header:
                raise ValueError(f"{path}: header must name 'video_id' and 'sentence', got {header}")
            col = {name: header.index(name) for name in header}
            for row in reader:
                where = f"{path.name}:{reader.line_num}"
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    report.bad(where, f"{len(row)} fields instead of {len(header)}: {row!r}")
                    continue
                key = row[col["key"]].strip() if "key" in col else None
                rows.append((where, key, row[col["video_id"]].strip(), row[col["sentence"]]))
    clips: list[Clip] = []
    seen: set[str] = set()
    n_rows = 0
    for where, key, video_id, sentence in rows:
        if not isinstance(video_id, str) or not video_id.strip():
            report.bad(where, f"missing video id: {video_id!r}")
            continue
        video_id = video_id.strip()
        if not isinstance(sentence, str) or not sentence.strip():
            report.bad(where, f"missing or empty sentence for {video_id!r}")
            continue
        n_rows += 1
        if unique_videos and video_id in seen:
            report.bad(where, f"video {video_id!r} appears again: skipped")
            continue
        seen.add(video_id)
        if known is not None and video_id not in known:
            report.unknown_video(where, video_id)
            continue
        clips.append(Clip(key or video_id, video_id, sentence.strip()))
    if expected_count is not None and n_rows != expected_count:
        report.note(path.name, f"{n_rows} valid rows, expected {expected_count}")
    report.summary()
    return ClipAnnotations(clips, report.problems, report.unknown, report.n_malformed)


# -------------------------------------------------------------------------------------- CrossTask


def parse_crosstask_tasks(path: str | Path) -> TaskList:
    """Tasks of ``tasks_primary.txt`` (or ``tasks_related.txt``).

    Format: blocks separated by blank lines, each of five lines: task id, task name, url, number of
    steps, comma-separated step names. A block whose step count does not match its step names, or
    that has the wrong number of lines, is reported and skipped.
    """
    path = Path(path)
    report = _Report(path)
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] = []
    first_line = 0
    with open(path, encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if line:
                if not current:
                    first_line = lineno
                current.append(line)
            elif current:
                blocks.append((first_line, current))
                current = []
    if current:
        blocks.append((first_line, current))
    tasks: dict[str, Task] = {}
    for lineno, lines in blocks:
        where = f"{path.name}:{lineno}"
        if len(lines) != 5:
            report.bad(where, f"task block has {len(lines)} lines instead of 5: {lines[:1]!r}...")
            continue
        task_id, name, url, count, steps_line = lines
        try:
            n_steps = int(count)
        except ValueError:
            report.bad(where, f"task {task_id}: step count {count!r} is not an integer")
            continue
        steps = tuple(s.strip() for s in steps_line.split(","))
        if n_steps <= 0 or len(steps) != n_steps or not all(steps):
            report.bad(where, f"task {task_id}: {n_steps} steps announced, {len(steps)} names given")
            continue
        if task_id in tasks:
            report.bad(where, f"task {task_id} defined again: skipped")
            continue
        tasks[task_id] = Task(task_id, name, url, steps)
    report.summary()
    return TaskList(tasks, report.problems)


_CROSSTASK_NAME = re.compile(r"^(?P<task>[^_]+)_(?P<video>.+)\.csv$")


def _parse_step_csv(
    path: Path,
    name: str,
    report: _Report,
    n_steps: int | None,
    step_names: tuple[str, ...] | None,
) -> list[StepSegment]:
    """Rows ``step,start,end`` of one video. ``step`` is 1-based; with ``step_names`` it may also be
    a step name (Mining YouTube adapter), background labels are skipped, and a header is allowed."""
    segments: list[StepSegment] = []
    by_name = None if step_names is None else {s.strip().lower(): i for i, s in enumerate(step_names)}
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            where = f"{name}:{reader.line_num}"
            cells = [c.strip() for c in row]
            if not cells or all(not c for c in cells):
                continue
            if by_name is not None and reader.line_num == 1 and [c.lower() for c in cells] == [
                "step", "start", "end",
            ]:
                continue
            if len(cells) != 3:
                report.bad(where, f"{len(cells)} fields instead of 3 (step,start,end): {row!r}")
                continue
            label, start_raw, end_raw = cells
            if by_name is not None and label.lower() in BACKGROUND_LABELS:
                continue
            step: int | None
            try:
                step = int(label) - 1
            except ValueError:
                step = None if by_name is None else by_name.get(label.lower())
                if step is None:
                    report.bad(where, f"unknown step {label!r}")
                    continue
            if step < 0 or (n_steps is not None and step >= n_steps):
                bound = "?" if n_steps is None else str(n_steps)
                report.bad(where, f"step number {label} outside 1..{bound}")
                continue
            interval = _interval(start_raw, end_raw)
            if isinstance(interval, str):
                report.bad(where, interval)
                continue
            segments.append(StepSegment(step, *interval))
    segments.sort(key=lambda seg: (seg.start, seg.step))
    return segments


def parse_crosstask_annotations(
    annotation_dir: str | Path,
    *,
    tasks: Mapping[str, Task] | None = None,
    video_ids: Collection[str] | None = None,
) -> StepAnnotations:
    """CrossTask ground truth from ``annotations/<task>_<video>.csv`` files.

    Each row is ``step_number,start,end`` (1-based step, seconds); returned steps are 0-based. With
    ``tasks`` (from :func:`parse_crosstask_tasks`) files of unknown tasks and step numbers beyond the
    task's steps are reported and skipped; without it any step >= 1 is accepted. The task id is the
    file name up to its first ``_`` (task ids are numeric; YouTube ids may contain ``_``). A video
    with no valid row, or seen under a second task, is reported and left out.
    """
    annotation_dir = Path(annotation_dir)
    if not annotation_dir.is_dir():
        raise FileNotFoundError(f"{annotation_dir}: not a directory")
    report = _Report(annotation_dir)
    known = None if video_ids is None else set(video_ids)
    out = StepAnnotations()
    if tasks is not None:
        out.task_steps = {task_id: task.steps for task_id, task in tasks.items()}
    for path in sorted(annotation_dir.iterdir()):
        if not path.is_file() or path.suffix.lower() != ".csv":
            continue
        match = _CROSSTASK_NAME.match(path.name)
        if match is None:
            report.bad(path.name, "file name is not <task>_<video>.csv")
            continue
        task_id, video_id = match["task"], match["video"]
        n_steps = None
        if tasks is not None:
            if task_id not in tasks:
                report.bad(path.name, f"unknown task {task_id!r}: skipped")
                continue
            n_steps = len(tasks[task_id].steps)
        _add_video(out, report, path, task_id, video_id, known, n_steps, None, path.name)
    report.summary()
    out.problems, out.unknown_video_ids, out.n_malformed = report.problems, report.unknown, report.n_malformed
    return out


def _add_video(
    out: StepAnnotations,
    report: _Report,
    path: Path,
    task_id: str,
    video_id: str,
    known: set[str] | None,
    n_steps: int | None,
    step_names: tuple[str, ...] | None,
    name: str,
) -> None:
    if known is not None and video_id not in known:
        report.unknown_video(name, video_id)
        return
    if video_id in out.segments:
        report.bad(name, f"video {video_id!r} already annotated for task {out.task_of[video_id]}: skipped")
        return
    segments = _parse_step_csv(path, name, report, n_steps, step_names)
    if not segments:
        report.note(name, "no valid step interval: video left out")
        return
    out.segments[video_id] = segments
    out.task_of[video_id] = task_id


# --------------------------------------------------------------------------------- Mining YouTube


def parse_mining_youtube(
    tasks_json: str | Path,
    annotation_dir: str | Path,
    *,
    video_ids: Collection[str] | None = None,
) -> StepAnnotations:
    """Mining YouTube ground truth in **our adapter format** (not the dataset's native layout).

    Adapter format (convert the original frame-level labels to it once, in seconds):

    - ``tasks_json``: ``{"<task>": ["<step 1 name>", "<step 2 name>", ...], ...}``, steps in their
      canonical order (the order the DP enforces).
    - ``annotation_dir/<task>/<video_id>.csv``: one row ``step,start,end`` per interval, where
      ``step`` is the 1-based step number or the exact step name (case-insensitive), ``start`` and
      ``end`` are seconds. An optional first line ``step,start,end`` is a header. Rows labelled
      ``SIL``, ``background`` or ``bg`` (background) are skipped silently.

    Task folders absent from ``tasks_json``, unknown step names, out-of-range numbers and malformed
    rows are reported in ``problems`` and skipped.
    """
    tasks_json, annotation_dir = Path(tasks_json), Path(annotation_dir)
    data = _load_json(tasks_json)
    if not isinstance(data, dict):
        raise ValueError(f"{tasks_json}: expected an object task -> list of step names")
    if not annotation_dir.is_dir():
        raise FileNotFoundError(f"{annotation_dir}: not a directory")
    report = _Report(annotation_dir)
    out = StepAnnotations()
    for task, steps in data.items():
        valid = isinstance(steps, list) and steps and all(isinstance(s, str) and s.strip() for s in steps)
        if not valid:
            report.bad(f"{tasks_json.name}[{task!r}]", "steps are not a non-empty list of names")
            continue
        out.task_steps[str(task)] = tuple(s.strip() for s in steps)
    known = None if video_ids is None else set(video_ids)
    for task_dir in sorted(p for p in annotation_dir.iterdir() if p.is_dir()):
        task = task_dir.name
        if task not in out.task_steps:
            report.bad(task_dir.name, f"task folder {task!r} is not in {tasks_json.name}: skipped")
            continue
        steps = out.task_steps[task]
        for path in sorted(task_dir.glob("*.csv")):
            _add_video(out, report, path, task, path.stem, known, len(steps), steps, f"{task}/{path.name}")
    report.summary()
    out.problems, out.unknown_video_ids, out.n_malformed = report.problems, report.unknown, report.n_malformed
    return out
