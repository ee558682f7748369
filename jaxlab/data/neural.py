"""Neural-response data for image -> neuron models: a simulated population (offline default) and user
recordings.

`synthetic:neural_population`: natural image patches cut from scikit-image's shipped photos
(jaxlab.data.shipped.skimage_images) shown to a fixed bank of simulated V1-like neurons. Neuron n has a
Gabor receptive field G_n (position, orientation, spatial frequency, phase, size and aspect drawn once
from `seed`, so the same population answers the train and the test patches); its firing rate for a
patch x (mean-subtracted) is

    rate_n(x) = baseline + gain_n * relu(<G_n, x - mean(x)>) ** exponent

with gain_n set so that the neuron's mean rate over a fixed calibration set of patches is `mean_rate`
(spikes per trial). Each stimulus is shown `repeats` times (`train_repeats` for the train split when
set: large stimulus sets are often shown once each); a trial's count is Poisson(rate). Served
features (S stimuli, N neurons, R repeats, P = patch size):
    image (S, P, P, 1) float32 in [0, 1]; response (S, N) float32, the mean count over the repeats;
    trials (S, R, N) float32 counts; rate (S, N) float32 ground-truth rates.
Everything is a pure function of (seed, split, options): train and test patches come from separate
streams of the seed.

`neural:<path>`: your recordings, e.g. the Allen Brain Observatory natural scenes (118 images). Prepare,
where allensdk and the internet are at hand, one .npz (or .h5) holding
    image     (S, H, W) or (S, H, W, C) stimuli, uint8 or float (boc.get_ophys_experiment_data(id)
              .get_stimulus_template("natural_scenes"), 118 x 918 x 1174 uint8);
    response  (S, N) trial-averaged responses (e.g. mean dF/F in the 0.5 s after onset per image and cell),
              or (S, R, N) per-trial responses (the repeats then serve the noise-corrected correlation).
The readouts' softplus output is positive, so give non-negative responses (spike counts, deconvolved
events, or dF/F clipped at 0); the Poisson loss refuses negative ones. Images are turned grey (channel
mean), resized to `image_size` (default: kept) and scaled to [0, 1] (uint8 / 255, floats by the set's min
and max); stimuli are split into train / test by a fixed seeded partition (`test_fraction`). The option
`keys` names stored arrays ("image:stimuli,response:dff").
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from jaxlab.data.sources import (
    ArraySource,
    DatasetNotFoundError,
    DataSourceError,
    parse_keys,
    register,
    register_kind,
    split_indices,
)

_SPLIT_SALT = {"train": 1, "test": 2}
_BANK_SALT, _CALIBRATION_SALT, _SPIKE_SALT = 0xBA2C, 0xCA11, 0x5B1C


@functools.lru_cache(maxsize=4)
def photos(size: int = 256) -> np.ndarray:
    """scikit-image's shipped photos, grey, (8, size, size) float32 in [0, 1] (read once, cached)."""
    from jaxlab.data.shipped import skimage_images

    return skimage_images("all", 0, size=size)["image"][..., 0]


def cut_patches(images: np.ndarray, count: int, patch: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random (patch, patch) crops of images (I, H, W), each from a random image, with a random
    horizontal flip: (count, patch, patch) float32."""
    num, height, width = images.shape
    if patch > min(height, width):
        raise DataSourceError(f"patch size {patch} is larger than the photos ({height}x{width})")
    which = rng.integers(0, num, count)
    top = rng.integers(0, height - patch + 1, count)
    left = rng.integers(0, width - patch + 1, count)
    flip = rng.random(count) < 0.5
    out = np.empty((count, patch, patch), np.float32)
    for i in range(count):
        crop = images[which[i], top[i]:top[i] + patch, left[i]:left[i] + patch]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def gabor_bank(num_neurons: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-norm Gabor receptive fields (num_neurons, size, size) float32.

    Per neuron: centre uniform in the central half of the patch, orientation in [0, pi), envelope sigma in
    [size/16, size/8] px, wavelength 1.5-3 sigmas, phase in [0, 2 pi), aspect (gamma) in [0.5, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    n = num_neurons
    cx, cy = rng.uniform(size / 4, 3 * size / 4, (2, n))
    theta = rng.uniform(0, np.pi, n)
    sigma = rng.uniform(size / 16, size / 8, n)
    wavelength = sigma * rng.uniform(1.5, 3.0, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    gamma = rng.uniform(0.5, 1.0, n)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    along, across = dx * c + dy * s, -dx * s + dy * c
    sig = sigma[:, None, None]
    envelope = np.exp(-(along**2 + (gamma[:, None, None] * across) ** 2) / (2 * sig**2))
    g = envelope * np.cos(2 * np.pi * along / wavelength[:, None, None] + phase[:, None, None])
    g -= g.mean(axis=(1, 2), keepdims=True)
    g /= np.linalg.norm(g.reshape(n, -1), axis=1)[:, None, None]
    return g.astype(np.float32)


def drive(patches: np.ndarray, bank: np.ndarray, exponent: float) -> np.ndarray:
    """relu(<G_n, x - mean(x)>) ** exponent: patches (S, P, P), bank (N, P, P) -> (S, N) float64."""
    centred = patches - patches.mean(axis=(1, 2), keepdims=True)
    flat_patches = centred.reshape(len(patches), -1).astype(np.float64)
    linear = flat_patches @ bank.reshape(len(bank), -1).T.astype(np.float64)
    return np.maximum(linear, 0.0) ** exponent


@register("synthetic", "neural_population")
def neural_population(
    split: str,
    seed: int,
    *,
    n_train: int = 2000,
    n_test: int = 200,
    num_neurons: int = 64,
    patch: int = 32,
    repeats: int = 10,
    train_repeats: int | None = None,
    mean_rate: float = 1.0,
    baseline: float = 0.1,
    exponent: float = 1.0,
    photo_size: int = 256,
    **_,
) -> dict[str, np.ndarray]:
    """The simulated population's responses to `split`'s patches (see the module docstring)."""
    if split not in _SPLIT_SALT:
        raise DataSourceError(f"synthetic:neural_population has splits 'train' and 'test', got {split!r}")
    counts = [num_neurons, repeats, n_train, n_test] + ([train_repeats] if train_repeats is not None else [])
    if min(counts) < 1 or mean_rate <= 0:
        raise DataSourceError("synthetic:neural_population needs num_neurons, repeats, n_train, n_test (and "
                              "train_repeats if set) >= 1 and mean_rate > 0; got "
                              f"{num_neurons}, {repeats}, {n_train}, {n_test}, {train_repeats}, {mean_rate}")
    images = photos(photo_size)
    bank = gabor_bank(num_neurons, patch, np.random.default_rng([seed, _BANK_SALT]))
    calibration = cut_patches(images, 512, patch, np.random.default_rng([seed, _CALIBRATION_SALT]))
    mean_drive = drive(calibration, bank, exponent).mean(0)
    gain = (mean_rate - baseline) / np.maximum(mean_drive, 1e-12)
    count = n_train if split == "train" else n_test
    if split == "train" and train_repeats is not None:
        repeats = int(train_repeats)
    patches = cut_patches(images, count, patch, np.random.default_rng([seed, _SPLIT_SALT[split]]))
    rate = baseline + gain * drive(patches, bank, exponent)
    spikes = np.random.default_rng([seed, _SPIKE_SALT, _SPLIT_SALT[split]])
    trials = spikes.poisson(rate[:, None, :], (count, repeats, num_neurons)).astype(np.float32)
    return {"image": patches[..., None], "response": trials.mean(1), "trials": trials,
            "rate": rate.astype(np.float32)}


def grey_unit(images: np.ndarray, image_size: tuple[int, int] | None) -> np.ndarray:
    """Stimuli (S, H, W) or (S, H, W, C) -> (S, h, w, 1) float32 grey in [0, 1], resized when image_size."""
    images = np.asarray(images)
    if images.ndim == 4:
        images = images.mean(-1) if images.shape[-1] > 1 else images[..., 0]
    if images.ndim != 3:
        raise DataSourceError(f"stimulus images must be (S, H, W) or (S, H, W, C), got shape {images.shape}")
    if np.issubdtype(images.dtype, np.integer):
        x = images.astype(np.float32) / 255.0
    else:
        lo, hi = float(np.min(images)), float(np.max(images))
        x = ((images - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)
    if image_size is not None and tuple(image_size) != x.shape[1:]:
        from skimage.transform import resize

        x = np.stack([resize(im, tuple(image_size), anti_aliasing=True) for im in x]).astype(np.float32)
    return x[..., None]


@register_kind("neural", renames=True)
def recordings(
    name: str, *, split: str, seed: int, keys=None, image_size=None, test_fraction: float = 0.2, **_
) -> ArraySource:
    """`neural:<path>`: stimulus images and recorded responses from your file (module docstring)."""
    from jaxlab.data.files import read_arrays

    path = Path(name).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(
            f"recordings file {str(path)!r} not found. Save an .npz with image (S, H, W[, C]) and response "
            "(S, N) or (S, repeats, N), e.g. the Allen Brain Observatory natural scenes (see "
            "jaxlab/data/neural.py)")
    arrays = read_arrays(path)
    served = parse_keys(keys) or {"image": "image", "response": "response"}
    missing = [stored for stored in served.values() if stored not in arrays]
    if missing or set(served) != {"image", "response"}:
        raise DataSourceError(
            f"{path}: needs arrays served as 'image' and 'response' (keys {served}); missing "
            f"{missing or 'none'}; the file has {sorted(arrays)}. Name them with "
            "--config.data.options.keys=image:<stored>,response:<stored>")
    images, response = arrays[served["image"]], np.asarray(arrays[served["response"]], np.float32)
    if response.ndim not in (2, 3) or response.shape[0] != images.shape[0]:
        raise DataSourceError(f"{path}: response must be (S, N) or (S, repeats, N) with S = "
                              f"{images.shape[0]} stimuli (image {images.shape}); got {response.shape}")
    out = {"image": grey_unit(images, image_size)}
    if response.ndim == 3:
        out["trials"], out["response"] = response, np.nanmean(response, axis=1).astype(np.float32)
    else:
        out["response"] = response
    idx = split_indices(len(response), split, test_fraction=test_fraction, seed=seed)
    return ArraySource({k: v[idx] for k, v in out.items()}, name=f"{path}[{split}]")
