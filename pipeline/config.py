"""The resolved configuration of a pipeline run: one dataclass tree, YAML presets, dotted overrides."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from model.train import TrainConfig
from pipeline.configtools import ConfigError, apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from pipeline.evalsets import EvaluateConfig
from pipeline.extract import ExtractConfig
from pipeline.runner import RunnerConfig
from pipeline.scan import ScanConfig
from store import atomic
from store.lineage import git_revision, package_version
from synthetic import DemoDataConfig

logger = logging.getLogger(__name__)

__all__ = ["Config", "ConfigError", "load_config", "write_resolved"]


@dataclass
class Config:
    scan: ScanConfig = field(default_factory=ScanConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    demo_data: DemoDataConfig = field(default_factory=DemoDataConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)


def load_config(path: Path | str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML preset (if any) ← `section.key=value` overrides."""
    data = load_yaml(Path(path)) if path else {}
    apply_overrides(data, list(overrides))
    return from_dict(Config, data)


def write_resolved(path: Path, section: object, **extra: object) -> bool:
    """Write a stage's resolved config (with the version and git revision) next to its outputs, unless
    the file already says exactly this; True when written."""
    body = {"config": to_dict(section), "version": package_version(), "git_revision": git_revision(),
            **to_dict(extra)}
    return atomic.write_if_changed(path, dump_yaml(body))
