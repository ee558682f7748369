"""Audio front end in JAX: STFT power spectrogram, Slaney mel filterbank, log (dB) and normalisation.

The default parameters are AV-Net's (av_inpainting.md; the official code calls librosa 0.8.1):
1 s of audio at 16 kHz, n_fft 256, a 10 ms Hann window (160 samples, zero-padded to n_fft, centred),
5 ms hop (80 samples), 80 mel bins, power 2, `center=True` with reflect padding (librosa 0.8's
`pad_mode`), the Slaney mel scale with Slaney ("area 1") normalisation over 0 .. sr/2, then
`power_to_db(ref=np.max, amin=1e-10, top_db=80)` and (x - (-40)) / 40. One second gives
(80 mels, 201 frames): librosa's layout and the official code's H x W of the audio ResNet (the spec's
"201x80" is the same spectrogram transposed).

    log_mel(wave)                     (..., samples) -> (..., n_mels, frames) in dB, max 0, floor -top_db
    normalize_log_mel(db)             (db + 40) / 40, in [-1, 1]
    mel_filterbank(sr, n_fft, n_mels) (n_fft // 2 + 1, n_mels) numpy
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LogMelParams:
    """The front end's parameters (AV-Net's by default); durations in seconds, rates in Hz."""

    sample_rate: int = 16000
    n_fft: int = 256
    win_seconds: float = 0.010
    hop_seconds: float = 0.005
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float | None = None  # None: sample_rate / 2
    top_db: float = 80.0
    amin: float = 1e-10
    pad_mode: str = "reflect"  # librosa 0.8 (the official code's); librosa >= 0.10 uses "constant"
    norm_mean: float = -40.0
    norm_std: float = 40.0

    @property
    def win_length(self) -> int:
        return int(self.sample_rate * self.win_seconds)

    @property
    def hop_length(self) -> int:
        return int(self.sample_rate * self.hop_seconds)

    def num_frames(self, samples: int) -> int:
        """Frames of a centred STFT of `samples` samples: 1 + samples // hop."""
        return 1 + samples // self.hop_length


def hz_to_mel(hz):
    """Slaney mel scale (librosa htk=False): linear 3 mels per 200 Hz below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    linear = hz / f_sp
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, linear)


def mel_to_hz(mel):
    """Inverse of hz_to_mel."""
    mel = np.asarray(mel, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Triangular filters (n_fft // 2 + 1, n_mels), float32: n_mels + 2 points equally spaced in mel
    between fmin and fmax (sr / 2 if None), each filter scaled by 2 / (its width in Hz) (Slaney norm)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_hz[None] - lower) / (centre - lower)
    falling = (upper - fft_hz[None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
    return weights.T.astype(np.float32)


def hann_window(win_length: int, n_fft: int) -> np.ndarray:
    """Periodic Hann window of win_length zero-padded to n_fft, centred (librosa's pad_center)."""
    n = np.arange(win_length)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / win_length)
    left = (n_fft - win_length) // 2
    return np.pad(window, (left, n_fft - win_length - left)).astype(np.float32)


def stft_power(wave: jax.Array, n_fft: int, win_length: int, hop_length: int,
               pad_mode: str = "reflect") -> jax.Array:
    """|STFT|^2 of a centred STFT: (..., samples) -> (..., frames, n_fft // 2 + 1), frames = 1 + samples // hop."""
    if pad_mode not in ("reflect", "constant"):
        raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {pad_mode!r}")
    half = n_fft // 2
    if pad_mode == "reflect" and wave.shape[-1] <= half:
        raise ValueError(f"reflect padding needs more than n_fft // 2 = {half} samples, got wave {wave.shape}")
    padded = jnp.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(half, half)], mode=pad_mode)
    frames = 1 + wave.shape[-1] // hop_length
    index = hop_length * np.arange(frames)[:, None] + np.arange(n_fft)[None]
    windowed = padded[..., index] * hann_window(win_length, n_fft)
    spectrum = jnp.fft.rfft(windowed.astype(jnp.float32), axis=-1)
    return jnp.square(spectrum.real) + jnp.square(spectrum.imag)


def power_to_db(power: jax.Array, amin: float = 1e-10, top_db: float | None = 80.0) -> jax.Array:
    """10 log10(power) relative to each example's maximum over its last two axes (librosa's ref=np.max),
    floored at max - top_db."""
    db = 10.0 * jnp.log10(jnp.maximum(power, amin))
    db = db - jnp.max(db, axis=(-2, -1), keepdims=True)
    return db if top_db is None else jnp.maximum(db, -top_db)


def log_mel(wave: jax.Array, params: LogMelParams = LogMelParams()) -> jax.Array:
    """(..., samples) float waveform -> (..., n_mels, frames) log-mel power in dB (max 0, floor -top_db)."""
    if wave.ndim < 1:
        raise ValueError(f"log_mel needs a waveform (..., samples), got shape {wave.shape}")
    power = stft_power(wave, params.n_fft, params.win_length, params.hop_length, params.pad_mode)
    bank = mel_filterbank(params.sample_rate, params.n_fft, params.n_mels, params.fmin, params.fmax)
    mel = jnp.einsum("...tf,fm->...mt", power, bank, precision=jax.lax.Precision.HIGHEST)
    return power_to_db(mel, params.amin, params.top_db)


def normalize_log_mel(db: jax.Array, params: LogMelParams = LogMelParams()) -> jax.Array:
    """(db - norm_mean) / norm_std: the official code's Normalize(mean=-40, std=40), [-80, 0] -> [-1, 1]."""
    return (db - params.norm_mean) / params.norm_std


def audio_features(wave: jax.Array, params: LogMelParams = LogMelParams()) -> jax.Array:
    """The audio network's input: normalize_log_mel(log_mel(wave)), (..., samples) -> (..., n_mels, frames)."""
    return normalize_log_mel(log_mel(wave, params), params)
