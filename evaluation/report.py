"""Self-contained HTML evaluation report: metrics, retrieval examples, cluster gallery, training curves.

The page is the jinja2 template ``evaluation/templates/report.html.j2`` (package data), rendered with
autoescaping on: every value from the data (captions, ids, titles) is HTML-escaped by jinja2, none by
hand. This module only turns the :class:`ReportData` into plain values for it (formatted numbers,
thumbnails, plots).

The page opens from disk with no network: CSS is inline and every image (clip thumbnails from
:mod:`evaluation.thumbnails`, matplotlib plots) is embedded as a base64 ``data:`` URI. No JavaScript is
needed; ``self_check=True`` adds a tiny script that counts the images that decoded (used by the tests).
Nothing here raises on bad media or a bad training log: missing videos get a placeholder thumbnail,
malformed log lines are skipped and counted.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from evaluation.thumbnails import image_mime, thumbnail
from store import atomic

logger = logging.getLogger(__name__)

__all__ = [
    "ClipRef",
    "QueryResult",
    "ReportData",
    "TrainLog",
    "metrics_table",
    "read_train_log",
    "render_report",
    "write_report",
]

LOSS_KEYS: tuple[str, ...] = ("total", "mms", "cluster", "recon")
_RECALL = re.compile(r"(?:R|recall)@(\d+)", re.IGNORECASE)
TEMPLATE = "report.html.j2"  # in evaluation/templates/


@dataclass
class ClipRef:
    """One clip of a video, as shown in the report."""

    video_path: Path | None  # raw video file, for the thumbnail (None -> placeholder image)
    video_id: str
    start: float  # seconds
    end: float
    caption: str = ""
    score: float | None = None


@dataclass
class QueryResult:
    """One retrieval query: its true clip and the top-k retrieved clips, best first."""

    query: str
    true_clip: ClipRef
    retrieved: list[ClipRef]
    true_rank: int  # 0-based rank of the true clip


@dataclass
class ReportData:
    """Everything the report shows; only ``title`` and ``metrics`` are required."""

    title: str
    metrics: dict[str, dict[str, float]]  # mode -> {"R@1", "R@5", "R@10", "median_rank", "mean_rank", ...}
    chance: dict[str, float] | None = None  # metric -> chance level, e.g. {"R@1": 1/N}
    queries: list[QueryResult] = field(default_factory=list)
    clusters: dict[int, list[ClipRef]] = field(default_factory=dict)  # k-means cluster -> a few clips
    train_log: Path | None = None  # JSONL, one object per logged step
    info: dict[str, str] = field(default_factory=dict)  # checkpoint, config identity, protocol, dates...
    n_annotated: int | None = None  # queries of the set's annotation file (None without one)
    n_missing: int | None = None  # annotated queries that could not be evaluated


@dataclass
class TrainLog:
    """The usable records of a training log and the number of lines that were skipped."""

    records: list[dict[str, float]]
    n_bad: int = 0
    error: str | None = None  # why the file could not be read at all


# --------------------------------------------------------------------------------------------------
# Training log


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def read_train_log(path: Path) -> TrainLog:
    """Numeric fields of each JSON object line; lines that are not an object with a numeric ``step``
    are skipped and counted (blank lines are ignored)."""
    records: list[dict[str, float]] = []
    n_bad = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    n_bad += 1
                    continue
                if not isinstance(obj, dict) or _number(obj.get("step")) is None:
                    n_bad += 1
                    continue
                records.append({k: v for k, v in ((k, _number(v)) for k, v in obj.items()) if v is not None})
    except OSError as exc:
        logger.warning("cannot read training log %s: %s", path, exc)
        return TrainLog([], 0, f"{type(exc).__name__}: {exc}")
    if n_bad:
        logger.warning("training log %s: skipped %d malformed line(s)", path, n_bad)
    return TrainLog(records, n_bad)


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _series(records: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if key in r:
            xs.append(r["step"])
            ys.append(r[key])
    return xs, ys


def _epoch_starts(records: list[dict[str, float]]) -> list[float]:
    starts, last = [], None
    for r in records:
        e = r.get("epoch")
        if e is not None and last is not None and e != last:
            starts.append(r["step"])
        last = e if e is not None else last
    return starts if len(starts) <= 30 else []


def _loss_keys(records: list[dict[str, float]]) -> list[str]:
    present = {k for r in records for k, v in r.items() if math.isfinite(v)}
    subparts = sorted(k for k in present if k.startswith("mms_"))
    return [k for k in LOSS_KEYS if k in present] + subparts


def plot_losses(records: list[dict[str, float]]) -> bytes | None:
    """PNG of the loss parts against the step (log y when they span more than ~1.5 decades)."""
    from matplotlib.figure import Figure

    keys = _loss_keys(records)
    if not keys:
        return None
    values = [v for k in keys for v in _series(records, k)[1] if math.isfinite(v)]
    positive = [v for v in values if v > 0]
    log_y = bool(positive) and max(positive) / min(positive) > 30
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    for k in keys:
        xs, ys = _series(records, k)
        if log_y:  # drawn as gaps, not clipped to a fake floor
            ys = [y if y > 0 else math.nan for y in ys]
        sub = k.startswith("mms_")
        ax.plot(xs, ys, label=k, linewidth=0.9 if sub else 1.6, linestyle="--" if sub else "-",
                marker="." if len(xs) <= 30 else None)
    for s in _epoch_starts(records):
        ax.axvline(s, color="0.8", linewidth=0.8, zorder=0)
    title = "training losses"
    if log_y:
        ax.set_yscale("log")
        if len(positive) < len(values):
            title += " (log y: values <= 0 not drawn)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(keys), 4))
    fig.tight_layout()
    return _png(fig)


def plot_rates(records: list[dict[str, float]]) -> bytes | None:
    """PNG of the learning rate and the throughput (clips/s) against the step."""
    from matplotlib.figure import Figure

    panels = [(k, label) for k, label in (("lr", "learning rate"), ("clips_per_s", "clips / s"))
              if any(k in r and math.isfinite(r[k]) for r in records)]
    if not panels:
        return None
    fig = Figure(figsize=(8, 3.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (k, label) in zip(axes, panels):
        xs, ys = _series(records, k)
        ax.plot(xs, ys, linewidth=1.4, marker="." if len(xs) <= 30 else None,
                color="tab:purple" if k == "lr" else "tab:green")
        for s in _epoch_starts(records):
            ax.axvline(s, color="0.8", linewidth=0.8, zorder=0)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if k == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------------------------------
# The page: evaluation/templates/report.html.j2, filled with plain data (strings, numbers, dicts)


#: The rank columns of the metrics table (metric key → header), after the recalls; the ``*_all``
#: variants (ranks over every annotated query, the missing ones at the worst rank) only when present.
RANK_COLUMNS: tuple[tuple[str, str], ...] = (("median_rank", "MedR"), ("mean_rank", "MeanR"),
                                             ("median_rank_all", "MedR (all)"), ("mean_rank_all", "MeanR (all)"))
MODE_LABELS = {"text_to_video": "text→video", "text_to_video_audio": "text→(video+audio)",
               "video_to_text": "video→text"}


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    """The jinja2 environment of the package's templates, autoescaping every value."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("evaluation", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _data_uri(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s < 60:
        return f"{s:.1f}"
    m, sec = divmod(s, 60)
    return f"{int(m)}:{sec:04.1f}" if m < 60 else f"{int(m // 60)}:{int(m % 60):02d}:{sec:04.1f}"


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt_metric(metric: str, value: Any) -> str:
    v = _finite(value)
    if v is None:
        return "—"
    if _RECALL.fullmatch(metric):
        return f"{100 * v:.1f} %"
    if v.is_integer():
        return f"{int(v):d}" if abs(v) < 1e15 else f"{v:.3g}"
    return f"{v:.2f}"


def _recall_k(metric: str) -> int | None:
    m = _RECALL.fullmatch(metric)
    return int(m.group(1)) if m else None


def metrics_table(metrics: dict[str, dict[str, float]], chance: dict[str, float] | None,
                  n_annotated: int | None = None, n_missing: int | None = None) -> dict[str, Any]:
    """The compact metrics table: one row per mode with the recall columns (every ``R@K`` present, by
    K), MedR, MeanR (and their ``_all`` variants when some mode has them) and n (queries evaluated, "of
    n_total" when the recalls are divided by more); a chance row under the recalls; notes below."""
    recalls = sorted({k for m in metrics.values() for k in m if _recall_k(k) is not None}, key=_recall_k)
    ranks = [(k, label) for k, label in RANK_COLUMNS if any(k in m for m in metrics.values())]
    columns = [{"key": k, "label": k} for k in recalls] + [{"key": k, "label": label} for k, label in ranks]
    columns.append({"key": "n_queries", "label": "n"})
    rows = []
    for mode, m in metrics.items():
        cells = []
        for k in recalls:
            v = _finite(m.get(k))
            cells.append({"kind": "recall", "text": _fmt_metric(k, v),
                          "bar": None if v is None else f"{max(0.0, min(1.0, v)) * 100:.1f}"})
        cells += [{"kind": "rank-metric", "text": _fmt_metric(k, m.get(k)), "bar": None} for k, _ in ranks]
        n, total = _finite(m.get("n_queries")), _finite(m.get("n_total"))
        text = _fmt_metric("n_queries", n)
        if n is not None and total is not None and total != n:
            text += f" of {_fmt_metric('n_total', total)}"
        cells.append({"kind": "n", "text": text, "bar": None})
        rows.append({"mode": mode, "label": MODE_LABELS.get(mode, mode), "cells": cells})
    chance_row = None
    if chance:
        chance_row = [_fmt_metric(k, chance[k]) if k in chance else "" for k in recalls] + [""] * (len(ranks) + 1)
    notes = []
    if n_missing:
        of = f" of {n_annotated}" if n_annotated is not None else ""
        notes.append(f"{n_missing}{of} annotated queries could not be evaluated (video absent or unusable, "
                     "no known word in the caption).")
    if any(c["key"].endswith("_all") for c in columns):
        notes.append("MedR and MeanR: over the evaluated queries; (all): over every query of the set, a "
                     "query that could not be evaluated at the worst rank.")
    return {"columns": columns, "rows": rows, "chance": chance_row, "notes": notes}


def _same_clip(a: ClipRef, b: ClipRef) -> bool:
    return a.video_id == b.video_id and math.isclose(a.start, b.start, abs_tol=1e-3) and math.isclose(
        a.end, b.end, abs_tol=1e-3)


def _mid(c: ClipRef) -> float:
    return (c.start + c.end) / 2 if math.isfinite(c.start + c.end) else 0.0


class _Thumbs:
    """Thumbnails as data URIs, fetched concurrently up front (ffmpeg subprocesses release the GIL)."""

    def __init__(self, clips: list[ClipRef], width: int, workers: int) -> None:
        self.width = width
        keys = list(dict.fromkeys((c.video_path, _mid(c)) for c in clips))
        self.uris: dict[tuple[Path | None, float], str] = {}
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for key, data in zip(keys, pool.map(lambda k: thumbnail(k[0], k[1], width), keys)):
                self.uris[key] = _data_uri(data)

    def uri(self, c: ClipRef) -> str:
        return self.uris.get((c.video_path, _mid(c))) or _data_uri(thumbnail(c.video_path, _mid(c), self.width))


def _clip(c: ClipRef, thumbs: _Thumbs, *, rank: int | None = None, is_true: bool = False,
          sep: bool = False) -> dict[str, Any]:
    """One clip figure's values (``rank`` 0-based; shown 1-based)."""
    score = _finite(c.score)
    span = f"{_fmt_time(c.start)}–{_fmt_time(c.end)} s"
    return {"src": thumbs.uri(c), "width": thumbs.width, "alt": f"{c.video_id} {span}",
            "rank": None if rank is None else rank + 1, "score": None if score is None else f"{score:.3f}",
            "is_true": is_true, "where": f"{c.video_id} · {span}",
            "caption": c.caption, "sep": sep}


def _sample(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [0][:k]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _query(q: QueryResult, thumbs: _Thumbs, top_k: int) -> dict[str, Any]:
    """A query's top ``top_k`` clips, then (after a separator) its true clip when it is not among them."""
    clips, true_shown = [], False
    for r, c in enumerate(q.retrieved[:top_k]):
        is_true = r == q.true_rank or _same_clip(c, q.true_clip)
        true_shown |= is_true
        clips.append(_clip(c, thumbs, rank=r, is_true=is_true))
    if not true_shown:
        clips.append(_clip(q.true_clip, thumbs, rank=q.true_rank if q.true_rank >= 0 else None, is_true=True,
                           sep=True))
    return {"query": q.query, "true_rank": q.true_rank + 1, "hit": 0 <= q.true_rank < top_k, "clips": clips}


def _training(train_log: Path | None) -> dict[str, Any]:
    """What the training section shows: the log's counts and the plots (PNG data URIs)."""
    out: dict[str, Any] = {"path": None if train_log is None else str(train_log), "error": None, "n_records": 0,
                           "n_bad": 0, "plots": []}
    if train_log is None:
        return out
    log = read_train_log(Path(train_log))
    out.update(error=log.error, n_bad=log.n_bad, n_records=len(log.records), name=Path(train_log).name)
    if log.error is not None or not log.records:
        return out
    records = sorted(log.records, key=lambda r: r["step"])
    out["last_step"] = int(records[-1]["step"])
    for name, png in (("losses", plot_losses(records)), ("rates", plot_rates(records))):
        if png is not None:
            out["plots"].append({"name": name, "src": _data_uri(png)})
    return out


def render_report(data: ReportData, *, max_queries: int = 10, top_k: int = 5, clips_per_cluster: int = 6,
                  thumb_width: int = 160, workers: int = 4, self_check: bool = False) -> str:
    """The report as one HTML string (see :func:`write_report`)."""
    picked = [data.queries[i] for i in _sample(len(data.queries), max_queries)]
    clusters = {k: v[:clips_per_cluster] for k, v in sorted(data.clusters.items())}
    clips: list[ClipRef] = []
    for q in picked:
        clips += q.retrieved[:top_k] + [q.true_clip]
    for v in clusters.values():
        clips += v
    thumbs = _Thumbs(clips, thumb_width, workers)
    return _environment().get_template(TEMPLATE).render(
        title=data.title, info=data.info,
        table=metrics_table(data.metrics, data.chance, data.n_annotated, data.n_missing),
        queries=[_query(q, thumbs, top_k) for q in picked], n_queries=len(data.queries), top_k=top_k,
        clusters=[{"id": k, "clips": [_clip(c, thumbs) for c in members]} for k, members in clusters.items()],
        training=_training(data.train_log),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), self_check=self_check)


def write_report(path: Path, data: ReportData, *, max_queries: int = 10, top_k: int = 5,
                 clips_per_cluster: int = 6, thumb_width: int = 160, workers: int = 4,
                 self_check: bool = False) -> Path:
    """Write the self-contained report and return its path.

    ``path`` is the HTML file if it ends in ``.html``/``.htm``, else a folder that receives ``report.html``.
    Shows an evenly spread sample of at most ``max_queries`` queries with their ``top_k`` clips, and
    ``clips_per_cluster`` clips per cluster. The file is written to a temporary name and renamed.
    """
    path = Path(path)
    out = path if path.suffix.lower() in (".html", ".htm") else path / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render_report(data, max_queries=max_queries, top_k=top_k, clips_per_cluster=clips_per_cluster,
                         thumb_width=thumb_width, workers=workers, self_check=self_check)
    atomic.write_text(out, text)
    logger.info("wrote report %s (%.1f kB)", out, len(text) / 1024)
    return out
