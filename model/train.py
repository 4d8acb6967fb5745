"""MCN training loop (SPEC §4–§5): Adam + cosine schedule, online k-means, DDP, resumable checkpoints.

Global batch
    ``TrainConfig.batch_size`` counts videos over all ranks; each rank loads ``batch_size / world``
    videos (× ``n_pair`` clips). The MMS and cluster losses see the global batch: embeddings are
    all-gathered with gradients (:func:`model.distributed.all_gather_with_grad`). The reconstruction
    loss is per rank (DDP averages its gradients, i.e. the global mean when ranks have equal clip
    counts). k-means runs on the gathered fused vectors on every rank; labels and refitted centroids
    are broadcast from rank 0 so that they stay bit-identical.

Checkpoints (``run_dir/checkpoints/step-000123.pt`` + ``latest``)
    Model, ``mcn_config``, optimizer, scheduler, scaler, k-means (centroids, queue, RNG), Python /
    NumPy / torch RNG states, step, epoch, data position ``(epoch, batch_in_epoch)``, data counters and
    the config as a dict; tensors and plain containers only (``weights_only=True``). Written by rank
    0, atomically, every ``checkpoint_every`` steps, at each epoch end and when the run stops; the last
    ``keep_last`` are kept. A non-finite loss raises :class:`TrainingDiverged` before the optimizer
    step, so nothing computed from it is ever saved.

Logs (rank 0): TensorBoard in ``run_dir/logs/`` and one JSON line per logged step in
``run_dir/logs/train.jsonl`` (step, epoch, lr, clips_per_s, every loss part, cluster and data stats).
On resume, lines after the resumed step are dropped so the file stays one line per step.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from model.checkpoint import load_checkpoint, load_mcn, save_model_checkpoint
from model.data import DataConfig, add_counts, batches_per_epoch, empty_counts, make_loader
from model.distributed import (
    all_gather_nograd, all_gather_with_grad, all_reduce_mean, broadcast_, dist_env, get_rank, get_world_size,
    is_distributed,
)
from model.kmeans import KMeansConfig, OnlineKMeans
from model.losses import LossConfig, mcn_losses
from model.mcn import MCN, MCNConfig, fuse_embeddings
from store import atomic
from store.layout import LATEST, Workspace, checkpoint_name, find_checkpoints, latest_checkpoint
from store.lineage import RUNTIME
from store.reader import FeatureSet

logger = logging.getLogger(__name__)

__all__ = ["CODE_VERSION", "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "LOSS_PARTS",
           "cosine_with_warmup", "resolve_resume", "train"]

LOSS_PARTS: tuple[str, ...] = ("mms_tv", "mms_at", "mms_av", "mms", "cluster", "recon", "total")
CHECKPOINT_FORMAT = "mcn-train-1"
#: Version of the training code in the lineage of every run: bump it when a change alters what a run
#: with the same config and features learns.
CODE_VERSION = "mcn-train-1"


class TrainingDiverged(RuntimeError):
    """A loss part became NaN or infinite; the run stops before the optimizer step."""

    def __init__(self, step: int, parts: dict[str, float], checkpoint: Path | None = None):
        self.step, self.parts, self.checkpoint = step, parts, checkpoint
        shown = ", ".join(f"{k}={v:.6g}" for k, v in parts.items())
        bad = [k for k, v in parts.items() if not math.isfinite(v)]
        where = f"; last good checkpoint: {checkpoint}" if checkpoint else "; no checkpoint was written"
        super().__init__(f"training diverged at step {step}: non-finite loss part(s) {bad} ({shown}){where}")


@dataclass
class TrainConfig:
    """Training recipe (defaults: the reference, SPEC §5) and its sub-configs."""

    batch_size: int = 128  # videos per GLOBAL batch (all ranks); clips = batch_size · data.n_pair
    epochs: int = 30
    lr: float = 1e-4
    warmup_steps: int = 5000
    weight_decay: float = 0.0
    amp: bool = True  # autocast on CUDA (no effect on CPU)
    amp_dtype: str = "bfloat16"  # or "float16" (then a GradScaler is used)
    grad_clip: float | None = None  # max global grad norm; None: no clipping (as the reference)
    checkpoint_every: int = field(default=1000, metadata=RUNTIME)  # steps; also when the run stops
    checkpoint_epoch_end: bool = field(default=True, metadata=RUNTIME)  # also at epoch ends (off: tiny epochs)
    keep_last: int = field(default=3, metadata=RUNTIME)
    log_every: int = field(default=10, metadata=RUNTIME)
    # Stop after this many steps in all; the schedule still spans all epochs, so raising it continues
    # the same run (it is not part of the run's lineage).
    max_steps: int | None = field(default=None, metadata=RUNTIME)
    seed: int = 0
    device: str = field(default="auto", metadata=RUNTIME)  # auto | cpu | cuda
    sync_bn: bool = True  # SyncBatchNorm in DAVEnet under DDP on CUDA (unsupported on CPU)
    progress: bool = field(default=True, metadata=RUNTIME)  # tqdm bar on rank 0
    tensorboard: bool = field(default=True, metadata=RUNTIME)
    model: MCNConfig = field(default_factory=MCNConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored with a warning."""
        subs: dict[str, type] = {"model": MCNConfig, "loss": LossConfig, "kmeans": KMeansConfig,
                                 "data": DataConfig}

        def build(klass: type, values: dict[str, Any]) -> Any:
            names = {f.name for f in fields(klass)}
            extra = sorted(set(values) - names)
            if extra:
                logger.warning("%s: ignoring unknown keys %s", klass.__name__, extra)
            kw = {k: v for k, v in values.items() if k in names}
            for k, sub in subs.items():
                if klass is cls and isinstance(kw.get(k), dict):
                    kw[k] = build(sub, kw[k])
            return klass(**kw)

        return build(cls, d)


@dataclass
class TrainResult:
    step: int
    epoch: int  # epoch of the data position after the last step
    losses: dict[str, float]  # of the last step (averaged over ranks)
    checkpoint: Path | None  # last checkpoint written (or resumed from)
    data_counts: dict[str, int] = field(default_factory=dict)
    total_steps: int = 0  # epochs × batches per epoch (the schedule's length)
    limit: int = 0  # steps this call trained up to: min(total_steps, max_steps)
    trained: bool = True  # False when the run was found done and nothing was trained


def cosine_with_warmup(warmup_steps: int, total_steps: int):
    """LR factor: linear warm-up s / warmup, then cosine decay to 0 at ``total_steps`` (reference /
    transformers' ``get_cosine_schedule_with_warmup``; the factor is 0 at step 0 when warmup > 0)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


def resolve_device(name: str) -> torch.device:
    local = dist_env().local_rank
    if name == "auto":
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local}")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------
# RNG state as plain data (weights_only-loadable)


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((int(v), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# One optimisation step


class Trainer:
    """Model, optimizer, schedule, scaler and k-means; :meth:`train_step` does one step on one batch.

    Works with any batch dict of the :mod:`model.data` layout (the rank's share of the global batch).
    """

    def __init__(self, cfg: TrainConfig, *, total_steps: int, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.rank, self.world = get_rank(), get_world_size()
        torch.manual_seed(cfg.seed)
        model: nn.Module = MCN(cfg.model)
        if is_distributed() and cfg.sync_bn and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        self.net: nn.Module = self.model
        if is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            # static_graph: DAVEnet.batchnorm1 is never used (reference quirk); DDP learns that once.
            self.net = DistributedDataParallel(self.model, device_ids=ids, static_graph=True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, cosine_with_warmup(cfg.warmup_steps, total_steps))
        self.autocast = cfg.amp and self.device.type == "cuda"
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.amp_dtype]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast and self.amp_dtype == torch.float16)
        self.kmeans = OnlineKMeans(cfg.kmeans, cfg.model.embed_dim, self.device)
        self.step = 0  # optimizer steps done

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "kmeans": self.kmeans.state_dict(),
            "rng": rng_state(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore model (``state["model"]``) and training state of a checkpoint."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.kmeans.load_state_dict(state["kmeans"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])

    # ------------------------------------------------------------------ step
    def _check_batch(self, batch: dict[str, Any]) -> None:
        m = self.cfg.model
        v, a, t = batch["video"], batch["audio"], batch["text"]
        if v.shape[1] != m.video_dim or a.shape[1] != m.n_mels or t.shape[2] != m.text_dim:
            raise ValueError(
                f"batch dims video {v.shape[1]}, mels {a.shape[1]}, words {t.shape[2]} do not match the "
                f"model (video_dim {m.video_dim}, n_mels {m.n_mels}, text_dim {m.text_dim}); check the "
                "extract config")

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step; returns the loss parts (averaged over ranks) and ``lr``.

        Raises :class:`TrainingDiverged` (before any parameter update) on a non-finite loss part.
        """
        if self.step == 0:
            self._check_batch(batch)
        dev, cfg = self.device, self.cfg
        video = batch["video"].to(dev, non_blocking=True).float()
        audio = batch["audio"].to(dev, non_blocking=True).float()
        nframes = batch["nframes"].to(dev, non_blocking=True)
        text = batch["text"].to(dev, non_blocking=True).float()
        mask = batch["audio_mask"].to(dev, non_blocking=True).bool()
        n_videos = int(batch["video_index"][-1]) + 1
        n_pair = video.shape[0] // n_videos

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=self.amp_dtype, enabled=self.autocast):
            out = self.net(video, audio, nframes, text, mask)
        emb = {k: out[k].float() for k in ("video", "audio", "text")}
        if self.world > 1:
            g = {k: all_gather_with_grad(x) for k, x in emb.items()}
            g_mask = all_gather_nograd(mask)
        else:
            g, g_mask = emb, mask
        fused = fuse_embeddings(g["video"], g["audio"], g["text"], g_mask)

        with torch.no_grad():
            f = fused.detach()
            labels = self.kmeans.step(f)
            if self.world > 1:
                broadcast_(labels)
                if self.kmeans.stats().get("refit") and self.kmeans.centroids is not None:
                    broadcast_(self.kmeans.centroids)
            self.kmeans.push(self.kmeans.queue_subset(f, n_pair))
        centroids = self.kmeans.centroids

        if self.world == 1:
            parts = mcn_losses({**out, **emb, "fused": fused}, labels=labels, centroids=centroids,
                               audio_mask=mask, cfg=cfg.loss)
        else:
            zero = fused.new_zeros(fused.shape[0], 1)
            g_out = {**g, "fused": fused, "recon_video": zero, "target_video": zero, "recon_audio": zero,
                     "target_audio": zero, "recon_text": zero, "target_text": zero}
            parts = mcn_losses(g_out, labels=labels, centroids=centroids, audio_mask=g_mask, cfg=cfg.loss)
            local = mcn_losses(out, labels=None, centroids=None, audio_mask=mask, cfg=cfg.loss)
            parts["recon"] = local["recon"]
            parts["total"] = (parts["mms"] + cfg.loss.cluster_weight * parts["cluster"]
                              + cfg.loss.recon_weight * parts["recon"])

        values = all_reduce_mean(torch.stack([parts[k].detach().float() for k in LOSS_PARTS]))
        logged = dict(zip(LOSS_PARTS, values.tolist()))
        if not all(math.isfinite(x) for x in logged.values()):
            raise TrainingDiverged(self.step + 1, logged)

        lr = float(self.scheduler.get_last_lr()[0])
        self.scaler.scale(parts["total"]).backward()
        if cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        logged["lr"] = lr
        return logged


# --------------------------------------------------------------------------------------------------
# Checkpoint files


def resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    """``"latest"`` → the file named by ``checkpoints/latest`` (else the highest step; None when there
    is none); any other string is a checkpoint path (must exist)."""
    if resume is None:
        return None
    if resume != "latest":
        p = Path(resume)
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint to resume from not found: {p}")
        return p
    return latest_checkpoint(ckpt_dir)


def _save(trainer: Trainer, ckpt_dir: Path, *, epoch: int, batch_in_epoch: int, counts: dict[str, int],
          keep_last: int) -> Path:
    cfg = trainer.cfg
    path = ckpt_dir / checkpoint_name(trainer.step)
    extra = {
        **trainer.state_dict(),
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "data_counts": dict(counts),
        "world_size": trainer.world,
        "config": cfg.to_dict(),
    }
    save_model_checkpoint(path, trainer.model, extra)
    atomic.write_text(ckpt_dir / LATEST, path.name + "\n")
    if keep_last > 0:
        for _, old in find_checkpoints(ckpt_dir)[:-keep_last]:
            if old != path:
                old.unlink(missing_ok=True)
    logger.info("checkpoint %s (epoch %d, batch %d)", path, epoch, batch_in_epoch)
    return path


# --------------------------------------------------------------------------------------------------
# Logging


class _RunLog:
    """train.jsonl + TensorBoard on rank 0; no-op elsewhere."""

    def __init__(self, log_dir: Path, *, enabled: bool, tensorboard: bool, resumed_step: int | None):
        self.enabled = enabled
        self.tb = None
        self.jsonl = log_dir / "train.jsonl"
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step is not None and self.jsonl.exists():
            keep = []
            for line in self.jsonl.read_text().splitlines():
                try:
                    if int(json.loads(line)["step"]) <= resumed_step:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
            atomic.write_text(self.jsonl, "".join(x + "\n" for x in keep))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resumed_step is None else resumed_step + 1
            self.tb = SummaryWriter(str(log_dir), purge_step=purge)

    def write(self, record: dict[str, Any], cluster_sizes: list[int] | None) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k in ("step",) or not isinstance(v, (int, float)):
                    continue
                prefix = "loss/" if k in LOSS_PARTS else ("data/" if k.startswith("data_") else "train/")
                self.tb.add_scalar(prefix + k, v, step)
            if cluster_sizes:
                self.tb.add_histogram("cluster/sizes", np.asarray(cluster_sizes), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, features: FeatureSet, run_dir: Path, *, resume: str | None = None,
          init_from: str | None = None) -> TrainResult:
    """Train MCN on a workspace's feature shards (:func:`store.reader.open_features`); outputs in ``run_dir``.

    ``resume``: ``"latest"`` or a checkpoint path (full state; the data order continues exactly);
    ``init_from``: weights only, from our checkpoint or the reference ``e{N}.pth``. Runs under DDP when
    torch.distributed is initialised (see :func:`model.distributed.init_distributed`).
    """
    run_dir = Path(run_dir)
    ckpt_dir, log_dir = Workspace.checkpoints_dir(run_dir), Workspace.logs_dir(run_dir)
    rank, world = get_rank(), get_world_size()
    main = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} (videos, global) is not divisible by world size "
                         f"{world}")
    per_rank = cfg.batch_size // world
    shards = features.shards
    if not shards:
        raise FileNotFoundError(f"no complete feature shards under {features.ws.features_dir} (need done "
                                "records of video2d, video3d, audio and text)")
    bpe = batches_per_epoch(shards, per_rank, world, cfg.data)
    total_steps = cfg.epochs * bpe
    trainer = Trainer(cfg, total_steps=total_steps)
    logger.info("training: %d shards, %d batches/epoch of %d videos × %d clips (global), %d epochs, "
                "device %s, world %d", len(shards), bpe, cfg.batch_size, cfg.data.n_pair, cfg.epochs,
                trainer.device, world)

    epoch, in_epoch = 0, 0
    counts = empty_counts()
    last_ckpt = resolve_resume(resume, ckpt_dir)
    resumed_step: int | None = None
    if last_ckpt is not None:
        state = load_checkpoint(last_ckpt, map_location="cpu")
        trainer.load_state_dict(state)
        epoch, in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        if main:
            counts = add_counts(empty_counts(), state.get("data_counts", {}))
        saved = state.get("config", {})
        saved_workers = saved.get("data", {}).get("num_workers")
        if int(state.get("world_size", world)) != world or saved_workers != cfg.data.num_workers:
            logger.warning("resuming with a different world size or num_workers than the checkpoint: the "
                           "data order will not be the one of an uninterrupted run")
        resumed_step = trainer.step
        logger.info("resumed from %s: step %d, epoch %d, batch %d", last_ckpt, trainer.step, epoch, in_epoch)
    elif resume is not None:
        logger.info("no checkpoint in %s; starting from scratch", ckpt_dir)
    if last_ckpt is None and init_from is not None:
        src = load_mcn(init_from, config=cfg.model)
        trainer.model.load_state_dict(src.state_dict())
        logger.info("initialised weights from %s", init_from)

    log = _RunLog(log_dir, enabled=main, tensorboard=cfg.tensorboard, resumed_step=resumed_step)
    limit = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=limit, initial=trainer.step, desc="train", unit="step", dynamic_ncols=True)
    losses: dict[str, float] = {}
    clips_per_step = cfg.batch_size * cfg.data.n_pair
    t_last, steps_since = time.perf_counter(), 0
    try:
        while trainer.step < limit and epoch < cfg.epochs:
            if in_epoch == 0:
                trainer.kmeans.new_epoch()
            loader = make_loader(cfg.data, features, batch_size=per_rank, epoch=epoch, n_batches=bpe, rank=rank,
                                 world_size=world, skip_batches=in_epoch, n_mels=cfg.model.n_mels,
                                 pin_memory=trainer.device.type == "cuda")
            for batch in loader:
                add_counts(counts, batch.pop("counts", {}))
                try:
                    losses = trainer.train_step(batch)
                except TrainingDiverged as exc:
                    raise TrainingDiverged(exc.step, exc.parts, last_ckpt) from None
                in_epoch += 1
                steps_since += 1
                end_of_epoch = in_epoch >= bpe
                pos_epoch, pos_batch = (epoch + 1, 0) if end_of_epoch else (epoch, in_epoch)
                stop = trainer.step >= limit
                if trainer.step % cfg.log_every == 0 or stop or end_of_epoch:
                    now = time.perf_counter()
                    rate = steps_since * clips_per_step / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    total_counts = _global_counts(counts, trainer.device)
                    km = trainer.kmeans.stats()
                    record = {"step": trainer.step, "epoch": epoch, "lr": losses["lr"], "clips_per_s": rate,
                              **{k: losses[k] for k in LOSS_PARTS},
                              "cluster_n_empty": km.get("n_empty", 0),
                              "cluster_max_size": km.get("max_size", 0),
                              "cluster_refit": bool(km.get("refit", False)),
                              **{f"data_{k}": v for k, v in total_counts.items()}}
                    log.write(record, km.get("sizes"))
                    if bar is not None:
                        bar.set_postfix(loss=f"{losses['total']:.4f}", clips_s=f"{rate:.0f}", epoch=epoch)
                if bar is not None:
                    bar.update(1)
                if trainer.step % cfg.checkpoint_every == 0 or (end_of_epoch and cfg.checkpoint_epoch_end) or stop:
                    if main:
                        last_ckpt = _save(trainer, ckpt_dir, epoch=pos_epoch, batch_in_epoch=pos_batch,
                                          counts=_global_counts(counts, trainer.device),
                                          keep_last=cfg.keep_last)
                    else:
                        _global_counts(counts, trainer.device)  # matching collective
                        last_ckpt = ckpt_dir / checkpoint_name(trainer.step)
                if stop:
                    break
            del loader
            if in_epoch >= bpe:
                epoch, in_epoch = epoch + 1, 0
            if trainer.step >= limit:
                break
    finally:
        if bar is not None:
            bar.close()
        log.close()
    return TrainResult(step=trainer.step, epoch=epoch, losses=losses, checkpoint=last_ckpt,
                       data_counts=_global_counts(counts, trainer.device), total_steps=total_steps, limit=limit)


def _global_counts(counts: dict[str, int], device: torch.device) -> dict[str, int]:
    """Data counters summed over ranks (a collective under DDP: every rank must call it)."""
    if not is_distributed():
        return dict(counts)
    keys = sorted(counts)
    t = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=device)
    t = all_reduce_mean(t) * get_world_size()
    return {k: int(round(v)) for k, v in zip(keys, t.tolist())}

