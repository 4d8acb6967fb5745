"""Deterministic plan of the synthetic demo dataset: vocabulary, config, videos, segments, sentences.

Pure (numpy only, no I/O): the plan depends only on the config. Some (colour, shape, motion)
combinations are held out: they never occur in the ``train`` split and are the only ones in
``heldout``. Video ``i`` of a split depends only on the seed and the videos before it, so growing
``n_videos`` keeps existing videos. Times are in seconds, sizes in pixels or fractions of the frame.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from store.lineage import RUNTIME, config_dict

logger = logging.getLogger(__name__)

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

Combo = tuple[str, str, str]


@dataclass
class DemoDataConfig:
    """What to generate; everything but ``out_dir``, ``workers`` and ``progress`` is in the plan."""

    out_dir: Path = field(default=Path("demo_videos"), metadata=RUNTIME)  # where, not what: not in the plan
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
    workers: int = field(default=1, metadata=RUNTIME)  # videos encoded at once (a renderer + one ffmpeg each)
    progress: bool = field(default=True, metadata=RUNTIME)

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
        return config_dict(self)


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


def frame_bounds(video: VideoSpec, fps: int) -> list[tuple[int, int]]:
    """First and end (exclusive) frame index of every segment of ``video`` at ``fps`` frames/s."""
    return [(int(round(s.start * fps)), int(round(s.end * fps))) for s in video.segments]
