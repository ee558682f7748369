"""`synthetic:ecg_beats`: seeded 5-class heartbeats shaped like MIT-BIH beats after the paper's preprocessing.

Each beat is the R-peak-centred window of the spec (R +- 100 samples at 360 Hz = +-278 ms), resampled to
128 samples and min-max normalised to [0, 1]. A beat is a sum of Gaussian waves (amplitude, centre in
ms relative to the R peak, width in ms) for P, Q, R, S and T, with class-specific morphology following
the AAMI/MIT-BIH classes:

- N normal: upright P ~160 ms before R, narrow QRS, upright T.
- L left bundle branch block: wide, notched (M-shaped) R, no q, discordant (inverted) T.
- R right bundle branch block: narrow R then a wide slurred S (terminal delay), shallow T.
- A atrial premature: early, small or inverted P closer to the QRS, the previous beat's T wave near
  the left edge (short RR), otherwise normal QRS.
- V premature ventricular: no P, very wide bizarre QRS, large T of opposite polarity.

Every wave is jittered per beat (amplitude, timing, width), and each beat gets a heart-rate time scale,
baseline wander, Gaussian and EMG-like noise. The default class sizes are the paper's balanced set
(6,000 each of N, L, R, V and 2,490 A, split 50/50); `balance="mitbih"` uses the natural MIT-BIH ratio
(N 71,732 / L 8,036 / R 7,231 / A 2,491 / V 6,559), both scaled by `scale`.
"""

from __future__ import annotations

import numpy as np

from jaxlab.data.sources import register, split_indices

CLASSES = ("N", "L", "R", "A", "V")
BALANCED_COUNTS = {"N": 6000, "L": 6000, "R": 6000, "A": 2490, "V": 6000}
MITBIH_COUNTS = {"N": 71732, "L": 8036, "R": 7231, "A": 2491, "V": 6559}
BEAT_LENGTH = 128
HALF_WINDOW_MS = 100 / 360 * 1000  # +-100 samples at 360 Hz

# (amplitude, centre ms, width ms) per wave; a class is a list of waves.
MORPHOLOGY: dict[str, list[tuple[float, float, float]]] = {
    "N": [(0.15, -165, 22), (-0.10, -28, 7), (1.00, 0, 9), (-0.22, 26, 8), (0.32, 215, 38)],
    "L": [(0.13, -175, 22), (0.70, -18, 17), (0.78, 24, 18), (-0.08, 62, 12), (-0.30, 230, 45)],
    "R": [(0.14, -165, 22), (-0.06, -22, 6), (0.85, 0, 9), (-0.42, 42, 24), (0.12, 225, 40)],
    "A": [(-0.09, -110, 16), (-0.10, -28, 7), (1.00, 0, 9), (-0.22, 26, 8), (0.30, 210, 36), (0.26, -250, 35)],
    "V": [(0.00, -165, 22), (-0.25, -40, 22), (1.10, 10, 32), (-0.55, 75, 30), (-0.55, 225, 60)],
}


def generate(counts: dict[str, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Beats (N, 128) float32 in [0, 1] and labels (N,) int32 (order of CLASSES), classes interleaved."""
    rng = np.random.default_rng([seed, 0xEC6])
    labels = np.concatenate([np.full(counts[c], i, np.int32) for i, c in enumerate(CLASSES)])
    labels = labels[rng.permutation(labels.size)]
    t = np.linspace(-HALF_WINDOW_MS, HALF_WINDOW_MS, BEAT_LENGTH, dtype=np.float64)
    n = labels.size
    rate_scale = rng.uniform(0.8, 1.2, size=(n, 1))  # heart-rate dependent stretch of P/T timing
    r_peak_error = rng.normal(0.0, 10.0, size=(n, 1))  # R-peak detection error shifts the whole window
    beats = np.zeros((n, BEAT_LENGTH))
    for ci, cls in enumerate(CLASSES):
        rows = np.flatnonzero(labels == ci)
        for amp, centre, width in MORPHOLOGY[cls]:
            k = rows.size
            a = amp * rng.normal(1.0, 0.3, size=(k, 1))
            stretch = rate_scale[rows] if abs(centre) > 80 else 1.0
            c = centre * stretch + r_peak_error[rows] + rng.normal(0.0, 5.0 + 0.08 * abs(centre), size=(k, 1))
            w = width * rng.normal(1.0, 0.25, size=(k, 1)).clip(0.5, 1.8)
            beats[rows] += a * np.exp(-0.5 * ((t[None] - c) / w) ** 2)
    # baseline wander (0.15-0.5 Hz), white noise, EMG-like high-frequency bursts
    freq = rng.uniform(0.15, 0.5, size=(n, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    beats += rng.uniform(0.0, 0.3, size=(n, 1)) * np.sin(2 * np.pi * freq * t[None] / 1000 + phase)
    beats += rng.normal(0.0, 1.0, size=beats.shape) * rng.uniform(0.01, 0.08, size=(n, 1))
    lo, hi = beats.min(axis=1, keepdims=True), beats.max(axis=1, keepdims=True)
    beats = (beats - lo) / np.maximum(hi - lo, 1e-8)
    return beats.astype(np.float32), labels


def class_counts(balance: str, scale: float) -> dict[str, int]:
    table = {"balanced": BALANCED_COUNTS, "mitbih": MITBIH_COUNTS}
    if balance not in table:
        raise ValueError(f"ecg_beats balance must be one of {sorted(table)}, got {balance!r}")
    return {c: max(2, int(round(v * scale))) for c, v in table[balance].items()}


@register("synthetic", "ecg_beats")
def ecg_beats(
    split: str, seed: int, balance: str = "balanced", scale: float = 1.0, test_fraction: float = 0.5, **_
) -> dict[str, np.ndarray]:
    """signal (n, 128, 1) float32 in [0, 1]; label (n,) int32 in 0..4 (N, L, R, A, V)."""
    beats, labels = generate(class_counts(balance, scale), seed)
    idx = split_indices(labels.size, split, test_fraction=test_fraction, seed=seed)
    return {"signal": beats[idx, :, None], "label": labels[idx]}
