"""The train stage: the run of the current config and features, its lineage, state and training.

A run's lineage is its result-determining config, the training code's version and the fingerprints of
the four fields' feature shards it reads. A run folder holds one lineage: ``runs/<name>`` for the
first, ``runs/<name>-<fingerprint[:8]>`` beside it for another (store.layout), so a stale run is never
overwritten. A run that is done is not touched; an interrupted one continues from its latest
checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, write_resolved
from pipeline.ranks import rank_and_world
from pipeline.stages import FieldState, extract_states, workers_for
from store.layout import Workspace, latest_checkpoint
from store.lineage import Lineage, UnitState, config_dict, fingerprint, read_record, unit_state
from store.reader import FeatureSet, open_features

logger = logging.getLogger(__name__)


def train_lineage(cfg: Config, features: FeatureSet) -> Lineage:
    """A run's lineage: its result-determining config, the training code's version and the
    fingerprints of the four fields' feature shards it reads. The config includes the precision the
    run computes in on this device (``amp`` itself is runtime-only)."""
    from model.train import CODE_VERSION, train_precision

    config = {**config_dict(cfg.train), "precision": train_precision(cfg.train)}
    return Lineage(config=fingerprint(config), code=CODE_VERSION,
                   inputs={f"features/{f}": features.fingerprints[f] for f in features.fields})


def find_run(ws: Workspace, name: str, lineage: Lineage) -> Path:
    """The folder of run ``name`` for ``lineage``: ``runs/<name>`` when it holds this lineage or is
    unused, else ``runs/<name>-<fingerprint[:8]>`` beside it (a stale run is never overwritten)."""
    first, other = ws.run_dirs(name, lineage.fingerprint)
    for d in (first, other):
        rec = read_record(ws.run_record(d))
        if rec is not None and rec.get("fingerprint") == lineage.fingerprint:
            return d
    unused = read_record(ws.run_record(first)) is None and latest_checkpoint(ws.checkpoints_dir(first)) is None
    return first if unused else other


def find_continuation(ws: Workspace, name: str, lineage: Lineage, *, exclude: Path | None = None) -> Path | None:
    """The latest checkpoint of the most recently trained other run of ``name`` (``runs/<name>`` or
    ``runs/<name>-<fingerprint[:8]>``) whose config fingerprint is ``lineage.config``: where a run
    over new features continues from (``allow_new_data``). None when there is none."""
    best: tuple[int, Path] | None = None
    for run_dir in ws.runs_of(name):
        if exclude is not None and run_dir.resolve() == Path(exclude).resolve():
            continue
        rec = read_record(ws.run_record(run_dir))
        lin = rec.get("lineage") if rec else None
        if not isinstance(lin, dict) or lin.get("config") != lineage.config:
            continue
        ckpt = latest_checkpoint(ws.checkpoints_dir(run_dir))
        if ckpt is None:
            continue
        when = ckpt.stat().st_mtime_ns
        if best is None or when > best[0]:
            best = (when, ckpt)
    return best[1] if best else None


def run_limit(cfg: Config, total_steps: int) -> int:
    return total_steps if cfg.train.max_steps is None else min(total_steps, cfg.train.max_steps)


def run_state(ws: Workspace, cfg: Config, run_dir: Path, lineage: Lineage) -> UnitState:
    """done (trained to its limit, checkpoint present) / stale (with the reason) / missing."""
    rec = read_record(ws.run_record(run_dir))
    st = unit_state(rec, lineage)
    if st.done and rec is not None:
        limit = run_limit(cfg, int(rec.get("total_steps") or 0))
        ckpt = Workspace.checkpoints_dir(run_dir) / str(rec.get("checkpoint") or "")
        if int(rec.get("step") or 0) < limit or not rec.get("total_steps"):
            return UnitState("stale", [f"incomplete: step {rec.get('step', 0)} of {limit or '?'}"], rec)
        if not rec.get("checkpoint") or not ckpt.is_file():
            return UnitState("stale", [f"its checkpoint {ckpt.name} is missing"], rec)
    return st


@dataclass
class TrainState:
    """The run of the current config and features: its folder, lineage and state; ``upstream``: why
    the features it would read are not current (extract not done), empty when they are."""

    run_dir: Path
    lineage: Lineage
    state: UnitState
    features: FeatureSet
    upstream: list[str] = field(default_factory=list)

    @property
    def checkpoint(self) -> Path | None:
        rec = self.state.record or {}
        if not rec.get("checkpoint"):
            return None
        return Workspace.checkpoints_dir(self.run_dir) / str(rec["checkpoint"])


def features_upstream(ws: Workspace, cfg: Config, features: FeatureSet,
                      states: dict[str, FieldState] | None = None) -> list[str]:
    """Why the features on disk are not those of the current scan and extract config."""
    reasons = [f"features: {p}" for p in features.problems[:3]]
    if len(features.problems) > 3:
        reasons.append(f"features: {len(features.problems) - 3} more shard(s) incomplete")
    try:
        states = states if states is not None else extract_states(ws, cfg)
    except FileNotFoundError as exc:
        return reasons + [str(exc)]
    for f, st in states.items():
        if not st.complete:
            why = ", ".join(sorted(st.reasons)) or "not extracted"
            reasons.append(f"extract {f}: {st.stale} stale, {st.missing} missing ({why})")
    return reasons


def train_state(ws: Workspace, cfg: Config, *, extract: dict[str, FieldState] | None = None) -> TrainState:
    """The run of the current config and features (``extract``: the extract states already computed)."""
    if extract is None:
        try:
            extract = extract_states(ws, cfg)
        except FileNotFoundError:
            extract = {}
    records = {f: st.records for f, st in extract.items() if st.records is not None}
    features = open_features(ws, check_sizes=cfg.train.data.check_sizes, records=records)
    lineage = train_lineage(cfg, features)
    run_dir = find_run(ws, cfg.evaluate.run, lineage)
    return TrainState(run_dir, lineage, run_state(ws, cfg, run_dir, lineage), features,
                      features_upstream(ws, cfg, features, extract or None))


def run_train(ws: Workspace, cfg: Config, *, resume: str | None = None, init_from: str | None = None,
              progress: bool = True, allow_new_data: bool = False) -> Any:
    """Train the run of the current config and features (``runs/<evaluate.run>``, or beside it when
    that folder holds another lineage). A run that is done is not touched; an incomplete one resumes
    from its latest checkpoint. Returns the ``TrainResult`` (``trained=False`` when it was done).

    ``allow_new_data``: a checkpoint made on other features may be resumed (``model.train.train``
    recomputes the schedule); and a new run (other features, same config) that has no checkpoint
    yet continues from the latest checkpoint of the most recent other run of the same name and
    config (:func:`find_continuation`) instead of starting from scratch, in its own folder; its
    record.json says where it was continued from (``continued_from``). Under DDP, collectives wait
    ``train.dist_timeout_s`` for the other ranks.
    """
    from model.distributed import broadcast_, cleanup, collective_guard, init_distributed
    from model.train import TrainResult, train

    cfg.train.progress = cfg.train.progress and progress
    rank, world = rank_and_world()
    ts = train_state(ws, cfg)
    if not ts.features.shards:
        raise FileNotFoundError(f"no complete feature shards in {ws.features_dir}: run `mcn extract` first")
    if ts.upstream:
        raise FileNotFoundError("the features are not current: " + "; ".join(ts.upstream)
                                + " (run `mcn extract`, or `mcn run`)")

    def done_result(done: TrainState) -> TrainResult:
        rec = done.state.record or {}
        logger.info("train: run %s is done (step %s)", done.run_dir.name, rec.get("step"))
        return TrainResult(step=int(rec["step"]), epoch=int(rec.get("epoch", 0)), losses=rec.get("losses", {}),
                           checkpoint=done.checkpoint, total_steps=int(rec["total_steps"]),
                           limit=run_limit(cfg, int(rec["total_steps"])), trained=False)

    if ts.state.done:
        return done_result(ts)
    # this run's own record (same lineage: an interrupted run) keeps where it was continued from
    own = ts.state.record if (ts.state.record or {}).get("fingerprint") == ts.lineage.fingerprint else None
    continued: dict[str, Any] | None = (own or {}).get("continued_from")
    own_ckpts = ws.checkpoints_dir(ts.run_dir).resolve()
    if resume not in (None, "latest") and Path(resume).resolve().parent != own_ckpts:
        src = Path(resume)  # another run's checkpoint, given by the user
        continued = {"run": src.parent.parent.name, "checkpoint": src.name, "path": str(src)}
    elif (allow_new_data and resume in (None, "latest")
            and latest_checkpoint(ws.checkpoints_dir(ts.run_dir)) is None):
        src = find_continuation(ws, cfg.evaluate.run, ts.lineage, exclude=ts.run_dir)
        if src is None:
            logger.info("train: no earlier run %r with this config to continue from; starting from scratch",
                        cfg.evaluate.run)
        else:
            resume = str(src)
            continued = {"run": src.parent.parent.name, "checkpoint": src.name, "path": str(src)}
            logger.info("train: new run %s continues run %s from %s (allow_new_data)", ts.run_dir.name,
                        continued["run"], src.name)
    if world > 1:
        init_distributed(timeout_s=cfg.train.dist_timeout_s)
    workers = workers_for(ws, cfg)
    claim = None
    try:
        if rank == 0:
            claim = workers.claim(ws.run_unit(ts.run_dir), what=f"training run {ts.run_dir.name}")
            workers.sweep()  # temporary files of a killed run (a half-written checkpoint)
        with collective_guard(lambda: "start-up"):
            go = _agree(rank == 0 and not run_state(ws, cfg, ts.run_dir, ts.lineage).done, world, broadcast_)
        if not go:
            logger.info("train: run %s was completed by another process", ts.run_dir.name)
            return done_result(train_state(ws, cfg))
        if rank == 0:
            reason = "; ".join(ts.state.reasons) if ts.state.status == "stale" else "new run"
            logger.info("train: run %s (%s)", ts.run_dir.name, reason)
            ts.run_dir.mkdir(parents=True, exist_ok=True)
            config_path = ws.run_config(ts.run_dir)
            if not config_path.exists():  # the resolved config of a run is written once, at its creation
                write_resolved(config_path, cfg.train, world_size=world, run=ts.run_dir.name)
            _write_run_record(ws, ts, step=_ckpt_step(ts.run_dir), complete=False, continued=continued,
                              earlier=own, decoder=cfg.extract.decode.backend)
        result = train(cfg.train, ts.features, ts.run_dir, resume=resume or "latest", init_from=init_from,
                       allow_new_data=allow_new_data)
        if rank == 0:
            _write_run_record(ws, ts, step=result.step, complete=result.step >= result.limit, result=result,
                              world=world, continued=continued, earlier=own, decoder=cfg.extract.decode.backend)
        return result
    finally:
        if claim is not None:
            claim.release()
        if world > 1:
            cleanup()


def _agree(flag: bool, world: int, broadcast_: Any) -> bool:
    """Rank 0's decision, on every rank."""
    if world == 1:
        return flag
    import torch

    t = torch.tensor([1 if flag else 0])
    broadcast_(t)
    return bool(t.item())


def _ckpt_step(run_dir: Path) -> int:
    from store.layout import checkpoint_step

    ckpt = latest_checkpoint(Workspace.checkpoints_dir(run_dir))
    return (checkpoint_step(ckpt.name) or 0) if ckpt else 0


def _write_run_record(ws: Workspace, ts: TrainState, *, step: int, complete: bool, result: Any = None,
                      world: int = 1, continued: dict[str, Any] | None = None,
                      earlier: dict[str, Any] | None = None, decoder: str | None = None) -> None:
    """The run's record.json. ``continued``: the run and checkpoint it was continued from, when it was
    started from another run's checkpoint; ``data_change``: when (step, epoch) and why its data
    changed under ``allow_new_data``. Both are kept from the ``earlier`` record of the same run."""
    from store.lineage import write_record

    payload: dict[str, Any] = {
        "name": ts.run_dir.name, "step": step, "complete": complete,
        "features": {"n_shards": len(ts.features.shards), "n_usable": ts.features.n_usable},
    }
    if continued:
        payload["continued_from"] = dict(continued)
    if (earlier or {}).get("data_change"):
        payload["data_change"] = earlier["data_change"]  # type: ignore[index]
    if result is not None:
        ckpt = result.checkpoint
        own = ckpt is not None and Path(ckpt).resolve().parent == ws.checkpoints_dir(ts.run_dir).resolve()
        payload.update(epoch=result.epoch, total_steps=result.total_steps, limit=result.limit,
                       checkpoint=ckpt.name if own else None,  # never another run's file
                       losses={k: float(v) for k, v in result.losses.items()}, world_size=world,
                       skipped_steps=int(getattr(result, "skipped_steps", 0)))
        change = getattr(result, "data_change", None)
        if change:
            payload["data_change"] = {"step": change.get("step"), "epoch": change.get("epoch"),
                                      "reason": change.get("reason")}
    write_record(ws.run_record(ts.run_dir), ws.run_unit(ts.run_dir), ts.lineage, decoder=decoder, **payload)


def current_checkpoint(ws: Workspace, cfg: Config, checkpoint: str | None = None) -> Path:
    """``checkpoint`` when given (must exist), else the checkpoint of the run of the current config
    and features, which must be done (FileNotFoundError saying why not)."""
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    ts = train_state(ws, cfg)
    if ts.upstream:
        raise FileNotFoundError("the features are not current (" + "; ".join(ts.upstream) + "): run `mcn run`, "
                                "or pass --checkpoint")
    if not ts.state.done or ts.checkpoint is None:
        why = "; ".join(ts.state.reasons) if ts.state.reasons else "not trained"
        raise FileNotFoundError(f"run {ts.run_dir.name} of the current config and features is not done ({why}): "
                                "train first (`mcn train`) or pass --checkpoint")
    return ts.checkpoint


__all__ = ["TrainState", "current_checkpoint", "find_continuation", "find_run", "run_state", "run_train",
           "train_lineage", "train_state"]
