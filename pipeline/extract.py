"""`extract`: decode every video once and write the four feature fields as webdataset shards.

Per shard, only the fields that are not done are computed. Visual decoding runs in worker
processes (`extractors.workers.WorkerPool`: spawn, per-video timeout, recycling), kept from one shard
to the next for the whole run (`ExtractStage.close` stops them); one decode feeds
both visual extractors; frames from consecutive videos are batched together through the models.
Audio is decoded by an ffmpeg subprocess into a memory-mapped file; text comes from the scan's
per-shard caption files; both run in a thread beside the visual pass (``ExtractStage._side``).
Every video of the shard gets a sample in every field, failed ones too.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extractors import FeatureExtractor, create, get_extractor
from extractors.decode import (
    DecodeConfig,
    DecodeError,
    DecodeTimeout,
    NoAudioError,
    audio_identity,
    decode_audio,
    visual_task,
)
from extractors.resnext3d import windows_from_frames
from extractors.workers import WorkerConfig, WorkerPool
from pipeline.configtools import from_dict, to_dict
from pipeline.runner import ShardJob
from store.claims import Claim
from store.fields import FIELDS, VISUAL_FIELDS
from store.layout import Workspace
from store.lineage import RUNTIME, Lineage, config_dict, fingerprint
from store.manifest import VideoRecord, read_captions
from store.reader import decode_member, iter_raw
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
    transient: bool = False  # a failure --retry-failed redoes: timeout, crashed worker, out of memory


def failure(where: str, exc: BaseException) -> FieldResult:
    """The failed result of one video: ``"<where>: <Type>: <first line>"``; out of memory is transient."""
    text = " ".join(str(exc).split())[:300]
    oom = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower()
    if oom:
        return FieldResult("failed", f"{where}: out of memory ({text})", transient=True)
    plain = isinstance(exc, (ValueError, RuntimeError, ArithmeticError, OSError)) and text
    return FieldResult("failed", f"{where}: {text}" if plain else f"{where}: {type(exc).__name__}: {text}")


def _finite_rows(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).all())


class _Batcher:
    """Accumulates rows of many videos and runs ``fn`` on full batches; outputs go back per video.

    A batch that raises is run again video by video, so that one video's failure (a model error, out
    of memory, non-finite features) costs that video only: it lands in ``failed``.
    """

    def __init__(self, fn: Callable[[np.ndarray], torch.Tensor], batch_size: int, where: str) -> None:
        self.fn, self.batch_size, self.where = fn, max(1, batch_size), where
        self.pending: list[tuple[int, np.ndarray]] = []
        self.n_pending = 0
        self.outputs: dict[int, list[np.ndarray]] = {}
        self.failed: dict[int, FieldResult] = {}

    def add(self, video: int, rows: np.ndarray) -> None:
        if video in self.failed:
            return
        self.outputs.setdefault(video, [])
        if self.pending and rows.shape[1:] != self.pending[0][1].shape[1:]:
            self.flush()  # frames of another size (aspect ratio) cannot share a batch
        if len(rows):
            self.pending.append((video, rows))
            self.n_pending += len(rows)
        if self.n_pending >= self.batch_size:
            self.flush()

    def _run(self, rows: np.ndarray) -> np.ndarray:
        out = self.fn(rows).numpy()
        if not _finite_rows(out):
            raise FloatingPointError("the model produced non-finite features")
        return out.astype(np.float16)  # stored as float16

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending, self.n_pending = self.pending, [], 0
        try:
            out = self._run(np.concatenate([rows for _, rows in pending]))
        except Exception:  # noqa: BLE001 - contained: find the video(s) it came from
            if len(pending) == 1:
                out = None
            else:
                for video, rows in pending:
                    self._one(video, rows)
                return
        if out is None:
            self._one(*pending[0])
            return
        start = 0
        for video, rows in pending:
            self.outputs[video].append(out[start : start + len(rows)])
            start += len(rows)

    def _one(self, video: int, rows: np.ndarray) -> None:
        if video in self.failed:
            return
        try:
            self.outputs[video].append(self._run(rows))
        except Exception as exc:  # noqa: BLE001 - this video's failure, recorded
            self.failed[video] = failure(self.where, exc)
            self.outputs.pop(video, None)
            logger.warning("extract: video #%d: %s", video, self.failed[video].error)

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
        self._pool: WorkerPool | None = None  # the decode workers, kept from shard to shard (close())
        for f in self.fields:
            spec: ExtractorSpec = getattr(cfg, f)
            cls = get_extractor(spec.name)
            if cls.field != f:
                raise ValueError(f"extractor {spec.name!r} produces {cls.field!r} features, not {f!r}")

    def close(self) -> None:
        """Stop the decode workers (they are kept from one shard to the next). The stage stays usable:
        a later shard starts new ones."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def __enter__(self) -> ExtractStage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
            decode = audio_identity(self.cfg.decode)  # the rate, and the tool when it is PyAV
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
    def process(self, job: ShardJob, claims: dict[str, Claim], retry: dict[str, set[str]] | None = None) -> None:
        """Write the shard of every field in ``claims``. ``retry`` (field → video ids): for these fields
        redo only these videos and keep every other sample of the existing shard byte for byte.

        Every failure of one video (decoding, a model, non-finite values, a timeout) becomes that
        video's ``failed`` sample with a one-line reason; the shard is written all the same."""
        fields = list(claims)
        if self.cfg.torch_threads > 0:
            torch.set_num_threads(self.cfg.torch_threads)
        wanted = {f: (set(retry[f]) if retry is not None and f in retry else None) for f in fields}
        results: dict[str, dict[str, FieldResult]] = {f: {} for f in fields}
        for r in job.records:
            if not r.ok:
                for f in fields:
                    if wanted[f] is None or r.id in wanted[f]:
                        results[f][r.id] = FieldResult("failed", f"scan: {r.error}")

        def todo(f: str) -> list[VideoRecord]:
            return [r for r in job.records if r.ok and (wanted[f] is None or r.id in wanted[f])]

        visual = {f: todo(f) for f in fields if f in VISUAL_FIELDS}
        side = {f: todo(f) for f in fields if f not in VISUAL_FIELDS}
        stop = threading.Event()

        def run_side() -> None:  # audio and text: beside the visual pass (see _side)
            self._side(job, side, results, stop)

        if not any(visual.values()):
            run_side()
        else:
            wanted_ids = {r.id for rs in visual.values() for r in rs}
            with ThreadPoolExecutor(1, thread_name_prefix="extract-side") as beside:
                pending: list[Future[None]] = []

                def models_ready() -> None:
                    # not before: building a visual model traces it with torch.fx, which patches torch
                    # globally for the time of the trace (extractors.fold)
                    if side:
                        pending.append(beside.submit(run_side))

                try:
                    self._visual([r for r in job.records if r.id in wanted_ids], visual, results, models_ready)
                except BaseException:
                    stop.set()  # the shard is abandoned: the side thread stops before its next video
                    raise  # (leaving the executor waits for it)
                for done in pending:
                    done.result()  # an exception of the side thread is the shard's
        for f in fields:
            self._write(job, f, results[f], claims[f], keep_others=wanted[f] is not None)

    def _visual(self, records: list[VideoRecord], todo: dict[str, list[VideoRecord]],
                results: dict[str, dict[str, FieldResult]], models_ready: Callable[[], None] = lambda: None) -> None:
        """One decode per video (``records``, in shard order) feeds the visual fields that want it
        (``todo``: field → its videos). ``models_ready`` is called once the visual models are built."""
        window = 16
        wants = {f: {r.id for r in rs} for f, rs in todo.items()}
        carry: dict[int, np.ndarray] = {}
        errors: dict[int, FieldResult] = {}
        warnings: dict[int, list[str]] = {}
        tasks = [(str(self.videos_root / r.path), self.cfg.decode) for r in records]
        if self._pool is None:
            self._pool = WorkerPool(visual_task, self.cfg.workers)
        pool = self._pool
        pool.start(len(tasks))  # a first worker starts (imports torch) while the models are built
        batchers: dict[str, _Batcher] = {}
        for f in todo:
            ex = self.extractor(f)
            batchers[f] = _Batcher(ex, ex.config.batch_size, f"{f} model")
        models_ready()
        with closing(pool.run(tasks)) as events:  # ended early, its workers stop (WorkerPool.run)
            for ev in events:
                i = ev.task_index
                vid = records[i].id
                if ev.kind == "item":
                    chunk = ev.payload
                    if chunk.warnings:
                        warnings.setdefault(i, []).extend(chunk.warnings)
                    if "video2d" in batchers and vid in wants["video2d"]:
                        batchers["video2d"].add(i, chunk.frames_2d)
                    if "video3d" in batchers and vid in wants["video3d"]:
                        frames = chunk.frames_3d
                        if i in carry:
                            frames = np.concatenate([carry.pop(i), frames])
                        n_full = len(frames) // window * window
                        if n_full < len(frames):
                            carry[i] = frames[n_full:]
                        batchers["video3d"].add(i, windows_from_frames(frames[:n_full], window))
                elif ev.kind == "done" and i in carry:  # the video's last incomplete 3D window
                    tail = carry.pop(i)
                    if getattr(self.extractor("video3d").config, "pad_tail", False):
                        batchers["video3d"].add(i, windows_from_frames(tail, window, pad_tail=True))
                elif ev.kind == "error":
                    errors[i] = FieldResult("failed", f"decode: {ev.payload}", transient=ev.transient)
                    carry.pop(i, None)
                    for b in batchers.values():
                        b.drop(i)
                    logger.warning("extract: %s: %s", records[i].path, ev.payload)
        for b in batchers.values():
            b.flush()
        for f, b in batchers.items():
            dim = self.extractor(f).dim
            for i, r in enumerate(records):
                if r.id not in wants[f]:
                    continue
                if i in errors:
                    results[f][r.id] = errors[i]
                elif i in b.failed:
                    results[f][r.id] = b.failed[i]
                else:
                    meta = {"warnings": warnings[i]} if warnings.get(i) else {}
                    results[f][r.id] = FieldResult(arrays={"feat.npy": b.result(i, dim)}, meta=meta)

    def _side(self, job: ShardJob, todo: dict[str, list[VideoRecord]], results: dict[str, dict[str, FieldResult]],
              stop: threading.Event) -> None:
        """The audio and text fields of ``todo`` (field → its videos), in a thread beside the visual pass.

        The visual backbones keep the cores busy, but not all the time: while the first chunks are
        decoded, between batches and while the models are built. The audio decode (an ffmpeg process),
        the log-mel, the text model's build and its forward fit in those gaps instead of running after
        the visual pass. torch releases the GIL in its kernels, so the two threads overlap; the
        features do not depend on it (each model runs its ops in its own thread, with the same
        intra-op thread count). ``stop``: the shard is abandoned, return before the next video.
        """
        if "audio" in todo:
            self._audio(job, todo["audio"], results["audio"], stop)
        if "text" in todo and not stop.is_set():
            self._text(job, todo["text"], results["text"], stop)

    def _audio(self, job: ShardJob, records: list[VideoRecord], out: dict[str, FieldResult],
               stop: threading.Event) -> None:
        if not records:
            return
        ex = self.extractor("audio")
        scratch = self.scratch() / f"audio-{job.index:06d}"
        try:
            for r in records:
                if stop.is_set():
                    return
                out[r.id] = self._audio_one(ex, r, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _audio_one(self, ex: FeatureExtractor, r: VideoRecord, scratch: Path) -> FieldResult:
        if not r.has_audio:
            return FieldResult("no_audio", "no audio stream")
        try:
            wave = decode_audio(self.videos_root / r.path, self.cfg.decode, scratch)
        except NoAudioError as exc:
            return FieldResult("no_audio", str(exc))
        except DecodeError as exc:
            logger.warning("extract: %s: audio: %s", r.path, exc)
            return FieldResult("failed", f"audio decode: {exc}", transient=isinstance(exc, DecodeTimeout))
        name = getattr(wave, "filename", None)
        try:
            feats = np.asarray(ex(wave), dtype=np.float16)
            if not _finite_rows(feats):
                raise FloatingPointError("log-mel features are not finite")
        except Exception as exc:  # noqa: BLE001 - this video's failure, recorded
            res = failure("audio", exc)
            logger.warning("extract: %s: %s", r.path, res.error)
            return res
        finally:
            del wave
            if name:
                Path(name).unlink(missing_ok=True)
        return FieldResult(arrays={"feat.npy": feats})

    def _text(self, job: ShardJob, records: list[VideoRecord], out: dict[str, FieldResult],
              stop: threading.Event) -> None:
        caps = self.captions(job.index)
        with_text = [r for r in records if caps.get(r.id)]
        for r in records:
            if not caps.get(r.id):
                out[r.id] = FieldResult("no_captions", "no captions")
        if not with_text:
            return
        ex = self.extractor("text")
        for r in with_text:
            if stop.is_set():
                return
            items = caps[r.id]
            try:
                words, lengths = ex([c.text for c in items])
                words, lengths = np.asarray(words, np.float16), np.asarray(lengths, np.int32)
                if not _finite_rows(words):
                    raise FloatingPointError("word vectors are not finite")
            except Exception as exc:  # noqa: BLE001 - this video's failure, recorded
                out[r.id] = failure("text", exc)
                logger.warning("extract: %s: %s", r.path, out[r.id].error)
                continue
            out[r.id] = FieldResult(arrays={"words.npy": words, "lengths.npy": lengths},
                                    meta={"captions": [dataclasses.asdict(c) for c in items]})

    def _write(self, job: ShardJob, f: str, results: dict[str, FieldResult], claim: Claim, *,
               keep_others: bool = False) -> None:
        """Write the field's shard: a sample per video in manifest order. ``keep_others``: the videos
        without a result keep their sample of the existing shard, copied byte for byte."""
        desc = self.describe(f)
        existing = iter_raw(self.ws.shard_tar(f, job.index)) if keep_others else None
        writer = ShardWriter(self.ws, f, job.index, self.lineage(f, job), desc, claim=claim,
                             decoder=self.cfg.decode.backend)
        try:  # (the old tar is read while the new one is written; the commit renames over it)
            for r in job.records:
                old = next(existing) if existing is not None else None
                if r.id not in results:
                    if old is None or old.get("__key__") != r.id:
                        raise ValueError(f"shard {job.index:06d} of {f} does not hold {r.id} where expected: "
                                         "redo it (mcn extract --force)")
                    meta = decode_member("json", old["json"])
                    members = {k: v for k, v in old.items() if not k.startswith("__")}
                    writer.add(r.id, members, status=meta.get("status", "failed"), error=meta.get("error"),
                               transient=bool(meta.get("transient")))
                    continue
                res = results[r.id]
                main = next(iter(res.arrays.values()), None)
                meta = {
                    "id": r.id, "field": f, "status": res.status, "error": res.error, **desc,
                    "dtype": str(main.dtype) if main is not None else None,
                    "shape": list(main.shape) if main is not None else None,
                    "duration": r.duration, **res.meta,
                }
                if res.transient:
                    meta["transient"] = True
                members = {"json": encode_json(meta)}
                members.update({name: encode_npy(a) for name, a in res.arrays.items()})
                writer.add(r.id, members, status=res.status, error=res.error, transient=res.transient)
        except BaseException:
            writer.abort()
            raise
        finally:
            if existing is not None:
                existing.close()
        writer.commit()
