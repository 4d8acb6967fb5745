"""Clip scoring (evaluation.scoring): hand-computed scores of 2 texts against 3 clips, one without audio."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.scoring import clip_scores, fused_targets
from evaluation.steps import step_scores

TEXT = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)  # (Q=2, D=2)
VIDEO = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, -1.0]], np.float32)  # (N=3, D)
# clip 1 has no audio: its audio row is meaningless (NaN here) and must not count
AUDIO = np.array([[10.0, 0.0], [np.nan, np.nan], [5.0, 5.0]], np.float32)
MASK = np.array([True, False, True])


def test_clip_scores_by_hand() -> None:
    # v + a: clip 0 [11, 2], clip 1 [3, 0] (video only), clip 2 [5, 4]
    # text 0 [1, 0] → 11, 3, 5;  text 1 [0, 2] → 4, 0, 8
    got = clip_scores(TEXT, VIDEO, AUDIO, MASK)
    assert got.dtype == np.float64 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, [[11.0, 3.0, 5.0], [4.0, 0.0, 8.0]])


def test_clip_scores_without_audio_and_without_mask() -> None:
    # no audio at all: t · v
    np.testing.assert_array_equal(clip_scores(TEXT, VIDEO), [[1.0, 3.0, 0.0], [4.0, 0.0, -2.0]])
    # no mask: every clip has audio (clip 1's audio [0, 10] here)
    audio = np.nan_to_num(AUDIO, nan=0.0)
    audio[1] = [0.0, 10.0]
    np.testing.assert_array_equal(clip_scores(TEXT, VIDEO, audio), [[11.0, 3.0, 5.0], [4.0, 20.0, 8.0]])


def test_fused_targets_by_hand() -> None:
    fused = fused_targets(VIDEO, AUDIO, MASK)
    assert fused.dtype == np.float32
    np.testing.assert_array_equal(fused, [[11.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    np.testing.assert_array_equal(fused_targets(VIDEO), VIDEO)  # no audio: the video embeddings


def test_step_scores_are_clip_scores_transposed() -> None:
    """Step localization scores seconds (T, S) the same way: (T = 3 seconds, S = 2 steps)."""
    np.testing.assert_array_equal(step_scores(VIDEO, AUDIO, MASK, TEXT),
                                  [[11.0, 4.0], [3.0, 0.0], [5.0, 8.0]])
    np.testing.assert_array_equal(step_scores(VIDEO, None, np.zeros(3, bool), TEXT),
                                  [[1.0, 4.0], [3.0, 0.0], [0.0, -2.0]])


@pytest.mark.parametrize("args, match", [
    ((TEXT[0], VIDEO), r"\(Q, D\)"),
    ((np.ones((2, 3)), VIDEO), "3-d"),
    ((TEXT, VIDEO, AUDIO[:2], MASK), "same shape"),
    ((TEXT, VIDEO, AUDIO, MASK[:2]), "audio_mask"),
])
def test_clip_scores_refuses_mismatched_shapes(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        clip_scores(*args)
