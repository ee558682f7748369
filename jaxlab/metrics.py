"""Image-quality measures shared by the methods (DAE-NR's reconstructions, RoS-FL's and HyperFed's CT).

Per image, jax, images (B, H, W, C) in [0, data_range]:
- mse: mean squared error over pixels; psnr = 10 log10(data_range^2 / mse).
- ssim: Wang et al. 2004 with a Gaussian window (sigma 1.5, truncated at 3.5 sigma: 11 x 11), K1 0.01,
  K2 0.03, population (co)variances, averaged over the positions where the window fits inside the image
  and over channels: skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=...) computes the same (tests/test_dae_nr.py checks it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image mean squared error: (B, ...) x2 -> (B,)."""
    return jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))


def psnr(mse_values, data_range: float = 1.0):
    """PSNR in dB from per-image MSE (any shape, jax or numpy)."""
    return 10.0 * jnp.log10(data_range**2 / mse_values)


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> jax.Array:
    """The normalised 1D Gaussian of scipy.ndimage.gaussian_filter: radius int(truncate sigma + 0.5)."""
    radius = int(truncate * sigma + 0.5)
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    w = jnp.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: jax.Array, w: jax.Array) -> jax.Array:
    """Separable 'valid' filtering of (B, H, W, C) by the 1D window w along H and W, per channel."""
    k = len(w)
    rows = sum(w[i] * x[:, i:x.shape[1] - k + 1 + i] for i in range(k))
    return sum(w[i] * rows[:, :, i:x.shape[2] - k + 1 + i] for i in range(k))


def ssim(x: jax.Array, y: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Per-image SSIM (module docstring): (B, H, W, C) x2 -> (B,); H, W >= 11."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, H, W, C) images of one shape, got {x.shape} and {y.shape}")
    w = gaussian_window()
    if min(x.shape[1:3]) < len(w):
        raise ValueError(f"ssim's {len(w)}x{len(w)} window does not fit images of {x.shape[1:3]}")
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    mx, my = _filter_valid(x, w), _filter_valid(y, w)
    vx = _filter_valid(x * x, w) - mx * mx
    vy = _filter_valid(y * y, w) - my * my
    cxy = _filter_valid(x * y, w) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2, 3))
