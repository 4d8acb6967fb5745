"""Text from the data reaches the terminal without its control characters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.terminal import terminal_safe

ROOT = Path(__file__).resolve().parents[2]


def test_terminal_safe_escapes_controls_and_bidi_overrides():
    assert terminal_safe("plain text, ünïcödé ok") == "plain text, ünïcödé ok"
    assert terminal_safe("a\x1b[2Jb\x07c\x00d\x7fe\x9bf") == "a\\x1b[2Jb\\x07c\\x00d\\x7fe\\x9bf"
    assert terminal_safe("tab\there\nnew line\r") == "tab here new line\\x0d"
    assert terminal_safe("evil\u202etxt.mp4") == "evil\\u202etxt.mp4"


def test_scan_and_status_print_hostile_names_escaped(tmp_path):
    videos = tmp_path / "v"
    videos.mkdir()
    (videos / "clear\x1b[2Jscreen.mp4").write_text("not a video")
    ws = tmp_path / "ws"
    for cmd in (["scan", "--videos", str(videos)], ["status"]):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *cmd, "--workspace", str(ws), "--no-progress"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "\x1b" not in proc.stdout and "clear\\x1b[2Jscreen.mp4" in proc.stdout, proc.stdout
