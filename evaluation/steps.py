"""Zero-shot step localization of a trained MCN on a workspace's feature shards (SPEC §6).

CrossTask protocol, per annotated video whose features are in the shards:

1. **One input per second.** ``t = 0 .. T-1`` with ``T`` = the number of 2D rows (1 row/s). The video
   vector of second ``t`` is ``2D row t ‖ 3D rows of that second``, each part L2-normalised as in
   training (:func:`model.data.pool_video`): the 3D part max-pools the rows whose time span
   ``[i/fps3, (i+1)/fps3)`` meets ``[t, t+1)``, i.e. ``pool_video(rows3d, t, t + 1 - 1e-6, fps3)`` =
   rows ``int(fps3·t) .. int(fps3·(t+1) - ε)`` (1.5 rows/s: seconds 0, 1, 2, 3 get rows {0,1}, {1,2},
   {3,4}, {4,5}). A second beyond the last 3D row takes the last 3D row (3D extraction can end up to
   one window before the 2D one); a video without any 3D row is not usable.
   The audio of second ``t`` is the log-mel window of ``w = StepsConfig.audio_window_s`` seconds
   around ``t`` (the time of its 2D frame), as the reference's CrossTask loader: ``[t - w/2, t + w/2]``
   *shifted*, not cut, to lie inside the video ``[0, T]``: it starts at
   ``min(max(t - w/2, 0), max(T - w, 0))`` and lasts ``w`` (8 s at 100 frames/s: 800 frames, the
   first 800 for seconds 0..4, the last 800 of ``[0, T]`` for the last 4 seconds). Its frames
   (:func:`model.data.crop_audio`) are zero-padded to ``StepsConfig.audio_frames`` (1024) frames;
   ``nframes`` = the frames really there (fewer only where the audio ends before the window does).
2. **Embeddings** with ``model.embed_video`` / ``model.embed_audio`` (eval mode), in batches. The step
   texts of the video's task go through the text extractor (made by :func:`step_text_extractor` to
   keep ``StepsConfig.max_words`` = 30 words, the reference's, where captions keep 20), cut to that
   many words, and ``model.embed_text``, once per task.
3. **Scores** ``(T, S)``: ``text · (video + audio)`` (dot products, no normalisation, as retrieval).
   The audio term is dropped for a whole video whose audio status is ``no_audio`` and for the seconds
   whose window holds no audio frame (audio shorter than the video).
4. **Placement** by :func:`evaluation.localization.ordered_step_assignment`: each step once, in the
   task's order, at strictly increasing seconds. Mining YouTube (``mining_youtube=True``): log-softmax
   over the steps at each second first.
5. **Recall** by :func:`evaluation.localization.crosstask_recall`: per video, then per task, then over
   tasks. Mining YouTube passes ``task_of=None`` (a plain mean over videos, as the reference did).

Steps without any known word (the extractor returns length 0) are never embedded as a zero vector:
they are left out of the placement (the other steps are placed in order among themselves, and for
Mining YouTube the log-softmax runs over the known steps only), their predicted second is ``-1`` and
an annotated one counts as a miss; each such step is named once in ``problems``.

Annotated videos without usable features (absent from the shards, or failed / corrupted visual
features) are counted in ``n_missing_features``, named in ``problems`` and left out of the recall (the
reference evaluated the videos it had features for). Videos of a task without a step list likewise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evaluation.annotations import StepAnnotations
from evaluation.localization import crosstask_recall, ordered_step_assignment
from evaluation.scoring import clip_scores
from extractors import create
from model.data import crop_audio, empty_counts, pool_video
from store.fields import OK, visual_unusable_reason
from store.reader import CorruptMember, FeatureSet, decode_member, zip_shard

logger = logging.getLogger(__name__)

__all__ = [
    "PROTOCOL",
    "SecondInputs",
    "StepsConfig",
    "TaskSteps",
    "audio_windows",
    "embed_seconds",
    "embed_task_steps",
    "localize",
    "per_second_video",
    "step_scores",
    "step_text_extractor",
    "window_start",
]

TextExtractor = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]

PROTOCOL = (
    "zero-shot; per second t: video = L2(2D row t) ‖ L2(max of the 3D rows meeting [t, t+1)), audio = "
    "log-mel window of {window:g} s around t, shifted inside the video, zero-padded to {frames} frames; "
    "step texts keep up to {words} words; score = text·(video+audio) (audio term dropped without audio); "
    "{softmax}steps placed once each, in order, by DP; recall = placed second inside a ground-truth "
    "interval, averaged per video, {average}"
)
_MAX_LISTED = 10
_EPS = 1e-6


@dataclass
class StepsConfig:
    """Inputs of the step-localization protocol (SPEC §6), as the reference's CrossTask loader made them.

    audio_window_s: seconds of audio scored with each second ``t``: ``[t - w/2, t + w/2]`` shifted
        inside the video (module docstring); 8 in the paper.
    audio_frames: length of the model's audio input in log-mel frames: each window's frames (800 at
        100 frames/s) zero-padded to it (the reference: 1024). A longer window is cut to it.
    max_words: words kept per step text (the reference: 30; training and retrieval captions keep 20,
        ``extract.text.options.max_words``).
    """

    audio_window_s: float = 8.0
    audio_frames: int = 1024
    max_words: int = 30

    def __post_init__(self) -> None:
        if not self.audio_window_s > 0 or self.audio_frames < 1 or self.max_words < 1:
            raise ValueError(f"steps config needs audio_window_s > 0, audio_frames >= 1 and max_words >= 1, "
                             f"got {self.audio_window_s}, {self.audio_frames}, {self.max_words}")


@dataclass
class SecondInputs:
    """Model inputs of one video, one row per second.

    video (T, D2+D3) float32; mel (Ta, n_mels) log-mel frames or None (no audio).
    """

    key: str
    video: np.ndarray
    mel: np.ndarray | None


@dataclass
class TaskSteps:
    """Embedded step texts of one task. emb (S_known, D) float32 rows of the known steps;
    known (S,) bool; names (S,) the step texts."""

    names: tuple[str, ...]
    emb: np.ndarray
    known: np.ndarray


# --------------------------------------------------------------------------------------------------
# Per-second inputs


def per_second_video(video2d: np.ndarray, video3d: np.ndarray, fps_3d: float) -> np.ndarray:
    """One video vector per second: (T2, D2), (T3, D3) → (T2, D2 + D3) float32, T2 ≥ 0, T3 ≥ 1.

    Row ``t`` = ``pool_video(video2d, t, t + 1 - 1e-6, 1)`` (= L2(2D row t)) ‖
    ``pool_video(video3d, t, t + 1 - 1e-6, fps_3d)`` (L2 of the max over the 3D rows whose span meets
    ``[t, t+1)``); a second past the last 3D row uses the last 3D row.
    """
    if video3d.shape[0] == 0:
        raise ValueError("video3d has no row")
    t_len, d2 = video2d.shape
    out = np.zeros((t_len, d2 + video3d.shape[1]), dtype=np.float32)
    last3 = video3d.shape[0] - 1
    for t in range(t_len):
        end = t + 1 - _EPS
        out[t, :d2] = pool_video(video2d, t, end, 1.0)
        if int(t * fps_3d) <= last3:
            out[t, d2:] = pool_video(video3d, t, end, fps_3d)
        else:
            out[t, d2:] = pool_video(video3d[last3:], 0.0, 0.0, 1.0)
    return out


def window_start(t: float, window_s: float, duration_s: float) -> float:
    """Start (seconds) of the audio window of second ``t`` in a video of ``duration_s`` seconds:
    ``[t - w/2, t + w/2]`` shifted right to start at 0, or left to end at ``duration_s``, keeping its
    length ``w`` (a video shorter than ``w`` gets ``[0, w]`` for every second)."""
    return min(max(float(t) - window_s / 2, 0.0), max(float(duration_s) - window_s, 0.0))


def audio_windows(mel: np.ndarray, seconds: np.ndarray, duration_s: float, rate: float,
                  cfg: StepsConfig) -> tuple[np.ndarray, np.ndarray]:
    """The audio window of each second, shifted inside ``[0, duration_s]`` (:func:`window_start`).

    mel (Ta, n_mels) log-mel frames at ``rate`` frames/s, seconds (B,) ints, duration_s = T (the
    video's seconds) → ((B, n_mels, cfg.audio_frames) float16 zero-padded, (B,) int64 frames really
    present): window ``[s, s + w]`` = frames ``int(s·rate) : int((s + w)·rate)`` (``crop_audio``).
    """
    out = np.zeros((len(seconds), mel.shape[1], cfg.audio_frames), dtype=np.float16)
    nframes = np.zeros(len(seconds), dtype=np.int64)
    for i, t in enumerate(seconds):
        start = window_start(t, cfg.audio_window_s, duration_s)
        out[i], nframes[i] = crop_audio(mel, start, start + cfg.audio_window_s, rate, cfg.audio_frames)
    return out, nframes


# --------------------------------------------------------------------------------------------------
# Embedding


def _batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def embed_seconds(model: torch.nn.Module, inputs: SecondInputs, *, cfg: StepsConfig | None = None,
                  audio_rate: float, batch_size: int = 256,
                  device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Per-second embeddings of one video (the audio windows of :func:`audio_windows` within the
    video's ``T`` seconds, ``T`` = its 2D rows).

    Returns video (T, D) float32, audio (T, D) float32 or None (no audio), audio_mask (T,) bool (True
    where the second's window holds at least one audio frame; its audio row is meaningless otherwise).
    """
    cfg = cfg or StepsConfig()
    device = torch.device(device)
    t_len = inputs.video.shape[0]
    video = [model.embed_video(torch.from_numpy(inputs.video[sl]).to(device)).float().cpu().numpy()
             for sl in _batches(t_len, batch_size)]
    v = np.concatenate(video) if video else np.zeros((0, model.config.embed_dim), np.float32)
    mask = np.zeros(t_len, dtype=bool)
    if inputs.mel is None:
        return v, None, mask
    audio = []
    for sl in _batches(t_len, batch_size):
        mel, nframes = audio_windows(inputs.mel, np.arange(sl.start, sl.stop), t_len, audio_rate, cfg)
        mask[sl] = nframes > 0
        a = model.embed_audio(torch.from_numpy(mel).float().to(device),
                              torch.from_numpy(nframes).clamp(min=1).to(device))
        audio.append(a.float().cpu().numpy())
    return v, np.concatenate(audio), mask


def step_text_extractor(name: str, options: Mapping[str, Any], cfg: StepsConfig) -> TextExtractor:
    """The text extractor ``name`` (registry of :mod:`extractors`) with the caption ``options`` the
    model was trained with, except that it keeps ``cfg.max_words`` words per text (step texts)."""
    return create(name, {**options, "max_words": cfg.max_words})


def embed_task_steps(model: torch.nn.Module, text_extractor: TextExtractor, steps: tuple[str, ...], *,
                     max_words: int = StepsConfig.max_words, device: torch.device | str = "cpu") -> TaskSteps:
    """Embed the step texts of one task, each cut to its first ``max_words`` words (the extractor's
    rows ``words[:, :max_words]``); steps with no known word are marked unknown (not embedded)."""
    words, lengths = text_extractor(list(steps))
    words = np.asarray(words)
    lengths = np.asarray(lengths).reshape(-1)
    if words.ndim != 3 or words.shape[0] != len(steps) or lengths.shape[0] != len(steps):
        raise ValueError(f"text extractor returned words {words.shape} and lengths {lengths.shape} "
                         f"for {len(steps)} texts (expected (N, W, D) and (N,))")
    if words.shape[1] < max_words:
        logger.warning("the text extractor keeps %d words per text, fewer than the %d of the step protocol "
                       "(make it with step_text_extractor)", words.shape[1], max_words)
    words, lengths = words[:, :max_words], np.minimum(lengths, max_words)
    if words.shape[2] != model.config.text_dim:
        raise ValueError(f"text extractor gives {words.shape[2]}-d word vectors, the model expects "
                         f"{model.config.text_dim}-d (text_dim): use the extractor it was trained with")
    known = lengths > 0
    emb = np.zeros((0, model.config.embed_dim), dtype=np.float32)
    if known.any():
        t = torch.from_numpy(words[known].astype(np.float32)).to(torch.device(device))
        emb = model.embed_text(t).float().cpu().numpy()
    return TaskSteps(names=tuple(steps), emb=emb, known=known)


def step_scores(video: np.ndarray, audio: np.ndarray | None, audio_mask: np.ndarray,
                text: np.ndarray) -> np.ndarray:
    """(T, D), (T, D) or None, (T,) bool, (S, D) → (T, S) float64 ``text · (video + audio)``,
    the audio term only where ``audio_mask`` (:func:`evaluation.scoring.clip_scores`)."""
    return clip_scores(text, video, audio, audio_mask).T


# --------------------------------------------------------------------------------------------------
# Reading the shards


def _npy(data: bytes) -> np.ndarray:
    a = decode_member("feat.npy", data)
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype.kind not in "fiu":
        raise ValueError("not a 2-D numeric array")
    return a


def _decode_visual(key: str, raw: dict[str, dict[str, Any]], rates: dict[str, float], video_dim: int,
                   n_mels: int) -> tuple[SecondInputs | None, str | None]:
    """Per-second inputs of one zipped sample (text is not needed: ``no_captions`` is fine).

    Returns (inputs, None), or (None, reason) when the visual features are unusable. Raises
    ValueError when the feature sizes do not fit the model (a configuration error, not a bad video).
    """
    try:
        meta = {f: decode_member("json", raw[f]["json"]) for f in ("video2d", "video3d", "audio")}
        why = visual_unusable_reason({f: m.get("status") for f, m in meta.items()})
        if why is not None:
            return None, why
        for f, m in meta.items():
            if m.get("status") == OK and m.get("rate") is not None and float(m["rate"]) != rates[f]:
                return None, f"corrupted sample ({f} says {m['rate']} rows/s, its shard's record {rates[f]})"
        v2, v3 = _npy(raw["video2d"]["feat.npy"]), _npy(raw["video3d"]["feat.npy"])
        mel = _npy(raw["audio"]["feat.npy"]) if meta["audio"].get("status") == OK else None
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, EOFError, OSError, CorruptMember) as exc:
        return None, f"corrupted sample ({type(exc).__name__}: {exc})"
    if v2.shape[0] == 0 or v3.shape[0] == 0:
        return None, f"no visual row (2D {v2.shape[0]}, 3D {v3.shape[0]})"
    if v2.shape[1] + v3.shape[1] != video_dim:
        raise ValueError(f"video {key}: 2D ({v2.shape[1]}) + 3D ({v3.shape[1]}) features do not match "
                         f"the model's video_dim {video_dim}")
    if mel is not None and mel.shape[1] != n_mels:
        raise ValueError(f"video {key}: {mel.shape[1]} mel bands, the model expects {n_mels}")
    return SecondInputs(key, per_second_video(v2, v3, rates["video3d"]), mel), None


def _iter_annotated(features: FeatureSet, wanted: set[str], problems: list[str]
                    ) -> Iterator[tuple[str, dict[str, dict[str, Any]]]]:
    """(key, raw sample) of the wanted videos in every complete shard, first occurrence only."""
    counts = empty_counts()
    seen: set[str] = set()
    for shard in features.shards:
        for raw in zip_shard(shard, counts):
            key = raw["video2d"]["__key__"]
            if key not in wanted:
                continue
            if key in seen:
                problems.append(f"video {key}: found again in shard {shard.index:06d}; first copy used")
                continue
            seen.add(key)
            yield key, raw
    for name in ("key_mismatch", "corrupted_shards"):
        if counts[name]:
            problems.append(f"feature shards: {counts[name]} {name.replace('_', ' ')} (see the log)")


def _listing(items: list[str]) -> str:
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


# --------------------------------------------------------------------------------------------------
# The protocol


def localize(
    model: torch.nn.Module,
    features: FeatureSet,
    ann: StepAnnotations,
    text_extractor: TextExtractor,
    *,
    mining_youtube: bool = False,
    cfg: StepsConfig | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Step localization recall of ``model`` on the annotated videos found in ``features``.

    Args:
        model: an MCN (``embed_video`` / ``embed_audio`` / ``embed_text``, ``config``); moved to ``device``.
        features: the workspace's feature shards (:func:`store.reader.open_features`); the 3D and audio
            rates come from their done records.
        ann: from ``parse_crosstask_annotations(..., tasks=...)`` or ``parse_mining_youtube``; the step
            texts come from ``ann.task_steps``.
        text_extractor: ``ex(list_of_str) -> (words (N, W, text_dim), lengths (N,))``, the one the
            model was trained with, keeping ``cfg.max_words`` words (:func:`step_text_extractor`).
        mining_youtube: log-softmax over the steps before the DP, and recall averaged over all videos.
        cfg: audio window, audio input length and step words (:class:`StepsConfig`; default the paper's).

    Returns:
        The :func:`evaluation.localization.crosstask_recall` dict (``recall``, ``per_task``,
        ``n_videos`` evaluated, ``per_task_videos``, ``n_missing_pred``, ``n_skipped``) plus
        ``n_annotated``, ``n_missing_features``, ``n_no_audio`` (evaluated without the audio term),
        ``n_without_steps`` (videos with features whose task has no step list: not evaluated),
        ``n_unknown_steps`` (steps never placed for lack of a known word), ``predictions`` (video ->
        list of predicted seconds, ``-1`` = not placed), ``protocol`` and ``problems`` (list[str]).
    """
    cfg = cfg or StepsConfig()
    device = torch.device(device)
    model = model.to(device)
    problems: list[str] = []
    wanted = set(ann.segments)
    task_cache: dict[str, TaskSteps | None] = {}
    pred: dict[str, list[int]] = {}
    unusable: dict[str, str] = {}
    no_steps: list[str] = []
    n_no_audio = 0
    video_dim = int(model.config.video_dim)
    rates: dict[str, float] = {}
    if features.shards:  # rows per second, from the done records
        rates = {f: features.rate(f) for f in ("video2d", "video3d", "audio")}
        if rates["video2d"] != 1.0:
            raise ValueError(f"step localization takes one input per second from the 2D rows (SPEC §6): it "
                             f"needs 2D features at 1 row/s, their done records say {rates['video2d']} rows/s")
        audio_rate = rates["audio"]

    def task_steps(task: str) -> TaskSteps | None:
        if task not in task_cache:
            steps = ann.task_steps.get(task)
            if not steps:
                problems.append(f"task {task}: no step list (tasks file) — its videos are not evaluated")
                task_cache[task] = None
            else:
                ts = embed_task_steps(model, text_extractor, tuple(steps), max_words=cfg.max_words, device=device)
                for s in np.flatnonzero(~ts.known):
                    message = (f"task {task} step {s + 1} {steps[s]!r}: no known word — never placed "
                               f"(annotated occurrences count as misses)")
                    problems.append(message)
                    logger.warning("%s", message)
                task_cache[task] = ts
        return task_cache[task]

    for key, raw in _iter_annotated(features, wanted, problems):
        task = ann.task_of.get(key)
        ts = task_steps(task) if task is not None else None
        if ts is None:
            no_steps.append(key)
            continue
        inputs, why = _decode_visual(key, raw, rates, video_dim, int(model.config.n_mels))
        if inputs is None:
            unusable[key] = str(why)
            continue
        v, a, mask = embed_seconds(model, inputs, cfg=cfg, audio_rate=audio_rate, batch_size=batch_size,
                                   device=device)
        if not mask.any():
            n_no_audio += 1
        scores = step_scores(v, a, mask, ts.emb)  # (T, S_known)
        seconds = np.full(len(ts.names), -1, dtype=np.int64)
        if ts.known.any():
            seconds[ts.known] = ordered_step_assignment(scores, mining_youtube=mining_youtube)
        pred[key] = seconds.tolist()

    missing = sorted(wanted - set(pred) - set(no_steps) - set(unusable))
    if missing:
        problems.append(f"{len(missing)} annotated video(s) not in the feature shards: {_listing(missing)}")
    if unusable:
        problems.append(f"{len(unusable)} annotated video(s) without usable visual features: "
                        + _listing([f"{k} ({why})" for k, why in sorted(unusable.items())]))
    if not pred:
        problems.append(f"no annotated video could be evaluated in {features.ws.features_dir}")
    for message in problems:
        if "no known word" not in message:  # those were logged when found
            logger.warning("%s", message)
    gt = {k: ann.segments[k] for k in pred}
    result: dict[str, Any] = dict(crosstask_recall(pred, gt, None if mining_youtube else ann.task_of))
    result.update(
        n_annotated=len(wanted),
        n_missing_features=len(missing) + len(unusable),
        n_no_audio=n_no_audio,
        n_without_steps=len(no_steps),
        n_unknown_steps=sum(int((~ts.known).sum()) for ts in task_cache.values() if ts is not None),
        predictions=pred,
        protocol=PROTOCOL.format(
            window=cfg.audio_window_s, frames=cfg.audio_frames, words=cfg.max_words,
            softmax="log-softmax over the steps; " if mining_youtube else "",
            average=("then over all videos (Mining YouTube)" if mining_youtube
                     else "then per task, then over tasks"),
        ),
        problems=problems,
    )
    logger.info("step localization: recall %.4f over %d video(s) (%d missing features)",
                result["recall"], result["n_videos"], result["n_missing_features"])
    return result
