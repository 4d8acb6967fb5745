"""Audio features: 40-band log-mel spectrogram in dB relative to the file's maximum, 100 frames/s.

Definition (the reference, AVLnet, with librosa), for a mono 16 kHz waveform y of S samples:

1. remove DC: ``y = y - mean(y)`` (mean over the whole file);
2. pre-emphasis 0.97: ``z[0] = y[0]``, ``z[n] = y[n] - 0.97 y[n-1]``;
3. STFT, n_fft = win = 400, hop 160, *symmetric* Hamming window (``scipy.signal.hamming(400)``),
   centred frames: the signal is padded by n_fft // 2 = 200 samples on each side by reflection
   (numpy's ``reflect`` mode, which librosa used; for S <= 200 numpy reflects repeatedly, i.e. the
   signal is extended periodically with period 2(S - 1), and S == 1 repeats the sample), giving
   T = 1 + S // 160 frames; power spectrum ``|X|**2``;
4. mel filterbank: librosa's (Slaney mel scale, Slaney area normalisation), 40 bands, 20–8000 Hz;
5. ``power_to_db(mel, ref=max)``: ``10 log10(max(mel, amin)) - 10 log10(max(max(mel), amin))``,
   amin = 1e-10, clipped below at -top_db (80 dB; None disables).

S == 0 gives a (0, 40) array. Long inputs (e.g. an np.memmap of an hour) are processed in chunks of
``chunk_seconds`` of frames: one pass for the mean, one for the spectra; apart from the (T, 40)
output, memory is bounded by the chunk size. Computation is in float64 on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torchaudio.functional as AF

from store.lineage import RUNTIME

from .base import FeatureExtractor, register

logger = logging.getLogger(__name__)

__all__ = ["LogMelConfig", "LogMelExtractor", "reflect_indices"]


@dataclass
class LogMelConfig:
    """Log-mel parameters (defaults = the reference); lengths in samples, frequencies in Hz.

    chunk_seconds: audio processed per chunk (bounds peak memory; does not change the result).
    """

    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 40
    fmin: float = 20.0
    fmax: float = 8000.0
    preemphasis: float = 0.97
    top_db: float | None = 80.0
    amin: float = 1e-10
    chunk_seconds: float = field(default=60.0, metadata=RUNTIME)


def reflect_indices(idx: np.ndarray, size: int) -> np.ndarray:
    """Map indices in (-inf, inf) into [0, size) like ``np.pad(..., mode="reflect")`` (edge not repeated)."""
    if size < 1:
        raise ValueError("size must be >= 1")
    if size == 1:
        return np.zeros_like(idx)
    period = 2 * (size - 1)
    m = np.mod(idx, period)
    return np.where(m >= size, period - m, m)


@register
class LogMelExtractor(FeatureExtractor):
    """``logmel``: wave float (S,) mono 16 kHz → float32 (T, 40) log-mel dB, T = 1 + S // 160.

    Values are <= 0 dB (the file's loudest band-frame is 0) and >= -top_db. See the module docstring.
    """

    name: ClassVar[str] = "logmel"
    field: ClassVar[str] = "audio"
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = LogMelConfig

    dim = 40  # class defaults for the default config; instances use their config's values
    rate = 100.0

    @classmethod
    def describe_config(cls, config: LogMelConfig) -> dict[str, Any]:
        return {"extractor": cls.name, "version": cls.version, "weights": "none", "random_weights": False,
                "rate": config.sample_rate / config.hop_length, "dim": config.n_mels}

    def __init__(self, config: LogMelConfig) -> None:
        super().__init__(config)
        c = config
        if not 0 < c.win_length <= c.n_fft:
            raise ValueError(f"need 0 < win_length <= n_fft, got {c.win_length}, {c.n_fft}")
        if c.hop_length < 1 or c.n_mels < 1 or c.chunk_seconds <= 0:
            raise ValueError("hop_length, n_mels and chunk_seconds must be positive")
        if not 0 <= c.fmin < c.fmax <= c.sample_rate / 2:
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got {c.fmin}, {c.fmax}")
        self.dim = c.n_mels
        self.rate = c.sample_rate / c.hop_length
        self.weights_id = "none"
        self.random_weights = False
        # Symmetric Hamming of win_length, zero-padded to n_fft in the centre (librosa's pad_center).
        win = torch.hamming_window(c.win_length, periodic=False, dtype=torch.float64)
        left = (c.n_fft - c.win_length) // 2
        self.window = torch.nn.functional.pad(win, (left, c.n_fft - c.win_length - left))
        # (n_fft // 2 + 1, n_mels) Slaney-scale, Slaney-normalised triangular filters.
        self.mel_fb = AF.melscale_fbanks(
            c.n_fft // 2 + 1, c.fmin, c.fmax, c.n_mels, c.sample_rate, norm="slaney", mel_scale="slaney"
        ).to(torch.float64)
        self.frames_per_chunk = max(1, int(round(c.chunk_seconds * self.rate)))

    def _mean(self, wave: np.ndarray) -> float:
        step = self.frames_per_chunk * self.config.hop_length
        total = 0.0
        for i in range(0, wave.shape[0], step):
            total += float(np.sum(wave[i : i + step], dtype=np.float64))
        mean = total / wave.shape[0]
        if not np.isfinite(mean):
            raise ValueError(f"{self.name}: waveform contains non-finite samples")
        return mean

    def _mel_power(self, wave: np.ndarray, mean: float, t0: int, t1: int) -> torch.Tensor:
        """Mel power of frames [t0, t1): float64 (t1 - t0, n_mels)."""
        c = self.config
        size = wave.shape[0]
        pad = c.n_fft // 2
        # Sample positions (in the unpadded signal) covered by the frames, reflected into [0, size).
        idx = reflect_indices(np.arange(t0 * c.hop_length - pad, (t1 - 1) * c.hop_length - pad + c.n_fft), size)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        start = max(lo - 1, 0)  # one sample of context for the pre-emphasis
        seg = np.asarray(wave[start:hi], dtype=np.float64) - mean
        z = np.empty(hi - lo, dtype=np.float64)
        if lo == 0:
            z[0] = seg[0]
            z[1:] = seg[1:] - c.preemphasis * seg[:-1]
        else:
            z[:] = seg[1:] - c.preemphasis * seg[:-1]
        x = torch.from_numpy(z[idx - lo])
        spec = torch.stft(
            x, c.n_fft, hop_length=c.hop_length, window=self.window, center=False, return_complex=True
        )  # (n_fft // 2 + 1, t1 - t0)
        power = spec.real.square() + spec.imag.square()
        return power.T @ self.mel_fb

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        """wave: float (S,) mono samples at ``sample_rate`` (array or np.memmap) → float32 (T, n_mels)."""
        if wave.ndim != 1:
            raise ValueError(f"{self.name}: expected a mono waveform (S,), got shape {wave.shape}")
        if not np.issubdtype(wave.dtype, np.floating):
            raise ValueError(f"{self.name}: expected float samples, got {wave.dtype}")
        c = self.config
        size = wave.shape[0]
        if size == 0:
            return np.zeros((0, c.n_mels), dtype=np.float32)
        n_frames = 1 + size // c.hop_length
        mean = self._mean(wave)
        out = np.empty((n_frames, c.n_mels), dtype=np.float32)
        peak = 0.0
        for t0 in range(0, n_frames, self.frames_per_chunk):
            t1 = min(n_frames, t0 + self.frames_per_chunk)
            mel = self._mel_power(wave, mean, t0, t1)
            peak = max(peak, float(mel.max()))
            out[t0:t1] = (10.0 * torch.log10(mel.clamp_min(c.amin))).numpy()
        out -= np.float32(10.0 * np.log10(max(peak, c.amin)))
        if c.top_db is not None:
            np.maximum(out, np.float32(-c.top_db), out=out)
        return out
