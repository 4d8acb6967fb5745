"""`run_train` over new shards: without --allow-new-data a new run starts from scratch beside the old
one; with it, the new run continues from the old run's latest checkpoint (same config), in its own
folder, and says so in its record.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import load_checkpoint
from model.data import DataConfig
from model.train import data_record
from pipeline import training
from pipeline.config import Config
from store.layout import Workspace
from store.lineage import read_record
from store.reader import open_features

from .conftest import make_features, random_video, write_shard
from .test_train import read_log, tiny_config
from .test_train_faults import bad_tensors, snapshot


@pytest.fixture
def pipeline_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Workspace, Config]:
    """A workspace with 3 shards × 4 videos of fixture features; the extract stage's own state (scan,
    extract config) is not there, so it is taken as current."""
    ws = Workspace(tmp_path / "ws")
    make_features(ws, n_shards=3, per_shard=4, seed=1, specials=False, duration=24.0, structured=True)
    monkeypatch.setattr(training, "extract_states", lambda *a, **kw: {})
    monkeypatch.setattr(training, "features_upstream", lambda *a, **kw: [])
    cfg = Config()
    cfg.train = tiny_config(checkpoint_every=4, data=DataConfig(n_pair=4, audio_frames=64, num_workers=0,
                                                                shuffle_buffer=4, batches_per_epoch=None))
    return ws, cfg


def add_shards(ws: Workspace) -> None:
    rng = np.random.default_rng(2)
    for s in (3, 4):
        write_shard(ws, s, [random_video(f"vid-{s:02d}-{i:02d}", rng, duration=24.0, structured=True)
                            for i in range(4)])


@pytest.mark.slow
def test_run_train_with_allow_new_data_continues_the_old_run_beside_it(pipeline_ws) -> None:
    ws, cfg = pipeline_ws
    old = training.run_train(ws, cfg, progress=False)
    old_dir = ws.run_dir("default")
    assert (old.step, old.total_steps, old.trained) == (12, 12, True)  # 4 epochs × 3 batches
    before = open_features(ws)
    add_shards(ws)
    old_files = snapshot(old_dir)

    cfg.train.max_steps = 16  # the new run stops at step 16, then resumes from its own checkpoint
    part = training.run_train(ws, cfg, progress=False, allow_new_data=True)
    assert (part.step, part.total_steps, part.data_change["step"]) == (16, 20, 12)
    cfg.train.max_steps = None
    res = training.run_train(ws, cfg, progress=False)
    assert res.data_change is None  # the same data as its own checkpoint: no change this time
    ts = training.train_state(ws, cfg)
    new_dir = ts.run_dir
    assert new_dir.name == f"default-{ts.lineage.fingerprint[:8]}" and ts.state.done
    assert snapshot(old_dir) == old_files  # the old run is never written to
    # continued from the old run's step 12 at the start of epoch 4 on 5 shards: 20 steps in all
    assert (res.step, res.total_steps, res.epoch, res.trained) == (20, 20, 5, True)
    assert sorted(read_log(new_dir)) == list(range(13, 21))
    assert sorted(p.name for p in (new_dir / "checkpoints").glob("step-*.pt")) == [
        "step-000016.pt", "step-000017.pt", "step-000020.pt"]  # max_steps, the end of epoch 4, the end
    assert [read_log(new_dir)[s]["epoch"] for s in range(13, 21)] == [4] * 5 + [5] * 3
    rec = read_record(ws.run_record(new_dir))
    assert rec["continued_from"] == {"run": "default", "checkpoint": "step-000012.pt",
                                     "path": str(old_dir / "checkpoints" / "step-000012.pt")}
    assert (rec["step"], rec["total_steps"], rec["complete"], rec["checkpoint"]) == (20, 20, True, "step-000020.pt")
    assert rec["features"] == {"n_shards": 5, "n_usable": 20}
    assert rec["data_change"]["step"] == 12 and rec["data_change"]["epoch"] == 4
    assert rec["data_change"]["reason"].startswith("the features changed since this checkpoint (3 shards, 12 usable")
    state = load_checkpoint(new_dir / "checkpoints" / "step-000020.pt")
    assert state["data"] == data_record(ts.features, 5, 20)
    assert state["data_history"] == [{**data_record(before, 3, 12), "until_step": 12}]
    assert bad_tensors(state) == []
    # done now: a second call trains nothing, with or without the flag
    again = training.run_train(ws, cfg, progress=False, allow_new_data=True)
    assert (again.trained, again.step) == (False, 20)


def test_run_train_over_new_data_without_the_flag_starts_from_scratch(pipeline_ws) -> None:
    ws, cfg = pipeline_ws
    cfg.train.max_steps = 2
    training.run_train(ws, cfg, progress=False)
    add_shards(ws)
    res = training.run_train(ws, cfg, progress=False)
    new_dir = training.train_state(ws, cfg).run_dir
    assert new_dir != ws.run_dir("default")
    assert (res.step, res.total_steps, res.data_change) == (2, 20, None)
    assert sorted(read_log(new_dir)) == [1, 2]
    assert "continued_from" not in read_record(ws.run_record(new_dir))


def test_run_train_resume_of_a_checkpoint_on_other_features_is_refused(pipeline_ws) -> None:
    ws, cfg = pipeline_ws
    cfg.train.max_steps = 2
    training.run_train(ws, cfg, progress=False)
    ckpt = ws.run_dir("default") / "checkpoints" / "step-000002.pt"
    add_shards(ws)
    with pytest.raises(ValueError, match=r"^cannot resume from .*step-000002\.pt: the features changed since this "
                                         r"checkpoint \(3 shards, 12 usable videos -> 5 shards, 20\): pass "
                                         r"--allow-new-data to continue on the new data with a recomputed schedule$"):
        training.run_train(ws, cfg, progress=False, resume=str(ckpt))
    res = training.run_train(ws, cfg, progress=False, resume=str(ckpt), allow_new_data=True)
    assert (res.step, res.total_steps) == (2, 20)  # max_steps 2: reached already; the new run holds it
    new_dir = training.train_state(ws, cfg).run_dir
    assert load_checkpoint(new_dir / "checkpoints" / "step-000002.pt")["data"]["n_shards"] == 5
    assert read_record(ws.run_record(new_dir))["continued_from"] == {"run": "default", "checkpoint": "step-000002.pt",
                                                                     "path": str(ckpt)}
