"""Deterministic generator of small narrated demo/test videos (`mcn demo-data`).

Every video is a sequence of segments; each segment shows one large coloured shape doing one motion
on a textured background, narrated by espeak-ng with a sentence naming colour, shape and motion.
A side-car ``.srt`` holds the same sentences at the segment times. Some (colour, shape, motion)
combinations are held out: they never occur in ``train/`` and are the only ones in ``heldout/``.

Layout written under ``out_dir``::

    train/train-0000.mp4 + .srt ...   heldout/heldout-0000.mp4 + .srt ...   demo_data.json

The plan (segments, sentences, voices, backgrounds) depends only on the config; video ``i`` of a
split depends only on the seed and the videos before it, so growing ``n_videos`` keeps existing
files. A video is skipped when its ``.mp4`` and ``.srt`` exist, the ``.srt`` is the expected one and
the fingerprint stored in the mp4's ``comment`` tag matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from store import atomic, identity
from synthetic.captions import srt_text
from synthetic.encode import encode_video
from synthetic.plan import SPLITS, Combo, DemoDataConfig, VideoSpec, plan_demo_data

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
INDEX_NAME = "demo_data.json"
_NAME_RE = re.compile(r"^(train|heldout)-\d{4,}\.(mp4|srt)$")


@dataclass
class DemoDataSummary:
    """What ``generate_demo_data`` produced."""

    out_dir: Path
    index_path: Path
    train_videos: list[Path]
    heldout_videos: list[Path]
    heldout_combinations: list[Combo]
    n_generated: int
    n_skipped: int
    seconds_train: float
    seconds_heldout: float
    elapsed_s: float = 0.0
    n_segments: int = 0

    @property
    def n_videos(self) -> int:
        return len(self.train_videos) + len(self.heldout_videos)

    @property
    def total_seconds(self) -> float:
        return self.seconds_train + self.seconds_heldout


def video_fingerprint(video: VideoSpec, cfg: DemoDataConfig) -> str:
    """Hash of everything that determines the bytes of one video."""
    payload = {"version": GENERATOR_VERSION, "video": video.to_json(), "width": cfg.width,
               "height": cfg.height, "fps": cfg.fps, "sample_rate": cfg.sample_rate, "crf": cfg.crf,
               "preset": cfg.preset}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _stored_fingerprint(mp4: Path) -> str | None:
    try:  # killed after a minute: a file that hangs ffprobe is simply regenerated
        proc = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format_tags=comment",
                               "-of", "default=nw=1:nk=1", str(mp4)], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, errors="replace")
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _is_complete(video: VideoSpec, cfg: DemoDataConfig, mp4: Path, srt: Path, fingerprint: str) -> bool:
    if not (mp4.is_file() and srt.is_file() and mp4.stat().st_size > 0):
        return False
    if srt.read_text(encoding="utf-8") != srt_text(video):
        return False
    return _stored_fingerprint(mp4) == f"mcn-demo:{fingerprint}"


def _make_video(video: VideoSpec, cfg: DemoDataConfig) -> bool:
    """Produce one video and its captions unless complete already; True when generated."""
    split_dir = cfg.out_dir / video.split
    mp4, srt = split_dir / f"{video.name}.mp4", split_dir / f"{video.name}.srt"
    fingerprint = video_fingerprint(video, cfg)
    if _is_complete(video, cfg, mp4, srt, fingerprint):
        return False
    srt.unlink(missing_ok=True)  # captions are written last: their presence marks completion
    encode_video(video, cfg, mp4, fingerprint)
    atomic.write_text(srt, srt_text(video))
    return True


def _prune(split_dir: Path, expected: set[str]) -> None:
    """Remove leftovers of this generator that the current plan does not contain."""
    mine = identity.current().token
    for path in sorted(split_dir.iterdir()):
        token = atomic.temp_owner(path.name)
        name = path.name[1:].rsplit(atomic.TEMP_MARK, 1)[0] if token else path.name
        if _NAME_RE.match(name) and ((token is not None and token != mine) or (token is None and name not in expected)):
            logger.info("removing stale %s", path)
            path.unlink()


def _check_tools() -> None:
    missing = [t for t in ("ffmpeg", "ffprobe", "espeak-ng") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"demo data needs {', '.join(missing)} on PATH")


def generate_demo_data(cfg: DemoDataConfig) -> DemoDataSummary:
    """Generate (or complete) the demo dataset under ``cfg.out_dir`` and write its index."""
    _check_tools()
    t0 = time.perf_counter()
    plan = plan_demo_data(cfg)
    for split in SPLITS:
        split_dir = cfg.out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        names = {v.name for v in plan.videos if v.split == split}
        _prune(split_dir, {f"{name}.{ext}" for name in names for ext in ("mp4", "srt")})
    generated = 0
    bar = tqdm(total=len(plan.videos), desc="demo videos", unit="video", disable=not cfg.progress)
    with bar, ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        for made in pool.map(lambda v: _make_video(v, cfg), plan.videos):
            generated += int(made)
            bar.update(1)
    index = {
        "version": GENERATOR_VERSION,
        "config": cfg.plan_dict(),
        "heldout_combinations": [list(c) for c in plan.heldout_combinations],
        "videos": [v.to_json() for v in plan.videos],
    }
    index_path = cfg.out_dir / INDEX_NAME
    atomic.write_if_changed(index_path, json.dumps(index, indent=1) + "\n")
    summary = DemoDataSummary(
        out_dir=cfg.out_dir, index_path=index_path,
        train_videos=[cfg.out_dir / v.split / f"{v.name}.mp4" for v in plan.videos if v.split == "train"],
        heldout_videos=[cfg.out_dir / v.split / f"{v.name}.mp4" for v in plan.videos if v.split == "heldout"],
        heldout_combinations=plan.heldout_combinations, n_generated=generated,
        n_skipped=len(plan.videos) - generated,
        seconds_train=sum(v.duration for v in plan.videos if v.split == "train"),
        seconds_heldout=sum(v.duration for v in plan.videos if v.split == "heldout"),
        elapsed_s=time.perf_counter() - t0, n_segments=sum(len(v.segments) for v in plan.videos),
    )
    logger.info("demo data in %s: %d videos (%d generated, %d up to date), %.0f s of video, %.1f s",
                cfg.out_dir, summary.n_videos, generated, summary.n_skipped, summary.total_seconds,
                summary.elapsed_s)
    return summary
