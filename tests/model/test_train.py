"""Training loop: end-to-end on fixture shards, exact resume, checkpoints, divergence, DDP equivalence."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import model.train as train_mod
from extractors.precision import cpu_has_bf16
from model.checkpoint import load_checkpoint, load_mcn
from model.data import DataConfig
from model.kmeans import KMeansConfig
from model.losses import LossConfig
from model.mcn import MCNConfig
from model.train import (
    LOSS_PARTS,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    cosine_with_warmup,
    train,
    train_precision,
)
from store.layout import Workspace, find_checkpoints
from store.lineage import runtime_fields
from store.reader import FeatureSet, open_features
from tests.support import free_port

from .conftest import D2, D3, DW, N_MELS


def tiny_config(**kw) -> TrainConfig:
    data = kw.pop("data", None) or DataConfig(n_pair=4, audio_frames=64, num_workers=0, shuffle_buffer=4,
                                              batches_per_epoch=4)
    cfg = TrainConfig(
        batch_size=4, epochs=4, lr=1e-3, warmup_steps=2, checkpoint_every=100, keep_last=3, log_every=1,
        device="cpu", progress=False, tensorboard=False, amp="fp32",  # exact comparisons: float32
        model=MCNConfig(embed_dim=32, video_dim=D2 + D3, text_dim=DW, n_mels=N_MELS, davenet_dim=32,
                        davenet_widths=(8, 8, 16, 16, 32), recon_dim=16),
        loss=LossConfig(),
        kmeans=KMeansConfig(k=4, queue_batches=3, queue_clips_per_video=2, refit_every=2),
        data=data,
    )
    return replace(cfg, **kw)


def read_log(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "logs" / "train.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def test_cosine_with_warmup() -> None:
    f = cosine_with_warmup(4, 12)
    assert [f(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5)
    assert f(12) == pytest.approx(0.0) and f(20) == 0.0
    assert cosine_with_warmup(0, 10)(0) == 1.0


def test_no_complete_shard_is_an_error(tmp_path: Path) -> None:
    features = open_features(Workspace(tmp_path / "ws"))  # an empty workspace
    with pytest.raises(FileNotFoundError, match="no complete feature shards"):
        train(tiny_config(), features, tmp_path / "run")


def test_config_round_trip() -> None:
    cfg = tiny_config()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.slow
def test_end_to_end_loss_goes_down(train_features: FeatureSet, tmp_path: Path) -> None:
    # recon weight 1 (not 50) so that the contrastive part visibly learns within 24 steps
    cfg = tiny_config(epochs=6, lr=1e-2, log_every=2, tensorboard=True, loss=LossConfig(recon_weight=1.0))
    res = train(cfg, train_features, tmp_path / "run")
    assert res.step == 24 and res.epoch == 6
    assert (res.total_steps, res.limit, res.trained) == (24, 24, True)  # 6 epochs × 4 batches
    log = read_log(tmp_path / "run")
    assert sorted(log) == list(range(2, 25, 2))
    for r in log.values():
        assert {"step", "epoch", "lr", "clips_per_s", *LOSS_PARTS} <= set(r)
        assert r["clips_per_s"] > 0
    for part, ratio in (("mms", 0.9), ("total", 0.85)):
        first = sum(log[s][part] for s in (2, 4, 6)) / 3
        last = sum(log[s][part] for s in (20, 22, 24)) / 3
        assert last < ratio * first, (part, first, last)
    assert res.data_counts["videos"] == 24 * 4 and res.data_counts["clips"] == 24 * 16
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "logs").iterdir())
    assert res.checkpoint == tmp_path / "run" / "checkpoints" / "step-000024.pt"


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(train_features: FeatureSet, tmp_path: Path) -> None:
    data = DataConfig(n_pair=4, audio_frames=64, num_workers=2, shuffle_buffer=4, batches_per_epoch=4)
    full = train(tiny_config(max_steps=6, data=data), train_features, tmp_path / "a")
    part = train(tiny_config(max_steps=3, data=data), train_features, tmp_path / "b")
    assert part.step == 3 and (part.total_steps, part.limit) == (16, 3)  # 4 epochs × 4 batches
    rest = train(tiny_config(max_steps=6, data=data), train_features, tmp_path / "b", resume="latest")
    assert full.step == rest.step == 6 and rest.limit == 6 and rest.trained
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:  # step 3 → 4 crosses the mid-epoch resume, 4 → 5 an epoch boundary (k-means re-init)
        for k in (*LOSS_PARTS, "lr"):
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-5, abs=1e-5), (step, k)
    wa = load_checkpoint(full.checkpoint)["model"]
    wb = load_checkpoint(rest.checkpoint)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_checkpoints_keep_last_and_contents(train_features: FeatureSet, tmp_path: Path) -> None:
    cfg = tiny_config(max_steps=5, checkpoint_every=1, keep_last=2)
    res = train(cfg, train_features, tmp_path / "run")
    ckdir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("step-*.pt")) == ["step-000004.pt", "step-000005.pt"]
    assert find_checkpoints(ckdir) == [(4, ckdir / "step-000004.pt"), (5, ckdir / "step-000005.pt")]
    assert (ckdir / "latest").read_text().strip() == "step-000005.pt"
    assert not [p for p in ckdir.iterdir() if p.name.endswith(".tmp")]
    state = load_checkpoint(res.checkpoint)  # weights_only=True
    assert state["step"] == 5 and (state["epoch"], state["batch_in_epoch"]) == (1, 1)
    for key in ("model", "mcn_config", "optimizer", "scheduler", "scaler", "kmeans", "rng", "config",
                "data_counts", "data", "data_history", "skipped_steps", "nonfinite_streak"):
        assert key in state, key
    assert state["format"] == "mcn-train-2"
    assert state["data"] == {"fingerprint": train_features.fingerprint, "n_shards": 4, "n_usable": 16,
                             "batches_per_epoch": 4, "total_steps": 16}
    assert (state["skipped_steps"], state["nonfinite_streak"], res.skipped_steps) == (0, 0, 0)
    assert state["kmeans"]["centroids"].shape == (4, 32)
    assert state["config"]["batch_size"] == 4
    model = load_mcn(res.checkpoint)
    torch.testing.assert_close(model.state_dict()["GU_video.fc.weight"], state["model"]["GU_video.fc.weight"])


def test_init_from_loads_weights(train_features: FeatureSet, tmp_path: Path) -> None:
    src = train(tiny_config(max_steps=2), train_features, tmp_path / "src")
    # warmup 2: the first step has lr 0, so after one step the weights are still the initial ones
    res = train(tiny_config(max_steps=1, seed=7), train_features, tmp_path / "dst",
                init_from=str(src.checkpoint))
    a = load_checkpoint(src.checkpoint)["model"]
    b = load_checkpoint(res.checkpoint)["model"]
    torch.testing.assert_close(a["GU_video.fc.weight"], b["GU_video.fc.weight"])
    torch.testing.assert_close(a["DAVEnet.conv1.weight"], b["DAVEnet.conv1.weight"])


def test_nan_raises_and_keeps_last_good_checkpoint(train_features: FeatureSet, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = train_mod.mcn_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            parts["mms_tv"] = parts["mms_tv"] * float("nan")
            parts["mms"] = parts["mms_tv"] + parts["mms_at"] + parts["mms_av"]
            parts["total"] = parts["total"] + parts["mms"]
        return parts

    monkeypatch.setattr(train_mod, "mcn_losses", poisoned)
    cfg = tiny_config(max_steps=8, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"step 5.*mms_tv") as info:
        train(cfg, train_features, tmp_path / "run")
    ckdir = tmp_path / "run" / "checkpoints"
    assert info.value.step == 5 and info.value.checkpoint == ckdir / "step-000004.pt"
    assert "step-000004.pt" in str(info.value)
    assert sorted(p.name for p in ckdir.glob("step-*.pt")) == ["step-000002.pt", "step-000004.pt"]
    assert (ckdir / "latest").read_text().strip() == "step-000004.pt"
    assert max(read_log(tmp_path / "run")) == 4


# ------------------------------------------------------------------------------------------------ DDP


def _synthetic_global_batch(seed: int, n_videos: int = 4, n_pair: int = 4, frames: int = 64) -> dict:
    """Video/text differ per clip; audio of the second half repeats the first half, so per-rank
    BatchNorm statistics (DAVEnet) equal the global ones and the comparison is exact (also for the
    gradients: the local-mean terms of BN's backward add up to the global ones over duplicate pairs)."""
    g = torch.Generator().manual_seed(seed)
    n = n_videos * n_pair
    half = torch.randn(n // 2, N_MELS, frames, generator=g) * 10 - 40
    text = torch.randn(n, 20, DW, generator=g)
    return {
        "video": torch.rand(n, D2 + D3, generator=g),
        "audio": torch.cat([half, half]).to(torch.float16),
        "nframes": torch.full((n,), frames, dtype=torch.long),
        "text": text.to(torch.float16),
        "text_len": torch.full((n,), 20, dtype=torch.long),
        "audio_mask": torch.ones(n, dtype=torch.bool),
        "video_index": torch.arange(n_videos).repeat_interleave(n_pair),
    }


def _rank_slice(batch: dict, rank: int, world: int) -> dict:
    n = batch["video"].shape[0] // world
    out = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    out["video_index"] = out["video_index"] - out["video_index"][0]
    return out


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = Trainer(tiny_config(warmup_steps=0), total_steps=10, device=torch.device("cpu"))
        l1 = trainer.train_step(_rank_slice(_synthetic_global_batch(0), rank, world))
        g1 = _grads(trainer)
        l2 = trainer.train_step(_rank_slice(_synthetic_global_batch(1), rank, world))
        if rank == 0:
            torch.save({"l1": l1, "l2": l2, "g1": g1, "centroids": trainer.kmeans.centroids}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)

    single = Trainer(tiny_config(warmup_steps=0), total_steps=10, device=torch.device("cpu"))
    l1 = single.train_step(_synthetic_global_batch(0))
    g1 = _grads(single)
    l2 = single.train_step(_synthetic_global_batch(1))
    for k in (*LOSS_PARTS, "lr"):
        assert ddp["l1"][k] == pytest.approx(l1[k], rel=1e-5, abs=1e-6), k
        assert ddp["l2"][k] == pytest.approx(l2[k], rel=1e-4, abs=1e-5), k
    assert set(ddp["g1"]) == set(g1)
    for name, g in g1.items():  # DDP-averaged gradients equal the global-batch gradients
        err = (ddp["g1"][name] - g).abs().max().item()
        assert err <= 1e-5 * g.abs().max().item() + 1e-7, (name, err, g.abs().max().item())
    torch.testing.assert_close(ddp["centroids"], single.kmeans.centroids, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ precision


def test_train_precision_resolves_amp_per_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert TrainConfig().amp == "auto"
    assert train_precision(TrainConfig(amp="auto"), cpu) == ("bf16" if cpu_has_bf16() else "fp32")
    assert train_precision(TrainConfig(amp=True), cpu) == train_precision(TrainConfig(amp="auto"), cpu)  # old configs
    assert train_precision(TrainConfig(amp=False), cpu) == "fp32"
    assert train_precision(TrainConfig(amp="fp32"), cuda) == "fp32"
    assert train_precision(TrainConfig(amp="auto"), cuda) == "bf16"
    assert train_precision(TrainConfig(amp="auto", amp_dtype="float16"), cuda) == "fp16"
    assert train_precision(TrainConfig(amp="bf16", amp_dtype="float16"), cpu) == "bf16"  # no fp16 on CPU
    with pytest.raises(ValueError):
        train_precision(TrainConfig(amp="half"), cpu)
    # amp is runtime-only: what it resolves to enters the run's lineage (pipeline.training.train_lineage)
    assert "amp" in runtime_fields(TrainConfig)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16 (AVX-512 bf16 / AMX)")
def test_bf16_step_on_cpu_runs_under_autocast_and_stays_close_to_fp32() -> None:
    batch = _synthetic_global_batch(0)
    fp32 = Trainer(tiny_config(warmup_steps=0), total_steps=10, device=torch.device("cpu"))
    bf16 = Trainer(tiny_config(warmup_steps=0, amp="bf16"), total_steps=10, device=torch.device("cpu"))
    assert (fp32.precision, fp32.autocast, bf16.precision, bf16.autocast) == ("fp32", False, "bf16", True)
    seen: list[torch.dtype] = []
    hook = bf16.model.GU_video.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    a, b = fp32.train_step(batch), bf16.train_step(batch)
    hook.remove()
    assert seen == [torch.bfloat16]  # the heads really ran in bf16
    for k in LOSS_PARTS:  # same weights (same seed), same batch: bf16 rounding only
        assert b[k] == pytest.approx(a[k], rel=0.05, abs=1e-3), k
    assert any(b[k] != a[k] for k in LOSS_PARTS)
