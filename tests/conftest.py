"""Session fixtures of the end-to-end and fault tests: generated narrated videos and a workspace with
them scanned and extracted (the slow part, done once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import mcn, overrides


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> Path:
    from synthetic import DemoDataConfig, generate_demo_data

    out = tmp_path_factory.mktemp("e2e") / "videos"
    generate_demo_data(DemoDataConfig(out_dir=out, n_videos=3, n_heldout=2, segments_per_video=(2, 2),
                                      min_seconds=3.0, max_seconds=3.0, width=96, height=64, fps=12,
                                      heldout_fraction=0.2, progress=False))
    return out


@pytest.fixture(scope="session")
def extracted(videos, tmp_path_factory) -> tuple[Path, list[str]]:
    """A workspace after `mcn run --only extract` (scan first). Tests that change it work on a copy,
    except test_end_to_end's first test, which runs the rest of the pipeline in it."""
    ws = tmp_path_factory.mktemp("e2e_ws") / "ws"
    common = ["--config", "configs/demo.yaml", "--workspace", str(ws), "--no-progress", *overrides(videos)]
    for stage in ("scan", "extract"):
        proc = mcn("run", "--videos", str(videos / "train"), "--only", stage, *common)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return ws, common
