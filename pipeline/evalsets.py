"""Evaluation sets: their configuration and the caption file made from benchmark annotations.

An evaluation set is a folder of raw videos turned into its own workspace (``WS/evalsets/<name>/``,
:meth:`store.layout.Workspace.evalset`) by the same scan and extract stages, with its clips defined by
captions: side-car captions (``kind: captions``), a YouCook2 annotation JSON (``youcook2``) or the
MSR-VTT 1k-A test CSV/JSON (``msrvtt``). Step-localization sets (``crosstask``, ``mining_youtube``)
read their annotations and task lists directly. Without ``videos``, the main workspace's own features
are the set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evaluation.steps import StepsConfig
from store import atomic
from store.lineage import RUNTIME

STEP_KINDS = ("crosstask", "mining_youtube")
RETRIEVAL_KINDS = ("captions", "youcook2", "msrvtt")


@dataclass
class EvalSetConfig:
    name: str
    kind: str = "captions"  # captions | youcook2 | msrvtt (retrieval); crosstask | mining_youtube (steps)
    videos: str | None = None  # raw videos folder (None: the main workspace's features)
    annotations: str | None = None  # youcook2 JSON / msrvtt CSV or JSON / step annotation folder
    tasks: str | None = None  # crosstask tasks_primary.txt / mining_youtube tasks JSON
    audio_frames: int = 1000  # YouCook2 5120, MSR-VTT 3072 in the paper
    # Queries the recalls are divided by, the clips not evaluated counting as misses (MSR-VTT 1k-A:
    # 1000); None: the clips evaluated (YouCook2, as the reference).
    n_total: int | None = None
    max_clips: int | None = None
    # Words kept per caption (query) of a retrieval set with its own ``videos``: the set's text is
    # extracted with this ``max_words`` (YouCook2 and MSR-VTT: 30 in the reference's loaders, see
    # configs/paper.yaml); None: the ``extract.text`` setting (20), shared with training.
    max_words: int | None = None
    steps: StepsConfig = field(default_factory=StepsConfig)  # step sets: audio windows, step words

    def validate(self) -> None:
        if self.max_words is not None:
            if self.max_words < 1:
                raise ValueError(f"evaluation set {self.name!r}: max_words must be >= 1, got {self.max_words}")
            if self.videos is None or self.kind in STEP_KINDS:
                raise ValueError(f"evaluation set {self.name!r}: max_words applies to a retrieval set with its own "
                                 "videos (the main workspace's text is extracted once, for training)")

    def lineage_dict(self) -> dict[str, Any]:
        """The settings that enter the set's evaluation fingerprint: every field, ``max_words`` only
        when it is set (sets configured before it existed keep their fingerprint)."""
        out = asdict(self)
        if out.get("max_words") is None:
            out.pop("max_words", None)
        return out


@dataclass
class EvaluateConfig:
    sets: list[EvalSetConfig] = field(default_factory=list)
    run: str = "default"  # name of the training run whose checkpoint is evaluated by default
    batch_size: int = field(default=256, metadata=RUNTIME)
    device: str = field(default="auto", metadata=RUNTIME)
    report_queries: int = 10
    report_clusters: int = 8
    ties: str = "pessimistic"


def find_set(cfg: EvaluateConfig, name: str) -> EvalSetConfig:
    for s in cfg.sets:
        if s.name == name:
            return s
    if name == "workspace":
        return EvalSetConfig(name="workspace")
    known = ", ".join([s.name for s in cfg.sets] + ["workspace"])
    raise FileNotFoundError(f"unknown evaluation set {name!r}; configured: {known} (evaluate.sets in the config)")


def annotation_captions(spec: EvalSetConfig, out: Path) -> tuple[Path | None, list[str], int | None]:
    """Turn benchmark annotations into a HowTo100M-style caption file for the set's scan (written only
    when its content changes). Returns (captions file or None, problems, number of annotated queries).
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
        raise ValueError(f"unknown evaluation set kind {spec.kind!r} ({', '.join(RETRIEVAL_KINDS + STEP_KINDS)})")
    caps: dict[str, list[dict[str, Any]]] = {}
    for clip in ann.clips:
        start = clip.start if clip.start is not None else 0.0
        end = clip.end if clip.end is not None else 1e9  # whole clip: clipped to the duration by the scan
        caps.setdefault(clip.video_id, []).append({"start": start, "end": end, "text": clip.sentence})
    atomic.write_if_changed(out, atomic.dumps_json(caps))
    return out, list(ann.problems), len(ann.clips)
