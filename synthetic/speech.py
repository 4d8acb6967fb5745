"""Narration of the demo videos: espeak-ng speech synthesis, the narration track, wav writing.

Audio is float32 mono in [-1, 1]; rates in samples per second.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from synthetic.plan import VideoSpec, frame_bounds

logger = logging.getLogger(__name__)

ESPEAK_RATE = 22050


def synthesize_speech(text: str, voice: str, speed: int, pitch: int,
                      sample_rate: int = ESPEAK_RATE) -> np.ndarray:
    """espeak-ng ``-w`` of ``text`` as float32 mono in [-1, 1] at ``sample_rate``."""
    with tempfile.TemporaryDirectory(prefix="mcn-espeak-") as tmp:
        path = Path(tmp) / "speech.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        with wave.open(str(path), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    if width != 2:
        raise RuntimeError(f"unexpected espeak-ng sample width {width}")
    audio = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        audio = audio.reshape(-1, channels).mean(axis=1)
    if rate != sample_rate and audio.size:
        n_out = int(round(audio.size * sample_rate / rate))
        audio = np.interp(np.arange(n_out) * (rate / sample_rate), np.arange(audio.size), audio)
        audio = audio.astype(np.float32)
    return audio


def render_audio(video: VideoSpec, fps: int, sample_rate: int) -> np.ndarray:
    """The narration track: each sentence starts at its segment start, cut (with a fade) to its length."""
    bounds = frame_bounds(video, fps)
    n_total = int(round(bounds[-1][1] / fps * sample_rate))
    track = np.zeros(n_total, dtype=np.float32)
    fade = int(0.01 * sample_rate)
    for seg, (f0, f1) in zip(video.segments, bounds):
        s0, s1 = int(round(f0 / fps * sample_rate)), min(int(round(f1 / fps * sample_rate)), n_total)
        speech = synthesize_speech(seg.sentence, seg.voice, seg.speed, seg.pitch, sample_rate)
        if speech.size > s1 - s0:
            logger.debug("%s: narration %.2fs cut to %.2fs", video.name, speech.size / sample_rate,
                         (s1 - s0) / sample_rate)
            speech = speech[: s1 - s0].copy()
            speech[-fade:] *= np.linspace(1.0, 0.0, min(fade, speech.size), dtype=np.float32)
        track[s0:s0 + speech.size] = speech
    return track


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """``audio`` (float32 mono in [-1, 1]) as 16-bit PCM mono wav at ``sample_rate`` Hz."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
