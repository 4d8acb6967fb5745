"""Helpers of the end-to-end tests: the tiny configuration, the CLI in a subprocess, workspace copies."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overrides(videos: Path) -> list[str]:
    """configs/demo.yaml, shrunk to seconds of CPU."""
    return [
        "scan.shard_size=1",
        "extract.decode.size_2d=64",
        "extract.video2d.options={batch_size: 8}",
        "train.batch_size=2", "train.epochs=3", "train.warmup_steps=2", "train.checkpoint_every=2",
        "train.log_every=1", "train.tensorboard=false",
        "train.model.embed_dim=32", "train.model.davenet_widths=[8,8,8,16,16]", "train.model.davenet_dim=16",
        "train.model.recon_dim=16",
        "train.kmeans.k=4", "train.kmeans.queue_batches=2", "train.kmeans.queue_clips_per_video=2",
        "train.kmeans.refit_every=2",
        "train.data.n_pair=4", "train.data.audio_frames=200", "train.data.num_workers=0",
        f"evaluate.sets=[{{name: heldout, videos: {videos / 'heldout'}, audio_frames: 200}}]",
    ]


def mcn(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, **kw)


def mcn_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def copy_stage_outputs(ws: Path, dest: Path, stages: tuple[str, ...] = ("scan", "extract")) -> Path:
    """A copy of what the given stages of ``ws`` wrote (scan: manifest, record, captions; extract: features)."""
    dest.mkdir(parents=True)
    names = {"scan": ("manifest.jsonl", "scan.json", "captions"), "extract": ("features",)}
    for stage in stages:
        for name in names[stage]:
            src = ws / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    return dest


def process_gone(pid: int) -> bool:
    """True when process ``pid`` has exited (no longer listed, or a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
