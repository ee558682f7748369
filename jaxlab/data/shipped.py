"""`shipped:<name>`: real data that ships inside installed wheels, so it loads with no network.

Each builder takes (split, seed) and returns arrays with a leading example axis. Datasets with many
examples get a fixed seeded train/test partition; single recordings/images serve every split.
"""

from __future__ import annotations

import numpy as np

from jaxlab.data.sources import register, split_indices

SKIMAGE_IMAGES = ("astronaut", "camera", "coins", "chelsea", "coffee", "rocket", "moon", "page")


def _split(arrays: dict[str, np.ndarray], split: str, seed: int, test_fraction: float) -> dict:
    n = next(iter(arrays.values())).shape[0]
    idx = split_indices(n, split, test_fraction=test_fraction, seed=seed)
    return {k: v[idx] for k, v in arrays.items()}


@register("shipped", "digits")
def digits(split: str, seed: int, test_fraction: float = 0.2, **_) -> dict:
    """scikit-learn digits: image (1797, 8, 8, 1) float32 in [0, 1], label (1797,) int32, 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    arrays = {"image": (d.images[..., None] / 16.0).astype(np.float32), "label": d.target.astype(np.int32)}
    return _split(arrays, split, seed, test_fraction)


@register("shipped", "iris")
def iris(split: str, seed: int, test_fraction: float = 0.2, **_) -> dict:
    """scikit-learn iris: features (150, 4) float32, label (150,) int32, 3 classes."""
    from sklearn.datasets import load_iris

    d = load_iris()
    arrays = {"features": d.data.astype(np.float32), "label": d.target.astype(np.int32)}
    return _split(arrays, split, seed, test_fraction)


@register("shipped", "skimage_images")
def skimage_images(split: str, seed: int, size: int = 128, **_) -> dict:
    """Real photos from scikit-image, grey, resized to (size, size): image (8, size, size, 1) in [0, 1]."""
    from skimage import color, data, transform

    out = []
    for name in SKIMAGE_IMAGES:
        img = getattr(data, name)()
        img = color.rgb2gray(img) if img.ndim == 3 else img / (255.0 if img.max() > 1 else 1.0)
        out.append(transform.resize(img, (size, size), anti_aliasing=True))
    return {"image": np.stack(out)[..., None].astype(np.float32)}


@register("shipped", "shepp_logan")
def shepp_logan(split: str, seed: int, size: int = 400, **_) -> dict:
    """scikit-image Shepp-Logan CT phantom: image (1, size, size, 1) float32 attenuation in [0, 1]."""
    from skimage import data, transform

    img = data.shepp_logan_phantom()
    if size != img.shape[0]:
        img = transform.resize(img, (size, size), anti_aliasing=True)
    return {"image": img[None, ..., None].astype(np.float32)}


@register("shipped", "stereo_motorcycle")
def stereo_motorcycle(split: str, seed: int, **_) -> dict:
    """scikit-image real stereo pair: left/right (1, 500, 741, 3) uint8 and dense disparity (1, 500, 741)
    float32 in pixels, 0 where unknown (the file marks those inf; 0 = invalid is the depth convention)."""
    from skimage import data

    left, right, disparity = data.stereo_motorcycle()
    disparity = np.where(np.isfinite(disparity), disparity, 0.0).astype(np.float32)
    return {"left": left[None], "right": right[None], "disparity": disparity[None]}


@register("shipped", "pywt_ecg")
def pywt_ecg(split: str, seed: int, **_) -> dict:
    """PyWavelets' real ECG: signal (1, 1024, 1) float32 (raw ADC units as shipped)."""
    import pywt

    return {"signal": pywt.data.ecg().astype(np.float32)[None, :, None]}


@register("shipped", "pydicom_ecg")
def pydicom_ecg(split: str, seed: int, **_) -> dict:
    """pydicom's real 12-lead ECG example: signal (1, 10000, 12) float32 at 1 kHz (microvolts)."""
    from pydicom import examples
    from pydicom.waveforms import multiplex_array

    return {"signal": multiplex_array(examples.waveform, 0, as_raw=False).astype(np.float32)[None]}


@register("shipped", "pydicom_ct")
def pydicom_ct(split: str, seed: int, **_) -> dict:
    """pydicom's real CT slice: image (1, 128, 128, 1) float32 in Hounsfield units."""
    from pydicom import examples

    ds = examples.ct
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return {"image": hu[None, ..., None]}
