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
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
INDEX_NAME = "demo_data.json"
SPLITS = ("train", "heldout")

#: Saturated colours, far from each other and from the dark, desaturated backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 190, 50),
    "blue": (35, 75, 235),
    "yellow": (245, 225, 30),
    "purple": (150, 50, 215),
    "orange": (250, 135, 15),
    "white": (240, 240, 240),
    "cyan": (30, 215, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "grows", "shrinks", "spins", "bounces")

#: Sentence templates per motion; ``{c}`` colour, ``{s}`` shape. Every one names the motion.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "left": ("the {c} {s} moves to the left", "a {c} {s} is moving left", "the {c} {s} slides to the left"),
    "right": ("the {c} {s} moves to the right", "a {c} {s} is moving right",
              "the {c} {s} slides to the right"),
    "up": ("the {c} {s} moves up", "a {c} {s} is moving up", "the {c} {s} rises up"),
    "down": ("the {c} {s} moves down", "a {c} {s} is moving down", "the {c} {s} drops down"),
    "grows": ("the {c} {s} grows bigger", "a {c} {s} is growing", "the {c} {s} gets bigger"),
    "shrinks": ("the {c} {s} shrinks", "a {c} {s} is shrinking", "the {c} {s} gets smaller"),
    "spins": ("the {c} {s} spins around", "a {c} {s} is spinning", "the {c} {s} turns round and round"),
    "bounces": ("the {c} {s} bounces", "a {c} {s} is bouncing up and down", "the {c} {s} jumps up and down"),
}
PREFIXES: tuple[str, ...] = ("", "", "", "look, ", "now ", "here ")
VOICES: tuple[str, ...] = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029")
SPEEDS: tuple[int, ...] = (150, 165, 180)
PITCHES: tuple[int, ...] = (35, 50, 65)
ESPEAK_RATE = 22050

_EXTENT = 1.2  # max |point| of every shape / its size parameter
_MARGIN = 3.0  # pixels kept between the shape and the frame border
_NAME_RE = re.compile(r"^(train|heldout)-\d{4,}\.(mp4|srt)$")

Combo = tuple[str, str, str]


@dataclass
class DemoDataConfig:
    """What to generate; everything but ``out_dir``, ``workers`` and ``progress`` is in the plan."""

    out_dir: Path = Path("demo_videos")
    n_videos: int = 24  # training videos
    n_heldout: int = 6  # videos of the held-out split
    min_seconds: float = 3.0  # per segment, multiples of 0.5 s between min and max
    max_seconds: float = 8.0
    segments_per_video: tuple[int, int] = (3, 6)  # inclusive range
    width: int = 320
    height: int = 240
    fps: int = 24
    seed: int = 0
    heldout_fraction: float = 0.1  # of all (colour, shape, motion) combinations
    sample_rate: int = 22050
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    motions: tuple[str, ...] = MOTIONS
    crf: int = 23
    preset: str = "veryfast"
    workers: int = 1  # videos encoded concurrently (each is a Python renderer + one ffmpeg)
    progress: bool = True

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.segments_per_video = (int(self.segments_per_video[0]), int(self.segments_per_video[1]))
        self.colours, self.shapes, self.motions = tuple(self.colours), tuple(self.shapes), tuple(self.motions)
        for name, values, known in (("colours", self.colours, COLOURS), ("shapes", self.shapes, SHAPES),
                                    ("motions", self.motions, MOTIONS)):
            unknown = [v for v in values if v not in known]
            if unknown or not values or len(set(values)) != len(values):
                raise ValueError(f"{name}: need distinct values among {sorted(known)}, got {list(values)}")
        if self.width % 2 or self.height % 2 or self.width < 32 or self.height < 32:
            raise ValueError("width and height must be even and >= 32 (yuv420p)")
        if not 0.5 <= self.min_seconds <= self.max_seconds:
            raise ValueError("need 0.5 <= min_seconds <= max_seconds")
        lo, hi = self.segments_per_video
        if not 1 <= lo <= hi:
            raise ValueError("segments_per_video must be a range (lo, hi) with 1 <= lo <= hi")
        if self.n_videos < 0 or self.n_heldout < 0 or self.fps <= 0 or self.workers < 1:
            raise ValueError("n_videos, n_heldout >= 0; fps, workers >= 1")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError("heldout_fraction must be in [0, 1)")
        if self.n_heldout and self.heldout_fraction == 0.0:
            raise ValueError("n_heldout > 0 needs heldout_fraction > 0")

    def plan_dict(self) -> dict[str, Any]:
        """The config fields that determine the output (no paths, no execution knobs)."""
        d = asdict(self)
        for k in ("out_dir", "workers", "progress"):
            d.pop(k)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: what is shown and said, and the render parameters that make it reproducible."""

    start: float
    end: float
    colour: str
    shape: str
    motion: str
    sentence: str
    voice: str
    speed: int
    pitch: int
    size: float  # shape size parameter as a fraction of the frame height
    pos: tuple[float, float]  # free coordinates in [0, 1] within the allowed range (x, y)
    spin_dir: int  # +1 / -1
    period: float  # bounce period, seconds
    background: tuple[float, ...]  # base rgb (3), grain, texture amplitude, gradient amplitude, seed

    @property
    def duration(self) -> float:
        return self.end - self.start

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start, "end": self.end, "colour": self.colour, "shape": self.shape,
            "motion": self.motion, "sentence": self.sentence, "voice": self.voice, "speed": self.speed,
            "pitch": self.pitch, "size": self.size, "pos": list(self.pos), "spin_dir": self.spin_dir,
            "period": self.period, "background": list(self.background),
        }


@dataclass(frozen=True)
class VideoSpec:
    """One planned video."""

    name: str
    split: str
    segments: tuple[SegmentSpec, ...]

    @property
    def duration(self) -> float:
        return self.segments[-1].end

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "split": self.split, "video": f"{self.split}/{self.name}.mp4",
            "captions": f"{self.split}/{self.name}.srt", "duration": self.duration,
            "segments": [s.to_json() for s in self.segments],
        }


@dataclass
class DemoPlan:
    """The whole dataset, before rendering."""

    heldout_combinations: list[Combo]
    videos: list[VideoSpec]


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


# ----------------------------------------------------------------------------------------- planning

def select_heldout_combinations(cfg: DemoDataConfig) -> list[Combo]:
    """Seeded choice of held-out combinations; every colour, shape and motion stays in training."""
    combos = [(c, s, m) for c in cfg.colours for s in cfg.shapes for m in cfg.motions]
    target = int(round(cfg.heldout_fraction * len(combos)))
    if cfg.heldout_fraction > 0:
        target = max(target, 1)
    rng = np.random.default_rng([cfg.seed, 7919])
    order = rng.permutation(len(combos))
    left = {k: {v: 0 for v in vals} for k, vals in enumerate((cfg.colours, cfg.shapes, cfg.motions))}
    for combo in combos:
        for k in range(3):
            left[k][combo[k]] += 1
    heldout: list[Combo] = []
    for i in order:
        if len(heldout) >= target:
            break
        combo = combos[int(i)]
        if all(left[k][combo[k]] > 1 for k in range(3)):  # keep >= 1 training combo per value
            heldout.append(combo)
            for k in range(3):
                left[k][combo[k]] -= 1
    if len(heldout) < target:
        logger.warning("only %d of %d requested held-out combinations keep every value in training",
                       len(heldout), target)
    return sorted(heldout)


def _combo_stream(combos: Sequence[Combo], rng: np.random.Generator) -> Iterator[Combo]:
    """Endless balanced stream: shuffled passes over ``combos``, no immediate repeat across passes."""
    prev: Combo | None = None
    while True:
        order = [combos[int(i)] for i in rng.permutation(len(combos))]
        if len(order) > 1 and order[0] == prev:
            order[0], order[1] = order[1], order[0]
        yield from order
        prev = order[-1]


def _durations(cfg: DemoDataConfig, rng: np.random.Generator, n: int) -> list[float]:
    steps = int(math.floor((cfg.max_seconds - cfg.min_seconds) / 0.5 + 1e-9))
    return [cfg.min_seconds + 0.5 * int(k) for k in rng.integers(0, steps + 1, size=n)]


def _plan_segment(combo: Combo, start: float, dur: float, rng: np.random.Generator) -> SegmentSpec:
    colour, shape, motion = combo
    template = TEMPLATES[motion][int(rng.integers(len(TEMPLATES[motion])))]
    text = PREFIXES[int(rng.integers(len(PREFIXES)))] + template.format(c=colour, s=shape)
    text = re.sub(r"\ba ([aeiou])", r"an \1", text)  # "an orange", "an ..."
    sentence = text[0].upper() + text[1:] + "."
    base = rng.uniform(35.0, 100.0)
    tint = rng.uniform(-18.0, 18.0, size=3)
    background = (*[round(float(v), 3) for v in base + tint], round(float(rng.uniform(0.0, 4.0)), 3),
                  round(float(rng.uniform(4.0, 16.0)), 3), round(float(rng.uniform(-20.0, 20.0)), 3),
                  float(rng.integers(0, 2**31 - 1)))
    return SegmentSpec(
        start=start, end=start + dur, colour=colour, shape=shape, motion=motion, sentence=sentence,
        voice=VOICES[int(rng.integers(len(VOICES)))], speed=int(SPEEDS[int(rng.integers(len(SPEEDS)))]),
        pitch=int(PITCHES[int(rng.integers(len(PITCHES)))]),
        size=round(float(rng.uniform(0.22, 0.28)), 4),
        pos=(round(float(rng.uniform(0, 1)), 4), round(float(rng.uniform(0, 1)), 4)),
        spin_dir=int(rng.choice([-1, 1])), period=round(float(rng.uniform(0.8, 1.3)), 3),
        background=background,
    )


def plan_demo_data(cfg: DemoDataConfig) -> DemoPlan:
    """The deterministic plan of every video (no I/O)."""
    heldout = select_heldout_combinations(cfg)
    if cfg.n_heldout and not heldout:
        raise ValueError("no combination can be held out with these colours, shapes and motions")
    held = set(heldout)
    train_combos = [(c, s, m) for c in cfg.colours for s in cfg.shapes for m in cfg.motions
                    if (c, s, m) not in held]
    videos: list[VideoSpec] = []
    for split_id, (split, n, combos) in enumerate((("train", cfg.n_videos, train_combos),
                                                    ("heldout", cfg.n_heldout, heldout))):
        stream = _combo_stream(combos, np.random.default_rng([cfg.seed, 101, split_id]))
        for i in range(n):
            rng = np.random.default_rng([cfg.seed, 202, split_id, i])
            n_seg = int(rng.integers(cfg.segments_per_video[0], cfg.segments_per_video[1] + 1))
            segments, t = [], 0.0
            for dur in _durations(cfg, rng, n_seg):
                segments.append(_plan_segment(next(stream), t, dur, rng))
                t += dur
            videos.append(VideoSpec(name=f"{split}-{i:04d}", split=split, segments=tuple(segments)))
    return DemoPlan(heldout_combinations=heldout, videos=videos)


# ---------------------------------------------------------------------------------------- rendering

@dataclass(frozen=True)
class Pose:
    """Shape placement at one instant: centre (px), size (px) and rotation (rad)."""

    cx: float
    cy: float
    radius: float
    angle: float


def segment_pose(seg: SegmentSpec, t: float, width: int, height: int) -> Pose:
    """Where the shape of ``seg`` is ``t`` seconds after the segment start."""
    frac = min(max(t / seg.duration, 0.0), 1.0)
    base = seg.size * height
    r_max = base * 1.45 if seg.motion == "grows" or seg.motion == "shrinks" else base
    ext = _EXTENT * r_max + _MARGIN
    x_lo, x_hi, y_lo, y_hi = ext, width - ext, ext, height - ext
    x = x_lo + seg.pos[0] * (x_hi - x_lo)
    y = y_lo + seg.pos[1] * (y_hi - y_lo)
    radius, angle = base, 0.0
    if seg.motion == "left":
        x = x_hi + frac * (x_lo - x_hi)
    elif seg.motion == "right":
        x = x_lo + frac * (x_hi - x_lo)
    elif seg.motion == "up":
        y = y_hi + frac * (y_lo - y_hi)
    elif seg.motion == "down":
        y = y_lo + frac * (y_hi - y_lo)
    elif seg.motion == "grows":
        radius = base * (0.45 + 1.0 * frac)
    elif seg.motion == "shrinks":
        radius = base * (1.45 - 1.0 * frac)
    elif seg.motion == "spins":
        angle = seg.spin_dir * math.pi * t  # half a turn per second
    elif seg.motion == "bounces":
        y = y_hi - (y_hi - y_lo) * abs(math.sin(math.pi * t / seg.period))
    return Pose(cx=x, cy=y, radius=radius, angle=angle)


def _regular_sdf(r: np.ndarray, theta: np.ndarray, k: int, apothem: float, normal0: float) -> np.ndarray:
    sector = 2 * math.pi / k
    t = np.mod(theta - normal0 + sector / 2, sector) - sector / 2
    return apothem - r * np.cos(t)


def shape_sdf(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Approximate signed distance (px, > 0 inside) in shape coordinates (u right, v down)."""
    if shape == "circle":
        return radius - np.hypot(u, v)
    if shape == "square":
        return 0.85 * radius - np.maximum(np.abs(u), np.abs(v))
    if shape == "diamond":
        return (1.15 * radius - np.abs(u) - np.abs(v)) * (1 / math.sqrt(2))
    if shape == "cross":
        w, arm = 0.36 * radius, 1.1 * radius
        au, av = np.abs(u), np.abs(v)
        return np.maximum(np.minimum(w - au, arm - av), np.minimum(w - av, arm - au))
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if shape == "triangle":  # pointing up: edge normals at pi/2 + 2pi j / 3
        return _regular_sdf(r, theta, 3, 0.6 * radius, math.pi / 2)
    if shape == "star":  # five points, one pointing up
        outer, inner, half = 1.2 * radius, 0.55 * radius, math.pi / 5
        t = np.abs(np.mod(theta + math.pi / 2 + half, 2 * half) - half)
        dx, dy = inner * math.cos(half) - outer, inner * math.sin(half)
        nx, ny = dy / math.hypot(dx, dy), -dx / math.hypot(dx, dy)
        return nx * outer - r * (nx * np.cos(t) + ny * np.sin(t))
    raise ValueError(f"unknown shape {shape!r}")


def shape_alpha(shape: str, pose: Pose, width: int, height: int,
                box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the shape over the frame, or over ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box if box is not None else (0, 0, width, height)
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5 - pose.cx
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - pose.cy
    ca, sa = math.cos(pose.angle), math.sin(pose.angle)
    u = xs * ca + ys * sa
    v = ys * ca - xs * sa
    return np.clip(shape_sdf(shape, u, v, pose.radius) + 0.5, 0.0, 1.0)


def render_background(seg: SegmentSpec, width: int, height: int) -> np.ndarray:
    """Static (H, W, 3) float32 background: tinted grey, gradient, smooth texture, fine grain."""
    *base, grain, texture, gradient, seed = seg.background
    rng = np.random.default_rng(int(seed))
    gh, gw = height // 24 + 2, width // 24 + 2
    coarse = rng.normal(0.0, 1.0, size=(gh, gw, 3)).astype(np.float32)
    yi = np.linspace(0, gh - 1.001, height, dtype=np.float32)
    xi = np.linspace(0, gw - 1.001, width, dtype=np.float32)
    y0, x0 = yi.astype(np.int64), xi.astype(np.int64)
    fy, fx = (yi - y0)[:, None, None], (xi - x0)[None, :, None]
    smooth = ((coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx) * (1 - fy)
              + (coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx) * fy)
    ramp = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None, None]
    bg = (np.asarray(base, dtype=np.float32) + texture * smooth + gradient * ramp
          + grain * rng.normal(0.0, 1.0, size=(height, width, 1)).astype(np.float32))
    return np.clip(bg, 0.0, 255.0)


def render_frame(seg: SegmentSpec, t: float, background: np.ndarray,
                 background_u8: np.ndarray | None = None) -> np.ndarray:
    """One uint8 RGB frame of ``seg`` at segment time ``t`` over a precomputed float background."""
    height, width = background.shape[:2]
    pose = segment_pose(seg, t, width, height)
    frame = background_u8.copy() if background_u8 is not None else background.astype(np.uint8)
    ext = _EXTENT * pose.radius + 2
    box = (max(int(pose.cx - ext), 0), max(int(pose.cy - ext), 0),
           min(int(math.ceil(pose.cx + ext)), width), min(int(math.ceil(pose.cy + ext)), height))
    if box[2] <= box[0] or box[3] <= box[1]:
        return frame
    alpha = shape_alpha(seg.shape, pose, width, height, box)[..., None]
    # Brightness ramp across the shape (0.8 .. 1.0) so rotation is visible, even for the circle.
    xs = np.arange(box[0], box[2], dtype=np.float32) + 0.5 - pose.cx
    ys = np.arange(box[1], box[3], dtype=np.float32)[:, None] + 0.5 - pose.cy
    u = (xs * math.cos(pose.angle) + ys * math.sin(pose.angle)) / pose.radius
    shade = (0.9 + 0.1 * np.clip(u, -1.0, 1.0))[..., None]
    colour = np.asarray(COLOURS[seg.colour], dtype=np.float32) * shade
    patch = background[box[1]:box[3], box[0]:box[2]]
    frame[box[1]:box[3], box[0]:box[2]] = (patch + alpha * (colour - patch) + 0.5).astype(np.uint8)
    return frame


def _frame_bounds(video: VideoSpec, fps: int) -> list[tuple[int, int]]:
    return [(int(round(s.start * fps)), int(round(s.end * fps))) for s in video.segments]


def iter_frames(video: VideoSpec, width: int, height: int, fps: int) -> Iterator[np.ndarray]:
    """All frames of ``video`` in order (uint8, (H, W, 3))."""
    for seg, (f0, f1) in zip(video.segments, _frame_bounds(video, fps)):
        background = render_background(seg, width, height)
        background_u8 = background.astype(np.uint8)
        for f in range(f0, f1):
            yield render_frame(seg, f / fps - seg.start, background, background_u8)


# ------------------------------------------------------------------------------------------- audio

def synthesize_speech(text: str, voice: str, speed: int, pitch: int,
                      sample_rate: int = ESPEAK_RATE) -> np.ndarray:
    """espeak-ng ``-w`` of ``text`` as float32 mono in [-1, 1] at ``sample_rate``."""
    with tempfile.TemporaryDirectory(prefix="mcn-espeak-") as tmp:
        path = Path(tmp) / "speech.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        with wave.open(str(path), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    if width != 2:
        raise RuntimeError(f"unexpected espeak-ng sample width {width}")
    audio = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        audio = audio.reshape(-1, channels).mean(axis=1)
    if rate != sample_rate and audio.size:
        n_out = int(round(audio.size * sample_rate / rate))
        audio = np.interp(np.arange(n_out) * (rate / sample_rate), np.arange(audio.size), audio)
        audio = audio.astype(np.float32)
    return audio


def render_audio(video: VideoSpec, fps: int, sample_rate: int) -> np.ndarray:
    """The narration track: each sentence starts at its segment start, cut (with a fade) to its length."""
    bounds = _frame_bounds(video, fps)
    n_total = int(round(bounds[-1][1] / fps * sample_rate))
    track = np.zeros(n_total, dtype=np.float32)
    fade = int(0.01 * sample_rate)
    for seg, (f0, f1) in zip(video.segments, bounds):
        s0, s1 = int(round(f0 / fps * sample_rate)), min(int(round(f1 / fps * sample_rate)), n_total)
        speech = synthesize_speech(seg.sentence, seg.voice, seg.speed, seg.pitch, sample_rate)
        if speech.size > s1 - s0:
            logger.debug("%s: narration %.2fs cut to %.2fs", video.name, speech.size / sample_rate,
                         (s1 - s0) / sample_rate)
            speech = speech[: s1 - s0].copy()
            speech[-fade:] *= np.linspace(1.0, 0.0, min(fade, speech.size), dtype=np.float32)
        track[s0:s0 + speech.size] = speech
    return track


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


# -------------------------------------------------------------------------------------- side files

def _srt_time(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def srt_text(video: VideoSpec) -> str:
    """The side-car captions: one cue per segment, at the segment times."""
    cues = [f"{i}\n{_srt_time(s.start)} --> {_srt_time(s.end)}\n{s.sentence}\n"
            for i, s in enumerate(video.segments, 1)]
    return "\n".join(cues)


def video_fingerprint(video: VideoSpec, cfg: DemoDataConfig) -> str:
    """Hash of everything that determines the bytes of one video."""
    payload = {"version": GENERATOR_VERSION, "video": video.to_json(), "width": cfg.width,
               "height": cfg.height, "fps": cfg.fps, "sample_rate": cfg.sample_rate, "crf": cfg.crf,
               "preset": cfg.preset}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _stored_fingerprint(mp4: Path) -> str | None:
    proc = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format_tags=comment",
                           "-of", "default=nw=1:nk=1", str(mp4)], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _is_complete(video: VideoSpec, cfg: DemoDataConfig, mp4: Path, srt: Path, fingerprint: str) -> bool:
    if not (mp4.is_file() and srt.is_file() and mp4.stat().st_size > 0):
        return False
    if srt.read_text(encoding="utf-8") != srt_text(video):
        return False
    return _stored_fingerprint(mp4) == f"mcn-demo:{fingerprint}"


# ------------------------------------------------------------------------------------------ encoding

def _encode_video(video: VideoSpec, cfg: DemoDataConfig, mp4: Path, fingerprint: str) -> None:
    """Render, narrate and mux one video into ``mp4`` (via a ``.part`` file and a rename)."""
    tmp_mp4 = mp4.with_name(mp4.name + ".part")
    with tempfile.TemporaryDirectory(prefix="mcn-demo-") as tmp:
        wav = Path(tmp) / "narration.wav"
        _write_wav(wav, render_audio(video, cfg.fps, cfg.sample_rate), cfg.sample_rate)
        log_path = Path(tmp) / "ffmpeg.log"
        cmd = [
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{cfg.width}x{cfg.height}", "-r", str(cfg.fps),
            "-i", "pipe:0", "-i", str(wav), "-map", "0:v:0", "-map", "1:a:0",
            "-c:v", "libx264", "-preset", cfg.preset, "-crf", str(cfg.crf), "-pix_fmt", "yuv420p",
            "-g", str(2 * cfg.fps), "-threads", "1", "-sws_flags", "bilinear+accurate_rnd+bitexact",
            "-c:a", "aac", "-b:a", "64k", "-ac", "1", "-ar", str(cfg.sample_rate),
            "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
            "-map_metadata", "-1", "-metadata", f"comment=mcn-demo:{fingerprint}",
            "-f", "mp4", str(tmp_mp4),
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
            assert proc.stdin is not None
            try:
                chunk: list[bytes] = []
                for frame in iter_frames(video, cfg.width, cfg.height, cfg.fps):
                    chunk.append(frame.tobytes())
                    if len(chunk) == cfg.fps:
                        proc.stdin.write(b"".join(chunk))
                        chunk = []
                if chunk:
                    proc.stdin.write(b"".join(chunk))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            except BaseException:
                proc.kill()
                proc.wait()
                tmp_mp4.unlink(missing_ok=True)
                raise
            rc = proc.wait()
        if rc != 0:
            tmp_mp4.unlink(missing_ok=True)
            raise RuntimeError(f"ffmpeg failed for {mp4.name} ({rc}): "
                               f"{log_path.read_text(errors='replace').strip()[-500:]}")
    with open(tmp_mp4, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp_mp4, mp4)


def _make_video(video: VideoSpec, cfg: DemoDataConfig) -> bool:
    """Produce one video and its captions unless complete already; True when generated."""
    split_dir = cfg.out_dir / video.split
    mp4, srt = split_dir / f"{video.name}.mp4", split_dir / f"{video.name}.srt"
    fingerprint = video_fingerprint(video, cfg)
    if _is_complete(video, cfg, mp4, srt, fingerprint):
        return False
    srt.unlink(missing_ok=True)  # captions are written last: their presence marks completion
    _encode_video(video, cfg, mp4, fingerprint)
    _atomic_write_text(srt, srt_text(video))
    return True


def _prune(split_dir: Path, expected: set[str]) -> None:
    """Remove leftovers of this generator that the current plan does not contain."""
    for path in sorted(split_dir.iterdir()):
        name = path.name[:-5] if path.name.endswith(".part") else path.name
        if _NAME_RE.match(name) and (path.name != name or name not in expected):
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
    _atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
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
