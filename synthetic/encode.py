"""Encoding of one demo video: rendered frames piped to ffmpeg (libx264) with the narration (aac).

Bit-exact flags and single-threaded x264 make the bytes depend only on the inputs.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from store import atomic
from synthetic.plan import DemoDataConfig, VideoSpec
from synthetic.render import iter_frames
from synthetic.speech import render_audio, write_wav


def encode_video(video: VideoSpec, cfg: DemoDataConfig, mp4: Path, fingerprint: str) -> None:
    """Render, narrate and mux one video into ``mp4`` (via a temporary file and a rename)."""
    tmp_mp4 = atomic.temp_path(mp4)
    with tempfile.TemporaryDirectory(prefix="mcn-demo-") as tmp:
        wav = Path(tmp) / "narration.wav"
        write_wav(wav, render_audio(video, cfg.fps, cfg.sample_rate), cfg.sample_rate)
        log_path = Path(tmp) / "ffmpeg.log"
        cmd = [
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{cfg.width}x{cfg.height}", "-r", str(cfg.fps),
            "-i", "pipe:0", "-i", str(wav), "-map", "0:v:0", "-map", "1:a:0",
            "-c:v", "libx264", "-preset", cfg.preset, "-crf", str(cfg.crf), "-pix_fmt", "yuv420p",
            "-g", str(2 * cfg.fps), "-threads", "1", "-sws_flags", "bilinear+accurate_rnd+bitexact",
            "-c:a", "aac", "-b:a", "64k", "-ac", "1", "-ar", str(cfg.sample_rate),
            "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
            "-map_metadata", "-1", "-metadata", f"comment=mcn-demo:{fingerprint}",
            "-f", "mp4", str(tmp_mp4),
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
            assert proc.stdin is not None
            try:
                chunk: list[bytes] = []
                for frame in iter_frames(video, cfg.width, cfg.height, cfg.fps):
                    chunk.append(frame.tobytes())
                    if len(chunk) == cfg.fps:
                        proc.stdin.write(b"".join(chunk))
                        chunk = []
                if chunk:
                    proc.stdin.write(b"".join(chunk))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            except BaseException:
                proc.kill()
                proc.wait()
                tmp_mp4.unlink(missing_ok=True)
                raise
            try:
                rc = proc.wait(timeout=600)
            except subprocess.TimeoutExpired:  # killed, not abandoned
                proc.kill()
                proc.wait()
                tmp_mp4.unlink(missing_ok=True)
                raise RuntimeError(f"ffmpeg did not finish {mp4.name} within 600 s") from None
        if rc != 0:
            tmp_mp4.unlink(missing_ok=True)
            raise RuntimeError(f"ffmpeg failed for {mp4.name} ({rc}): "
                               f"{log_path.read_text(errors='replace').strip()[-500:]}")
    atomic.commit_file(tmp_mp4, mp4)

