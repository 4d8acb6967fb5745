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
    NumPy / torch RNG states, step, epoch, data position ``(epoch, batch_in_epoch)``, data counters,
    skipped-step counters, the data trained on (``data``: the FeatureSet's fingerprint, its shards and
    usable videos, batches per epoch, total steps; ``data_history``: earlier data of the run) and the
    config as a dict; tensors and plain containers only (``weights_only=True``). Written by rank 0,
    atomically, every ``checkpoint_every`` steps, at each epoch end and when the run stops; the last
    ``keep_last`` are kept. No checkpoint holds a non-finite tensor: the writer checks every one
    (:class:`model.checkpoint.NonFiniteCheckpoint`).

Non-finite values
    A non-finite loss part raises :class:`TrainingDiverged` before the backward pass. A finite loss
    whose gradients are not all finite (after unscaling, with a GradScaler) is **skipped**: the
    gradients are dropped and the optimizer does not step (Adam's moments and step count are
    untouched), but the step counter, the LR scheduler and the data position advance as for any
    other step, so the LR stays a function of the step, a skipped batch is never retried, and
    ``max_steps`` / ``total_steps`` keep counting batches. What the batch's forward pass changed
    stays: the k-means queue (its finite, detached fused vectors) and BatchNorm's running statistics
    (buffers, not weights). Every rank takes the same decision (the finite flag is
    all-reduced, MAX, although DDP's averaged gradients already agree). Counters ``skipped_steps``
    (in all) and ``consecutive_skips`` are logged on every logged step (a skipped step is always
    logged) and kept in checkpoints; ``max_nonfinite_steps`` skips in a row raise
    :class:`NonFiniteGradients`. With ``amp_dtype: float16`` the GradScaler's own overflow steps are
    skipped steps too (its scale halves on each).

Resuming over other data
    A checkpoint records the data it was trained on. Resuming it over another feature set (other
    fingerprint) or another schedule (batches per epoch, total steps) raises :class:`DataChanged`,
    unless ``allow_new_data``: then the schedule becomes the new data's (``epochs`` × its batches per
    epoch), the step counter carries on (it is the position in the LR schedule: the LR is recomputed
    for it), and the data restart at the start of an epoch on the new shard set: the checkpoint's
    epoch when it was taken at an epoch boundary, else the next one (a half-read epoch of the old
    shards cannot be continued on new ones). The run then ends when the step counter reaches the new
    total (possibly mid-epoch, and epoch numbers may pass ``epochs``; a total already reached ends it
    at once). The change is logged (warning, the next train.jsonl line's ``data_change``, the
    checkpoints' ``data_history``).

Dead ranks
    Every collective runs under :func:`model.distributed.collective_guard`: when another rank dies or
    hangs past ``dist_timeout_s``, this rank raises :class:`model.distributed.RankFailure` with one
    line naming the rank and the step, and writes no checkpoint.

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
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from extractors.precision import Amp, autocast, resolve_precision
from model.checkpoint import load_checkpoint, load_mcn, save_model_checkpoint
from model.data import DataConfig, add_counts, batches_per_epoch, empty_counts, make_loader
from model.distributed import (
    DEFAULT_TIMEOUT_S, all_gather_nograd, all_gather_with_grad, all_reduce_max, all_reduce_mean, broadcast_,
    collective_guard, dist_env, get_rank, get_world_size, is_distributed,
)
from model.kmeans import KMeansConfig, OnlineKMeans
from model.losses import LossConfig, mcn_losses
from model.mcn import MCN, MCNConfig, fuse_embeddings
from store import atomic
from store.layout import LATEST, Workspace, checkpoint_name, find_checkpoints, latest_checkpoint
from store.lineage import RUNTIME
from store.reader import FeatureSet

logger = logging.getLogger(__name__)

__all__ = ["CODE_VERSION", "DataChanged", "NonFiniteGradients", "TrainConfig", "TrainResult", "Trainer",
           "TrainingDiverged", "LOSS_PARTS", "cosine_with_warmup", "data_record", "resolve_resume", "train",
           "train_precision"]

LOSS_PARTS: tuple[str, ...] = ("mms_tv", "mms_at", "mms_av", "mms", "cluster", "recon", "total")
#: mcn-train-2: + ``data``, ``data_history``, ``skipped_steps``, ``nonfinite_streak`` (older ones still load)
CHECKPOINT_FORMAT = "mcn-train-2"
#: Version of the training code in the lineage of every run: bump it when a change alters what a run
#: with the same config and features learns.
CODE_VERSION = "mcn-train-2"  # 2: merged captions keep the seed caption's words first


def _last_good(checkpoint: Path | None) -> str:
    return f"; last good checkpoint: {checkpoint}" if checkpoint else "; no checkpoint was written"


class TrainingDiverged(RuntimeError):
    """A loss part became NaN or infinite; the run stops before the optimizer step."""

    def __init__(self, step: int, parts: dict[str, float], checkpoint: Path | None = None):
        self.step, self.parts, self.checkpoint = step, parts, checkpoint
        shown = ", ".join(f"{k}={v:.6g}" for k, v in parts.items())
        bad = [k for k, v in parts.items() if not math.isfinite(v)]
        super().__init__(f"training diverged at step {step}: non-finite loss part(s) {bad} ({shown})"
                         f"{_last_good(checkpoint)}")

    def with_checkpoint(self, checkpoint: Path | None) -> TrainingDiverged:
        """The same error naming the run's last good checkpoint."""
        return TrainingDiverged(self.step, self.parts, checkpoint)


class NonFiniteGradients(TrainingDiverged):
    """``limit`` steps in a row had non-finite gradients (all skipped: the weights are still finite)."""

    def __init__(self, step: int, streak: int, skipped: int, first_bad: str, limit: int,
                 checkpoint: Path | None = None):
        self.step, self.streak, self.skipped, self.first_bad, self.limit = step, streak, skipped, first_bad, limit
        self.parts: dict[str, float] = {}
        self.checkpoint = checkpoint
        RuntimeError.__init__(
            self, f"training diverged at step {step}: non-finite gradients on {streak} step(s) in a row "
            f"(steps {step - streak + 1}-{step}, first non-finite in {first_bad}); {skipped} step(s) skipped "
            f"in all, none applied to the weights (limit train.max_nonfinite_steps={limit})"
            f"{_last_good(checkpoint)}")

    def with_checkpoint(self, checkpoint: Path | None) -> NonFiniteGradients:
        return NonFiniteGradients(self.step, self.streak, self.skipped, self.first_bad, self.limit, checkpoint)


class DataChanged(ValueError):
    """A checkpoint is resumed over other features (or another schedule) without ``allow_new_data``."""


@dataclass
class TrainConfig:
    """Training recipe (defaults: the reference, SPEC §5) and its sub-configs."""

    batch_size: int = 128  # videos per GLOBAL batch (all ranks); clips = batch_size · data.n_pair
    epochs: int = 30
    lr: float = 1e-4
    warmup_steps: int = 5000
    weight_decay: float = 0.0
    # auto: bf16 autocast on CUDA and on a CPU with native bf16 (AVX-512 bf16 / AMX), else fp32; or bf16,
    # fp32 (old true/false: auto/fp32). Runtime-only: the precision it resolves to (train_precision) is
    # part of the run's lineage instead.
    amp: Amp = field(default="auto", metadata=RUNTIME)
    amp_dtype: str = "bfloat16"  # or "float16" (CUDA only; then a GradScaler is used)
    grad_clip: float | None = None  # max global grad norm; None: no clipping (as the reference)
    # Steps in a row whose gradients are not all finite (each skipped: no update) before the run stops
    # with NonFiniteGradients; 0 or 1: stop at the first. It decides whether a run stops, not what a
    # completed run learned, so it is not part of the run's lineage.
    max_nonfinite_steps: int = field(default=5, metadata=RUNTIME)
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
    # seconds a DDP collective (and the rendezvous) waits for the other ranks before this rank stops
    dist_timeout_s: float = field(default=DEFAULT_TIMEOUT_S, metadata=RUNTIME)
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
    skipped_steps: int = 0  # steps of the run skipped for non-finite gradients (in all, resumes included)
    data_change: dict[str, Any] | None = None  # this call resumed over other data: {"from", "to", "step", "epoch"}


def cosine_with_warmup(warmup_steps: int, total_steps: int):
    """LR factor: linear warm-up s / warmup, then cosine decay to 0 at ``total_steps`` (reference /
    transformers' ``get_cosine_schedule_with_warmup``; the factor is 0 at step 0 when warmup > 0)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


def train_precision(cfg: TrainConfig, device: torch.device | None = None) -> str:
    """What a run computes in on ``device`` (default: ``cfg.device`` resolved): ``fp32``, ``bf16``, or
    ``fp16`` (CUDA with ``amp_dtype: float16``). It changes what a run learns: part of its lineage."""
    if cfg.amp_dtype not in ("bfloat16", "float16"):
        raise ValueError(f"amp_dtype: {cfg.amp_dtype!r} is not bfloat16 or float16")
    device = device if device is not None else resolve_device(cfg.device)
    precision = resolve_precision(cfg.amp, device)
    if precision == "bf16" and device.type == "cuda" and cfg.amp_dtype == "float16":
        return "fp16"
    return precision


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
        # fused: one vectorised pass per parameter instead of foreach's several; on CPU ~7x less time for
        # the same update, which at paper dims (224M parameters) is a large part of a bf16 step
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          fused=self.device.type in ("cpu", "cuda"))
        self.scheduler = LambdaLR(self.optimizer, cosine_with_warmup(cfg.warmup_steps, total_steps))
        self.precision = train_precision(cfg, self.device)
        self.autocast = self.precision != "fp32"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.kmeans = OnlineKMeans(cfg.kmeans, cfg.model.embed_dim, self.device)
        self.step = 0  # steps done (batches trained on), skipped ones included: the LR schedule's position
        self.skipped_steps = 0  # steps skipped for non-finite gradients, in all
        self.nonfinite_streak = 0  # of those, the current run of consecutive ones

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "kmeans": self.kmeans.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_streak": self.nonfinite_streak,
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
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))

    def set_total_steps(self, total_steps: int) -> None:
        """Recompute the LR schedule for another length, keeping its position (the step counter); the
        optimizer's LR becomes the new schedule's at the current step."""
        fn = cosine_with_warmup(self.cfg.warmup_steps, total_steps)
        self.scheduler.lr_lambdas = [fn for _ in self.optimizer.param_groups]
        lrs = [base * fn(self.scheduler.last_epoch) for base in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs  # what get_last_lr() reports for the next step

    def nonfinite_grads(self) -> str | None:
        """None when every gradient of this rank is finite, else the name of the first parameter whose
        gradient holds a NaN or an infinity."""
        grads = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        if not grads:
            return None
        # fast path: one fused read-only pass (a NaN or an infinity makes the total norm non-finite);
        # a per-tensor isfinite costs ~4 passes over 224M gradients (~9% of a paper-dims CPU step).
        # A finite total norm means every gradient is finite; a non-finite one (or an overflow of the
        # sum of squares) is settled by the exact per-tensor check below.
        if bool(torch.isfinite(torch.nn.utils.get_total_norm([g for _, g in grads], foreach=True))):
            return None
        ok = torch.stack([torch.isfinite(g).all() for _, g in grads])
        if bool(ok.all()):
            return None
        return grads[int((~ok).nonzero()[0, 0])][0]

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

        Raises :class:`TrainingDiverged` (before any parameter update) on a non-finite loss part. A
        step whose gradients are not all finite is skipped (see the module docstring: the step counter
        and the scheduler advance, the weights and the optimizer state do not); ``skipped`` (0/1),
        ``skipped_steps`` and ``consecutive_skips`` are returned with the losses;
        :class:`NonFiniteGradients` after ``max_nonfinite_steps`` such steps in a row.
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
        with autocast(dev, self.precision):
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
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # the check below sees the true gradients
        first_bad = self.nonfinite_grads()
        flag = torch.tensor([0.0 if first_bad is None else 1.0], device=dev)
        skip = bool(all_reduce_max(flag).item())  # one decision for every rank
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.nonfinite_streak += 1
        else:
            self.nonfinite_streak = 0
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
        self.scaler.update()  # with a GradScaler, a skipped step halves the scale (it found the inf too)
        with warnings.catch_warnings():
            if skip:  # "lr_scheduler.step() before optimizer.step()": intended, see the module docstring
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
            self.scheduler.step()
        self.step += 1
        logged["lr"] = lr
        logged["skipped"] = 1.0 if skip else 0.0
        logged["skipped_steps"] = float(self.skipped_steps)
        logged["consecutive_skips"] = float(self.nonfinite_streak)
        if skip:
            where = first_bad or "another rank's gradients"
            logger.warning("step %d: non-finite gradients (first in %s) with a finite loss (total %.6g); "
                           "optimizer step skipped (%d in a row, %d in all)", self.step, where, logged["total"],
                           self.nonfinite_streak, self.skipped_steps)
            if self.nonfinite_streak >= max(1, cfg.max_nonfinite_steps):
                raise NonFiniteGradients(self.step, self.nonfinite_streak, self.skipped_steps, where,
                                         cfg.max_nonfinite_steps)
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


def data_record(features: FeatureSet, bpe: int, total_steps: int) -> dict[str, Any]:
    """What a checkpoint records of the data it was trained on (see :func:`train`)."""
    return {"fingerprint": features.fingerprint, "n_shards": len(features.shards), "n_usable": features.n_usable,
            "batches_per_epoch": int(bpe), "total_steps": int(total_steps)}


def _data_difference(saved: dict[str, Any], now: dict[str, Any]) -> tuple[str, str] | None:
    """Why the data or schedule of a checkpoint (``saved``) is not the one of this call (``now``), and
    what ``allow_new_data`` would do about it; None when they are the same."""
    if saved.get("fingerprint") != now["fingerprint"]:
        same = (saved.get("n_shards"), saved.get("n_usable")) == (now["n_shards"], now["n_usable"])
        why = (f"the features changed since this checkpoint ({saved.get('n_shards')} shards, "
               f"{saved.get('n_usable')} usable videos -> {now['n_shards']} shards, {now['n_usable']}"
               f"{'; same counts, other content' if same else ''})")
        return why, "continue on the new data with a recomputed schedule"
    if (saved.get("batches_per_epoch"), saved.get("total_steps")) != (now["batches_per_epoch"],
                                                                      now["total_steps"]):
        why = (f"the schedule changed since this checkpoint, on the same features (batches per epoch "
               f"{saved.get('batches_per_epoch')} -> {now['batches_per_epoch']}, total steps "
               f"{saved.get('total_steps')} -> {now['total_steps']}: batch_size, epochs or "
               "data.batches_per_epoch differ from the checkpoint's)")
        return why, "continue with the recomputed schedule"
    return None


def _save(trainer: Trainer, ckpt_dir: Path, *, epoch: int, batch_in_epoch: int, counts: dict[str, int],
          keep_last: int, data: dict[str, Any], data_history: list[dict[str, Any]]) -> Path:
    cfg = trainer.cfg
    path = ckpt_dir / checkpoint_name(trainer.step)
    extra = {
        **trainer.state_dict(),
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "data_counts": dict(counts),
        "data": dict(data),
        "data_history": [dict(d) for d in data_history],
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
          init_from: str | None = None, allow_new_data: bool = False) -> TrainResult:
    """Train MCN on a workspace's feature shards (:func:`store.reader.open_features`); outputs in ``run_dir``.

    ``resume``: ``"latest"`` or a checkpoint path (full state; the data order continues exactly);
    ``init_from``: weights only, from our checkpoint or the reference ``e{N}.pth``. Runs under DDP when
    torch.distributed is initialised (see :func:`model.distributed.init_distributed`).

    ``allow_new_data``: resume a checkpoint trained on other features (or with another schedule)
    with the schedule recomputed for these (see the module docstring); without it that raises
    :class:`DataChanged` (a ValueError) saying what changed.
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
    data = data_record(features, bpe, total_steps)
    data_history: list[dict[str, Any]] = []
    data_change: dict[str, Any] | None = None
    last_ckpt = resolve_resume(resume, ckpt_dir)
    state = load_checkpoint(last_ckpt, map_location="cpu") if last_ckpt is not None else None
    if state is not None:
        saved_data = state.get("data")
        data_history = [dict(d) for d in state.get("data_history", [])]
        if not isinstance(saved_data, dict):
            logger.warning("checkpoint %s does not record the data it was trained on (made by an older "
                           "version): cannot check that these features are the same", last_ckpt)
        else:
            diff = _data_difference(saved_data, data)
            if diff is not None and not allow_new_data:
                raise DataChanged(f"cannot resume from {last_ckpt}: {diff[0]}: pass --allow-new-data to {diff[1]}")
            if diff is not None:
                data_change = {"from": saved_data, "to": data, "reason": diff[0]}

    current = 1  # the step being trained (for messages)
    with collective_guard(lambda: f"step {current}"):
        trainer = Trainer(cfg, total_steps=total_steps)
        logger.info("training: %d shards, %d batches/epoch of %d videos × %d clips (global), %d epochs, "
                    "device %s, world %d", len(shards), bpe, cfg.batch_size, cfg.data.n_pair, cfg.epochs,
                    trainer.device, world)

        epoch, in_epoch = 0, 0
        counts = empty_counts()
        resumed_step: int | None = None
        if state is not None:
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
            if data_change is not None:
                old_lr = float(trainer.scheduler.get_last_lr()[0])
                trainer.set_total_steps(total_steps)
                if in_epoch > 0:  # a half-read epoch of the old shards cannot go on over the new ones
                    epoch, in_epoch = epoch + 1, 0
                data_history.append({**data_change["from"], "until_step": trainer.step})
                data_change.update(step=trainer.step, epoch=epoch)
                logger.warning("resuming %s over other data: %s; schedule recomputed: total steps %d -> %d, lr "
                               "at step %d %.6g -> %.6g; continuing at step %d with epoch %d (batch 0) of the "
                               "new data%s", last_ckpt, data_change["reason"], data_change["from"].get("total_steps"),
                               total_steps, trainer.step, old_lr, float(trainer.scheduler.get_last_lr()[0]),
                               trainer.step, epoch,
                               "; that total is already reached: nothing to train" if trainer.step >= total_steps
                               else "")
        elif resume is not None:
            logger.info("no checkpoint in %s; starting from scratch", ckpt_dir)
        if last_ckpt is None and init_from is not None:
            src = load_mcn(init_from, config=cfg.model)
            trainer.model.load_state_dict(src.state_dict())
            logger.info("initialised weights from %s", init_from)
        current = trainer.step + 1

        log = _RunLog(log_dir, enabled=main, tensorboard=cfg.tensorboard, resumed_step=resumed_step)
        limit = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
        bar = None
        if main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=limit, initial=min(trainer.step, limit), desc="train", unit="step", dynamic_ncols=True)
        losses: dict[str, float] = {}
        clips_per_step = cfg.batch_size * cfg.data.n_pair
        t_last, steps_since = time.perf_counter(), 0
        note = {k: v for k, v in data_change.items() if k != "to"} if data_change else None
        saved_here = False  # a checkpoint was written by this call
        try:
            # the step counter ends the run: it equals epoch × bpe + batch unless the data changed
            while trainer.step < limit:
                if in_epoch == 0:
                    trainer.kmeans.new_epoch()
                loader = make_loader(cfg.data, features, batch_size=per_rank, epoch=epoch, n_batches=bpe,
                                     rank=rank, world_size=world, skip_batches=in_epoch, n_mels=cfg.model.n_mels,
                                     pin_memory=trainer.device.type == "cuda")
                for batch in loader:
                    current = trainer.step + 1
                    add_counts(counts, batch.pop("counts", {}))
                    try:
                        losses = trainer.train_step(batch)
                    except TrainingDiverged as exc:
                        raise exc.with_checkpoint(last_ckpt) from None
                    in_epoch += 1
                    steps_since += 1
                    end_of_epoch = in_epoch >= bpe
                    pos_epoch, pos_batch = (epoch + 1, 0) if end_of_epoch else (epoch, in_epoch)
                    stop = trainer.step >= limit
                    if (trainer.step % cfg.log_every == 0 or stop or end_of_epoch or losses["skipped"]
                            or note is not None):
                        now = time.perf_counter()
                        rate = steps_since * clips_per_step / max(now - t_last, 1e-9)
                        t_last, steps_since = now, 0
                        total_counts = _global_counts(counts, trainer.device)
                        km = trainer.kmeans.stats()
                        record = {"step": trainer.step, "epoch": epoch, "lr": losses["lr"], "clips_per_s": rate,
                                  **{k: losses[k] for k in LOSS_PARTS},
                                  "skipped": bool(losses["skipped"]),
                                  "skipped_steps": trainer.skipped_steps,
                                  "consecutive_skips": trainer.nonfinite_streak,
                                  "cluster_n_empty": km.get("n_empty", 0),
                                  "cluster_max_size": km.get("max_size", 0),
                                  "cluster_refit": bool(km.get("refit", False)),
                                  **{f"data_{k}": v for k, v in total_counts.items()}}
                        if note is not None:
                            record["data_change"], note = note, None
                        log.write(record, km.get("sizes"))
                        if bar is not None:
                            bar.set_postfix(loss=f"{losses['total']:.4f}", clips_s=f"{rate:.0f}", epoch=epoch)
                    if bar is not None:
                        bar.update(1)
                    if (trainer.step % cfg.checkpoint_every == 0 or (end_of_epoch and cfg.checkpoint_epoch_end)
                            or stop):
                        if main:
                            last_ckpt = _save(trainer, ckpt_dir, epoch=pos_epoch, batch_in_epoch=pos_batch,
                                              counts=_global_counts(counts, trainer.device),
                                              keep_last=cfg.keep_last, data=data, data_history=data_history)
                        else:
                            _global_counts(counts, trainer.device)  # matching collective
                            last_ckpt = ckpt_dir / checkpoint_name(trainer.step)
                        saved_here = True
                    if stop:
                        break
                del loader
                if in_epoch >= bpe:
                    epoch, in_epoch = epoch + 1, 0
        finally:
            if bar is not None:
                bar.close()
            log.close()
        if data_change is not None and not saved_here:
            # nothing trained over the new data (its total already reached): this run still gets its
            # own checkpoint, recording the new data
            if main:
                last_ckpt = _save(trainer, ckpt_dir, epoch=epoch, batch_in_epoch=in_epoch,
                                  counts=_global_counts(counts, trainer.device), keep_last=cfg.keep_last,
                                  data=data, data_history=data_history)
            else:
                _global_counts(counts, trainer.device)
                last_ckpt = ckpt_dir / checkpoint_name(trainer.step)
        final_counts = _global_counts(counts, trainer.device)
    return TrainResult(step=trainer.step, epoch=epoch, losses=losses, checkpoint=last_ckpt,
                       data_counts=final_counts, total_steps=total_steps, limit=limit,
                       skipped_steps=trainer.skipped_steps, data_change=data_change)


def _global_counts(counts: dict[str, int], device: torch.device) -> dict[str, int]:
    """Data counters summed over ranks (a collective under DDP: every rank must call it)."""
    if not is_distributed():
        return dict(counts)
    keys = sorted(counts)
    t = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=device)
    t = all_reduce_mean(t) * get_world_size()
    return {k: int(round(v)) for k, v in zip(keys, t.tolist())}

