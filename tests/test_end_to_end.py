"""`mcn run` end to end on a handful of generated videos; kill + re-run; 2-rank extract; torchrun train."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.shards import read_record
from pipeline.workspace import FIELDS, Workspace

pytestmark = pytest.mark.slow
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


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from synthetic import DemoDataConfig, generate_demo_data

    out = tmp_path_factory.mktemp("e2e") / "videos"
    generate_demo_data(DemoDataConfig(out_dir=out, n_videos=3, n_heldout=2, segments_per_video=(2, 2),
                                      min_seconds=3.0, max_seconds=3.0, width=96, height=64, fps=12,
                                      heldout_fraction=0.2, progress=False))
    return out


@pytest.fixture(scope="module")
def extracted(videos, tmp_path_factory) -> tuple[Path, list[str]]:
    """A workspace after `mcn run --only extract` (scan first), shared by the tests below."""
    ws = tmp_path_factory.mktemp("e2e_ws") / "ws"
    common = ["--config", "configs/demo.yaml", "--workspace", str(ws), "--no-progress", *overrides(videos)]
    for stage in ("scan", "extract"):
        proc = mcn("run", "--videos", str(videos / "train"), "--only", stage, *common)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return ws, common


def test_run_end_to_end_and_rerun_after_sigkill(videos, extracted, tmp_path):
    ws, common = extracted
    killed = tmp_path / "killed"
    shutil.copytree(ws, killed)
    # Uninterrupted: extraction is found done, training and evaluation run.
    proc = mcn("run", "--videos", str(videos / "train"), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shards written this run: video2d 0/3, video3d 0/3, audio 0/3, text 0/3" in proc.stdout
    w = Workspace(ws)
    for f in FIELDS:
        for i in range(3):
            assert read_record(w.shard_record(f, i))["n_videos"] == 1
    ckpts = sorted((w.run_dir("default") / "checkpoints").glob("step-*.pt"))
    assert ckpts and (w.run_dir("default") / "checkpoints" / "latest").read_text().strip() == "step-000003.pt"
    metrics = json.loads((w.eval_dir("heldout") / "metrics.json").read_text())
    assert metrics["n_queries"] == 4 and metrics["n_videos"] == 2
    for mode in ("text_to_video", "text_to_video_audio", "video_to_text"):
        m = metrics["retrieval"][mode]
        assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1 and m["R@10"] == 1.0  # 4 candidates
    assert metrics["chance"]["R@1"] == 0.25
    html = (w.eval_dir("heldout") / "report.html").read_text()
    assert 'data-metric="R@1"' in html and "data:image/png;base64," in html
    assert "R@1" in proc.stdout and "chance" in proc.stdout

    # Killed during training (SIGKILL), then the same command again: same result, nothing redone.
    k = Workspace(killed)
    record_times = {(f, i): k.shard_record(f, i).stat().st_mtime_ns for f in FIELDS for i in range(3)}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--videos", str(videos / "train"),
           *[c if c != str(ws) else str(killed) for c in common]]
    victim = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    first_ckpt = k.run_dir("default") / "checkpoints" / "step-000002.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not first_ckpt.exists() and victim.poll() is None:
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (k.eval_dir("heldout") / "metrics.json").exists(), "killed too late"
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step-000002.pt" in again.stderr
    assert {(f, i): k.shard_record(f, i).stat().st_mtime_ns for f in FIELDS for i in range(3)} == record_times
    resumed = json.loads((k.eval_dir("heldout") / "metrics.json").read_text())
    assert resumed["retrieval"] == metrics["retrieval"]


def test_two_ranks_extract_every_shard_once(videos, extracted, tmp_path):
    ws, common = extracted
    two = tmp_path / "two"
    two.mkdir()
    for name in ("manifest.jsonl", "scan.json", "captions"):
        src = ws / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, two / name)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"}
        args = [c if c != str(ws) else str(two) for c in common]
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert "rank shards 2/3" in outs[0][0] and "rank shards 1/3" in outs[1][0]
    for f in FIELDS:
        for i in range(3):
            assert (two / "features" / f / f"shard-{i:06d}.tar").read_bytes() == \
                (ws / "features" / f / f"shard-{i:06d}.tar").read_bytes()


def test_torchrun_two_process_training(extracted, tmp_path):
    ws, common = extracted
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [c for c in common] + ["train.max_steps=2", "train.checkpoint_every=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "pipeline.cli", "train", "--name", "ddp", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = [json.loads(line) for line in (ws / "runs" / "ddp" / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["total"] == r["total"] and r["total"] > 0 for r in log)  # finite, not NaN
    assert (ws / "runs" / "ddp" / "checkpoints" / "latest").read_text().strip() == "step-000002.pt"
    assert (ws / "runs" / "ddp" / "config.yaml").read_text().count("world_size: 2") == 1


@pytest.fixture(scope="module")
def checkpoint(extracted) -> Path:
    ws, common = extracted
    proc = mcn("train", "--name", "evalrun", *common, "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws / "runs" / "evalrun" / "checkpoints" / "step-000001.pt"


def test_evaluate_bad_inputs(videos, extracted, checkpoint, tmp_path):
    import torch

    ws, common = extracted
    proc = mcn("evaluate", "--checkpoint", str(tmp_path / "nope.pt"), *common)
    assert proc.returncode == 1 and f"checkpoint {tmp_path / 'nope.pt'} does not exist" in proc.stderr
    # a reference-style checkpoint of the wrong shape: the error lists the mismatched keys
    state = torch.load(checkpoint, weights_only=True)["model"]
    state["GU_text_captions.cg.fc.weight"] = torch.zeros(32, 10)
    del state["recon_t.2.bias"]
    bad = tmp_path / "e3.pth"
    torch.save(state, bad)
    proc = mcn("evaluate", "--checkpoint", str(bad), *common)
    assert proc.returncode == 1
    assert "GU_text_captions.cg.fc.weight" in proc.stderr and "recon_t.2.bias" in proc.stderr
    # a set whose videos have no captions: no valid clip, said clearly
    silent = tmp_path / "nocaps"
    silent.mkdir()
    for mp4 in sorted((videos / "heldout").glob("*.mp4")):
        (silent / mp4.name).symlink_to(mp4)
    proc = mcn("evaluate", "--checkpoint", str(checkpoint), "--videos", str(silent), *common)
    assert proc.returncode == 1 and "no valid clip" in proc.stderr
    # YouCook2-style annotations naming videos we do not have: counted and reported
    yc = tmp_path / "yc.json"
    segs = json.loads((videos / "demo_data.json").read_text())
    held = [v for v in segs["videos"] if v["split"] == "heldout"]
    db = {v["name"]: {"subset": "validation", "annotations": [
        {"segment": [s["start"], s["end"]], "sentence": s["sentence"], "id": i} for i, s in enumerate(v["segments"])]}
        for v in held}
    db["missing_video_1"] = {"subset": "validation", "annotations": [{"segment": [0, 2], "sentence": "x", "id": 0}]}
    yc.write_text(json.dumps({"database": db}))
    sets = f"evaluate.sets=[{{name: yc2, kind: youcook2, videos: {videos / 'heldout'}, annotations: {yc}, audio_frames: 200}}]"
    proc = mcn("evaluate", "--checkpoint", str(checkpoint), "--set", "yc2", *common, sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((ws / "eval" / "yc2" / "metrics.json").read_text())
    assert metrics["n_queries"] == 4 and metrics["n_total"] == 5  # the missing video's query is a miss
    assert any("1 annotated video id(s) not found" in p for p in metrics["problems"])
    assert metrics["retrieval"]["text_to_video"]["R@10"] == pytest.approx(4 / 5)


def test_crosstask_localization_and_search_from_the_cli(videos, extracted, checkpoint, tmp_path):
    ws, common = extracted
    index = json.loads((videos / "demo_data.json").read_text())
    held = [v for v in index["videos"] if v["split"] == "heldout"]
    # One CrossTask-style task whose steps are the held-out sentences, annotated where they are said.
    steps = [s["sentence"].replace(",", "") for v in held for s in v["segments"]]
    (tmp_path / "tasks.txt").write_text(f"77\nshapes\nhttp://x\n{len(steps)}\n{','.join(steps)}\n\n")
    ann = tmp_path / "annotations"
    ann.mkdir()
    n = 0
    for v in held:
        rows = []
        for s in v["segments"]:
            n += 1
            rows.append(f"{n},{s['start']},{s['end']}")
        (ann / f"77_{v['name']}.csv").write_text("\n".join(rows) + "\n")
    (ann / "77_not_a_video.csv").write_text("1,0,1\n")
    sets = (f"evaluate.sets=[{{name: ct, kind: crosstask, videos: {videos / 'heldout'}, "
            f"tasks: {tmp_path / 'tasks.txt'}, annotations: {ann}}}]")
    proc = mcn("evaluate", "--checkpoint", str(checkpoint), "--set", "ct", *common, sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((ws / "eval" / "ct" / "metrics.json").read_text())
    loc = metrics["localization"]
    assert loc["n_videos"] == 2 and loc["n_missing_features"] == 1  # the unknown video is counted
    assert 0.0 <= loc["recall"] <= 1.0 and set(loc["per_task"]) == {"77"}
    assert f"recall {100 * loc['recall']:.1f}%" in proc.stdout

    proc = mcn("search", "the red circle", "--checkpoint", str(checkpoint), "--top", "3", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:] if line.strip()]
    scores = [float(r[0]) for r in rows]
    assert len(rows) == 3 and scores == sorted(scores, reverse=True)
    assert (ws / "eval" / "search-cache" / "index.json").exists()
