"""`mcn run` end to end on a handful of generated videos: kill + re-run; lineage (a change redoes exactly
what is downstream of it, a re-run with nothing changed writes nothing); many `mcn extract` processes on
one workspace; torchrun training; evaluation's bad inputs; CrossTask and search from the CLI."""

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

from store.fields import FIELDS
from store.layout import Workspace
from store.lineage import read_record

from tests.support import ROOT, copy_stage_outputs, mcn  # fixtures videos, extracted: tests/conftest.py

pytestmark = pytest.mark.slow


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


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every output and record under root: all files but the claims and the owner
    registry (bookkeeping) and the record index (a cache, which notes once that a folder has settled)."""
    def kept(rel: Path) -> bool:
        return "locks" not in rel.parts and rel.parts[:2] != ("cache", "records")

    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and kept(p.relative_to(root)) and kept(Path(*p.relative_to(root).parts[2:]))}


def test_a_change_redoes_exactly_what_is_downstream(videos, extracted, tmp_path):
    """The issue's scenario: change only the text extractor's options. Status says what is stale and
    why; `mcn run` redoes the text shards, trains a new run beside the old one and re-evaluates; a
    second `mcn run` with nothing changed writes no file at all."""
    ws, common = extracted
    w = tmp_path / "lineage"
    shutil.copytree(ws, w)
    args = [c if c != str(ws) else str(w) for c in common]
    run = ["run", "--videos", str(videos / "train"), *args]
    first = mcn(*run)
    assert first.returncode == 0, first.stderr[-3000:]
    status = mcn("status", *args)
    assert status.returncode == 0, status.stderr[-2000:]
    states = {tuple(line.split()[:2]): line.split()[2] for line in status.stdout.splitlines()[2:]
              if line and not line.startswith(" ")}
    assert set(states.values()) == {"done"} and ("train", "default") in states

    before = _snapshot(w)
    changed = [*args, "extract.text.options={max_words: 12}"]
    status = mcn("status", *changed)
    lines = {tuple(line.split()[:2]): line for line in status.stdout.splitlines() if line and not line.startswith(" ")}
    assert "stale" in lines[("extract", "text")] and "config changed (3)" in lines[("extract", "text")]
    assert all(" done " in lines[("extract", f)] for f in ("video2d", "video3d", "audio"))
    assert "stale" in lines[("train", "default")] and "waiting on extract text" in lines[("train", "default")]
    assert "stale" in lines[("evaluate", "heldout")] and "waiting on train" in lines[("evaluate", "heldout")]
    assert _snapshot(w) == before  # status writes nothing

    redo = mcn("run", "--videos", str(videos / "train"), *changed)
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "shards written this run: video2d 0/3, video3d 0/3, audio 0/3, text 3/3" in redo.stdout
    after = _snapshot(w)
    changed_files = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert {k for k in changed_files if k.startswith("features/")} == \
        {f"features/text/shard-{i:06d}.{x}" for i in range(3) for x in ("tar", "json")} | {"features/text/config.yaml"}
    assert not {k for k in changed_files if k.startswith(("runs/default/", "scan", "manifest", "captions/"))}
    new_runs = {k.split("/")[1] for k in changed_files if k.startswith("runs/")}
    assert len(new_runs) == 1 and (new := new_runs.pop()).startswith("default-")  # beside the old one
    assert "[trained]" in redo.stdout and f"runs/{new}/checkpoints" in redo.stdout
    rec = read_record(w / "eval" / "heldout" / "record.json")
    assert rec["checkpoint"]["path"].endswith(f"runs/{new}/checkpoints/step-000003.pt")
    old = read_record(w / "runs" / "default" / "record.json")
    newrec = read_record(w / "runs" / new / "record.json")
    assert old["fingerprint"] != newrec["fingerprint"] and newrec["complete"] and newrec["step"] == 3
    assert old["lineage"]["inputs"]["features/text"] != newrec["lineage"]["inputs"]["features/text"]
    assert old["lineage"]["inputs"]["features/video2d"] == newrec["lineage"]["inputs"]["features/video2d"]
    status = mcn("status", *changed)
    assert f"train     {new}" in status.stdout and "kept     another lineage" in status.stdout

    settled = _snapshot(w)
    again = mcn("run", "--videos", str(videos / "train"), *changed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[done already]" in again.stdout and "unchanged since the last evaluation" in again.stdout
    assert _snapshot(w) == settled  # nothing changed: no file written


def test_many_extract_processes_write_each_shard_once(videos, extracted, tmp_path):
    """Static ranks 0 and 1 of 2, a second rank 0 (a restarted array task), then a dynamic worker
    joining late; where unshare is allowed, two of them run as PID 1 of their own PID namespace. All
    exit 0, each (shard, field) is written by exactly one process, and the shards are byte-identical
    to a single-process run."""
    ws, common = extracted
    many = copy_stage_outputs(ws, tmp_path / "many", ("scan",))
    args = [c if c != str(ws) else str(many) for c in common]
    pidns = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0
    ns = ["unshare", "--pid", "--fork", "--mount-proc"] if pidns else []
    plan = [([], {"RANK": "0", "WORLD_SIZE": "2"}, []), (ns, {"RANK": "1", "WORLD_SIZE": "2"}, []),
            ([], {"RANK": "0", "WORLD_SIZE": "2"}, []), (ns, {}, ["--claim", "dynamic"])]
    procs = []
    for prefix, env, extra in plan:
        procs.append(subprocess.Popen([*prefix, sys.executable, "-m", "pipeline.cli", "extract", *extra, *args],
                                      cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        time.sleep(1.5)  # staggered starts
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-2000:] for o in outs]
    written = {f: 0 for f in FIELDS}
    for out, _ in outs:
        line = next(x for x in out.splitlines() if x.startswith("extract:"))
        for f in FIELDS:
            written[f] += int(line.split(f"{f} ")[1].split(",")[0].split(";")[0])
    assert written == {f: 3 for f in FIELDS}, [o[0] for o in outs]
    for f in FIELDS:
        for i in range(3):
            assert (many / "features" / f / f"shard-{i:06d}.tar").read_bytes() == \
                (ws / "features" / f / f"shard-{i:06d}.tar").read_bytes()
    assert not list((many / "locks").rglob("*.lock")) and not [p for p in many.rglob("*") if ".tmp-" in p.name]


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
    sets = (f"evaluate.sets=[{{name: yc2, kind: youcook2, videos: {videos / 'heldout'}, annotations: {yc}, "
            "audio_frames: 200, max_words: 30}]")  # its text extracted with 30 words, as the reference
    proc = mcn("evaluate", "--checkpoint", str(checkpoint), "--set", "yc2", *common, sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((ws / "eval" / "yc2" / "metrics.json").read_text())
    assert metrics["n_queries"] == 4 and metrics["n_total"] == 4  # recalls over the clips evaluated
    assert (metrics["n_annotated"], metrics["n_missing"]) == (5, 1)
    assert any("1 annotated video id(s) not found" in p for p in metrics["problems"])
    assert metrics["retrieval"]["text_to_video"]["R@10"] == 1.0  # 4 candidates: every rank < 10
    from store.reader import iter_samples

    def word_rows(w: Workspace) -> set[int]:
        return {s["words.npy"].shape[1] for i in w.shard_indices("text") for s in iter_samples(w.shard_tar("text", i))
                if "words.npy" in s}

    assert word_rows(Workspace(ws).evalset("yc2")) == {30} and word_rows(Workspace(ws)) == {20}


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
    assert (ws / "cache" / "search" / "index.json").exists()
    index_mtime = (ws / "cache" / "search" / "index.json").stat().st_mtime_ns
    again = mcn("search", "the blue square", "--checkpoint", str(checkpoint), "--top", "2", *common)
    assert again.returncode == 0 and "embedded and saved" not in again.stderr
    assert (ws / "cache" / "search" / "index.json").stat().st_mtime_ns == index_mtime  # the cache was reused


def test_damaged_shards_are_stale_not_skipped_and_run_config_is_written_once(extracted, tmp_path):
    """A tar of another size than its record is stale: training refuses the features (it does not
    silently train on fewer shards), status names it, extract redoes it. A same-size corruption is
    found by `status --verify`. A run's resolved config is written at its creation only."""
    ws, common = extracted
    w = tmp_path / "damaged"
    shutil.copytree(ws, w)
    args = [c if c != str(ws) else str(w) for c in common]
    tar = w / "features" / "audio" / "shard-000001.tar"
    good = tar.read_bytes()
    tar.write_bytes(good[:-1024])
    status = mcn("status", *args)
    line = next(x for x in status.stdout.splitlines() if x.startswith("extract   audio"))
    assert "stale" in line and f"tar is {len(good) - 1024} bytes, its record says {len(good)}" in line
    train = mcn("train", *args, "train.max_steps=1")
    assert train.returncode == 1 and "the features are not current" in train.stderr
    assert "shard 000001: audio: tar is" in train.stderr
    redo = mcn("extract", *args)
    assert redo.returncode == 0 and "written: video2d 0, video3d 0, audio 1, text 0" in redo.stdout
    assert tar.read_bytes() == good
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    tar.write_bytes(bytes(flipped))
    assert " done " in next(x for x in mcn("status", *args).stdout.splitlines() if x.startswith("extract   audio"))
    verify = mcn("status", "--verify", *args)
    line = next(x for x in verify.stdout.splitlines() if x.startswith("extract   audio"))
    assert "stale" in line and "tar checksum differs from its record (1)" in line
    assert mcn("extract", "--verify", *args).returncode == 0 and tar.read_bytes() == good

    first = mcn("train", "--name", "once", *args, "train.max_steps=1")
    assert first.returncode == 0, first.stderr[-2000:]
    config = (w / "runs" / "once" / "config.yaml").read_bytes()
    # max_steps and log_every do not change what the run learns: same run, resumed, config kept
    more = mcn("train", "--name", "once", *args, "train.max_steps=2", "train.log_every=5")
    assert more.returncode == 0 and "resumed from" in more.stderr, more.stderr[-2000:]
    assert (w / "runs" / "once" / "config.yaml").read_bytes() == config
    assert read_record(w / "runs" / "once" / "record.json")["step"] == 2
    assert sorted(p.name for p in (w / "runs").iterdir() if p.name.startswith("once")) == ["once"]
