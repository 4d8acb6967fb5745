"""Log-mel audio features against an independent numpy implementation of the reference definition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from extractors import LogMelConfig, create

SR, N_FFT, HOP, N_MELS, FMIN, FMAX = 16000, 400, 160, 40, 20.0, 8000.0


# ---- numpy reference (librosa's definitions re-written here) ----------------------------------------


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep, f / f_sp)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def slaney_filters() -> np.ndarray:
    """(40, 201) triangular filters on the Slaney scale with Slaney area normalisation."""
    fft_freqs = np.linspace(0, SR / 2, 1 + N_FFT // 2)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(FMIN), hz_to_mel(FMAX), N_MELS + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    w = np.zeros((N_MELS, len(fft_freqs)))
    for i in range(N_MELS):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        w[i] = np.maximum(0, np.minimum(lower, upper))
    return w * (2.0 / (mel_f[2 : N_MELS + 2] - mel_f[:N_MELS]))[:, None]


def reference_logmel(y: np.ndarray, top_db: float | None = 80.0) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    y = y - y.mean()
    y = np.append(y[0], y[1:] - 0.97 * y[:-1])
    p = np.pad(y, N_FFT // 2, mode="reflect")
    n = 1 + (len(p) - N_FFT) // HOP
    frames = np.stack([p[i * HOP : i * HOP + N_FFT] for i in range(n)])
    power = np.abs(np.fft.rfft(frames * np.hamming(N_FFT), axis=1)) ** 2
    mel = power @ slaney_filters().T
    db = 10 * np.log10(np.maximum(mel, 1e-10)) - 10 * np.log10(max(mel.max(), 1e-10))
    return db if top_db is None else np.maximum(db, db.max() - top_db)


# ---- tests ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ext():
    return create("logmel")


def _signal(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    y = 0.3 * np.sin(2 * np.pi * 440 * t) * (t < seconds / 2) + 0.05 * rng.standard_normal(len(t)) + 0.2
    y[len(y) // 3 : len(y) // 3 + 2000] = 0.2  # a silent (DC-only) stretch reaches the -80 dB floor
    return y.astype(np.float32)


def test_contract(ext) -> None:
    assert (ext.name, ext.field, ext.dim, ext.rate) == ("logmel", "audio", 40, 100.0)
    assert ext.weights_id == "none" and ext.random_weights is False


def test_filterbank_matches_librosa_definition(ext) -> None:
    # torchaudio builds the filters in float32: absolute error ~1e-8 against peaks of ~1e-2
    np.testing.assert_allclose(ext.mel_fb.numpy().T, slaney_filters(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("top_db", [80.0, None])
def test_matches_numpy_reference(top_db: float | None) -> None:
    y = _signal(2.3)
    out = create("logmel", {"top_db": top_db})(y)
    ref = reference_logmel(y, top_db)
    assert out.dtype == np.float32 and out.shape == ref.shape == (1 + len(y) // HOP, N_MELS)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-3)
    assert out.max() == 0.0
    if top_db is not None:
        assert out.min() == -80.0  # the silent stretch is clipped
    else:
        assert out.min() < -80.0


@pytest.mark.parametrize("n", [1, 2, 5, 159, 160, 161, 200, 201, 399, 400, 1601])
def test_frame_count_and_tiny_inputs(ext, n: int) -> None:
    rng = np.random.default_rng(n)
    y = rng.standard_normal(n).astype(np.float32)
    out = ext(y)
    assert out.shape == (1 + n // 160, 40)
    np.testing.assert_allclose(out, reference_logmel(y), rtol=0, atol=1e-3)  # np.pad reflect semantics


def test_empty_and_constant(ext) -> None:
    assert ext(np.zeros(0, np.float32)).shape == (0, 40)
    # DC only: nothing left after mean removal → all-zero power → every value is 0 dB relative to itself
    np.testing.assert_array_equal(ext(np.full(1000, 0.5, np.float32)), np.zeros((7, 40), np.float32))


def test_chunked_equals_one_shot_on_memmap(tmp_path: Path) -> None:
    y = _signal(12.0, seed=3)
    path = tmp_path / "wave.f32"
    y.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r")
    one_shot = create("logmel", {"chunk_seconds": 100.0})(y)
    chunked = create("logmel", {"chunk_seconds": 0.737})(mm)  # 74 frames per chunk, odd boundaries
    assert chunked.shape == one_shot.shape == (1 + len(y) // HOP, 40)
    np.testing.assert_allclose(chunked, one_shot, rtol=0, atol=1e-4)
    np.testing.assert_allclose(chunked, reference_logmel(y), rtol=0, atol=1e-3)


def test_pure_tone_peaks_in_its_band(ext) -> None:
    t = np.arange(SR) / SR
    for freq in (300.0, 1000.0, 3000.0):
        out = ext(np.sin(2 * np.pi * freq * t).astype(np.float32))
        band = int(np.argmax(out[10:-10].mean(axis=0)))
        # the band whose triangle is highest at the tone's FFT bin (bins are 40 Hz apart)
        expected = int(np.argmax(slaney_filters()[:, int(round(freq / 40.0))]))
        assert band == expected
        centres = mel_to_hz(np.linspace(hz_to_mel(FMIN), hz_to_mel(FMAX), N_MELS + 2))[1:-1]
        assert abs(centres[band] - freq) < 0.5 * (centres[band + 1] - centres[band - 1])


def test_rejects_bad_input(ext) -> None:
    with pytest.raises(ValueError):
        ext(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError):
        ext(np.zeros(100, np.int16))
    with pytest.raises(ValueError):
        create("logmel", LogMelConfig(fmax=9000.0))
