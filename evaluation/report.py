"""Self-contained HTML evaluation report: metrics, retrieval examples, cluster gallery, training curves.

The page opens from disk with no network: CSS is inline and every image (clip thumbnails from
:mod:`evaluation.thumbnails`, matplotlib plots) is embedded as a base64 ``data:`` URI. No JavaScript is
needed; ``self_check=True`` adds a tiny script that counts the images that decoded (used by the tests).
All text coming from the data is HTML-escaped. Nothing here raises on bad media or a bad training log:
missing videos get a placeholder thumbnail, malformed log lines are skipped and counted.
"""

from __future__ import annotations

import base64
import html
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
    "read_train_log",
    "render_report",
    "write_report",
]

LOSS_KEYS: tuple[str, ...] = ("total", "mms", "cluster", "recon")
_RECALL = re.compile(r"(?:R|recall)@(\d+)", re.IGNORECASE)
_METRIC_LABELS = {"median_rank": "median rank", "mean_rank": "mean rank", "n_queries": "queries",
                  "n_total": "candidates"}


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
# HTML pieces


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _data_uri(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s < 60:
        return f"{s:.1f}"
    m, sec = divmod(s, 60)
    return f"{int(m)}:{sec:04.1f}" if m < 60 else f"{int(m // 60)}:{int(m % 60):02d}:{sec:04.1f}"


def _is_recall(metric: str) -> bool:
    return _RECALL.fullmatch(metric) is not None


def _fmt_metric(metric: str, value: float | None) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    if _is_recall(metric):
        return f"{100 * value:.1f} %"
    if metric.startswith("n_") or float(value).is_integer():
        return f"{int(value):d}" if abs(value) < 1e15 else f"{value:.3g}"
    return f"{value:.2f}"


def _metric_order(metric: str) -> tuple[int, float, str]:
    m = _RECALL.fullmatch(metric)
    if m:
        return (0, float(m.group(1)), metric)
    fixed = {"median_rank": 1, "mean_rank": 2}
    if metric in fixed:
        return (fixed[metric], 0.0, metric)
    return (4 if metric.startswith("n_") else 3, 0.0, metric)


def _metrics_table(metrics: dict[str, dict[str, float]], chance: dict[str, float] | None) -> str:
    head = "<tr><th>mode</th><th>metric</th><th>value</th>" + ("<th>chance</th>" if chance else "") + "</tr>"
    rows = []
    for mode, values in metrics.items():
        for i, metric in enumerate(sorted(values, key=_metric_order)):
            v = values[metric]
            bar = ""
            if _is_recall(metric) and isinstance(v, (int, float)) and math.isfinite(v):
                bar = f'<span class="bar" style="width:{max(0.0, min(1.0, float(v))) * 100:.1f}%"></span>'
            cells = [f'<td class="mode{"" if i == 0 else " repeat"}">{_e(mode)}</td>',
                     f'<td class="metric">{_e(_METRIC_LABELS.get(metric, metric))}</td>',
                     f'<td class="value">{bar}<span class="num">{_e(_fmt_metric(metric, v))}</span></td>']
            if chance:
                c = chance.get(metric)
                cells.append(f'<td class="chance">{_e(_fmt_metric(metric, c)) if c is not None else ""}</td>')
            rows.append(f'<tr class="metric-row{" first" if i == 0 else ""}" data-mode="{_e(mode)}" '
                        f'data-metric="{_e(metric)}">{"".join(cells)}</tr>')
    if not rows:
        return '<p class="note">No metrics.</p>'
    return f'<table id="metrics"><thead>{head}</thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table>"


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

    def img(self, c: ClipRef) -> str:
        uri = self.uris.get((c.video_path, _mid(c))) or _data_uri(thumbnail(c.video_path, _mid(c), self.width))
        alt = f"{c.video_id} {_fmt_time(c.start)}–{_fmt_time(c.end)} s"
        return f'<img class="thumb" src="{uri}" alt="{_e(alt)}" width="{self.width}">'


def _clip_figure(c: ClipRef, thumbs: _Thumbs, *, rank: int | None = None, is_true: bool = False) -> str:
    cls = "clip true-clip" if is_true else "clip"
    top = []
    if rank is not None:
        top.append(f'<span class="rank">#{rank + 1}</span>')
    if c.score is not None and math.isfinite(c.score):
        top.append(f'<span class="score">{c.score:.3f}</span>')
    if is_true:
        top.append('<span class="label">✔ true clip</span>')
    where = f"{_e(c.video_id)} · {_fmt_time(c.start)}–{_fmt_time(c.end)} s"
    caption = f'<div class="caption">{_e(c.caption)}</div>' if c.caption else ""
    return (f'<figure class="{cls}">{thumbs.img(c)}<figcaption><div class="top">{" ".join(top)}</div>'
            f'<div class="where">{where}</div>{caption}</figcaption></figure>')


def _sample(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [0][:k]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _query_block(i: int, q: QueryResult, thumbs: _Thumbs, top_k: int) -> str:
    shown = q.retrieved[:top_k]
    figs, true_shown = [], False
    for r, c in enumerate(shown):
        is_true = r == q.true_rank or _same_clip(c, q.true_clip)
        true_shown |= is_true
        figs.append(_clip_figure(c, thumbs, rank=r, is_true=is_true))
    if not true_shown:
        figs.append('<div class="sep">…</div>')
        figs.append(_clip_figure(q.true_clip, thumbs, rank=q.true_rank if q.true_rank >= 0 else None, is_true=True))
    status = "hit" if 0 <= q.true_rank < top_k else "miss"
    return (f'<section class="query {status}"><h3><span class="qn">{i + 1}.</span> “{_e(q.query)}”</h3>'
            f'<p class="meta">true clip at rank <b>{q.true_rank + 1}</b></p>'
            f'<div class="clips">{"".join(figs)}</div></section>')


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1150px;
 padding:0 16px;color:#222;background:#fff}
h1{font-size:24px;margin:0 0 8px}h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 4px;font-weight:600}
dl.info{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:8px 0;font-size:13px}
dl.info dt{color:#666}dl.info dd{margin:0;font-family:ui-monospace,Menlo,monospace;word-break:break-all}
table#metrics{border-collapse:collapse;font-size:13px}
#metrics th,#metrics td{padding:3px 12px;text-align:left;border-bottom:1px solid #eee}
#metrics thead th{border-bottom:2px solid #ccc}#metrics tr.first td{border-top:1px solid #bbb}
#metrics td.repeat{color:#bbb}#metrics td.value{position:relative;min-width:110px;text-align:right}
#metrics .bar{position:absolute;left:0;top:4px;bottom:4px;background:#e1edf9;z-index:0}
#metrics .num{position:relative;z-index:1;font-variant-numeric:tabular-nums}#metrics td.chance{color:#888;text-align:right}
.note{color:#777;font-style:italic}.meta{margin:0 0 6px;color:#555;font-size:13px}
.query{margin-bottom:18px}.query.miss h3 .qn{color:#c0392b}.query.hit h3 .qn{color:#1e8449}
.clips,.gallery{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure.clip{margin:0;width:168px;padding:3px;border:2px solid transparent;border-radius:6px;background:#fafafa}
figure.clip img{display:block;width:160px;height:auto;border-radius:3px;background:#ddd}
figure.true-clip{border-color:#27ae60;background:#eafaf1}
figcaption{font-size:12px;margin-top:3px}.top{display:flex;gap:6px;align-items:baseline}
.rank{font-weight:700}.score{color:#555;font-variant-numeric:tabular-nums}
.label{color:#fff;background:#27ae60;border-radius:3px;padding:0 4px;font-size:11px;font-weight:600}
.where{color:#888;font-size:11px;word-break:break-all}.caption{margin-top:2px}
.sep{align-self:center;color:#aaa;font-size:22px}
img.plot{display:block;max-width:100%;height:auto;margin:8px 0}
footer{margin-top:40px;color:#999;font-size:12px}
"""

_SELF_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-ok", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
  document.title = "images-ok:" + ok + "/" + imgs.length;
});
</script>"""


def _training_section(train_log: Path | None) -> str:
    if train_log is None:
        return '<p class="note">No training log given.</p>'
    log = read_train_log(Path(train_log))
    if log.error is not None:
        return f'<p class="note">Training log {_e(train_log)} could not be read ({_e(log.error)}).</p>'
    notes = []
    if log.n_bad:
        notes.append(f'<p class="note" id="train-log-skipped">{log.n_bad} malformed line(s) of the training log '
                     "were skipped.</p>")
    if not log.records:
        return "".join(notes) + f'<p class="note">Training log {_e(train_log)} has no usable records.</p>'
    records = sorted(log.records, key=lambda r: r["step"])
    parts = [f'<p class="meta">{len(records)} logged steps, last step {int(records[-1]["step"])} '
             f'from {_e(Path(train_log).name)}</p>', *notes]
    for name, png in (("losses", plot_losses(records)), ("rates", plot_rates(records))):
        if png is not None:
            parts.append(f'<img class="plot" id="plot-{name}" src="{_data_uri(png)}" alt="{name}">')
    return "".join(parts)


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

    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>{_e(data.title)}</title><style>{_CSS}</style></head><body>",
           f'<header><h1>{_e(data.title)}</h1>']
    if data.info:
        out.append('<dl class="info">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in data.info.items())
                   + "</dl>")
    out.append("</header>")

    out.append('<section id="metrics-section"><h2>Retrieval metrics</h2>')
    out.append(_metrics_table(data.metrics, data.chance))
    out.append("</section>")

    out.append('<section id="queries"><h2>Retrieval examples</h2>')
    if picked:
        out.append(f'<p class="meta">{len(picked)} of {len(data.queries)} queries, top {top_k} each; '
                   "the true clip is framed in green.</p>")
        out += [_query_block(i, q, thumbs, top_k) for i, q in enumerate(picked)]
    else:
        out.append('<p class="note">No query examples.</p>')
    out.append("</section>")

    out.append('<section id="clusters"><h2>Cluster gallery</h2>')
    if clusters:
        for k, members in clusters.items():
            out.append(f'<div class="cluster" data-cluster="{_e(k)}"><h3>cluster {_e(k)}</h3><div class="gallery">'
                       + "".join(_clip_figure(c, thumbs) for c in members) + "</div></div>")
    else:
        out.append('<p class="note">No clusters.</p>')
    out.append("</section>")

    out.append('<section id="training"><h2>Training curves</h2>')
    out.append(_training_section(data.train_log))
    out.append("</section>")

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.append(f"<footer>generated {stamp} by evaluation.report</footer>")
    if self_check:
        out.append(_SELF_CHECK)
    out.append("</body></html>\n")
    return "\n".join(out)


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
