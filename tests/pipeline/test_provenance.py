"""Every record says which code made it (version, git revision) and with which decode backend."""

from __future__ import annotations

import shutil
from importlib.metadata import version

from pipeline.config import load_config
from pipeline.scan import scan
from pipeline.stages import run_extract
from store.layout import Workspace
from store.lineage import git_revision, read_record


def test_done_record_of_an_extract_run_names_the_decoder(tmp_path, tiny_video):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(tiny_video, videos / "a.mp4")
    ws = Workspace(tmp_path / "ws")
    # the audio field: the cheapest extract run (no model, no decode workers); the configured backend is
    # recorded in every shard's provenance
    cfg = load_config(None, ["extract.fields=[audio]", "extract.decode.backend=pyav"])
    scan(videos, ws, cfg.scan, progress=False)
    run_extract(ws, cfg, progress=False)
    record = read_record(ws.shard_record("audio", 0))
    assert record is not None and record["n_ok"] == 1
    prov = record["provenance"]
    assert prov["decoder"] == "pyav"
    assert prov["version"] == version("mcn-pipeline") and prov["git_revision"] == git_revision()
    assert len(prov["git_revision"]) == 40
    # the scan probes with ffprobe and decodes nothing: the key is there, without a decoder
    scan_prov = read_record(ws.scan_record)["provenance"]
    assert "decoder" in scan_prov and scan_prov["decoder"] is None
