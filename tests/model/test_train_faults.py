"""Training faults: non-finite gradients (skipped steps, the stop after N in a row, identical decision on
every DDP rank), checkpoints that refuse non-finite tensors, resuming over a changed shard set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import model.train as train_mod
from model.checkpoint import NonFiniteCheckpoint, load_checkpoint, save_model_checkpoint
from model.data import DataConfig
from model.mcn import MCN
from model.train import (
    DataChanged,
    NonFiniteGradients,
    Trainer,
    TrainingDiverged,
    cosine_with_warmup,
    data_record,
    train,
)
from store.reader import FeatureSet
from tests.support import free_port

from .test_train import _rank_slice, _synthetic_global_batch, read_log, tiny_config

POISON = "GU_video.fc.weight"
#: the learned parameters (BatchNorm running statistics are buffers: a skipped step's forward pass
#: still updates them, as it updates the k-means queue)
PARAMS = [n for n, _ in MCN(tiny_config().model).named_parameters()]


def poisoned(steps: set[int], param: str = POISON) -> type[Trainer]:
    """A Trainer whose gradient of ``param`` is made infinite (by a hook) on the given steps."""

    class Poisoned(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            p = dict(self.model.named_parameters())[param]
            p.register_hook(lambda g: torch.full_like(g, float("inf")) if self.step + 1 in steps else g)

    return Poisoned


def skipping(steps: set[int]) -> type[Trainer]:
    """A Trainer that does not call the optimizer on the given steps: skipped by construction."""

    class SkippingScaler:
        def __init__(self, trainer: Trainer) -> None:
            self.trainer, self.scaler = trainer, trainer.scaler

        def step(self, optimizer: torch.optim.Optimizer) -> Any:
            return None if self.trainer.step + 1 in steps else self.scaler.step(optimizer)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.scaler, name)

    class Skipping(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.scaler = SkippingScaler(self)  # type: ignore[assignment]

    return Skipping


def bad_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Paths of the floating tensors holding a NaN or an infinity (independent of the code under test)."""
    if isinstance(obj, torch.Tensor):
        return [prefix] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return [b for k, v in items for b in bad_tensors(v, f"{prefix}.{k}")]


def float_tensors(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return int(obj.is_floating_point())
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return sum(float_tensors(v) for _, v in items)


def all_checkpoints_finite(run_dir: Path) -> list[str]:
    """Load every checkpoint of a run; return their names (asserting each is finite and non-trivial)."""
    names = []
    for path in sorted((run_dir / "checkpoints").glob("step-*.pt")):
        state = load_checkpoint(path)
        assert float_tensors(state["model"]) > 20 and float_tensors(state["optimizer"]) > 20
        assert bad_tensors(state) == [], path
        names.append(path.name)
    return names


# ------------------------------------------------------------------------------ non-finite gradients


def test_nonfinite_gradient_step_is_skipped_like_a_step_without_update(train_features: FeatureSet, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(max_steps=5, checkpoint_every=1, keep_last=0)
    monkeypatch.setattr(train_mod, "Trainer", poisoned({2}))
    bad = train(cfg, train_features, tmp_path / "bad")
    monkeypatch.setattr(train_mod, "Trainer", skipping({2}))
    ref = train(cfg, train_features, tmp_path / "ref")
    monkeypatch.setattr(train_mod, "Trainer", Trainer)
    plain = train(cfg, train_features, tmp_path / "plain")

    assert (bad.step, bad.skipped_steps, ref.skipped_steps, plain.skipped_steps) == (5, 1, 0, 0)
    a, b = read_log(tmp_path / "bad"), read_log(tmp_path / "ref")
    assert sorted(a) == [1, 2, 3, 4, 5]
    assert [a[s]["skipped"] for s in a] == [False, True, False, False, False]
    assert [a[s]["skipped_steps"] for s in a] == [0, 1, 1, 1, 1]
    assert [a[s]["consecutive_skips"] for s in a] == [0, 1, 0, 0, 0]
    for s in a:  # the scheduler advanced on the skipped step: same LR and losses at every step
        for k in ("lr", "total", "mms", "cluster", "recon"):
            assert a[s][k] == b[s][k], (s, k)
    assert a[2]["lr"] > 0  # step 2 would have changed the weights

    # every checkpoint of the run is finite; the final weights and optimizer state are those of the
    # run whose step 2 made no update
    assert all_checkpoints_finite(tmp_path / "bad") == [f"step-00000{i}.pt" for i in range(1, 6)]
    wa, wb, wp = (load_checkpoint(r.checkpoint) for r in (bad, ref, plain))
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    assert len(wa["optimizer"]["state"]) > 20
    for i, st in wa["optimizer"]["state"].items():
        assert float(st["step"]) == 4.0  # Adam stepped 4 times of 5
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], wb["optimizer"]["state"][i][k]), (i, k)
    assert {float(st["step"]) for st in wp["optimizer"]["state"].values()} == {5.0}
    assert not torch.equal(wa["model"][POISON], wp["model"][POISON])  # the skip mattered
    assert (wa["step"], wa["skipped_steps"], wa["nonfinite_streak"]) == (5, 1, 0)
    at2 = load_checkpoint(tmp_path / "bad" / "checkpoints" / "step-000002.pt")
    at1 = load_checkpoint(tmp_path / "bad" / "checkpoints" / "step-000001.pt")
    assert (at2["skipped_steps"], at2["nonfinite_streak"]) == (1, 1)
    for k in PARAMS:  # step 2 changed no weight
        assert torch.equal(at1["model"][k], at2["model"][k]), k


def test_nonfinite_gradients_in_a_row_stop_the_run(train_features: FeatureSet, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_mod, "Trainer", poisoned({3, 4, 5}))
    cfg = tiny_config(max_steps=8, checkpoint_every=2, max_nonfinite_steps=3)
    ckdir = tmp_path / "run" / "checkpoints"
    with pytest.raises(NonFiniteGradients) as info:
        train(cfg, train_features, tmp_path / "run")
    assert isinstance(info.value, TrainingDiverged)
    assert str(info.value) == (
        "training diverged at step 5: non-finite gradients on 3 step(s) in a row (steps 3-5, first non-finite in "
        "GU_video.fc.weight); 3 step(s) skipped in all, none applied to the weights (limit "
        f"train.max_nonfinite_steps=3); last good checkpoint: {ckdir / 'step-000004.pt'}")
    assert (info.value.step, info.value.streak, info.value.checkpoint) == (5, 3, ckdir / "step-000004.pt")
    assert all_checkpoints_finite(tmp_path / "run") == ["step-000002.pt", "step-000004.pt"]
    s2, s4 = load_checkpoint(ckdir / "step-000002.pt"), load_checkpoint(ckdir / "step-000004.pt")
    assert (s4["step"], s4["skipped_steps"], s4["nonfinite_streak"]) == (4, 2, 2)
    for k in PARAMS:  # steps 3 and 4 were skipped
        assert torch.equal(s2["model"][k], s4["model"][k]), k
    log = read_log(tmp_path / "run")
    assert sorted(log) == [1, 2, 3, 4]
    assert [log[s]["consecutive_skips"] for s in log] == [0, 0, 1, 2]


def test_scattered_nonfinite_steps_do_not_stop_the_run(train_features: FeatureSet, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_mod, "Trainer", poisoned({2, 4, 6}))
    res = train(tiny_config(max_steps=7, max_nonfinite_steps=2), train_features, tmp_path / "run")
    assert (res.step, res.skipped_steps) == (7, 3)
    log = read_log(tmp_path / "run")
    assert [log[s]["consecutive_skips"] for s in sorted(log)] == [0, 1, 0, 1, 0, 1, 0]
    assert [log[s]["skipped_steps"] for s in sorted(log)] == [0, 1, 1, 2, 2, 3, 3]
    assert all_checkpoints_finite(tmp_path / "run") == ["step-000004.pt", "step-000007.pt"]


def test_max_nonfinite_steps_is_runtime_and_round_trips() -> None:
    from store.lineage import config_dict

    cfg = tiny_config(max_nonfinite_steps=9, dist_timeout_s=12.5)
    assert train_mod.TrainConfig().max_nonfinite_steps == 5 and train_mod.TrainConfig().dist_timeout_s == 300.0
    assert train_mod.TrainConfig.from_dict(cfg.to_dict()) == cfg
    # neither changes what a completed run learned: not part of its lineage
    assert config_dict(cfg) == config_dict(tiny_config())


# ------------------------------------------------------------------------------ checkpoint writer


def test_checkpoint_writer_refuses_nonfinite_weights_and_optimizer_state(tmp_path: Path) -> None:
    model = MCN(tiny_config().model)
    path = tmp_path / "ckpt" / "step-000001.pt"
    with torch.no_grad():
        model.GU_text_captions.fc.bias[3] = float("nan")
        model.GU_text_captions.fc.bias[5] = float("-inf")
    with pytest.raises(NonFiniteCheckpoint) as info:
        save_model_checkpoint(path, model, {"step": 1})
    assert str(info.value) == (
        f"refusing to write checkpoint {path}: model.GU_text_captions.fc.bias holds 2 non-finite value(s) (NaN or "
        "inf); no checkpoint is written with non-finite weights or state")
    assert isinstance(info.value, ValueError)

    model = MCN(tiny_config().model)
    opt = torch.optim.Adam(model.parameters())
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    opt.state[model.recon_t[2].weight]["exp_avg_sq"][0, 0] = float("inf")
    with pytest.raises(NonFiniteCheckpoint, match=r": optimizer\.state\.recon_t\.2\.weight\.exp_avg_sq holds 1 "):
        save_model_checkpoint(path, model, {"optimizer": opt.state_dict()})
    assert not path.parent.exists() or list(path.parent.iterdir()) == []  # nothing written, no temp left

    opt.state[model.recon_t[2].weight]["exp_avg_sq"][0, 0] = 1.0
    save_model_checkpoint(path, model, {"optimizer": opt.state_dict()})
    assert bad_tensors(load_checkpoint(path)) == []


def test_train_refuses_a_checkpoint_of_nonfinite_state(train_features: FeatureSet, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """State that no gradient check sees (a BatchNorm buffer) poisoned after step 2: the checkpoint of
    step 2 is refused, the one of step 1 stays the latest."""

    class BufferPoison(Trainer):
        def train_step(self, batch: dict) -> dict:
            out = super().train_step(batch)
            if self.step == 2:
                self.model.DAVEnet.bn1.running_var[0] = float("nan")
            return out

    monkeypatch.setattr(train_mod, "Trainer", BufferPoison)
    ckdir = tmp_path / "run" / "checkpoints"
    with pytest.raises(NonFiniteCheckpoint, match=r"step-000002\.pt: model\.DAVEnet\.bn1\.running_var holds 1 "):
        train(tiny_config(max_steps=4, checkpoint_every=1), train_features, tmp_path / "run")
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step-000001.pt"]
    assert (ckdir / "latest").read_text().strip() == "step-000001.pt"
    assert all_checkpoints_finite(tmp_path / "run") == ["step-000001.pt"]


# ------------------------------------------------------------------------------ DDP: one decision


def _ddp_skip_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    class RankOnePoison(Trainer):
        def nonfinite_grads(self) -> str | None:
            # after DDP's all-reduce: only rank 1's copy of the gradients is made infinite
            if rank == 1 and self.step == 0:
                self.model.recon_v[0].weight.grad[0, 0] = float("inf")
            return super().nonfinite_grads()

    try:
        trainer = RankOnePoison(tiny_config(warmup_steps=0), total_steps=10, device=torch.device("cpu"))
        w0 = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        l1 = trainer.train_step(_rank_slice(_synthetic_global_batch(0), rank, world))
        w1 = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        l2 = trainer.train_step(_rank_slice(_synthetic_global_batch(1), rank, world))
        torch.save({"l1": l1, "l2": l2, "w0": w0, "w1": w1, "w2": trainer.model.state_dict(),
                    "skipped": trainer.skipped_steps, "lr": trainer.scheduler.get_last_lr()[0]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_nonfinite_gradient_decision_is_the_same_on_every_rank(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_skip_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    for r in (r0, r1):
        assert (r["l1"]["skipped"], r["l2"]["skipped"], r["skipped"]) == (1.0, 0.0, 1)
        for k in r["w0"]:  # rank 0's gradients were finite, yet it skipped too
            assert torch.equal(r["w0"][k], r["w1"][k]), k
        assert not torch.equal(r["w1"]["GU_video.fc.weight"], r["w2"]["GU_video.fc.weight"])
    for k in r0["w2"]:  # and the ranks stay identical
        assert torch.equal(r0["w2"][k], r1["w2"][k]), k
    assert r0["lr"] == r1["lr"]


# ------------------------------------------------------------------------------ resuming over new data


def grown_config(**kw: Any) -> train_mod.TrainConfig:
    """Batches per epoch from the data: 12 usable videos → 3, 20 → 5 (batch 4); 4 epochs."""
    data = DataConfig(n_pair=4, audio_frames=64, num_workers=0, shuffle_buffer=4, batches_per_epoch=None)
    return tiny_config(data=data, **kw)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_resume_over_new_shards_is_refused_without_allow_new_data(grown_features: tuple[FeatureSet, FeatureSet],
                                                                  tmp_path: Path) -> None:
    before, after = grown_features
    run = tmp_path / "run"
    first = train(grown_config(max_steps=4), before, run)
    ckpt = run / "checkpoints" / "step-000004.pt"
    assert (first.step, first.total_steps, first.checkpoint) == (4, 12, ckpt)
    state = load_checkpoint(ckpt)
    assert state["data"] == {"fingerprint": before.fingerprint, "n_shards": 3, "n_usable": 12,
                             "batches_per_epoch": 3, "total_steps": 12}
    assert state["data_history"] == [] and (state["epoch"], state["batch_in_epoch"]) == (1, 1)
    files = snapshot(run)
    expected = (f"cannot resume from {ckpt}: the features changed since this checkpoint (3 shards, 12 usable videos "
                "-> 5 shards, 20): pass --allow-new-data to continue on the new data with a recomputed schedule")
    with pytest.raises(DataChanged) as info:
        train(grown_config(), after, run, resume="latest")
    assert str(info.value) == expected and isinstance(info.value, ValueError)
    with pytest.raises(DataChanged) as info:  # a checkpoint path into another run folder: the same
        train(grown_config(), after, tmp_path / "other", resume=str(ckpt))
    assert str(info.value) == expected
    assert snapshot(run) == files and not (tmp_path / "other").exists()
    # the same data resumes as before
    again = train(grown_config(max_steps=5), before, run, resume="latest")
    assert (again.step, again.total_steps, again.data_change) == (5, 12, None)


@pytest.mark.parametrize("stop, epochs, end", [
    (4, [2] * 5 + [3] * 5 + [4] * 5 + [5], (5, 1)),  # mid-epoch 1 (batch 1 of 3): the next epoch, 2
    (3, [1] * 5 + [2] * 5 + [3] * 5 + [4] * 2, (4, 2)),  # at the end of epoch 0: epoch 1 starts on the new data
])
def test_allow_new_data_recomputes_the_schedule(grown_features: tuple[FeatureSet, FeatureSet], tmp_path: Path,
                                                stop: int, epochs: list[int], end: tuple[int, int]) -> None:
    before, after = grown_features
    run = tmp_path / "run"
    train(grown_config(max_steps=stop), before, run)
    res = train(grown_config(), after, run, resume="latest", allow_new_data=True)
    # the step counter carries on to the new total, epochs × 5 batches
    assert (res.step, res.total_steps, res.limit, res.epoch) == (20, 20, 20, end[0])
    assert res.data_change is not None and (res.data_change["step"], res.data_change["epoch"]) == (stop, epochs[0])
    log = read_log(run)
    assert sorted(log) == list(range(1, 21))
    assert [log[s]["epoch"] for s in range(stop + 1, 21)] == epochs
    assert log[stop]["lr"] == pytest.approx(1e-3 * cosine_with_warmup(2, 12)(stop - 1))  # old schedule
    assert log[stop + 1]["lr"] == pytest.approx(1e-3 * cosine_with_warmup(2, 20)(stop))  # the new one
    assert log[stop + 1]["data_change"]["reason"].startswith("the features changed since this checkpoint (3 shards")
    assert (log[stop + 1]["data_change"]["step"], log[stop + 1]["data_change"]["epoch"]) == (stop, epochs[0])
    assert all("data_change" not in log[s] for s in log if s != stop + 1)
    state = load_checkpoint(res.checkpoint)
    assert state["data"] == data_record(after, 5, 20) and state["data"]["n_shards"] == 5
    assert state["data_history"] == [{**data_record(before, 3, 12), "until_step": stop}]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (20, *end)
    assert res.data_counts["videos"] == 20 * 4
    assert bad_tensors(state) == []
    # resumed again on the new data, without the flag: nothing changed, nothing to do
    done = train(grown_config(), after, run, resume="latest")
    assert (done.step, done.total_steps, done.data_change) == (20, 20, None)


def test_new_data_whose_schedule_is_already_done(grown_features: tuple[FeatureSet, FeatureSet],
                                                 tmp_path: Path) -> None:
    """Fewer batches per epoch (20 → 12 usable videos): the new total, 12, is behind step 14: nothing is
    trained, and the run's checkpoint records the data it now belongs to."""
    before, after = grown_features
    run = tmp_path / "run"
    train(grown_config(max_steps=14), after, run)
    res = train(grown_config(), before, run, resume="latest", allow_new_data=True)
    assert (res.step, res.total_steps, res.limit, res.epoch) == (14, 12, 12, 3)
    assert sorted(read_log(run)) == list(range(1, 15))
    state = load_checkpoint(run / "checkpoints" / "step-000014.pt")
    assert state["data"] == data_record(before, 3, 12)
    assert state["data_history"] == [{**data_record(after, 5, 20), "until_step": 14}]
    assert train(grown_config(), before, run, resume="latest").step == 14  # no flag needed any more


def test_resume_with_another_schedule_on_the_same_data_is_refused(grown_features: tuple[FeatureSet, FeatureSet],
                                                                  tmp_path: Path) -> None:
    before, _ = grown_features
    run = tmp_path / "run"
    train(grown_config(max_steps=4), before, run)
    ckpt = run / "checkpoints" / "step-000004.pt"
    with pytest.raises(DataChanged) as info:
        train(grown_config(epochs=5), before, run, resume="latest")
    assert str(info.value) == (
        f"cannot resume from {ckpt}: the schedule changed since this checkpoint, on the same features (batches per "
        "epoch 3 -> 3, total steps 12 -> 15: batch_size, epochs or data.batches_per_epoch differ from the "
        "checkpoint's): pass --allow-new-data to continue with the recomputed schedule")
    res = train(grown_config(epochs=5), before, run, resume="latest", allow_new_data=True)
    # steps 5-15 from the next epoch, 2, on: epochs 2-4 give 9 steps, the last 2 are in epoch 5
    assert (res.step, res.total_steps, res.epoch) == (15, 15, 5)
    assert [r["epoch"] for s, r in sorted(read_log(run).items()) if s > 4] == [2] * 3 + [3] * 3 + [4] * 3 + [5] * 2


def test_checkpoint_without_data_record_still_resumes(grown_features: tuple[FeatureSet, FeatureSet],
                                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    before, _ = grown_features
    run = tmp_path / "run"
    train(grown_config(max_steps=2), before, run)
    ckpt = run / "checkpoints" / "step-000002.pt"
    state = load_checkpoint(ckpt)
    for key in ("data", "data_history", "skipped_steps", "nonfinite_streak"):
        del state[key]
    torch.save(state, ckpt)
    res = train(grown_config(max_steps=3), before, run, resume="latest")
    assert res.step == 3 and res.skipped_steps == 0
    assert "does not record the data it was trained on" in caplog.text


def test_gradscaler_overflow_is_a_skipped_step_and_halves_the_scale(train_features: FeatureSet, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The float16 path's GradScaler (here its CPU twin, enabled): gradients are unscaled before the
    check; a skipped step still updates the scaler, whose scale halves; the next steps apply."""
    scales: list[float] = []

    class Scaled(poisoned({2})):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)

        def train_step(self, batch: dict) -> dict:
            out = super().train_step(batch)
            scales.append(float(self.scaler.get_scale()))
            return out

    monkeypatch.setattr(train_mod, "Trainer", Scaled)
    res = train(tiny_config(max_steps=4, checkpoint_every=2, keep_last=0), train_features, tmp_path / "run")
    assert (res.step, res.skipped_steps) == (4, 1)
    assert scales == [2.0 ** 10, 2.0 ** 9, 2.0 ** 9, 2.0 ** 9]
    state = load_checkpoint(res.checkpoint)
    assert state["scaler"]["scale"] == 2.0 ** 9 and bad_tensors(state) == []
    assert {float(st["step"]) for st in state["optimizer"]["state"].values()} == {3.0}


# ------------------------------------------------------------------------------ distributed helpers


def test_init_distributed_passes_the_timeout_and_sets_nccl_async_error_handling(monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    import model.distributed as md

    calls: list[dict] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(md, "is_distributed", lambda: False)
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    md.init_distributed(backend="gloo", timeout_s=7)
    assert calls[-1]["timeout"] == timedelta(seconds=7) and calls[-1]["backend"] == "gloo"
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ
    md.init_distributed(backend="nccl", timeout_s=9.5)
    assert calls[-1]["timeout"] == timedelta(seconds=9.5) and calls[-1]["backend"] == "nccl"
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # the user's own setting wins
    md.init_distributed(backend="nccl")
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and calls[-1]["timeout"] == timedelta(seconds=300)

    def no_rendezvous(**kw: Any) -> None:
        raise dist.DistStoreError("Timed out after 7 seconds waiting for clients. 1/2 clients joined.")

    monkeypatch.setattr(dist, "init_process_group", no_rendezvous)
    with pytest.raises(md.RankFailure) as info:
        md.init_distributed(backend="gloo", timeout_s=7)
    assert str(info.value) == ("training rank 1 of 2: the ranks did not all join within 7 s at 127.0.0.1:1 (Timed "
                               "out after 7 seconds waiting for clients. 1/2 clients joined); this rank stops too")
    assert isinstance(info.value, TimeoutError)  # the CLI prints timeouts on one line


def test_comm_errors_are_recognised_and_shortened() -> None:
    import model.distributed as md

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:36774: Connection reset by peer. This is typically caused by a remote worker "
                        "hanging or bugs in the application. Check the logs of the remote worker.")
    assert md.is_comm_error(gloo)
    assert md.short_cause(gloo) == "Read error [127.0.0.1]:36774: Connection reset by peer"
    assert md.is_comm_error(RuntimeError("Application timeout caused pair closure"))
    assert md.short_cause(RuntimeError("a\n  b " + "x" * 300)).endswith("...")
    for other in (RuntimeError("DataLoader timed out after 5 seconds"), RuntimeError("mat1 and mat2 shapes cannot be "
                  "multiplied"), ValueError("Connection reset by peer")):
        assert not md.is_comm_error(other), other


class FakeStore:
    """The store of a process group (set / check), some of whose ranks report the failure."""

    def __init__(self, reporting: set[int]) -> None:
        self.keys = {f"mcn/comm-failure/{r}" for r in reporting}

    def set(self, key: str, value: str) -> None:
        self.keys.add(key)

    def check(self, keys: list[str]) -> bool:
        return all(k in self.keys for k in keys)


def test_unreachable_ranks_are_those_that_do_not_report() -> None:
    import model.distributed as md

    assert md.unreachable_ranks(FakeStore({1, 3}), 0, 4, grace_s=0.2) == [2]
    assert md.unreachable_ranks(FakeStore({0, 1, 2}), 3, 4, grace_s=0.2) == []  # all there: unknown
    assert md.unreachable_ranks(object(), 1, 4, grace_s=0.2) is None  # the store is gone with rank 0
