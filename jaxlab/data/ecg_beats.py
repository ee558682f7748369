"""MIT-BIH-style beat extraction (split_ecg.md preprocessing) and real beats from shipped recordings.

record -> min-max normalise -> R peaks -> window R +- 100 samples at 360 Hz (scaled to the record's rate)
-> resample to 128 -> wavelet denoise (bior4.4, soft threshold 0.005 * sqrt(2 * log2 n) on the detail
coefficients) -> min-max to [0, 1]. Real recordings shipped in wheels give unlabelled real beats
(`shipped:pywt_ecg_beats`, `shipped:pydicom_ecg_beats`) for realism checks of the leakage metrics.
"""

from __future__ import annotations

import numpy as np

from jaxlab.data.sources import register

MITBIH_RATE = 360
HALF_WINDOW = 100  # samples at 360 Hz
BEAT_LENGTH = 128


def minmax(x: np.ndarray, axis=-1) -> np.ndarray:
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def detect_r_peaks(signal: np.ndarray, rate: float) -> np.ndarray:
    """R-peak sample indices of a 1D ECG (a small Pan-Tompkins): the squared slope, integrated over 80 ms,
    peaks at least 300 ms apart above half its 99th percentile; each is moved to the largest excursion
    from the median within +-60 ms (the R wave, whatever the lead's polarity)."""
    from scipy.signal import find_peaks

    x = signal.astype(np.float64)
    x = x - np.median(x)
    energy = np.convolve(np.gradient(x) ** 2, np.ones(max(1, int(0.08 * rate))), mode="same")
    found, _ = find_peaks(energy, height=0.5 * np.percentile(energy, 99), distance=max(1, int(0.3 * rate)))
    reach = max(1, int(0.06 * rate))
    sign = 1.0 if x.max() >= -x.min() else -1.0
    peaks = [max(0, p - reach) + int(np.argmax(sign * x[max(0, p - reach) : p + reach + 1])) for p in found]
    return np.unique(np.array(peaks, dtype=np.int64))


def wavelet_denoise(beat: np.ndarray, wavelet: str = "bior4.4") -> np.ndarray:
    import pywt

    coeffs = pywt.wavedec(beat, wavelet, mode="periodization")
    threshold = 0.005 * np.sqrt(2 * np.log2(beat.size))
    coeffs = [coeffs[0]] + [pywt.threshold(c, threshold, mode="soft") for c in coeffs[1:]]
    return pywt.waverec(coeffs, wavelet, mode="periodization")[: beat.size]


def extract_beats(signal: np.ndarray, rate: float, r_peaks: np.ndarray | None = None) -> np.ndarray:
    """(T,) record at `rate` Hz -> (n_beats, 128) float32 beats in [0, 1] (edge beats dropped)."""
    from scipy.signal import resample

    x = minmax(signal.astype(np.float64))
    peaks = detect_r_peaks(signal, rate) if r_peaks is None else np.asarray(r_peaks)
    half = int(round(HALF_WINDOW * rate / MITBIH_RATE))
    beats = [x[p - half : p + half + 1] for p in peaks if p - half >= 0 and p + half < x.size]
    if not beats:
        raise ValueError(f"no complete beat windows in a record of {x.size} samples at {rate} Hz")
    out = [minmax(wavelet_denoise(resample(b, BEAT_LENGTH))) for b in beats]
    return np.stack(out).astype(np.float32)


@register("shipped", "pywt_ecg_beats")
def pywt_ecg_beats(split: str, seed: int, **_) -> dict:
    """Real beats from PyWavelets' ECG (360 Hz, as in MIT-BIH): signal (n, 128, 1)."""
    import pywt

    return {"signal": extract_beats(pywt.data.ecg(), MITBIH_RATE)[..., None]}


@register("shipped", "pydicom_ecg_beats")
def pydicom_ecg_beats(split: str, seed: int, lead: int = 1, **_) -> dict:
    """Real beats from lead `lead` (default II) of pydicom's 12-lead ECG at 1 kHz: signal (n, 128, 1)."""
    from pydicom import examples
    from pydicom.waveforms import multiplex_array

    record = multiplex_array(examples.waveform, 0, as_raw=False)[:, lead]
    return {"signal": extract_beats(record, 1000.0)[..., None]}
