"""A dead or hung DDP rank: two `mcn train` processes started by hand (RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT / LOCAL_RANK; not torchrun, whose agent would end the group for us), gloo on CPU,
``train.dist_timeout_s`` 20 s (10 s for the frozen rank, to keep the test short). Rank 1 is killed
(SIGKILL) or frozen (SIGSTOP) once rank 0 has logged a step: rank 0 must exit non-zero with one clear
line, at once for a dead rank and after the timeout for a frozen one, not after 30 minutes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = {"kill": 20, "freeze": 10}  # train.dist_timeout_s


def _overrides(videos: Path) -> list[str]:
    """configs/demo.yaml, shrunk to seconds of CPU (as tests/support.py)."""
    return [
        "scan.shard_size=1", "extract.decode.size_2d=64", "extract.video2d.options={batch_size: 8}",
        "train.batch_size=2", "train.epochs=3", "train.warmup_steps=2", "train.log_every=1",
        "train.tensorboard=false", "train.model.embed_dim=32", "train.model.davenet_widths=[8,8,8,16,16]",
        "train.model.davenet_dim=16", "train.model.recon_dim=16", "train.kmeans.k=4", "train.kmeans.queue_batches=2",
        "train.kmeans.queue_clips_per_video=2", "train.kmeans.refit_every=2", "train.data.n_pair=4",
        "train.data.audio_frames=200", "train.data.num_workers=0",
    ]


def _own_extracted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from synthetic import DemoDataConfig, generate_demo_data

    root = tmp_path_factory.mktemp("dead_rank")
    videos, ws = root / "videos", root / "ws"
    generate_demo_data(DemoDataConfig(out_dir=videos, n_videos=3, n_heldout=2, segments_per_video=(2, 2),
                                      min_seconds=3.0, max_seconds=3.0, width=96, height=64, fps=12,
                                      heldout_fraction=0.2, progress=False))
    common = ["--config", "configs/demo.yaml", "--workspace", str(ws), "--no-progress", *_overrides(videos)]
    for stage in ("scan", "extract"):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--videos", str(videos / "train"),
                               "--only", stage, *common], cwd=ROOT, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return ws, common


@pytest.fixture(scope="session")
def extracted_ws(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A scanned and extracted workspace: the end-to-end tests' one (tests/conftest.py) when there is
    one, else one of our own."""
    try:
        return request.getfixturevalue("extracted")
    except pytest.FixtureLookupError:
        return _own_extracted(tmp_path_factory)


LINE = re.compile(r"^mcn train: training rank 1 stopped or became unreachable during step (\d+) \((.+)\); "
                  r"this rank stops too$")


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_a_dead_rank_stops_the_others_with_one_line(extracted_ws, tmp_path: Path, how: str) -> None:
    src, common = extracted_ws
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("manifest.jsonl", "scan.json", "captions", "features"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, ws / name)
    args = [str(ws) if c == str(src) else c for c in common]
    args += ["train.epochs=100000", "train.checkpoint_every=100000", "train.checkpoint_epoch_end=false",
             f"train.dist_timeout_s={TIMEOUT_S[how]}"]
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        for rank in (0, 1):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
            env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "--name", "dead", *args],
                                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        log = ws / "runs" / "dead" / "logs" / "train.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (log.exists() and log.read_text().strip()):
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].communicate()[1][-3000:]
            time.sleep(0.05)
        assert log.read_text().strip(), "rank 0 logged no step within 60 s"
        os.kill(procs[1].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            _, err = procs[0].communicate(timeout=60)
        except subprocess.TimeoutExpired:
            procs[0].kill()
            _, err = procs[0].communicate()
            pytest.fail(f"rank 0 still running 60 s after rank 1 was {how}ed: {err[-3000:]}")
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL also ends a stopped process
                p.wait()
    assert procs[0].returncode == 1, err[-3000:]
    lines = err.strip().splitlines()
    m = LINE.match(lines[-1])
    assert m, lines[-1]
    assert "Traceback" not in err and err.count("stopped or became unreachable") == 1
    logged = [int(line.split('"step": ')[1].split(",")[0]) for line in log.read_text().splitlines()]
    assert logged == list(range(1, len(logged) + 1))
    assert int(m.group(1)) in (logged[-1], logged[-1] + 1)  # during the step after the last logged one
    if how == "kill":
        assert elapsed < 15, elapsed  # a closed connection is seen at once
    else:
        assert TIMEOUT_S[how] - 2 < elapsed < TIMEOUT_S[how] + 25, elapsed  # the timeout, not 30 minutes
        assert re.search(r"timed out|timeout", m.group(2), re.IGNORECASE), m.group(2)  # gloo words it two ways
    assert not list((ws / "runs" / "dead" / "checkpoints").glob("step-*.pt"))
