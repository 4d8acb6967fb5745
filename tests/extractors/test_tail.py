"""3D tail: a video's last incomplete 16-frame window is dropped by default and zero-padded into one
more row with ``pad_tail`` (the reference extractor; configs/paper.yaml). Hand-computed on F = 40
frames: 40 = 2 × 16 + 8, so 2 rows without the option and 3 with it, the 3rd window = frames 32..39
then 8 zero frames, which are −mean per channel after the mean subtraction."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from extractors import ResNeXt101Extractor, create, windows_from_frames
from extractors.decode import iter_visual
from pipeline.config import load_config
from pipeline.scan import scan
from pipeline.stages import extract_states, run_extract, shard_jobs
from store.layout import Workspace
from store.reader import iter_samples

N_FRAMES = 40  # at 24 fps: 1.667 s


@pytest.fixture(scope="module")
def r3d() -> ResNeXt101Extractor:
    return create("resnext101_3d", {"allow_random_weights": True, "seed": 0, "batch_size": 4, "device": "cpu",
                                    "amp": "fp32"})


def test_windows_drop_or_zero_pad_the_tail() -> None:
    frames = torch.arange(1, N_FRAMES + 1, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 4, 4, 3).contiguous()
    dropped = windows_from_frames(frames)
    padded = windows_from_frames(frames, pad_tail=True)
    assert dropped.shape == (2, 16, 4, 4, 3) and padded.shape == (3, 16, 4, 4, 3)
    assert torch.equal(padded[:2], dropped)
    assert padded[2, :, 0, 0, 0].tolist() == [33, 34, 35, 36, 37, 38, 39, 40] + [0] * 8
    assert not padded[2, 8:].any()
    as_numpy = windows_from_frames(frames.numpy(), pad_tail=True)
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, padded.numpy())
    # a whole number of windows gets no extra one; fewer than 16 frames give one padded window
    assert windows_from_frames(frames[:32], pad_tail=True).shape[0] == 2
    assert windows_from_frames(frames[:5], pad_tail=True).shape[0] == 1
    assert windows_from_frames(frames[:5]).shape[0] == 0
    assert windows_from_frames(frames[:0], pad_tail=True).shape[0] == 0


def test_padded_frames_are_minus_the_mean_after_normalisation(r3d) -> None:
    frames = np.full((N_FRAMES, 112, 112, 3), 200, dtype=np.uint8)
    x = r3d.preprocess(torch.from_numpy(windows_from_frames(frames, pad_tail=True)[2:]))  # (1, 3, 16, 112, 112)
    assert x.shape == (1, 3, 16, 112, 112)
    for c, (mean, real) in enumerate([(-110.6, 89.4), (-103.2, 96.8), (-96.3, 103.7)]):  # 200 − mean
        torch.testing.assert_close(x[0, c, 8:], torch.full((8, 112, 112), mean), rtol=0, atol=1e-4)
        torch.testing.assert_close(x[0, c, :8], torch.full((8, 112, 112), real), rtol=0, atol=1e-4)


def test_pad_tail_in_the_paper_preset_only() -> None:
    paper = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "paper.yaml").read_text())
    assert paper["extract"]["video3d"]["options"]["pad_tail"] is True
    assert load_config(None, []).extract.video3d.options.get("pad_tail", False) is False


@pytest.mark.slow
def test_extract_stage_pads_the_tail_when_asked(tmp_path: Path, r3d) -> None:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not on PATH")
    videos = tmp_path / "videos"
    videos.mkdir()
    video = videos / "f40.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=160x120:rate=24", "-frames:v", str(N_FRAMES), "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(video)], check=True)
    ws = Workspace(tmp_path / "ws")
    base = ["extract.fields=[video3d]", "extract.allow_random_weights=true", "extract.workers.num_workers=1",
            "extract.workers.timeout_s=120"]
    opts = "extract.video3d.options={batch_size: 4, device: cpu, amp: fp32%s}"
    cfg = load_config(None, [*base, opts % ", pad_tail: true"])
    scan(videos, ws, cfg.scan, progress=False)
    assert run_extract(ws, cfg, progress=False).processed == {"video3d": 1}
    (sample,) = [s for job in shard_jobs(ws) for s in iter_samples(ws.shard_tar("video3d", job.index))]
    assert sample["json"]["status"] == "ok" and sample["json"]["rate"] == 1.5
    rows = sample["feat.npy"].astype(np.float32)
    assert rows.shape == (3, 2048)  # 40 frames: 2 full windows + the padded tail (2 rows without pad_tail)
    # rows = the model on frames 0..15, 16..31, and 32..39 followed by 8 zero frames
    frames = np.concatenate([c.frames_3d for c in iter_visual(str(video), cfg.extract.decode)])
    assert frames.shape == (N_FRAMES, 112, 112, 3)
    windows = np.stack([frames[:16], frames[16:32], np.concatenate([frames[32:], np.zeros_like(frames[:8])])])
    np.testing.assert_allclose(rows, r3d(windows).numpy(), atol=2e-3)
    # the option is in the field's fingerprint: without it the shard is stale
    assert extract_states(ws, cfg)["video3d"].done == 1
    assert extract_states(ws, load_config(None, [*base, opts % ""]))["video3d"].stale == 1
