"""`evaluate`: zero-shot retrieval (and step localization) of a trained MCN on an evaluation set.

Each set (:mod:`pipeline.evalsets`) is a unit of the runner: its record holds the lineage (the set's
config, the checkpoint's identity, the features' fingerprint, for step sets the annotations and the
text extractor), so an evaluation is redone exactly when one of them changed, and a re-run with
nothing changed writes nothing. Outputs: ``WS/eval/<name>/{metrics.json, report.html,
embeddings.npz, config.yaml, record.json}``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.clipset import ClipSet, ClipSetConfig, build_clipset
from evaluation.embed import embed_clipset
from evaluation.retrieval import rank_of_true, retrieval_report
from evaluation.scoring import clip_scores
from extractors.base import resolve_device
from pipeline.config import Config, write_resolved
from pipeline.evalsets import STEP_KINDS, EvalSetConfig, EvaluateConfig, annotation_captions, find_set
from pipeline.runner import run_unit
from pipeline.stages import extract_stage, run_extract, workers_for
from pipeline.training import current_checkpoint
from store import atomic
from store.claims import Claim
from store.layout import Workspace
from store.lineage import (
    Lineage,
    UnitState,
    config_dict,
    file_identity,
    fingerprint,
    read_record,
    remember_identity,
    unit_state,
)
from store.manifest import iter_manifest, read_scan
from store.reader import FeatureSet, open_features

logger = logging.getLogger(__name__)

PROTOCOL = ("zero-shot; similarity text·(video+audio) (and text·video); rank = 0-based rank of the true "
            "clip, ties pessimistic; R@K = rank < K over the clips evaluated (over n_total when the set fixes "
            "it: missing clips are misses); median rank = median(rank)+1 over the clips evaluated")

#: Version of the evaluation code in the lineage of every evaluation: bump it when the metrics change.
CODE_VERSION = "eval-3"


def prepare_set(ws: Workspace, cfg: Config, spec: EvalSetConfig, *, progress: bool
                ) -> tuple[Workspace, list[str], int | None]:
    """Scan + extract the set's videos into ``WS/evalsets/<name>`` (cached by lineage like the main
    workspace); returns the workspace whose features are the set, the problems found and the number
    of annotated queries (None when the set has no annotation file)."""
    spec.validate()
    if spec.videos is None:
        return ws, [], None
    from pipeline.scan import scan

    set_ws = ws.evalset(spec.name)
    set_ws.root.mkdir(parents=True, exist_ok=True)
    captions_file, problems, n_annotated = annotation_captions(spec, set_ws.annotation_captions)
    scan_cfg = dataclasses.replace(cfg.scan, captions_file=str(captions_file) if captions_file else None)
    result = scan(Path(spec.videos), set_ws, scan_cfg, progress=progress, workers=workers_for(set_ws, cfg))
    if result.n_ok == 0:
        raise ValueError(f"evaluation set {spec.name!r}: no usable video in {spec.videos}")
    if captions_file is not None:
        import json

        scanned = {key for r in iter_manifest(set_ws.manifest) if r.ok
                   for key in (r.id, r.path, str(Path(r.path).with_suffix("")), Path(r.path).stem)}
        annotated = set(json.loads(captions_file.read_text()))
        missing = sorted(annotated - scanned)
        if missing:
            fate = ("count as misses (n_total)" if spec.n_total is not None
                    else "are not evaluated (n_missing; recalls are over the clips evaluated)")
            problems.append(f"{len(missing)} annotated video id(s) not found among the videos "
                            f"(e.g. {', '.join(missing[:5])}); their queries {fate}")
    run_extract(set_ws, set_extract_config(cfg, spec), progress=progress)
    return set_ws, problems, n_annotated


def set_extract_config(cfg: Config, spec: EvalSetConfig) -> Config:
    """The config that extracts a set's own videos: ``cfg``, with the set's ``max_words`` (when it has
    one) as the text extractor's ``max_words``."""
    if spec.max_words is None:
        return cfg
    text = dataclasses.replace(cfg.extract.text, options={**cfg.extract.text.options, "max_words": spec.max_words})
    return dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, text=text))


def _path_identity(path: str | None) -> Any:
    """Size and mtime of a file, or of every file of a folder (cheap: stat calls only)."""
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        return sorted([str(q.relative_to(p)), q.stat().st_size, q.stat().st_mtime_ns]
                      for q in p.rglob("*") if q.is_file())
    try:
        st = p.stat()
    except OSError:
        return [str(p), None]
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def checkpoint_identity(ws: Workspace, name: str, ckpt: Path) -> dict[str, Any]:
    """The checkpoint's identity, its sha256 taken from the set's record when size and mtime agree."""
    previous = (read_record(ws.eval_record(name)) or {}).get("checkpoint")
    return file_identity(ckpt, previous if isinstance(previous, dict) else None)


def eval_lineage(ws: Workspace, cfg: Config, spec: EvalSetConfig, name: str, ckpt: Path,
                 features: FeatureSet) -> Lineage:
    """The set's config (with the report settings), the evaluation code, and its inputs: the
    checkpoint's identity (sha256, re-hashed only when its size or mtime changed), the features'
    fingerprint, and for step sets the annotations, the task list and the text extractor."""
    ident = checkpoint_identity(ws, name, ckpt)
    ecfg = config_dict(cfg.evaluate)
    ecfg.pop("sets", None)
    ecfg.pop("run", None)
    inputs = {"checkpoint": ident["sha256"], "features": features.fingerprint}
    if spec.kind in STEP_KINDS:
        inputs["annotations"] = fingerprint(_path_identity(spec.annotations), _path_identity(spec.tasks))
        inputs["text_extractor"] = fingerprint(extract_stage(ws, cfg).field_config("text"))
    return Lineage(config=fingerprint(spec.lineage_dict(), ecfg), code=CODE_VERSION, inputs=inputs)


def eval_state(ws: Workspace, name: str, lineage: Lineage) -> UnitState:
    record = read_record(ws.eval_record(name))
    problems = [] if ws.eval_metrics(name).is_file() else ["metrics.json missing"]
    return unit_state(record, lineage, problems if record is not None else None)


def evaluate_set(ws: Workspace, cfg: Config, set_name: str, checkpoint: str | None, *,
                 progress: bool = True, eval_name: str | None = None) -> dict[str, Any]:
    """Evaluate one set unless its record says it is done for this checkpoint and these features;
    returns the metrics dict (``cached`` True when nothing was recomputed)."""
    spec = find_set(cfg.evaluate, set_name)
    name = eval_name or spec.name
    ckpt = current_checkpoint(ws, cfg, checkpoint)
    set_ws, problems, n_annotated = prepare_set(ws, cfg, spec, progress=progress)
    features = open_features(set_ws)
    lineage = eval_lineage(ws, cfg, spec, name, ckpt, features)

    def work(claim: Claim, st: UnitState) -> dict[str, Any]:
        if st.status == "stale":
            logger.info("evaluate %s: %s", name, st.why())
        if spec.kind in STEP_KINDS:
            metrics = localize_set(set_ws, cfg, spec, ckpt, features, problems)
        else:
            metrics = retrieve_set(ws, cfg, spec, name, ckpt, features, problems, n_annotated)
        metrics = _jsonable(metrics)
        claim.verify()
        out = ws.eval_dir(name)
        out.mkdir(parents=True, exist_ok=True)
        ws.eval_record(name).unlink(missing_ok=True)
        atomic.write_json(ws.eval_metrics(name), metrics)
        write_resolved(ws.eval_config(name), cfg.evaluate, set=dataclasses.asdict(spec), checkpoint=str(ckpt))
        from store.lineage import write_record

        write_record(ws.eval_record(name), ws.eval_unit(name), lineage, decoder=cfg.extract.decode.backend,
                     set=spec.name,
                     checkpoint=file_identity(ckpt), features={"n_shards": len(features.shards)})
        return {**metrics, "cached": False}

    workers = workers_for(ws, cfg)
    st, metrics = run_unit(workers, ws.eval_unit(name), lambda: eval_state(ws, name, lineage), work)
    if metrics is None:
        remember_identity(ws.eval_record(name), st.record, "checkpoint", checkpoint_identity(ws, name, ckpt))
        logger.info("evaluate %s: done for this checkpoint and these features (nothing recomputed)", name)
        metrics = {**read_record(ws.eval_metrics(name)), "cached": True}  # type: ignore[dict-item]
    return metrics


def retrieve_set(ws: Workspace, cfg: Config, spec: EvalSetConfig, name: str, ckpt: Path, features: FeatureSet,
                 problems: list[str], n_annotated: int | None) -> dict[str, Any]:
    """Retrieval metrics of one set; writes the embeddings and the report next to the metrics.

    The recalls are divided by the clips evaluated, or by ``spec.n_total`` when the set fixes its size
    (MSR-VTT 1k-A: 1000; the clips not evaluated then count as misses). ``n_annotated``: the queries of
    the set's annotation file (None without one); ``metrics["n_missing"]`` counts the annotated queries
    that were not evaluated (video absent or unusable, caption without a known word), those beyond
    ``spec.max_clips`` aside.
    """
    from model.checkpoint import load_mcn

    ecfg: EvaluateConfig = cfg.evaluate
    clips = build_clipset(features, ClipSetConfig(audio_frames=spec.audio_frames, max_clips=spec.max_clips,
                                                  max_words=spec.max_words))
    problems = problems + clips.problems
    model = load_mcn(ckpt)
    emb = embed_clipset(model, clips, batch_size=ecfg.batch_size, device=resolve_device(ecfg.device))
    n_total = None if spec.n_total is None else max(spec.n_total, len(clips))
    if spec.n_total is not None and spec.n_total < len(clips):
        problems.append(f"{len(clips)} clips found, more than the set's n_total {spec.n_total}: recalls over "
                        f"{len(clips)}")
    audio = emb["audio"] if clips.audio_mask.any() else None
    report = retrieval_report(emb["text"], emb["video"], audio=audio, audio_mask=clips.audio_mask,
                              n_total=n_total, ties=ecfg.ties)
    metrics: dict[str, Any] = {
        "set": spec.name, "kind": spec.kind, "n_queries": len(clips), "n_total": n_total or len(clips),
        "n_videos": len(set(clips.video_ids)), "checkpoint": str(ckpt), "protocol": PROTOCOL,
        "chance": {f"R@{k}": min(1.0, k / len(clips)) for k in (1, 5, 10)},
        "retrieval": report, "problems": problems,
    }
    if n_annotated is not None:
        n_cut = int(clips.counts.get("cut_by_max_clips", 0))
        metrics["n_annotated"] = n_annotated
        metrics["n_missing"] = max(0, n_annotated - len(clips) - n_cut)
    out_dir = ws.eval_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_open(ws.eval_embeddings(name), "wb") as fh:
        np.savez(fh, video=emb["video"], audio=emb["audio"], text=emb["text"], audio_mask=clips.audio_mask,
                 starts=clips.starts, ends=clips.ends, video_ids=np.asarray(clips.video_ids))
    try:
        write_eval_report(ws, name, cfg, spec, clips, emb, metrics, ckpt, features)
    except Exception as exc:  # the numbers stand without the pictures
        logger.error("report for %s could not be written: %s", name, exc)
    return metrics


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics as a text table with chance next to the recalls."""
    chance = metrics["chance"]
    n = f"n={metrics['n_queries']}"
    if metrics.get("n_missing"):
        n += f"; {metrics['n_missing']} of {metrics['n_annotated']} annotated not evaluated"
    lines = [f"{'mode':<22}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MedR':>8}{'MeanR':>9}   ({n})"]
    for mode, m in metrics["retrieval"].items():
        lines.append(f"{mode:<22}{100 * m['R@1']:>7.1f}%{100 * m['R@5']:>7.1f}%{100 * m['R@10']:>7.1f}%"
                     f"{m['median_rank']:>8.1f}{m['mean_rank']:>9.1f}")
    lines.append(f"{'chance':<22}{100 * chance['R@1']:>7.1f}%{100 * chance['R@5']:>7.1f}%{100 * chance['R@10']:>7.1f}%")
    return "\n".join(lines)


def _clusters(ckpt: Path, fused: np.ndarray, per_cluster: int, n_clusters: int) -> dict[int, list[int]]:
    """Assign eval clips to the checkpoint's k-means centroids (cosine); the largest clusters."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    km = state.get("kmeans") if isinstance(state, dict) else None
    cent = km.get("centroids") if isinstance(km, dict) else None
    if cent is None:
        return {}
    c = torch.nn.functional.normalize(cent.float(), dim=1)
    x = torch.nn.functional.normalize(torch.from_numpy(fused).float(), dim=1)
    labels = (x @ c.T).argmax(1).numpy()
    ids, counts = np.unique(labels, return_counts=True)
    top = ids[np.argsort(-counts)][:n_clusters]
    return {int(k): np.flatnonzero(labels == k)[:per_cluster].tolist() for k in top}


def write_eval_report(ws: Workspace, name: str, cfg: Config, spec: EvalSetConfig, clips: ClipSet,
                      emb: dict[str, np.ndarray], metrics: dict[str, Any], ckpt: Path, features: FeatureSet) -> Path:
    from evaluation.report import ClipRef, QueryResult, ReportData, write_report
    from model.mcn import fuse_embeddings

    set_ws = features.ws
    paths: dict[str, Path] = {}
    try:
        root = read_scan(set_ws).videos_root
        paths = {r.id: root / r.path for r in iter_manifest(set_ws.manifest)}
    except FileNotFoundError:
        pass

    def ref(i: int, score: float | None = None) -> ClipRef:
        return ClipRef(paths.get(clips.video_ids[i]), clips.video_ids[i], float(clips.starts[i]),
                       float(clips.ends[i]), clips.captions[i], score)

    n = len(clips)
    picks = np.unique(np.linspace(0, n - 1, min(n, cfg.evaluate.report_queries)).astype(int))
    queries = []
    for q in picks:
        scores = clip_scores(emb["text"][q:q + 1], emb["video"], emb["audio"], clips.audio_mask)[0]
        order = np.argsort(-scores, kind="stable")[:5]
        rank = int(rank_of_true(scores[None, :][:, np.r_[q, np.delete(np.arange(n), q)]])[0])
        queries.append(QueryResult(clips.captions[q], ref(q), [ref(int(i), float(scores[i])) for i in order], rank))
    fused = fuse_embeddings(*(torch.from_numpy(emb[k]).float() for k in ("video", "audio", "text")),
                            torch.from_numpy(clips.audio_mask)).numpy()
    clusters = {k: [ref(i) for i in idx] for k, idx in
                _clusters(ckpt, fused, 6, cfg.evaluate.report_clusters).items()}
    log = Workspace.train_log(ckpt.parent.parent)
    data = ReportData(
        title=f"MCN zero-shot evaluation: {spec.name}",
        metrics=metrics["retrieval"], chance=metrics["chance"], queries=queries, clusters=clusters,
        train_log=log if log.exists() else None,
        n_annotated=metrics.get("n_annotated"), n_missing=metrics.get("n_missing"),
        info={"checkpoint": str(ckpt), "set": spec.name, "kind": spec.kind, "queries": str(n),
              "protocol": PROTOCOL, "problems": "; ".join(metrics["problems"]) or "none"},
    )
    return write_report(ws.eval_report(name), data)


def localize_set(set_ws: Workspace, cfg: Config, spec: EvalSetConfig, ckpt: Path, features: FeatureSet,
                 problems: list[str]) -> dict[str, Any]:
    """Step localization (CrossTask protocol, or Mining YouTube with a log-softmax over steps)."""
    from evaluation.annotations import parse_crosstask_annotations, parse_crosstask_tasks, parse_mining_youtube
    from evaluation.steps import localize, step_text_extractor
    from model.checkpoint import load_mcn
    from store.ids import video_id

    if not spec.annotations or not spec.tasks:
        raise FileNotFoundError(f"evaluation set {spec.name!r} ({spec.kind}) needs `annotations` and `tasks`")
    if spec.kind == "crosstask":
        tasks = parse_crosstask_tasks(spec.tasks)
        problems = problems + tasks.problems
        ann = parse_crosstask_annotations(spec.annotations, tasks=tasks.tasks)
    else:
        ann = parse_mining_youtube(spec.tasks, spec.annotations)
    problems = problems + ann.problems
    # Annotation files name videos by file stem (YouTube id); the workspace by our path-derived id.
    ann.segments = {video_id(f"{k}.mp4"): v for k, v in ann.segments.items()}
    ann.task_of = {video_id(f"{k}.mp4"): v for k, v in ann.task_of.items()}
    model = load_mcn(ckpt)
    device = resolve_device(cfg.evaluate.device)
    stage = extract_stage(set_ws, cfg)
    # the caption extractor the model was trained with, keeping the step protocol's words per text
    text = step_text_extractor(stage.cfg.text.name, stage.options("text"), spec.steps)
    result = localize(model, features, ann, text, mining_youtube=spec.kind == "mining_youtube",
                      cfg=spec.steps, batch_size=cfg.evaluate.batch_size, device=device)
    problems += result.pop("problems", [])
    return {"set": spec.name, "kind": spec.kind, "checkpoint": str(ckpt), "localization": result,
            "problems": problems}
