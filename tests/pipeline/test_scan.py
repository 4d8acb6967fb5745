import json
import os

import pytest

from pipeline.captions import CaptionError, parse_timed_blocks, read_caption_file
from store.ids import video_id
from store.manifest import read_captions, read_manifest
from pipeline.scan import ScanConfig, scan
from store.layout import Workspace


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
    # same stem, other extension: the second gets the disambiguated id, which no plain id can equal
    assert records["twin.mov"].id == "twin" and records["twin.mp4"].id == "twin-xmp4"
    ids = [r.id for r in records.values()]
    assert len(set(ids)) == len(ids)


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
    summary = json.loads(ws.scan_record.read_text())
    assert summary["n_failed"] == result.n_failed == 9
    assert [p["index"] for p in summary["shards"]] == [0, 1, 2, 3]
    assert [p["n_videos"] for p in summary["shards"]] == [sum(r.shard == s for r in recs) for s in range(4)]
    assert summary["manifest_bytes"] == ws.manifest.stat().st_size
    assert summary["skipped"] == [] and result.skipped == [] and summary["retry"] == []


def _files(ws: Workspace) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(ws.root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(ws.root.rglob("*")) if p.is_file()}


def test_rescan_unchanged_writes_nothing_and_changes_are_seen(scan_tree, tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    for p in ("good.mp4", "good.srt", "silent.mkv"):
        (root / p).write_bytes((scan_tree / p).read_bytes())
    ws = Workspace(tmp_path / "ws")
    first = scan(root, ws, ScanConfig(shard_size=1), progress=False)
    plan = {r.id: r.shard for r in read_manifest(ws.manifest)}
    before = _files(ws)
    again = scan(root, ws, ScanConfig(shard_size=1), progress=False)
    assert first.n_probed == 2 and not first.up_to_date and again.up_to_date and again.n_probed == 0
    assert _files(ws) == before  # nothing was rewritten
    # A side-car edited: the scan is redone (no probe needed) and only its shard's caption file changes.
    (root / "good.srt").write_text((scan_tree / "good.srt").read_text().replace("red circle", "green circle"))
    third = scan(root, ws, ScanConfig(shard_size=1), progress=False)
    assert not third.up_to_date and third.n_probed == 0
    after = _files(ws)
    good = ws.captions(plan[video_id("good.mp4")]).relative_to(ws.root).as_posix()
    silent = ws.captions(plan[video_id("silent.mkv")]).relative_to(ws.root).as_posix()
    assert after[good] != before[good] and after[silent] == before[silent]
    assert after["manifest.jsonl"] == before["manifest.jsonl"]
    old = {p["index"]: p for p in json.loads(ws.scan_record.read_text())["shards"]}
    # A new video: appended in a new shard, the plan of the others kept, only it probed.
    (root / "more.mp4").write_bytes((scan_tree / "good.mp4").read_bytes())
    fourth = scan(root, ws, ScanConfig(shard_size=1), progress=False)
    assert fourth.n_probed == 1 and fourth.n_shards == 3
    new_plan = {r.id: r.shard for r in read_manifest(ws.manifest)}
    assert {k: new_plan[k] for k in plan} == plan and new_plan[video_id("more.mp4")] == 2
    shards = {p["index"]: p for p in json.loads(ws.scan_record.read_text())["shards"]}
    assert {i: shards[i] for i in old} == old  # the existing shards' inputs are unchanged
    # Another plan seed (or a plan made under an older rule): the scan is redone, but the videos
    # planned already stay where they are; the manifest and the plan are the same bytes.
    manifest = ws.manifest.read_bytes()
    fifth = scan(root, ws, ScanConfig(shard_size=1, plan_seed=7), progress=False)
    assert not fifth.up_to_date and fifth.n_probed == 0
    assert ws.manifest.read_bytes() == manifest
    record = json.loads(ws.scan_record.read_text())
    assert record["plan_seed"] == 7 and record["shards"] == list(shards.values())


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
    assert recs["gone.mp4"].error == "cannot stat file (No such file or directory)"
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
