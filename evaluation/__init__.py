"""Evaluation: zero-shot retrieval and step-localization metrics, annotation parsers (SPEC §6)."""

from evaluation.annotations import (
    Clip,
    ClipAnnotations,
    StepAnnotations,
    StepSegment,
    Task,
    TaskList,
    parse_crosstask_annotations,
    parse_crosstask_tasks,
    parse_mining_youtube,
    parse_msrvtt_test,
    parse_youcook2,
)
from evaluation.localization import (
    crosstask_recall,
    log_softmax_steps,
    ordered_step_assignment,
    second_in_interval,
)
from evaluation.retrieval import rank_of_true, retrieval_metrics, retrieval_report, similarity

__all__ = [
    "Clip",
    "ClipAnnotations",
    "StepAnnotations",
    "StepSegment",
    "Task",
    "TaskList",
    "crosstask_recall",
    "log_softmax_steps",
    "ordered_step_assignment",
    "parse_crosstask_annotations",
    "parse_crosstask_tasks",
    "parse_mining_youtube",
    "parse_msrvtt_test",
    "parse_youcook2",
    "rank_of_true",
    "retrieval_metrics",
    "retrieval_report",
    "second_in_interval",
    "similarity",
]
