"""`extract`: decode every video once and write the four feature fields as webdataset shards.

Per shard, only the fields that are not done are computed. Visual decoding runs in worker
processes (`extractors.workers.WorkerPool`: spawn, per-video timeout, recycling); one decode feeds
both visual extractors; frames from consecutive videos are batched together through the models.
Audio is decoded by an ffmpeg subprocess into a memory-mapped file; text comes from the scan's
per-shard caption files. Every video of the shard gets a sample in every field, failed ones too.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extractors import FeatureExtractor, create, get_extractor
from extractors.decode import DecodeConfig, DecodeError, NoAudioError, decode_audio, visual_task
from extractors.resnext3d import windows_from_frames
from extractors.workers import WorkerConfig, WorkerPool
from pipeline.configtools import from_dict, to_dict
from pipeline.runner import ShardJob
from store.claims import Claim
from store.fields import FIELDS, VISUAL_FIELDS
from store.layout import Workspace
from store.lineage import RUNTIME, Lineage, config_dict, fingerprint
from store.manifest import VideoRecord, read_captions
from store.shards import SHARD_FORMAT, ShardWriter, encode_json, encode_npy

logger = logging.getLogger(__name__)



@dataclass
class ExtractorSpec:
    """An extractor by registry name plus the fields of its Config."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExtractConfig:
    fields: list[str] = field(default_factory=lambda: list(FIELDS))
    allow_random_weights: bool = False  # visual backbones: seeded random init when no weights file
    video2d: ExtractorSpec = field(default_factory=lambda: ExtractorSpec("resnet152_2d"))
    video3d: ExtractorSpec = field(default_factory=lambda: ExtractorSpec("resnext101_3d"))
    audio: ExtractorSpec = field(default_factory=lambda: ExtractorSpec("logmel"))
    text: ExtractorSpec = field(default_factory=lambda: ExtractorSpec("word2vec"))
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    workers: WorkerConfig = field(default_factory=WorkerConfig, metadata=RUNTIME)
    torch_threads: int = field(default=0, metadata=RUNTIME)  # CPU threads for the models; 0: torch's default


@dataclass
class FieldResult:
    status: str = "ok"  # ok | failed | no_audio | no_captions
    error: str | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class _Batcher:
    """Accumulates rows of many videos and runs `fn` on full batches; outputs go back per video."""

    def __init__(self, fn: Callable[[np.ndarray], torch.Tensor], batch_size: int) -> None:
        self.fn, self.batch_size = fn, max(1, batch_size)
        self.pending: list[tuple[int, np.ndarray]] = []
        self.n_pending = 0
        self.outputs: dict[int, list[np.ndarray]] = {}

    def add(self, video: int, rows: np.ndarray) -> None:
        self.outputs.setdefault(video, [])
        if self.pending and rows.shape[1:] != self.pending[0][1].shape[1:]:
            self.flush()  # frames of another size (aspect ratio) cannot share a batch
        if len(rows):
            self.pending.append((video, rows))
            self.n_pending += len(rows)
        if self.n_pending >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        out = self.fn(np.concatenate([rows for _, rows in self.pending])).numpy()
        start = 0
        for video, rows in self.pending:
            self.outputs[video].append(out[start : start + len(rows)].astype(np.float16))  # stored as float16
            start += len(rows)
        self.pending, self.n_pending = [], 0

    def result(self, video: int, dim: int) -> np.ndarray:
        parts = self.outputs.get(video, [])
        return np.concatenate(parts) if parts else np.zeros((0, dim), np.float16)

    def drop(self, video: int) -> None:
        self.pending = [(v, r) for v, r in self.pending if v != video]
        self.n_pending = sum(len(r) for _, r in self.pending)
        self.outputs.pop(video, None)


class ExtractStage:
    """The extract stage as the runner sees it (see `pipeline.runner.ShardedStage`)."""

    name = "extract"

    def __init__(self, ws: Workspace, cfg: ExtractConfig, videos_root: Path,
                 scratch: Callable[[], Path] | None = None) -> None:
        unknown = sorted(set(cfg.fields) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown extract fields {unknown}; known: {list(FIELDS)}")
        self.ws, self.cfg, self.videos_root = ws, cfg, Path(videos_root)
        self.scratch = scratch or (lambda: ws.scratch_root)
        self.fields = [f for f in FIELDS if f in cfg.fields]
        self._extractors: dict[str, FeatureExtractor] = {}
        self._captions: dict[int, dict] = {}
        self._described: dict[str, dict[str, Any]] = {}
        self._field_fp: dict[str, tuple[str, str]] = {}  # field → (config fingerprint, code version)
        for f in self.fields:
            spec: ExtractorSpec = getattr(cfg, f)
            cls = get_extractor(spec.name)
            if cls.field != f:
                raise ValueError(f"extractor {spec.name!r} produces {cls.field!r} features, not {f!r}")

    # -- extractors -------------------------------------------------------------------------------
    def options(self, f: str) -> dict[str, Any]:
        spec: ExtractorSpec = getattr(self.cfg, f)
        opts = dict(spec.options)
        cls = get_extractor(spec.name)
        names = {x.name for x in dataclasses.fields(cls.Config)}
        if "allow_random_weights" in names and self.cfg.allow_random_weights:
            opts.setdefault("allow_random_weights", True)
        return opts

    def extractor(self, f: str) -> FeatureExtractor:
        if f not in self._extractors:
            spec: ExtractorSpec = getattr(self.cfg, f)
            self._extractors[f] = create(spec.name, self.options(f))
            logger.info("extract: %s → %r", f, self._extractors[f])
        return self._extractors[f]

    def describe(self, f: str) -> dict[str, Any]:
        """Extractor name, version, weights identity, rate and dim; cheap (nothing is loaded)."""
        if f in self._extractors:
            return self._extractors[f].describe()
        if f not in self._described:
            spec: ExtractorSpec = getattr(self.cfg, f)
            cls = get_extractor(spec.name)
            self._described[f] = cls.describe_config(from_dict(cls.Config, to_dict(self.options(f))))
        return self._described[f]

    # -- caching ----------------------------------------------------------------------------------
    def captions(self, shard: int) -> dict:
        if shard not in self._captions:
            self._captions[shard] = read_captions(self.ws.captions(shard))
        return self._captions[shard]

    def field_config(self, f: str) -> dict[str, Any]:
        """What determines a field's output besides its inputs: the extractor (weights included, version
        aside), its result-determining options and the decoding settings the field depends on."""
        spec: ExtractorSpec = getattr(self.cfg, f)
        cls = get_extractor(spec.name)
        desc = {k: v for k, v in self.describe(f).items() if k != "version"}
        options = config_dict(from_dict(cls.Config, to_dict(self.options(f))))
        decode = config_dict(self.cfg.decode)
        if f in VISUAL_FIELDS:
            decode.pop("audio_rate", None)
        elif f == "audio":
            decode = {"audio_rate": decode["audio_rate"]}
        else:
            decode = {}
        return {"field": f, "extractor": desc, "options": options, "decode": decode}

    def lineage(self, f: str, job: ShardJob) -> Lineage:
        """Config, code (extractor version and shard format) and inputs (the shard's videos, and for
        text its captions, as fingerprints from the scan's plan) of one field of one shard."""
        inputs = {"videos": job.planned.videos}
        if f == "text":
            inputs["captions"] = job.planned.captions
        if f not in self._field_fp:
            desc = self.describe(f)
            self._field_fp[f] = (fingerprint(self.field_config(f)),
                                 f"{desc['extractor']}-{desc['version']}/{SHARD_FORMAT}")
        config, code = self._field_fp[f]
        return Lineage(config=config, code=code, inputs=inputs)

    # -- work ---------------------------------------------------------------------------------------
    def process(self, job: ShardJob, claims: dict[str, Claim]) -> None:
        fields = list(claims)
        if self.cfg.torch_threads > 0:
            torch.set_num_threads(self.cfg.torch_threads)
        results: dict[str, dict[str, FieldResult]] = {f: {} for f in fields}
        for r in job.records:
            if not r.ok:
                for f in fields:
                    results[f][r.id] = FieldResult("failed", f"scan: {r.error}")
        todo = [r for r in job.records if r.ok]
        visual = [f for f in fields if f in ("video2d", "video3d")]
        if visual and todo:
            self._visual(todo, visual, results)
        if "audio" in fields:
            self._audio(job, todo, results["audio"])
        if "text" in fields:
            self._text(job, todo, results["text"])
        for f in fields:
            self._write(job, f, results[f], claims[f])

    def _visual(self, records: list[VideoRecord], fields: list[str], results: dict[str, dict[str, FieldResult]]) -> None:
        window = 16
        batchers: dict[str, _Batcher] = {}
        if "video2d" in fields:
            ex2 = self.extractor("video2d")
            batchers["video2d"] = _Batcher(ex2, ex2.config.batch_size)
        if "video3d" in fields:
            ex3 = self.extractor("video3d")
            batchers["video3d"] = _Batcher(ex3, ex3.config.batch_size)
        carry: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        tasks = [(str(self.videos_root / r.path), self.cfg.decode) for r in records]
        with WorkerPool(visual_task, self.cfg.workers) as pool:
            for ev in pool.run(tasks):
                i = ev.task_index
                if ev.kind == "item":
                    chunk = ev.payload
                    if "video2d" in batchers:
                        batchers["video2d"].add(i, chunk.frames_2d)
                    if "video3d" in batchers:
                        frames = chunk.frames_3d
                        if i in carry:
                            frames = np.concatenate([carry.pop(i), frames])
                        n_full = len(frames) // window * window
                        if n_full < len(frames):
                            carry[i] = frames[n_full:]
                        batchers["video3d"].add(i, windows_from_frames(frames[:n_full], window))
                elif ev.kind == "error":
                    errors[i] = str(ev.payload)
                    carry.pop(i, None)
                    for b in batchers.values():
                        b.drop(i)
                    logger.warning("extract: %s: %s", records[i].path, ev.payload)
        for b in batchers.values():
            b.flush()
        for f, b in batchers.items():
            dim = self.extractor(f).dim
            for i, r in enumerate(records):
                if i in errors:
                    results[f][r.id] = FieldResult("failed", f"decode: {errors[i]}")
                else:
                    results[f][r.id] = FieldResult(arrays={"feat.npy": b.result(i, dim)})

    def _audio(self, job: ShardJob, records: list[VideoRecord], out: dict[str, FieldResult]) -> None:
        ex = self.extractor("audio")
        scratch = self.scratch() / f"audio-{job.index:06d}"
        try:
            for r in records:
                if not r.has_audio:
                    out[r.id] = FieldResult("no_audio", "no audio stream")
                    continue
                try:
                    wave = decode_audio(self.videos_root / r.path, self.cfg.decode, scratch)
                except NoAudioError as exc:
                    out[r.id] = FieldResult("no_audio", str(exc))
                    continue
                except DecodeError as exc:
                    out[r.id] = FieldResult("failed", f"audio decode: {exc}")
                    logger.warning("extract: %s: audio: %s", r.path, exc)
                    continue
                try:
                    feats = ex(wave)
                finally:
                    name = getattr(wave, "filename", None)
                    del wave
                    if name:
                        Path(name).unlink(missing_ok=True)
                out[r.id] = FieldResult(arrays={"feat.npy": np.asarray(feats, dtype=np.float16)})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _text(self, job: ShardJob, records: list[VideoRecord], out: dict[str, FieldResult]) -> None:
        caps = self.captions(job.index)
        with_text = [r for r in records if caps.get(r.id)]
        for r in records:
            if not caps.get(r.id):
                out[r.id] = FieldResult("no_captions", "no captions")
        if not with_text:
            return
        ex = self.extractor("text")
        for r in with_text:
            items = caps[r.id]
            words, lengths = ex([c.text for c in items])
            out[r.id] = FieldResult(
                arrays={"words.npy": np.asarray(words, np.float16), "lengths.npy": np.asarray(lengths, np.int32)},
                meta={"captions": [dataclasses.asdict(c) for c in items]},
            )

    def _write(self, job: ShardJob, f: str, results: dict[str, FieldResult], claim: Claim) -> None:
        desc = self.describe(f)
        writer = ShardWriter(self.ws, f, job.index, self.lineage(f, job), desc, claim=claim)
        try:
            for r in job.records:
                res = results[r.id]
                main = next(iter(res.arrays.values()), None)
                meta = {
                    "id": r.id, "field": f, "status": res.status, "error": res.error, **desc,
                    "dtype": str(main.dtype) if main is not None else None,
                    "shape": list(main.shape) if main is not None else None,
                    "duration": r.duration, **res.meta,
                }
                members = {"json": encode_json(meta)}
                members.update({name: encode_npy(a) for name, a in res.arrays.items()})
                writer.add(r.id, members, status=res.status, error=res.error)
        except BaseException:
            writer.abort()
            raise
        writer.commit()
