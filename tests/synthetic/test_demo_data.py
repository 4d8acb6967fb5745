"""Tests of the deterministic demo media generator (synthetic)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from synthetic import (
    COLOURS,
    MOTIONS,
    SHAPES,
    DemoDataConfig,
    DemoDataSummary,
    generate_demo_data,
    plan_demo_data,
)
from synthetic.render import render_background, render_frame, segment_pose, shape_alpha
from synthetic.speech import synthesize_speech

W, H, FPS, SR = 160, 120, 12, 22050


def _tiny_cfg(out_dir: Path, **kw: object) -> DemoDataConfig:
    base = dict(out_dir=out_dir, n_videos=2, n_heldout=1, segments_per_video=(2, 2), min_seconds=3.0,
                max_seconds=3.0, width=W, height=H, fps=FPS, seed=3, sample_rate=SR, progress=False)
    base.update(kw)
    return DemoDataConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoDataConfig, DemoDataSummary, dict]:
    cfg = _tiny_cfg(tmp_path_factory.mktemp("demo") / "data")
    summary = generate_demo_data(cfg)
    index = json.loads(summary.index_path.read_text())
    return cfg, summary, index


def _probe(path: Path) -> dict:
    cmd = ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _frames(path: Path) -> np.ndarray:
    cmd = ["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, H, W, 3)


def _audio(path: Path) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-vn", "-ac", "1", "-ar", str(SR),
                          "-f", "f32le", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype="<f4")


def _parse_srt(text: str) -> list[tuple[float, float, str]]:
    def sec(ts: str) -> float:
        h, m, rest = ts.split(":")
        s, ms = rest.split(",")
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        assert lines[0].isdigit()
        m = re.fullmatch(r"(\S+) --> (\S+)", lines[1])
        assert m, lines[1]
        cues.append((sec(m[1]), sec(m[2]), " ".join(lines[2:])))
    return cues


def _envelope(x: np.ndarray, hop: int = 441) -> np.ndarray:
    n = x.size // hop
    return np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1))


# ------------------------------------------------------------------------------------ generated media

def test_layout_and_summary(demo: tuple) -> None:
    cfg, summary, index = demo
    assert [p.name for p in summary.train_videos] == ["train-0000.mp4", "train-0001.mp4"]
    assert [p.name for p in summary.heldout_videos] == ["heldout-0000.mp4"]
    assert summary.n_generated == 3 and summary.n_skipped == 0 and summary.n_segments == 6
    assert summary.seconds_train == pytest.approx(12.0) and summary.seconds_heldout == pytest.approx(6.0)
    for p in summary.train_videos + summary.heldout_videos:
        assert p.is_file() and p.with_suffix(".srt").is_file()
    assert not [p for p in cfg.out_dir.rglob("*") if ".tmp-" in p.name]  # no temporary file left
    assert [v["video"] for v in index["videos"]] == ["train/train-0000.mp4", "train/train-0001.mp4",
                                                      "heldout/heldout-0000.mp4"]
    assert "out_dir" not in index["config"]


def test_streams_duration_fps(demo: tuple) -> None:
    _, summary, index = demo
    for rec in index["videos"]:
        info = _probe(summary.out_dir / rec["video"])
        codecs = {s["codec_type"]: s for s in info["streams"]}
        assert codecs["video"]["codec_name"] == "h264" and codecs["video"]["pix_fmt"] == "yuv420p"
        assert (codecs["video"]["width"], codecs["video"]["height"]) == (W, H)
        assert codecs["video"]["r_frame_rate"] == f"{FPS}/1"
        assert codecs["audio"]["codec_name"] == "aac" and int(codecs["audio"]["sample_rate"]) == SR
        expected = sum(s["end"] - s["start"] for s in rec["segments"])
        assert expected == pytest.approx(6.0)
        assert abs(float(info["format"]["duration"]) - expected) <= 0.2
        assert int(codecs["video"]["nb_frames"]) == round(expected * FPS)


def test_srt_matches_segments(demo: tuple) -> None:
    _, summary, index = demo
    for rec in index["videos"]:
        cues = _parse_srt((summary.out_dir / rec["captions"]).read_text())
        assert len(cues) == len(rec["segments"]) == 2
        for (start, end, text), seg in zip(cues, rec["segments"]):
            assert (start, end) == (pytest.approx(seg["start"]), pytest.approx(seg["end"]))
            assert text == seg["sentence"]
            low = text.lower()
            assert seg["colour"] in low and seg["shape"] in low
            motion_word = {"left": "left", "right": "right", "up": "up", "down": "down",
                           "grows": "grow|bigger", "shrinks": "shrink|smaller", "spins": "spin|round",
                           "bounces": "bounc|jumps"}
            assert re.search(motion_word[seg["motion"]], low), (seg["motion"], text)
        assert [c[0] for c in cues] == [0.0, 3.0]


def test_heldout_combinations_absent_from_train(demo: tuple) -> None:
    _, summary, index = demo
    held = {tuple(c) for c in index["heldout_combinations"]}
    assert held == set(summary.heldout_combinations)
    n_all = len(COLOURS) * len(SHAPES) * len(MOTIONS)
    assert len(held) == round(0.1 * n_all)
    for rec in index["videos"]:
        combos = {(s["colour"], s["shape"], s["motion"]) for s in rec["segments"]}
        if rec["split"] == "train":
            assert not combos & held
        else:
            assert combos <= held


def test_frames_show_segment_colour(demo: tuple) -> None:
    cfg, summary, _ = demo
    plan = plan_demo_data(cfg)
    for video in plan.videos:
        frames = _frames(summary.out_dir / video.split / f"{video.name}.mp4")
        assert frames.shape[0] == round(video.duration * FPS)
        for seg in video.segments:
            t = seg.duration / 2
            frame = frames[int(round((seg.start + t) * FPS))].astype(np.float32)
            alpha = shape_alpha(seg.shape, segment_pose(seg, t, W, H), W, H)
            inside, outside = alpha >= 1.0, alpha <= 0.0
            assert inside.sum() > 0.04 * W * H  # a large shape
            got = frame[inside].mean(axis=0)
            want = 0.9 * np.asarray(COLOURS[seg.colour], dtype=np.float32)  # mean of the 0.8..1.0 shading
            assert np.abs(got - want).max() < 25, (seg.colour, got, want)
            assert np.abs(frame[outside].mean(axis=0) - want).max() > 60  # background far from the shape


def test_motion_visible_in_decoded_video(demo: tuple) -> None:
    """Segment the shape by colour (independently of the renderer's geometry) and check its motion."""
    cfg, summary, _ = demo
    for video in plan_demo_data(cfg).videos:
        frames = _frames(summary.out_dir / video.split / f"{video.name}.mp4").astype(np.float32)
        for seg in video.segments:
            want = 0.9 * np.asarray(COLOURS[seg.colour], dtype=np.float32)
            f0, f1 = (int(round((seg.start + a * seg.duration) * FPS)) for a in (0.1, 0.9))
            masks = [np.abs(frames[f] - want).max(axis=-1) < 40 for f in (f0, f1)]
            (ya, xa), (yb, xb) = (np.nonzero(m) for m in masks)
            area = [m.sum() for m in masks]
            dx, dy = xb.mean() - xa.mean(), yb.mean() - ya.mean()
            checks = {"left": dx < -0.2 * W, "right": dx > 0.2 * W, "up": dy < -0.15 * H,
                      "down": dy > 0.15 * H, "grows": area[1] > 2 * area[0], "shrinks": area[0] > 2 * area[1]}
            if seg.motion in checks:
                assert checks[seg.motion], (seg.motion, dx, dy, area)


def test_audio_narration(demo: tuple) -> None:
    cfg, summary, _ = demo
    for video in plan_demo_data(cfg).videos:
        path = summary.out_dir / video.split / f"{video.name}.mp4"
        audio = _audio(path)
        assert abs(audio.size / SR - video.duration) < 0.2
        cues = _parse_srt(path.with_suffix(".srt").read_text())
        speeches = [synthesize_speech(text, s.voice, s.speed, s.pitch, SR) for (_, _, text), s in
                    zip(cues, video.segments)]
        for i, (seg, speech) in enumerate(zip(video.segments, speeches)):
            s0, n = int(seg.start * SR), min(speech.size, int(seg.duration * SR))
            part = audio[s0:s0 + n]
            assert np.sqrt(np.mean(part ** 2)) > 0.02  # narration is audible
            tail = audio[s0 + n + int(0.1 * SR):int(seg.end * SR)]
            if tail.size > 0.2 * SR:
                assert np.sqrt(np.mean(tail ** 2)) < 0.005  # silence after it
            # the spoken words are the srt sentence: envelope of the track ~ espeak-ng of that sentence
            env = _envelope(part)
            match = np.corrcoef(env, _envelope(speech[:n]))[0, 1]
            other = speeches[1 - i]
            other = np.pad(other, (0, max(0, n - other.size)))[:n]
            assert match > 0.85 and match > np.corrcoef(env, _envelope(other))[0, 1] + 0.1


# --------------------------------------------------------------------------- determinism, idempotence

def test_deterministic_across_directories(demo: tuple, tmp_path: Path) -> None:
    cfg, summary, _ = demo
    again = generate_demo_data(dataclasses.replace(cfg, out_dir=tmp_path / "again"))
    assert again.index_path.read_bytes() == summary.index_path.read_bytes()
    for a, b in zip(summary.train_videos + summary.heldout_videos, again.train_videos + again.heldout_videos):
        assert a.with_suffix(".srt").read_bytes() == b.with_suffix(".srt").read_bytes()
        assert np.array_equal(_frames(a), _frames(b))
        assert np.array_equal(_audio(a), _audio(b))


def test_rerun_skips_complete_and_redoes_incomplete(demo: tuple, tmp_path: Path) -> None:
    cfg = _tiny_cfg(tmp_path / "d", n_heldout=0)
    first = generate_demo_data(cfg)
    mtimes = {p: p.stat().st_mtime_ns for p in first.train_videos}
    first.train_videos[1].with_suffix(".srt").unlink()  # interrupted before the captions were written
    (first.train_videos[0].parent / "train-0007.mp4").write_bytes(b"stale")  # from a larger earlier plan
    second = generate_demo_data(cfg)
    assert (second.n_generated, second.n_skipped) == (1, 1)
    assert first.train_videos[0].stat().st_mtime_ns == mtimes[first.train_videos[0]]
    assert first.train_videos[1].with_suffix(".srt").is_file()
    assert not (first.train_videos[0].parent / "train-0007.mp4").exists()
    # a change that alters the pixels (not the captions) is caught by the fingerprint
    third = generate_demo_data(dataclasses.replace(cfg, crf=30))
    assert third.n_generated == 2


# ----------------------------------------------------------------------------------- plan and render

def test_plan_holds_out_combinations_not_values() -> None:
    cfg = DemoDataConfig(n_videos=40, n_heldout=8, seed=11, heldout_fraction=0.2)
    plan = plan_demo_data(cfg)
    held = set(plan.heldout_combinations)
    train = [(s.colour, s.shape, s.motion) for v in plan.videos if v.split == "train" for s in v.segments]
    test = [(s.colour, s.shape, s.motion) for v in plan.videos if v.split == "heldout" for s in v.segments]
    assert not set(train) & held and set(test) <= held and len(set(test)) > 10
    for k, values in enumerate((cfg.colours, cfg.shapes, cfg.motions)):
        assert {c[k] for c in train} == set(values)  # every value is seen in training
    for v in plan.videos:
        assert 3 <= len(v.segments) <= 6
        assert all(3.0 <= s.duration <= 8.0 for s in v.segments)
    assert plan_demo_data(cfg) == plan
    # growing the training set keeps the earlier videos
    bigger = plan_demo_data(dataclasses.replace(cfg, n_videos=50))
    assert bigger.videos[:40] == plan.videos[:40]
    # extreme fraction on a small vocabulary still leaves every value in training
    small = DemoDataConfig(colours=("red", "blue"), shapes=("circle", "star"), motions=("left", "up"),
                           heldout_fraction=0.9, n_heldout=1)
    combos = set(plan_demo_data(small).heldout_combinations)
    rest = {(c, s, m) for c in small.colours for s in small.shapes for m in small.motions} - combos
    assert combos and all({c[k] for c in rest} == set(v) for k, v in
                          enumerate((small.colours, small.shapes, small.motions)))


@pytest.mark.parametrize("motion", MOTIONS)
def test_render_motion(motion: str) -> None:
    seg = dataclasses.replace(plan_demo_data(_tiny_cfg(Path("unused"))).videos[0].segments[0],
                              start=0.0, end=4.0, shape="square", motion=motion, colour="red")
    bg = render_background(seg, W, H)
    want = 0.9 * np.asarray(COLOURS["red"], dtype=np.float32)
    frames = [render_frame(seg, t, bg).astype(np.float32) for t in np.arange(0.0, 4.0, 1 / FPS)]
    masks = np.stack([np.abs(f - want).max(axis=-1) < 40 for f in frames])
    area = masks.sum(axis=(1, 2))
    cy = np.array([np.nonzero(m)[0].mean() for m in masks])
    cx = np.array([np.nonzero(m)[1].mean() for m in masks])
    assert area.min() > 0.03 * W * H
    if motion in ("left", "right"):
        assert np.all(np.sign(np.diff(cx)) == (1 if motion == "right" else -1))
        assert abs(cx[-1] - cx[0]) > W / 4
    elif motion in ("up", "down"):
        assert np.all(np.sign(np.diff(cy)) == (1 if motion == "down" else -1))
        assert abs(cy[-1] - cy[0]) > H / 5
    elif motion in ("grows", "shrinks"):
        assert (area[-1] > 2.5 * area[0]) if motion == "grows" else (area[0] > 2.5 * area[-1])
    elif motion == "spins":  # a square turning 45 degrees: same place and area, different silhouette
        quarter = int(round(0.25 * FPS))
        assert np.ptp(cx) < 2 and np.ptp(cy) < 2 and abs(area[quarter] - area[0]) < 0.1 * area[0]
        assert (masks[quarter] != masks[0]).sum() > 0.2 * area[0]
    elif motion == "bounces":
        assert np.ptp(cx) < 1 and np.ptp(cy) > H / 5 and (np.diff(np.sign(np.diff(cy))) != 0).sum() >= 4


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        DemoDataConfig(width=161)
    with pytest.raises(ValueError):
        DemoDataConfig(colours=("red", "mauve"))
    with pytest.raises(ValueError):
        DemoDataConfig(min_seconds=5, max_seconds=3)
    cfg = DemoDataConfig(out_dir="x", segments_per_video=[2, 4],  # type: ignore[arg-type]
                         shapes=["circle", "star"])  # type: ignore[arg-type]
    assert cfg.out_dir == Path("x") and cfg.segments_per_video == (2, 4) and cfg.shapes == ("circle", "star")
