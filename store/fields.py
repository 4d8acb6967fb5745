"""The feature fields of a workspace, their members, per-video statuses and the usable-video rule.

Every field has the same shard numbering and the same keys (video ids) in the same order; each
sample carries ``ID.json`` (always) and the field's arrays (only when its status is ``ok``):

=========  ================================  ==================================================
field      arrays                            meaning
=========  ================================  ==================================================
video2d    ``feat.npy``                      (T, 2048) float16, ``rate`` rows/s (1.0: ResNet-152)
video3d    ``feat.npy``                      (T, 2048) float16, ``rate`` rows/s (1.5: 16 frames at 24 fps)
audio      ``feat.npy``                      (T, 40) float16 log-mel dB, ``rate`` rows/s (100)
text       ``words.npy``, ``lengths.npy``    (N, W, D) float16 word vectors, (N,) int32 word counts
=========  ================================  ==================================================

The rates are not constants of the code: each done record carries its extractor's ``rate`` and the
readers take it from there (:mod:`store.reader`).
"""

from __future__ import annotations

from collections.abc import Mapping

FIELDS: tuple[str, ...] = ("video2d", "video3d", "audio", "text")
VISUAL_FIELDS: tuple[str, ...] = ("video2d", "video3d")

#: Array members of a sample of each field (besides ``json``), the first one is the main array.
ARRAYS: dict[str, tuple[str, ...]] = {
    "video2d": ("feat.npy",),
    "video3d": ("feat.npy",),
    "audio": ("feat.npy",),
    "text": ("words.npy", "lengths.npy"),
}

# Per-video statuses of one field.
OK = "ok"
FAILED = "failed"
NO_AUDIO = "no_audio"  # the video has no audio stream: usable, without the audio term
NO_CAPTIONS = "no_captions"  # the video has no caption: no text, not usable for training
STATUSES: tuple[str, ...] = (OK, FAILED, NO_AUDIO, NO_CAPTIONS)


def check_field(field: str) -> str:
    if field not in FIELDS:
        raise ValueError(f"unknown field {field!r}; known: {', '.join(FIELDS)}")
    return field


def unusable_reason(statuses: Mapping[str, str | None]) -> str | None:
    """Why a video cannot be used for training and retrieval, or None when it can.

    ``statuses`` maps each field to the video's status in it. The rule: both visual fields ``ok``,
    text ``ok``, audio ``ok`` or ``no_audio``. Returns ``"failed"`` (a field failed, or is absent or
    unknown) or ``"no_captions"``.
    """
    if any(statuses.get(f) == FAILED for f in FIELDS):
        return FAILED
    if any(statuses.get(f) != OK for f in VISUAL_FIELDS):
        return FAILED
    if statuses.get("text") == NO_CAPTIONS:
        return NO_CAPTIONS
    if statuses.get("text") != OK or statuses.get("audio") not in (OK, NO_AUDIO):
        return FAILED
    return None


def usable(statuses: Mapping[str, str | None]) -> bool:
    """True when the video can be used for training and retrieval (see :func:`unusable_reason`)."""
    return unusable_reason(statuses) is None


def visual_unusable_reason(statuses: Mapping[str, str | None]) -> str | None:
    """The rule for step localization, which needs no text: both visual fields ``ok``."""
    for f in VISUAL_FIELDS:
        if statuses.get(f) != OK:
            return f"{f} status {statuses.get(f)!r}"
    return None
