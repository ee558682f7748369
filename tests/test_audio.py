"""jaxlab.audio against direct numpy / scipy computations (plain loops, librosa 0.8's definitions)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import get_window

from jaxlab.audio import LogMelParams, audio_features, hz_to_mel, log_mel, mel_filterbank, mel_to_hz


def reference_filterbank(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney mel filters by plain loops: (n_fft // 2 + 1, n_mels)."""
    def to_mel(f):
        return f / (200 / 3) if f < 1000 else 15 + math.log(f / 1000) * 27 / math.log(6.4)

    def to_hz(m):
        return m * 200 / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)

    top = to_mel(sr / 2)
    edges = [to_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    out = np.zeros((n_fft // 2 + 1, n_mels))
    for k in range(n_fft // 2 + 1):
        f = k * sr / n_fft
        for m in range(n_mels):
            lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
            if lo < f < hi:
                tri = (f - lo) / (mid - lo) if f <= mid else (hi - f) / (hi - mid)
                out[k, m] = tri * 2 / (hi - lo)
    return out


def reference_log_mel(wave: np.ndarray, p: LogMelParams) -> np.ndarray:
    """librosa.feature.melspectrogram (center, reflect, periodic Hann of win_length padded to n_fft,
    power 2) then power_to_db(ref=np.max, top_db=80), in float64 by a frame loop."""
    win = get_window("hann", p.win_length, fftbins=True)
    left = (p.n_fft - p.win_length) // 2
    window = np.zeros(p.n_fft)
    window[left:left + p.win_length] = win
    padded = np.pad(wave.astype(np.float64), p.n_fft // 2, mode="reflect")
    frames = []
    for start in range(0, len(padded) - p.n_fft + 1, p.hop_length):
        frames.append(np.abs(np.fft.rfft(padded[start:start + p.n_fft] * window)) ** 2)
    power = np.stack(frames, axis=1)  # (freq, frames)
    mel = reference_filterbank(p.sample_rate, p.n_fft, p.n_mels).T @ power
    db = 10 * np.log10(np.maximum(mel, p.amin))
    db -= db.max()
    return np.maximum(db, -p.top_db)


def test_mel_scale_anchors():
    assert hz_to_mel(1000.0) == pytest.approx(15.0)
    assert hz_to_mel(440.0) == pytest.approx(6.6)
    assert hz_to_mel(8000.0) == pytest.approx(15 + math.log(8) * 27 / math.log(6.4))
    f = np.array([0.0, 300.0, 999.0, 1000.0, 4321.0, 8000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, rtol=1e-9, atol=1e-9)


def test_filterbank_matches_loops():
    np.testing.assert_allclose(mel_filterbank(16000, 256, 80), reference_filterbank(16000, 256, 80),
                               rtol=1e-5, atol=1e-9)


def test_log_mel_matches_numpy():
    p = LogMelParams()
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    waves = np.stack([np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(16000),
                      0.5 * np.sign(np.sin(2 * np.pi * 150 * t)) * np.exp(-3 * t)]).astype(np.float32)
    got = np.asarray(jax.jit(log_mel)(jnp.asarray(waves)))
    assert got.shape == (2, 80, 201)  # 1 s at 16 kHz: the spec's 201 frames x 80 mels
    for wave, out in zip(waves, got):
        np.testing.assert_allclose(out, reference_log_mel(wave, p), atol=0.02)  # dB
    features = np.asarray(audio_features(jnp.asarray(waves)))
    np.testing.assert_allclose(features, (got + 40) / 40, atol=1e-6)
    assert features.max() == pytest.approx(1.0) and features.min() >= -1.0


def test_short_wave_is_refused_with_reflect_padding():
    with pytest.raises(ValueError, match="reflect padding"):
        log_mel(jnp.zeros((2, 100)))
