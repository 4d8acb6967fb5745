"""Side-car captions of the demo videos (``.srt``): one cue per segment, at the segment times."""

from __future__ import annotations

from synthetic.plan import VideoSpec


def _srt_time(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def srt_text(video: VideoSpec) -> str:
    """The side-car captions: one cue per segment, at the segment times."""
    cues = [f"{i}\n{_srt_time(s.start)} --> {_srt_time(s.end)}\n{s.sentence}\n"
            for i, s in enumerate(video.segments, 1)]
    return "\n".join(cues)

