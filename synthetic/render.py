"""Frame rendering of the demo videos: shape poses, shape signed distances, backgrounds, frames.

Pixel coordinates: x right, y down, centres of pixels at +0.5. Frames are uint8 RGB (H, W, 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from synthetic.plan import COLOURS, SegmentSpec, VideoSpec, frame_bounds

_EXTENT = 1.2  # max |point| of every shape / its size parameter
_MARGIN = 3.0  # pixels kept between the shape and the frame border


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


def iter_frames(video: VideoSpec, width: int, height: int, fps: int) -> Iterator[np.ndarray]:
    """All frames of ``video`` in order (uint8, (H, W, 3))."""
    for seg, (f0, f1) in zip(video.segments, frame_bounds(video, fps)):
        background = render_background(seg, width, height)
        background_u8 = background.astype(np.uint8)
        for f in range(f0, f1):
            yield render_frame(seg, f / fps - seg.start, background, background_u8)
