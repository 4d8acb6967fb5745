"""`evaluate`: zero-shot retrieval (and step localization) of a trained MCN on an evaluation set.

An evaluation set is a folder of raw videos turned into its own workspace (`WS/evalsets/<name>/`) by
the same scan and extract stages (cached and resumable like the main workspace), with its clips
defined by captions: side-car captions (`kind: captions`), a YouCook2 annotation JSON (`youcook2`),
or the MSR-VTT 1k-A test CSV/JSON (`msrvtt`). Without `videos`, the main workspace's own features
are the set. Outputs: `WS/eval/<name>/{metrics.json, report.html, embeddings.npz, config.yaml}`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.clipset import ClipSet, ClipSetConfig, build_clipset
from evaluation.embed import embed_clipset
from evaluation.retrieval import rank_of_true, retrieval_report
from extractors.base import resolve_device
from pipeline import atomic
from pipeline.manifest import iter_manifest
from pipeline.workspace import Workspace

logger = logging.getLogger(__name__)

PROTOCOL = ("zero-shot; similarity text·(video+audio) (and text·video); rank = 0-based rank of the true "
            "clip, ties pessimistic; R@K = rank < K; median rank = median(rank)+1")


@dataclass
class EvalSetConfig:
    name: str
    kind: str = "captions"  # captions | youcook2 | msrvtt (retrieval); crosstask | mining_youtube (steps)
    videos: str | None = None  # raw videos folder (None: the main workspace's features)
    annotations: str | None = None  # youcook2 JSON / msrvtt CSV or JSON / step annotation folder
    tasks: str | None = None  # crosstask tasks_primary.txt / mining_youtube tasks JSON
    audio_frames: int = 1000  # YouCook2 5120, MSR-VTT 3072 in the paper
    n_total: int | None = None  # queries the protocol counts (MSR-VTT: 1000); None: the clips found
    max_clips: int | None = None


@dataclass
class EvaluateConfig:
    sets: list[EvalSetConfig] = field(default_factory=list)
    run: str = "default"  # training run whose latest checkpoint is evaluated by default
    batch_size: int = 256
    device: str = "auto"
    report_queries: int = 10
    report_clusters: int = 8
    ties: str = "pessimistic"


STEP_KINDS = ("crosstask", "mining_youtube")


def resolve_checkpoint(ws: Workspace, run: str, checkpoint: str | None) -> Path:
    if checkpoint:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    ckpt_dir = ws.run_dir(run) / "checkpoints"
    pointer = ckpt_dir / "latest"
    if pointer.exists():
        path = ckpt_dir / pointer.read_text().strip()
        if path.exists():
            return path
    raise FileNotFoundError(f"no checkpoint given and none in {ckpt_dir}: train first or pass --checkpoint")


def find_set(cfg: EvaluateConfig, name: str) -> EvalSetConfig:
    for s in cfg.sets:
        if s.name == name:
            return s
    if name == "workspace":
        return EvalSetConfig(name="workspace")
    known = ", ".join([s.name for s in cfg.sets] + ["workspace"])
    raise FileNotFoundError(f"unknown evaluation set {name!r}; configured: {known} (evaluate.sets in the config)")


def annotation_captions(spec: EvalSetConfig, out: Path) -> tuple[Path | None, list[str], int | None]:
    """Turn benchmark annotations into a HowTo100M-style caption file for the scan.

    Returns (captions file or None, problems, number of annotated queries).
    """
    if spec.kind in ("captions",) + STEP_KINDS:
        return None, [], None
    from evaluation.annotations import parse_msrvtt_test, parse_youcook2

    if not spec.annotations:
        raise FileNotFoundError(f"evaluation set {spec.name!r} of kind {spec.kind} needs `annotations`")
    if spec.kind == "youcook2":
        ann = parse_youcook2(spec.annotations)
    elif spec.kind == "msrvtt":
        ann = parse_msrvtt_test(spec.annotations)
    else:
        raise ValueError(f"unknown evaluation set kind {spec.kind!r} (captions, youcook2, msrvtt)")
    caps: dict[str, list[dict[str, Any]]] = {}
    for clip in ann.clips:
        start = clip.start if clip.start is not None else 0.0
        end = clip.end if clip.end is not None else 1e9  # whole clip: clipped to the duration by the scan
        caps.setdefault(clip.video_id, []).append({"start": start, "end": end, "text": clip.sentence})
    atomic.write_json(out, caps)
    return out, list(ann.problems), len(ann.clips)


def prepare_set(ws: Workspace, cfg: Any, spec: EvalSetConfig, *, progress: bool) -> tuple[Path, list[str], int | None]:
    """Scan + extract the set's videos into WS/evalsets/<name> (cached); returns its features dir."""
    if spec.videos is None:
        return ws.features_dir, [], spec.n_total
    from pipeline.scan import scan
    from pipeline.stages import run_extract

    set_ws = Workspace(ws.root / "evalsets" / spec.name)
    set_ws.root.mkdir(parents=True, exist_ok=True)
    captions_file, problems, n_annotated = annotation_captions(spec, set_ws.root / "annotations.json")
    scan_cfg = dataclasses.replace(cfg.scan, captions_file=str(captions_file) if captions_file else None)
    result = scan(Path(spec.videos), set_ws, scan_cfg, progress=progress)
    if result.n_ok == 0:
        raise ValueError(f"evaluation set {spec.name!r}: no usable video in {spec.videos}")
    if captions_file is not None:
        scanned = {key for r in iter_manifest(set_ws.manifest) if r.ok
                   for key in (r.id, r.path, str(Path(r.path).with_suffix("")), Path(r.path).stem)}
        annotated = set(json.loads(captions_file.read_text()))
        missing = sorted(annotated - scanned)
        if missing:
            problems.append(f"{len(missing)} annotated video id(s) not found among the videos "
                            f"(e.g. {', '.join(missing[:5])}); their queries count as misses")
    run_extract(set_ws, cfg, progress=progress)
    return set_ws.features_dir, problems, spec.n_total or n_annotated


def evaluate_set(ws: Workspace, cfg: Any, set_name: str, checkpoint: str | None, *,
                 progress: bool = True, eval_name: str | None = None) -> dict[str, Any]:
    """Run one evaluation set end to end and write its outputs; returns the metrics dict."""
    from model.checkpoint import load_mcn

    ecfg: EvaluateConfig = cfg.evaluate
    spec = find_set(ecfg, set_name)
    ckpt = resolve_checkpoint(ws, ecfg.run, checkpoint)
    features_dir, problems, n_total = prepare_set(ws, cfg, spec, progress=progress)
    if spec.kind in STEP_KINDS:
        return localize_set(ws, cfg, spec, ckpt, features_dir, problems, eval_name or spec.name)
    clips = build_clipset(features_dir, ClipSetConfig(audio_frames=spec.audio_frames, max_clips=spec.max_clips))
    problems += clips.problems
    model = load_mcn(ckpt)
    device = resolve_device(ecfg.device)
    emb = embed_clipset(model, clips, batch_size=ecfg.batch_size, device=device)
    n_total = max(n_total or 0, len(clips)) or None
    audio = emb["audio"] if clips.audio_mask.any() else None
    report = retrieval_report(emb["text"], emb["video"], audio=audio, audio_mask=clips.audio_mask,
                              n_total=n_total if n_total and n_total > len(clips) else None, ties=ecfg.ties)
    name = eval_name or spec.name
    out_dir = ws.eval_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "set": spec.name, "kind": spec.kind, "n_queries": len(clips), "n_total": n_total,
        "n_videos": len(set(clips.video_ids)), "checkpoint": str(ckpt), "protocol": PROTOCOL,
        "chance": {f"R@{k}": min(1.0, k / len(clips)) for k in (1, 5, 10)},
        "retrieval": report, "problems": problems,
    }
    atomic.write_json(out_dir / "metrics.json", _jsonable(metrics))
    np.savez(out_dir / "embeddings.npz", video=emb["video"], audio=emb["audio"], text=emb["text"],
             audio_mask=clips.audio_mask, starts=clips.starts, ends=clips.ends,
             video_ids=np.asarray(clips.video_ids))
    from pipeline.config import write_resolved

    write_resolved(out_dir / "config.yaml", cfg.evaluate, set=dataclasses.asdict(spec), checkpoint=str(ckpt))
    try:
        write_eval_report(out_dir, ws, cfg, spec, clips, emb, metrics, ckpt, features_dir)
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
    lines = [f"{'mode':<22}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MedR':>8}{'MeanR':>9}   (n={metrics['n_queries']})"]
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


def write_eval_report(out_dir: Path, ws: Workspace, cfg: Any, spec: EvalSetConfig, clips: ClipSet,
                      emb: dict[str, np.ndarray], metrics: dict[str, Any], ckpt: Path, features_dir: Path) -> Path:
    from evaluation.report import ClipRef, QueryResult, ReportData, write_report

    set_root = features_dir.parent
    paths: dict[str, Path] = {}
    summary = set_root / "scan.json"
    if summary.exists() and (set_root / "manifest.jsonl").exists():
        root = Path(json.loads(summary.read_text())["videos_root"])
        paths = {r.id: root / r.path for r in iter_manifest(set_root / "manifest.jsonl")}

    def ref(i: int, score: float | None = None) -> ClipRef:
        return ClipRef(paths.get(clips.video_ids[i]), clips.video_ids[i], float(clips.starts[i]),
                       float(clips.ends[i]), clips.captions[i], score)

    target = emb["video"] + np.where(clips.audio_mask[:, None], emb["audio"], 0.0)
    n = len(clips)
    picks = np.unique(np.linspace(0, n - 1, min(n, cfg.evaluate.report_queries)).astype(int))
    queries = []
    for q in picks:
        scores = target @ emb["text"][q]
        order = np.argsort(-scores, kind="stable")[:5]
        rank = int(rank_of_true(scores[None, :][:, np.r_[q, np.delete(np.arange(n), q)]])[0])
        queries.append(QueryResult(clips.captions[q], ref(q), [ref(int(i), float(scores[i])) for i in order], rank))
    fused = (emb["video"] + emb["text"] + np.where(clips.audio_mask[:, None], emb["audio"], 0.0)) / np.where(
        clips.audio_mask, 3.0, 2.0)[:, None]
    clusters = {k: [ref(i) for i in idx] for k, idx in
                _clusters(ckpt, fused, 6, cfg.evaluate.report_clusters).items()}
    log = ws.run_dir(cfg.evaluate.run) / "logs" / "train.jsonl"
    data = ReportData(
        title=f"MCN zero-shot evaluation: {spec.name}",
        metrics=metrics["retrieval"], chance=metrics["chance"], queries=queries, clusters=clusters,
        train_log=log if log.exists() else None,
        info={"checkpoint": str(ckpt), "set": spec.name, "kind": spec.kind, "queries": str(n),
              "protocol": PROTOCOL, "problems": "; ".join(metrics["problems"]) or "none"},
    )
    return write_report(out_dir / "report.html", data)


def localize_set(ws: Workspace, cfg: Any, spec: EvalSetConfig, ckpt: Path, features_dir: Path,
                 problems: list[str], name: str) -> dict[str, Any]:
    """Step localization (CrossTask protocol, or Mining YouTube with a log-softmax over steps)."""
    from evaluation.annotations import parse_crosstask_annotations, parse_crosstask_tasks, parse_mining_youtube
    from evaluation.steps import localize
    from model.checkpoint import load_mcn
    from pipeline.ids import video_id
    from pipeline.stages import extract_stage

    if not spec.annotations or not spec.tasks:
        raise FileNotFoundError(f"evaluation set {spec.name!r} ({spec.kind}) needs `annotations` and `tasks`")
    if spec.kind == "crosstask":
        tasks = parse_crosstask_tasks(spec.tasks)
        problems += tasks.problems
        ann = parse_crosstask_annotations(spec.annotations, tasks=tasks.tasks)
    else:
        ann = parse_mining_youtube(spec.tasks, spec.annotations)
    problems += ann.problems
    # Annotation files name videos by file stem (YouTube id); the workspace by our path-derived id.
    ann.segments = {video_id(f"{k}.mp4"): v for k, v in ann.segments.items()}
    ann.task_of = {video_id(f"{k}.mp4"): v for k, v in ann.task_of.items()}
    model = load_mcn(ckpt)
    device = resolve_device(cfg.evaluate.device)
    text = extract_stage(ws, cfg).extractor("text")
    result = localize(model, features_dir, ann, text, mining_youtube=spec.kind == "mining_youtube",
                      batch_size=cfg.evaluate.batch_size, device=device)
    problems += result.pop("problems", [])
    metrics = {"set": spec.name, "kind": spec.kind, "checkpoint": str(ckpt), "localization": result,
               "problems": problems}
    out_dir = ws.eval_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out_dir / "metrics.json", _jsonable(metrics))
    return metrics
