import json
import os

import pytest

from pipeline.captions import CaptionError, parse_timed_blocks, read_caption_file
from pipeline.ids import video_id
from pipeline.manifest import read_captions, read_manifest
from pipeline.scan import ScanConfig, scan
from pipeline.workspace import Workspace


@pytest.fixture(scope="module")
def scanned(scan_tree, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    result = scan(scan_tree, ws, ScanConfig(shard_size=4, probe_workers=2), progress=False)
    records = {r.path: r for r in read_manifest(ws.manifest)}
    return ws, result, records


def test_good_videos_are_probed(scanned):
    ws, result, records = scanned
    good = records["good.mp4"]
    assert good.status == "ok" and good.error is None
    assert abs(good.duration - 2.0) < 0.1
    assert abs(good.fps - 12) < 0.01 and good.width == 64 and good.height == 48
    assert good.video_codec == "h264" and good.audio_codec == "aac" and good.has_audio
    assert good.audio_rate == 16000 and good.audio_channels == 1
    assert good.n_captions == 2 and good.caption_source == "good.srt"
    silent = records["silent.mkv"]
    assert silent.status == "ok" and silent.has_audio is False and silent.audio_codec is None
    assert "no captions found" in silent.warnings[0]


def test_same_stem_in_two_folders_and_odd_names(scanned):
    ws, _, records = scanned
    a1, a2 = records["cooking/a.mp4"], records["other/a.mp4"]
    assert a1.id != a2.id and a1.status == a2.status == "ok"
    assert a1.caption_source == "cooking/a.vtt" and a2.caption_source == "other/a.json"
    odd = records["my clip.v2 ünï.mp4"]
    assert odd.status == "ok" and "." not in odd.id and " " not in odd.id


@pytest.mark.parametrize(
    "path, reason",
    [
        ("empty.mp4", "empty file (0 bytes)"),
        ("notes.mp4", "ffprobe: Invalid data found when processing input"),
        ("truncated.mp4", "ffprobe:"),
        ("audio_only.mp4", "no video stream"),
        ("badjson.mp4", "captions: badjson.json: invalid JSON"),
        ("emptycap.mp4", "captions: emptycap.srt: empty caption file"),
        ("outside.mp4", "captions: outside.srt: no usable caption (outside.srt: 1 caption(s) outside the video"),
        ("latin1.mp4", "captions: latin1.srt: not UTF-8 (invalid byte 0xe9"),
        ("twin.mp4", "same name as twin.mov"),
    ],
)
def test_bad_inputs_are_recorded_with_reasons(scanned, path, reason):
    _, result, records = scanned
    rec = records[path]
    assert rec.status == "failed"
    assert rec.error.startswith(reason), rec.error
    assert (path, rec.error) in result.failures


def test_partial_caption_problems_are_warnings(scanned):
    ws, _, records = scanned
    rec = records["partial.mp4"]
    assert rec.status == "ok" and rec.n_captions == 2
    assert any("outside the video" in w for w in rec.warnings)
    caps = read_captions(ws.captions(rec.shard))[rec.id]
    assert [(c.start, c.end, c.text) for c in caps] == [(0.0, 1.0, "the red circle moves"), (1.0, 1.9, "a blue square")]


def test_shard_plan_and_captions_files(scanned):
    ws, result, records = scanned
    recs = read_manifest(ws.manifest)
    assert result.n_videos == len(recs) == 16
    assert result.n_shards == 4
    assert [r.shard for r in recs] == sorted(r.shard for r in recs)
    assert max(sum(r.shard == s for r in recs) for s in range(4)) == 4
    for s in range(result.n_shards):
        ids = list(read_captions(ws.captions(s)))
        assert ids == [r.id for r in recs if r.shard == s]
    summary = json.loads(ws.scan_summary.read_text())
    assert summary["n_failed"] == result.n_failed == 9


def test_rescan_uses_probe_cache_and_keeps_plan(scan_tree, tmp_path):
    ws = Workspace(tmp_path / "ws")
    first = scan(scan_tree, ws, ScanConfig(shard_size=4), progress=False)
    plan = {r.id: r.shard for r in read_manifest(ws.manifest)}
    again = scan(scan_tree, ws, ScanConfig(shard_size=4), progress=False)
    assert first.n_probed == 16 and again.n_probed == 0
    assert {r.id: r.shard for r in read_manifest(ws.manifest)} == plan


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(scan_tree, tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    p = root / "locked.mp4"
    p.write_bytes((scan_tree / "good.mp4").read_bytes())
    p.chmod(0)
    ws = Workspace(tmp_path / "ws")
    scan(root, ws, ScanConfig(), progress=False)
    assert read_manifest(ws.manifest)[0].error == "permission denied (file is not readable)"


def test_dangling_link_is_recorded(tmp_path, scan_tree):
    root = tmp_path / "v"
    root.mkdir()
    (root / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (root / "ok.mp4").symlink_to(scan_tree / "good.mp4")
    ws = Workspace(tmp_path / "ws")
    result = scan(root, ws, ScanConfig(), progress=False)
    recs = {r.path: r for r in read_manifest(ws.manifest)}
    assert recs["gone.mp4"].error.startswith("cannot stat file")
    assert recs["ok.mp4"].status == "ok" and result.n_ok == 1


def test_howto100m_caption_files(tmp_path, scan_tree):
    root = tmp_path / "v"
    root.mkdir()
    (root / "yt_ab-C1.mp4").symlink_to(scan_tree / "good.mp4")
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"yt_ab-C1": {"start": [0.0, 1.0], "end": [1.0, 1.5], "text": ["one", "two"]}}))
    ws = Workspace(tmp_path / "ws")
    scan(root, ws, ScanConfig(captions_file=str(caps)), progress=False)
    rec = read_manifest(ws.manifest)[0]
    assert rec.id == video_id("yt_ab-C1.mp4") and rec.n_captions == 2
    csv_path = tmp_path / "caps.csv"
    csv_path.write_text("video_id,start,end,text\nyt_ab-C1,0,1,hello\nyt_ab-C1,1,1.5,\"a, b\"\n")
    parsed = read_caption_file(csv_path)
    assert [(c.start, c.end, c.text) for c in parsed["yt_ab-C1"]] == [(0, 1, "hello"), (1, 1.5, "a, b")]
    bad = tmp_path / "bad.csv"
    bad.write_text("vid,start\nx,1\n")
    with pytest.raises(CaptionError, match="CSV header"):
        read_caption_file(bad)


def test_srt_parser_handles_tags_and_hours():
    caps = parse_timed_blocks("1\n01:00:01,5 --> 01:00:02,250\n<b>Hi</b>\nthere\n\n", "x.srt")
    assert [(c.start, c.end, c.text) for c in caps] == [(3601.5, 3602.25, "Hi there")]
    with pytest.raises(CaptionError, match="malformed time line"):
        parse_timed_blocks("1\n00:00:xx --> 00:00:01,000\nhey\n", "x.srt")
