"""`mcn demo-data` as a unit of the runner: its record, a re-run that writes nothing, changes seen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.demo_data import demo_state, make_demo_data
from store.layout import folder_state
from store.lineage import read_record
from synthetic import DemoDataConfig


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and "locks" not in p.parts}


def test_demo_data_record_rerun_and_changes(tmp_path):
    cfg = DemoDataConfig(out_dir=tmp_path / "d", n_videos=1, n_heldout=1, segments_per_video=(1, 1),
                         min_seconds=2.0, max_seconds=2.0, width=64, height=48, fps=8, seed=5, progress=False)
    assert demo_state(cfg).status == "missing"
    first = make_demo_data(cfg)
    assert first.n_generated == 2 and demo_state(cfg).done
    record = read_record(folder_state(cfg.out_dir).record)
    assert record["unit"] == "demo-data" and len(record["files"]) == 5  # 2 mp4 + 2 srt + the index
    before = _files(cfg.out_dir)
    again = make_demo_data(cfg)
    assert again.n_generated == 0 and again.n_skipped == 2 and _files(cfg.out_dir) == before
    assert again.train_videos == first.train_videos and again.heldout_videos == first.heldout_videos
    # a file removed: stale, and only that video is made again
    first.heldout_videos[0].unlink()
    st = demo_state(cfg)
    assert st.status == "stale" and st.reasons == ["heldout/heldout-0000.mp4 is missing"]
    third = make_demo_data(cfg)
    assert third.n_generated == 1 and third.heldout_videos[0].is_file()
    # another plan (config): stale with the reason, regenerated
    bigger = dataclasses.replace(cfg, crf=30)
    assert demo_state(bigger).reasons == ["config changed"]
    assert make_demo_data(bigger).n_generated == 2
    # the runtime settings are not part of the plan
    assert demo_state(dataclasses.replace(bigger, workers=2, progress=True)).done
