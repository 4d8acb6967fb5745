"""Synthetic narrated demo videos (`mcn demo-data`): a seeded plan of segments, numpy-rendered
coloured shapes in motion, espeak-ng narration, ffmpeg encoding and side-car ``.srt`` captions.

Modules: ``plan`` (config, vocabulary, held-out combinations, segment plan; pure), ``render``
(frames), ``speech`` (narration audio), ``captions`` (``.srt``), ``encode`` (ffmpeg mux of one
video), ``generate`` (fingerprints, skip/prune, the dataset and its index). No import of ``pipeline``.
"""

from synthetic.generate import GENERATOR_VERSION, INDEX_NAME, DemoDataSummary, generate_demo_data
from synthetic.plan import (
    COLOURS,
    MOTIONS,
    SHAPES,
    SPLITS,
    DemoDataConfig,
    DemoPlan,
    SegmentSpec,
    VideoSpec,
    plan_demo_data,
    select_heldout_combinations,
)

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "INDEX_NAME",
    "MOTIONS",
    "SHAPES",
    "SPLITS",
    "DemoDataConfig",
    "DemoDataSummary",
    "DemoPlan",
    "SegmentSpec",
    "VideoSpec",
    "generate_demo_data",
    "plan_demo_data",
    "select_heldout_combinations",
]
