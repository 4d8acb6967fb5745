"""The resolved configuration of a pipeline run: one dataclass tree, YAML presets, dotted overrides."""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import atomic
from model.train import TrainConfig
from pipeline.configtools import ConfigError, apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from synthetic import DemoDataConfig
from pipeline.evaluate import EvaluateConfig
from pipeline.extract import ExtractConfig
from pipeline.scan import ScanConfig

logger = logging.getLogger(__name__)

__all__ = ["Config", "ConfigError", "load_config", "write_resolved", "git_revision"]


@dataclass
class Config:
    scan: ScanConfig = field(default_factory=ScanConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    demo_data: DemoDataConfig = field(default_factory=DemoDataConfig)


def load_config(path: Path | str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML preset (if any) ← `section.key=value` overrides."""
    data = load_yaml(Path(path)) if path else {}
    apply_overrides(data, list(overrides))
    return from_dict(Config, data)


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_resolved(path: Path, section: object, **extra: object) -> None:
    """Write a stage's resolved config (plus the git revision) next to its outputs."""
    body = {"config": to_dict(section), "git_revision": git_revision(), **to_dict(extra)}
    atomic.write_text(path, dump_yaml(body))
