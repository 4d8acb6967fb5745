"""The HTML evaluation report (a jinja2 template): self-contained, images decode, one metrics row per mode,
escaped text, and (with Chromium) it renders."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation import thumbnails
from evaluation.report import ClipRef, QueryResult, ReportData, read_train_log, write_report
from evaluation.thumbnails import placeholder, thumbnail

CHROMIUM = Path("/usr/bin/chromium")
MODES = ("text_to_video", "video_to_text")
N_CANDIDATES = 20


def _video(path: Path) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=size=64x48:rate=12:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(path)], check=True, timeout=60)
    return path


class _Parsed(HTMLParser):
    """Images, the metrics table (header cells, one row per mode, the chance row) and class lists."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.header: list[str] = []
        self.rows: list[dict[str, object]] = []  # {"mode": data-mode or "chance", "cells": [texts]}
        self.classes: list[str] = []
        self.body: dict[str, str] = {}
        self._cell: list[str] | None = None
        self._in_metrics = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.classes += a.get("class", "").split()
        if tag == "img":
            self.imgs.append(a)
        elif tag == "body":
            self.body = a
        elif tag == "table" and a.get("id") == "metrics":
            self._in_metrics = True
        elif tag == "tr" and {"metric-row", "chance-row"} & set(a.get("class", "").split()):
            self.rows.append({"mode": a.get("data-mode", "chance"), "cells": []})
        elif tag in ("td", "th") and self._in_metrics:
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_metrics = False
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell).strip()
            if tag == "th":
                self.header.append(text)
            else:
                self.rows[-1]["cells"].append(text)  # type: ignore[union-attr]
            self._cell = None


def _parse(text: str) -> _Parsed:
    p = _Parsed()
    p.feed(text)
    return p


def _decode(uri: str) -> tuple[str, bytes]:
    m = re.fullmatch(r"data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)", uri)
    assert m, uri[:60]
    return m.group(1), base64.b64decode(m.group(2), validate=True)


def _metrics(r1: float, **extra: float) -> dict[str, float]:
    return {"R@1": r1, "R@5": 0.5, "R@10": 0.75, "median_rank": 5.0, "mean_rank": 6.25, "n_queries": 20, **extra}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_media")
    log = root / "train.jsonl"
    lines = [json.dumps({"step": s, "epoch": s // 3, "lr": 1e-3 * (1 - s / 10), "clips_per_s": 100.0 + s,
                         "total": 2.0 / s, "mms": 1.5 / s, "cluster": 0.0 if s < 3 else 0.3 / s,
                         "recon": 0.2 / s, "mms_tv": 0.5 / s, "cluster_refit": s == 3}) for s in range(1, 7)]
    lines[2:2] = ["this is not json", "", "[1, 2, 3]", '{"epoch": 0, "total": 1.0}']
    log.write_text("\n".join(lines) + "\n")
    return {"v0": _video(root / "v0.mp4"), "v1": _video(root / "v1.mp4"), "missing": root / "missing.mp4",
            "log": log, "root": root}


def _data(media: dict[str, Path]) -> ReportData:
    v0, v1, missing = media["v0"], media["v1"], media["missing"]

    def clip(path: Path | None, vid: str, start: float, score: float, cap: str = "") -> ClipRef:
        return ClipRef(path, vid, start, start + 0.8, caption=cap or f"caption of {vid} at {start:.1f}", score=score)

    true0 = clip(v0, "v0", 0.2, 0.91, "mix the flour")
    q0 = QueryResult("mix the flour", true0,
                     [true0] + [clip(v1, "v1", 0.1 * i, 0.9 - 0.1 * i) for i in range(1, 5)], true_rank=0)
    true1 = clip(v1, "v1", 1.0, 0.12, "fold the <b>dough</b>")
    q1 = QueryResult("<script>alert(1)</script> & fold", true1,
                     [clip(v0, "v0", 0.1, 0.8), clip(missing, "gone", 0.0, 0.7)]
                     + [clip(v0, "v0", 0.3 * i, 0.6 - 0.1 * i) for i in range(1, 4)], true_rank=7)
    clusters = {3: [clip(v1, "v1", 0.5, 0.0), clip(missing, "gone", 0.0, 0.0)],
                0: [clip(v0, "v0", 0.0, 0.0), clip(v1, "v1", 1.1, 0.0)]}
    return ReportData(
        title="MCN eval <demo>",
        metrics={MODES[0]: _metrics(0.125, n_total=20),
                 MODES[1]: _metrics(0.3, n_total=25, median_rank_all=7.0, mean_rank_all=8.5)},
        n_annotated=27, n_missing=2,
        chance={k: n / N_CANDIDATES for k, n in (("R@1", 1), ("R@5", 5), ("R@10", 10))},
        queries=[q0, q1], clusters=clusters, train_log=media["log"],
        info={"checkpoint": "runs/demo/checkpoints/step-000060.pt", "protocol": "YouCook2 val, 20 clips"})


@pytest.fixture(scope="module")
def report(media) -> Path:
    thumbnails.clear_cache()
    return write_report(media["root"] / "eval", _data(media), self_check=True)


# Images the report must hold: q0 5 clips, q1 5 + the true clip outside the top 5, 4 cluster clips, 2 plots;
# placeholders (PNG) for the 2 clips of the missing video.
N_IMAGES, N_JPEG, N_PNG = 5 + 6 + 4 + 2, 13, 4


def test_thumbnail_is_a_cached_jpeg(media, monkeypatch) -> None:
    thumbnails.clear_cache()
    data = thumbnail(media["v0"], 1.0)
    assert data[:3] == b"\xff\xd8\xff"
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.size == (160, 120)  # 64x48 scaled to width 160
    assert np.asarray(im.convert("L"), dtype=float).std() > 20  # testsrc: colour bars, not a flat frame

    def boom(*a, **k):
        raise AssertionError("ffmpeg must not run again for a cached (path, t)")

    monkeypatch.setattr(thumbnails, "run_tool", boom)
    assert thumbnail(media["v0"], 1.0) is data


def test_thumbnail_placeholder_never_raises(media, tmp_path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video\n" * 50)
    for path, t in ((media["missing"], 1.0), (None, 0.0), (bad, 0.5), (media["v0"], 100.0)):
        data = thumbnail(path, t)
        assert data.startswith(b"\x89PNG"), (path, t)
        im = Image.open(io.BytesIO(data))
        assert im.size == (160, 90)
        px = np.asarray(im.convert("RGB"))
        assert (px[10:-10, 60:100] == 200).mean() > 0.8  # mostly the grey fill
    assert placeholder(50, 20)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_metrics_images_and_escaping(report: Path) -> None:
    assert report.name == "report.html" and report.is_file()
    text = report.read_text(encoding="utf-8")
    p = _parse(text)

    # one row per mode, recalls as percentages, the _all ranks where a mode has them, chance under the
    # recalls; n "of n_total" where the recalls are divided by more than the queries evaluated
    assert p.header == ["mode", "R@1", "R@5", "R@10", "MedR", "MeanR", "MedR (all)", "MeanR (all)", "n"]
    assert [r["mode"] for r in p.rows] == [*MODES, "chance"]
    assert [r["cells"] for r in p.rows] == [
        ["text→video", "12.5 %", "50.0 %", "75.0 %", "5", "6.25", "—", "—", "20"],
        ["video→text", "30.0 %", "50.0 %", "75.0 %", "5", "6.25", "7", "8.50", "20 of 25"],
        ["chance", "5.0 %", "25.0 %", "50.0 %", "", "", "", "", ""],
    ]
    assert "2 of 27 annotated queries could not be evaluated" in text

    # every image is embedded and decodes; nothing refers to the network or the disk
    kinds = []
    for img in p.imgs:
        mime, raw = _decode(img["src"])
        im = Image.open(io.BytesIO(raw))
        im.load()
        assert im.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[mime]
        assert im.width > 0 and im.height > 0
        kinds.append(im.format)
    assert len(p.imgs) == N_IMAGES
    assert kinds.count("JPEG") == N_JPEG and kinds.count("PNG") == N_PNG
    plots = [i for i in p.imgs if i.get("class") == "plot"]
    assert [i["id"] for i in plots] == ["plot-losses", "plot-rates"]
    assert all(Image.open(io.BytesIO(_decode(i["src"])[1])).size == (800, s) for i, s in zip(plots, (360, 300)))
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text) + re.findall(r"url\(([^)]*)\)", text)
    assert refs and all(r.startswith("data:") for r in refs)
    assert "http://" not in text and "https://" not in text

    # the true clip is marked once per query (q1's true clip, rank 8, is shown after the top 5)
    assert p.classes.count("true-clip") == 2 and text.count("true clip</span>") == 2
    assert "true clip at rank <b>8</b>" in text and "true clip at rank <b>1</b>" in text
    assert p.classes.count("cluster") == 2
    assert text.index('data-cluster="0"') < text.index('data-cluster="3"')

    # escaped text, bad log lines counted
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; fold" in text
    assert "fold the &lt;b&gt;dough&lt;/b&gt;" in text and "<title>MCN eval &lt;demo&gt;</title>" in text
    assert "3 malformed line(s)" in text and "6 logged steps, last step 6" in text
    assert "runs/demo/checkpoints/step-000060.pt" in text


def test_train_log_parsing_and_missing_logs(media, tmp_path) -> None:
    log = read_train_log(media["log"])
    assert log.n_bad == 3 and [r["step"] for r in log.records] == [1, 2, 3, 4, 5, 6]
    assert "cluster_refit" not in log.records[0] and log.records[0]["total"] == 2.0

    empty, junk = tmp_path / "empty.jsonl", tmp_path / "junk.jsonl"
    empty.write_text("")
    junk.write_text("{{{\nnull\n")
    base = ReportData(title="t", metrics={"text_to_video": {"R@1": float("nan"), "median_rank": float("nan")}})
    for log_path, note in ((None, "No training log given."), (empty, "has no usable records"),
                           (junk, "2 malformed line(s)"), (tmp_path / "absent.jsonl", "could not be read")):
        base.train_log = log_path
        out = write_report(tmp_path / f"r-{note[:5]}.html", base)
        text = out.read_text()
        assert note in text and 'class="plot"' not in text
        assert "No query examples." in text and "No clusters." in text
        parsed = _parse(text)  # only the columns present; NaN and absent values as a dash
        assert parsed.header == ["mode", "R@1", "MedR", "n"]
        assert [r["cells"] for r in parsed.rows] == [["text→video", "—", "—", "—"]]
        assert "metrics-note" not in text and 'class="chance-row"' not in text
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian package `chromium`; "
                    "install it with apt-get to run the rendering test)")
def test_report_renders_in_headless_chromium(report: Path, tmp_path) -> None:
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", "--virtual-time-budget=5000",
            f"--user-data-dir={tmp_path / 'profile'}"]
    url = report.resolve().as_uri()

    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    p = _parse(dom.stdout)
    assert p.body.get("data-images-total") == str(N_IMAGES), dom.stdout[:500]
    assert p.body.get("data-images-ok") == str(N_IMAGES)  # every <img> decoded: naturalWidth > 0
    assert "<title>images-ok:%d/%d</title>" % (N_IMAGES, N_IMAGES) in dom.stdout
    assert [r["mode"] for r in p.rows] == [*MODES, "chance"] and p.header[:6] == ["mode", "R@1", "R@5", "R@10",
                                                                                  "MedR", "MeanR"]

    shot = tmp_path / "shot.png"
    run = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,3000", url],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    im = Image.open(shot)
    assert im.size == (1200, 3000)
    px = np.asarray(im.convert("RGB"), dtype=float)
    assert px.std() > 20
    assert (px.min(axis=2) < 200).mean() > 0.02  # text, thumbnails and plots, not a blank page
    # colour: the testsrc thumbnails and the green true-clip frames are drawn
    assert (px.max(axis=2) - px.min(axis=2) > 100).mean() > 0.002
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
