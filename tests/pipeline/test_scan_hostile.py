"""`scan` on hostile inputs found in real collections: every case ends as a one-line reason in the
scan's output (a failed record's ``error``, a record's ``warnings`` or the scan's ``skipped`` list),
never a crash and never a silent drop, and the good videos beside them are scanned ok."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from pipeline.captions import format_bytes, parse_timed_blocks
from pipeline.scan import ScanConfig, _unique_ids, scan
from store.ids import extension_id, path_of_id, split_id, video_id
from store.layout import Workspace
from store.manifest import Caption, VideoRecord, read_captions, read_manifest
from tests.support import process_gone

LATIN1 = os.fsdecode(b"caf\xe9.mp4")  # a name that is not valid UTF-8, as os.walk gives it
CONTROL = "ctl\x01\x7fname.mp4"
NEWLINE = "new\nline.mp4"
LONG_ASCII = "L" * 251 + ".mp4"  # 255 bytes: the longest name most file systems allow
LONG_UTF8 = "é" * 125 + "x.mp4"  # 255 bytes, 131 characters

SRT = "1\n00:00:00,000 --> 00:00:00,800\nhello there\n"
HOSTILE_CFG = ScanConfig(shard_size=4, probe_workers=2, probe_timeout_s=60)

# path → (status, reason prefix); "" for ok videos
EXPECTED = {
    "good.mp4": ("ok", ""),
    "caf\\xe9.mp4": ("failed", "file name is not valid UTF-8 (byte 0xe9 at offset 3 of the path): rename it"),
    CONTROL: ("ok", ""),
    NEWLINE: ("ok", ""),
    LONG_ASCII: ("ok", ""),
    LONG_UTF8: ("ok", ""),
    "-dash.mp4": ("ok", ""),
    "--double.mp4": ("ok", ""),
    " lead space.mp4": ("ok", ""),
    "UPPER.MP4": ("ok", ""),
    "a.mkv": ("ok", ""),
    "a.mp4": ("failed", "same name as a.mkv (only the extension differs): id and captions would be "
                        "ambiguous"),
    "a.mp4.mkv": ("ok", ""),
    "sub/x.mp4": ("ok", ""),
    "shown/h.mp4": ("ok", ""),  # a folder symlink inside the root, to a folder not walked otherwise
    "dir.mp4/inner.mp4": ("ok", ""),
    "farm.mp4": ("ok", ""),  # a file symlink may point anywhere
    "alias.mp4": ("failed", "same file as good.mp4"),
    "hard.mp4": ("failed", "same file as good.mp4"),
    "gone.mp4": ("failed", "cannot stat file (No such file or directory)"),
    "pipe.mp4": ("failed", "not a regular file (a named pipe)"),
}

SKIPPED = [
    ["alias_dir", "symlink to a folder already walked (as sub)"],
    ["broken", "broken symlink"],
    ["out_link", "symlink to a folder outside the videos root"],
    ["sub/deep/up", "symlink to a folder already walked (loop)"],
    ["sub/loop", "symlink to a folder already walked (loop)"],
    ["sub/self", "symlink to a folder already walked (loop)"],
]


@pytest.fixture(scope="module")
def hostile_tree(tiny_video, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    outside = base / "outside"
    outside.mkdir()
    shutil.copy(tiny_video, outside / "elsewhere.mp4")
    shutil.copy(tiny_video, outside / "far.mp4")
    root = base / "videos"
    root.mkdir()
    for name in ("good.mp4", LATIN1, CONTROL, NEWLINE, LONG_ASCII, LONG_UTF8, "-dash.mp4", "--double.mp4",
                 " lead space.mp4", "UPPER.MP4", "a.mkv", "a.mp4", "a.mp4.mkv", "sub/x.mp4", ".hidden/h.mp4",
                 "dir.mp4/inner.mp4"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_video, root / name)
    (root / "good.srt").write_text(SRT)
    (root / "UPPER.SRT").write_text(SRT)
    (root / "new\nline.srt").write_text(SRT)
    (root / ("L" * 251 + ".srt")).write_text(SRT)
    # two symlink loops, a link to the root's own subfolder, one outside, one broken, one to a hidden folder
    (root / "sub" / "loop").symlink_to("..")
    (root / "sub" / "self").symlink_to(".")
    (root / "sub" / "deep").mkdir()
    (root / "sub" / "deep" / "up").symlink_to("../..")
    (root / "alias_dir").symlink_to("sub")
    (root / "out_link").symlink_to(outside)
    (root / "broken").symlink_to(base / "nowhere")
    (root / "shown").symlink_to(".hidden")
    # file links: another path to a scanned file (symlink, hard link), a symlink farm entry, a broken one
    (root / "alias.mp4").symlink_to("good.mp4")
    os.link(root / "good.mp4", root / "hard.mp4")
    (root / "farm.mp4").symlink_to(outside / "far.mp4")
    (root / "gone.mp4").symlink_to(base / "nowhere.mp4")
    os.mkfifo(root / "pipe.mp4")
    return root


@pytest.fixture(scope="module")
def hostile(hostile_tree, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("hostile_ws"))
    t0 = time.monotonic()
    result = scan(hostile_tree, ws, HOSTILE_CFG, progress=False)
    elapsed = time.monotonic() - t0
    return ws, result, {r.path: r for r in read_manifest(ws.manifest)}, elapsed


def test_every_hostile_input_is_recorded_with_its_reason(hostile):
    ws, result, records, elapsed = hostile
    assert elapsed < 60
    assert sorted(records) == sorted(EXPECTED)  # each video once (no loop multiplies it), none dropped
    for path, (status, reason) in EXPECTED.items():
        rec = records[path]
        assert rec.status == status, (path, rec.error)
        if status == "ok":
            assert rec.error is None and rec.duration > 0.5 and rec.width == 64, path
        else:
            assert rec.error.startswith(reason), (path, rec.error)
            assert (path, rec.error) in result.failures
    assert result.n_videos == len(EXPECTED)
    assert result.n_failed == sum(s == "failed" for s, _ in EXPECTED.values())
    assert [list(s) for s in result.skipped] == SKIPPED
    record = json.loads(ws.scan_record.read_text(encoding="utf-8"))
    assert record["skipped"] == SKIPPED and record["retry"] == []
    assert record["manifest_bytes"] == ws.manifest.stat().st_size


def test_every_reason_is_one_line_and_the_manifest_is_utf8(hostile):
    ws, _, records, _ = hostile
    ws.manifest.read_bytes().decode("utf-8")  # writable and readable as UTF-8 JSON lines
    for rec in records.values():
        for text in [rec.error or ""] + rec.warnings:
            assert text.isprintable(), (rec.path, text)
    assert records[NEWLINE].n_captions == 1
    assert records[NEWLINE].caption_source == NEWLINE.replace(".mp4", ".srt")
    assert records["UPPER.MP4"].n_captions == 1 and records["UPPER.MP4"].caption_source == "UPPER.SRT"
    assert records[LONG_ASCII].n_captions == 1  # its ".json" side-car name would be 256 bytes: no crash


def test_ids_are_unique_safe_and_name_their_file(hostile):
    _, _, records, _ = hostile
    ids = [r.id for r in records.values()]
    assert len(set(ids)) == len(ids)
    for path, rec in records.items():
        assert re.fullmatch(r"[A-Za-z0-9_-]+", rec.id), rec.id
    assert records["caf\\xe9.mp4"].id == "caf-e9" == video_id(LATIN1)
    assert os.fsencode(path_of_id("caf-e9")) == b"caf\xe9"
    assert records["a.mkv"].id == "a" and records["a.mp4"].id == "a-xmp4"
    assert records["a.mp4.mkv"].id == "a-2emp4"
    assert records["UPPER.MP4"].id == "UPPER" and records["-dash.mp4"].id == "-2ddash"
    assert records[LONG_UTF8].id == "-c3-a9" * 125 + "x"
    for path in (CONTROL, NEWLINE, LONG_ASCII, LONG_UTF8, "-dash.mp4", " lead space.mp4", "sub/x.mp4"):
        assert path_of_id(records[path].id) == path.rsplit(".", 1)[0]


def test_captions_of_hostile_names_are_in_their_shard(hostile):
    ws, _, records, _ = hostile
    for path in ("good.mp4", NEWLINE, "UPPER.MP4"):
        rec = records[path]
        caps = read_captions(ws.captions(rec.shard))[rec.id]
        assert [(c.start, c.end, c.text) for c in caps] == [(0.0, 0.8, "hello there")]


def test_rescan_is_up_to_date_and_keeps_the_skipped_list(hostile, hostile_tree):
    ws, result, _, _ = hostile
    again = scan(hostile_tree, ws, HOSTILE_CFG, progress=False)
    assert again.up_to_date and again.skipped == result.skipped and again.failures == result.failures


def test_a_new_folder_symlink_out_of_the_root_is_seen(tiny_video, tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    shutil.copy(tiny_video, root / "a.mp4")
    ws = Workspace(tmp_path / "ws")
    first = scan(root, ws, ScanConfig(), progress=False)
    assert first.skipped == [] and first.n_ok == 1
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tiny_video, tmp_path / "elsewhere" / "b.mp4")
    (root / "more").symlink_to(tmp_path / "elsewhere")
    second = scan(root, ws, ScanConfig(), progress=False)  # not "unchanged": the walk differs
    assert not second.up_to_date and second.n_videos == 1
    assert second.skipped == [("more", "symlink to a folder outside the videos root")]


# -- ids ------------------------------------------------------------------------------------------


def test_extension_ids_never_equal_plain_ids():
    stems = ["a", "a.mp4", "a-x", "a-xmp4", "a/x", "x", "-", "a--b", "é", os.fsdecode(b"\xff")]
    exts = [".mp4", ".mkv", ".MP4", ".m-v", ".x", ".mp4x"]
    plain = {video_id(f"{s}{e}") for s in stems for e in exts}
    extended = [extension_id(f"{s}{e}") for s in stems for e in exts]
    assert len(set(extended)) == len(extended) and not plain & set(extended)
    for s in stems:
        for e in exts:
            assert split_id(extension_id(f"{s}{e}")) == (s, e)
            assert split_id(video_id(f"{s}{e}")) == (s, None)
    assert extension_id("a.mp4") == "a-xmp4" and video_id("a.mp4.mkv") == "a-2emp4"
    assert video_id(b"caf\xe9.mp4") == video_id(LATIN1) == "caf-e9"
    with pytest.raises(ValueError):
        split_id("a-zz")


def test_duplicate_ids_left_are_failed_naming_the_other_file():
    recs = [VideoRecord(id="v", path="p.mp4"), VideoRecord(id="v", path="q.mp4"),
            VideoRecord(id="v-x--1", path="r.mp4")]
    rel_of = {id(r): r.path for r in recs}
    captions = {id(recs[1]): [Caption(0, 1, "x")]}
    _unique_ids(recs, rel_of, captions)
    assert recs[0].ok and recs[0].id == "v"
    assert recs[1].status == "failed" and recs[1].error == "id v is also the id of p.mp4"
    assert len({r.id for r in recs}) == 3 and id(recs[1]) not in captions


def test_duplicate_id_check_in_a_scan(tiny_video, tmp_path, monkeypatch):
    """Were the disambiguated id to collide with another file's id, the check still keeps ids unique."""
    import pipeline.scan as scan_module

    root = tmp_path / "v"
    root.mkdir()
    for name in ("a.mkv", "a.mp4", "z.mp4"):
        shutil.copy(tiny_video, root / name)
    monkeypatch.setattr(scan_module, "extension_id", lambda rel: "z")
    ws = Workspace(tmp_path / "ws")
    scan(root, ws, ScanConfig(), progress=False)
    recs = {r.path: r for r in read_manifest(ws.manifest)}
    assert len({r.id for r in recs.values()}) == 3
    assert recs["z.mp4"].ok and recs["z.mp4"].id == "z" and recs["a.mkv"].ok
    assert recs["a.mp4"].status == "failed" and recs["a.mp4"].error.startswith("same name as a.mkv")
    assert recs["a.mp4"].warnings == ["id z is also the id of z.mp4: given the id z-x--1"]


# -- captions -------------------------------------------------------------------------------------

CAPTIONS_JSON = """{
 "k_good": {"start": [0.0, 0.5], "end": [0.5, 0.9], "text": ["one", "two"]},
 "k_time": {"start": [0.0, "abc"], "end": [0.5, 0.9], "text": ["one", "two"]},
 "k_nonlist": 5,
 "k_lengths": {"start": [0.0, 0.5], "end": [0.5, 0.9], "text": ["one"]},
 "k_startnotlist": {"start": 0, "end": [0.5], "text": ["one"]},
 "k_nan": {"start": [NaN], "end": [0.5], "text": ["one"]},
 "k_items": [{"start": 0, "end": 0.5, "text": "ok"}, {"start": "x", "end": 1, "text": "bad"}],
 "k_list": [{"start": 0, "end": 0.5, "text": "fine"}]
}"""

CAPTION_WARNINGS = {
    "k_time": "captions: caps.json: k_time: start[1] is not a number ('abc')",
    "k_nonlist": "captions: caps.json: k_nonlist: expected a list of captions or {start, end, text} lists, "
                 "got int",
    "k_lengths": "captions: caps.json: k_lengths: start/end/text lists differ in length (2, 2, 1)",
    "k_startnotlist": "captions: caps.json: k_startnotlist: start is not a list (int)",
    "k_nan": "captions: caps.json: k_nan: start[0] is not a number (nan)",
    "k_items": "captions: caps.json: k_items[1]: start/end are not numbers ('x', 1)",
}


def _keyed_tree(tiny_video: Path, root: Path, keys: list[str]) -> None:
    root.mkdir()
    for key in keys:
        shutil.copy(tiny_video, root / f"{key}.mp4")


def test_bad_entries_of_a_caption_file_cost_only_their_video(tiny_video, tmp_path):
    keys = ["k_good", "k_list", *CAPTION_WARNINGS]
    root = tmp_path / "v"
    _keyed_tree(tiny_video, root, keys)
    caps = tmp_path / "caps.json"
    caps.write_text(CAPTIONS_JSON)
    ws = Workspace(tmp_path / "ws")
    result = scan(root, ws, ScanConfig(captions_file=str(caps)), progress=False)
    recs = {r.path: r for r in read_manifest(ws.manifest)}
    assert result.n_ok == len(keys) and result.n_failed == 0
    assert recs["k_good.mp4"].n_captions == 2 and recs["k_good.mp4"].caption_source == "caps.json[k_good]"
    assert recs["k_list.mp4"].n_captions == 1
    stored = read_captions(ws.captions(0))
    assert [c.text for c in stored[video_id("k_good.mp4")]] == ["one", "two"]
    for key, warning in CAPTION_WARNINGS.items():
        rec = recs[f"{key}.mp4"]
        assert rec.status == "ok" and rec.n_captions == 0 and rec.caption_source is None
        assert rec.warnings == [f"{warning} (entry ignored: no captions for this video)"], rec.warnings
        assert stored[rec.id] == []
    assert json.loads(ws.scan_record.read_text())["captions_file_error"] is None


def test_bad_rows_of_a_csv_caption_file_cost_only_their_video(tiny_video, tmp_path):
    root = tmp_path / "v"
    _keyed_tree(tiny_video, root, ["k_good", "k_time"])
    caps = tmp_path / "caps.csv"
    caps.write_text("video_id,start,end,text\nk_good,0,0.5,hello\nk_time,0,0.5,fine\nk_time,abc,2,bad\n"
                    ",1,2,no key\nk_good,0.5,0.9,\"a, b\"\n")
    ws = Workspace(tmp_path / "ws")
    scan(root, ws, ScanConfig(captions_file=str(caps)), progress=False)
    recs = {r.path: r for r in read_manifest(ws.manifest)}
    assert recs["k_good.mp4"].ok and recs["k_good.mp4"].n_captions == 2
    bad = recs["k_time.mp4"]
    assert bad.ok and bad.n_captions == 0
    assert bad.warnings == ["captions: caps.csv: line 4: start/end are not numbers ('abc', '2') "
                            "(entry ignored: no captions for this video)"]


def test_unreadable_caption_file_keeps_todays_behaviour(tiny_video, tmp_path):
    root = tmp_path / "v"
    _keyed_tree(tiny_video, root, ["k_good"])
    caps = tmp_path / "caps.json"
    caps.write_text('{"k_good": [')
    ws = Workspace(tmp_path / "ws")
    scan(root, ws, ScanConfig(captions_file=str(caps)), progress=False)
    record = json.loads(ws.scan_record.read_text())
    assert record["captions_file_error"].startswith("caps.json: invalid JSON")
    rec = read_manifest(ws.manifest)[0]
    assert rec.status == "failed" and rec.error.startswith("captions: caps.json: invalid JSON")


def test_oversized_deep_and_pathological_side_cars(tiny_video, tmp_path):
    root = tmp_path / "v"
    _keyed_tree(tiny_video, root, ["big", "deep", "angles", "fine"])
    (root / "big.srt").write_text(SRT + "x" * (70_000 - len(SRT)))
    (root / "deep.json").write_text("[" * 10_000 + "]" * 10_000)
    angles = "1\n00:00:00,000 --> 00:00:00,500\n" + "<" * 200_000 + "\nwords\n"
    (root / "angles.srt").write_text(angles)
    (root / "fine.srt").write_text(SRT)
    ws = Workspace(tmp_path / "ws")
    t0 = time.monotonic()
    scan(root, ws, ScanConfig(max_caption_bytes=64 * 1024), progress=False)
    assert time.monotonic() - t0 < 30
    recs = {r.path: r for r in read_manifest(ws.manifest)}
    assert recs["big.mp4"].status == "failed"
    assert recs["big.mp4"].error == "captions: big.srt: file is 70000 bytes, over the 64 KiB cap"
    assert recs["deep.mp4"].error == "captions: deep.json: invalid JSON (nested too deeply)"
    assert recs["angles.mp4"].error == (f"captions: angles.srt: file is {len(angles)} bytes, "
                                        "over the 64 KiB cap")
    assert recs["fine.mp4"].ok and recs["fine.mp4"].n_captions == 1
    # under the default cap (16 MiB) the pathological one is parsed, in linear time
    ws2 = Workspace(tmp_path / "ws2")
    scan(root, ws2, ScanConfig(), progress=False)
    recs = {r.path: r for r in read_manifest(ws2.manifest)}
    assert recs["angles.mp4"].ok and recs["angles.mp4"].n_captions == 1 and recs["big.mp4"].ok
    assert recs["deep.mp4"].error == "captions: deep.json: invalid JSON (nested too deeply)"
    assert ScanConfig().max_caption_bytes == 16 * 1024 * 1024 and format_bytes(16 * 1024 * 1024) == "16 MiB"


def test_malformed_time_line_reason_is_short_and_one_line():
    from pipeline.captions import CaptionError

    with pytest.raises(CaptionError) as err:
        parse_timed_blocks("1\n00:00:xx\x1b[2J --> " + "9" * 100_000 + "\nhey\n", "x.srt")
    assert len(str(err.value)) < 120 and str(err.value).isprintable()


def _best_time(text: str, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        parse_timed_blocks(text, "x.srt")
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.timeout(300)
def test_pathological_captions_parse_in_linear_time():
    size = 2_000_000
    head = "1\n00:00:00,000 --> 00:00:01,000\n"
    block = "1\n00:00:01,000 --> 00:00:02,500\nsome ordinary words of a caption line\n\n"
    plain = (block * (size // len(block) + 1))[:size]
    baseline = _best_time(plain)
    pathological = {
        "200k '<' per line, no '>'": head + ("<" * 200_000 + "\n") * (size // 200_001),
        "one line of '<'": head + "<" * size,
        "'{\\' without '}'": head + "{\\" * (size // 2),
        "'<' then text, no '>'": head + ("<" + "a" * 600) * (size // 601),
        "a huge whitespace run": head + "x\n" + " \t" * (size // 2) + "\n",
        "newline then spaces": head + "x" + ("\n" + " " * 1000) * (size // 1001),
        "only newlines": head + "x" + "\n" * size,
    }
    for what, text in pathological.items():
        took = _best_time(text)
        assert took < 10 * baseline + 0.05, f"{what}: {took:.3f} s vs {baseline:.3f} s for plain captions"


# -- ffprobe ---------------------------------------------------------------------------------------


def _fake_ffprobe(folder: Path, real: str) -> Path:
    """An ffprobe that hangs (with a child process, to check that the whole group is killed) on any
    file named hang.mp4 and runs the real one otherwise."""
    folder.mkdir()
    fake = folder / "ffprobe"
    fake.write_text(f"""#!/bin/sh
for a in "$@"; do
  case "$a" in
    */hang.mp4) sleep 300 & echo $! > "{folder}/sleep.pid"; wait; exit 1;;
  esac
done
exec "{real}" "$@"
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return fake


def test_hung_ffprobe_is_killed_failed_and_retried_by_the_next_scan(tiny_video, tmp_path, monkeypatch):
    real = shutil.which("ffprobe")
    assert real
    root = tmp_path / "v"
    _keyed_tree(tiny_video, root, ["a", "hang", "b", "c"])
    bin_dir = tmp_path / "bin"
    _fake_ffprobe(bin_dir, real)
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{path}")
    ws = Workspace(tmp_path / "ws")
    cfg = ScanConfig(probe_timeout_s=1.5, probe_workers=2)
    t0 = time.monotonic()
    result = scan(root, ws, cfg, progress=False)
    assert time.monotonic() - t0 < 30
    assert not [t for t in threading.enumerate() if t.name.startswith("probe")]  # no thread left running
    recs = {r.path: r for r in read_manifest(ws.manifest)}
    assert recs["hang.mp4"].status == "failed" and recs["hang.mp4"].error == "ffprobe timed out after 1.5 s"
    assert all(recs[p].ok for p in ("a.mp4", "b.mp4", "c.mp4"))
    assert result.n_probed == 4 and json.loads(ws.scan_record.read_text())["retry"] == ["hang.mp4"]
    sleeper = int((bin_dir / "sleep.pid").read_text())
    deadline = time.monotonic() + 5
    while not process_gone(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(sleeper), "ffprobe's child outlived the timeout"
    assert "hang.mp4" not in ws.probe_cache.read_text()  # a timeout is not a property of the file
    # Same files, a working ffprobe: the scan is not "unchanged", it probes the hung file (only) again.
    monkeypatch.setenv("PATH", path)
    again = scan(root, ws, cfg, progress=False)
    assert not again.up_to_date and again.n_probed == 1 and again.n_failed == 0
    assert json.loads(ws.scan_record.read_text())["retry"] == []
    assert scan(root, ws, cfg, progress=False).up_to_date


def test_timeouts_cached_by_older_scans_are_probed_again(tiny_video, tmp_path):
    root = tmp_path / "v"
    _keyed_tree(tiny_video, root, ["a"])
    ws = Workspace(tmp_path / "ws")
    st = (root / "a.mp4").stat()
    key = f"{root.resolve() / 'a.mp4'}|{st.st_size}|{st.st_mtime_ns}"
    ws.probe_cache.parent.mkdir(parents=True)
    ws.probe_cache.write_text(json.dumps({"key": key, "ok": False, "error": "ffprobe timed out after 120 s"})
                              + "\n[1, 2]\n{torn")
    result = scan(root, ws, ScanConfig(), progress=False)
    assert result.n_probed == 1 and result.n_ok == 1


def test_missing_ffprobe_fails_each_video_for_this_scan_only(tiny_video, tmp_path, monkeypatch):
    root = tmp_path / "v"
    _keyed_tree(tiny_video, root, ["a", "b"])
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(empty))
    ws = Workspace(tmp_path / "ws")
    cfg = ScanConfig(probe_tool="ffprobe")  # ffprobe asked for (auto would probe with PyAV: test_no_ffmpeg)
    result = scan(root, ws, cfg, progress=False)
    assert result.n_failed == 2
    assert all(why.startswith("cannot run ffprobe") for _, why in result.failures), result.failures
    monkeypatch.setenv("PATH", path)
    again = scan(root, ws, cfg, progress=False)
    assert again.n_probed == 2 and again.n_ok == 2
