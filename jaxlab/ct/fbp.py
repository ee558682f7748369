"""Filtered back-projection for parallel and fan beam (flat and arc detectors), full scans.

Kak & Slaney, "Principles of Computerized Tomographic Imaging", ch. 3 (the formulas used, per kind):
- parallel: Q = p * h (ramp h with spacing tau = det_spacing); f(r) = (pi / V) sum_views Q(<r, e_u>);
  valid for equally spaced views over pi (or 2 pi: then dtheta = 2 pi / V and a factor 1/2 give the
  same pi / V);
- fan, flat (equi-spaced) detector: rebin to the virtual detector through the rotation axis,
  s = u * s2r / (s2r + d2r); pre-weight p by s2r / sqrt(s2r^2 + s^2); Q = p' * (h / 2) with tau the
  virtual spacing; f(r) = (2 pi / V) sum_views Q(s'(r)) / U^2, U = (s2r + <r, e_r>) / s2r (eq. 3.117);
- fan, arc (equi-angular) detector: pre-weight by s2r cos(gamma); Q = p' * g, g(gamma) =
  (1/2) (gamma / sin gamma)^2 h(gamma), tau = dgamma = det_spacing / (s2r + d2r);
  f(r) = (2 pi / V) sum_views Q(gamma'(r)) / L^2, L = |r - source| (eq. 3.103).
The fan formulas need views equally spaced over 2 pi (no short-scan / Parker weights).
h is the band-limited ramp in its spatial form (h(0) = 1/(4 tau^2), h(odd n) = -1/(n pi tau)^2, else
0; its DFT avoids the DC error of a sampled |f|), convolved by zero-padded FFT (>= 2D points) and
multiplied in frequency by the window: ramp (none), Shepp-Logan sinc(f), cosine cos(pi f), Hann
(1 + cos(2 pi f)) / 2 (f in cycles per sample, as skimage.transform.iradon). V is the number of active
(unmasked) views. The back-projection is pixel-driven (each pixel reads its detector coordinate by
linear interpolation, a gather), chunked over views: it is the usual FBP back-projector, not A^T.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.ct.geometry import Geometry, detector_positions, pixel_centres
from jaxlab.ct.projector import _check_shape

FILTERS = ("ramp", "shepp-logan", "cosine", "hann")


def _window(name: str, n_fft: int) -> np.ndarray:
    f = np.fft.fftfreq(n_fft)
    windows = {"ramp": np.ones_like(f), "shepp-logan": np.sinc(f), "cosine": np.cos(np.pi * f),
               "hann": 0.5 * (1 + np.cos(2 * np.pi * f))}
    if name not in windows:
        raise ValueError(f"unknown FBP filter {name!r}; choose one of {FILTERS}")
    return windows[name].astype(np.float32)


def fft_size(n_det: int) -> int:
    """Zero-padded filter length: a power of two >= max(64, 2 n_det) (linear, not circular, conv)."""
    return int(max(64, 2 ** int(np.ceil(np.log2(2 * n_det)))))


def _ramp(offsets: jax.Array, tau: jax.Array) -> jax.Array:
    """Band-limited ramp h(n tau) at integer `offsets` n."""
    odd = (jnp.abs(offsets) % 2) == 1
    safe = jnp.where(offsets == 0, 1, offsets)
    return jnp.where(offsets == 0, 1 / (4 * tau**2), jnp.where(odd, -1 / (jnp.pi * safe * tau) ** 2, 0.0))


def _kernel_and_weights(geom: Geometry, n_fft: int):
    """(spatial kernel (n_fft,) in circular order, times its sample spacing; pre-weights (D,))."""
    offsets = jnp.asarray(np.fft.fftfreq(n_fft) * n_fft, jnp.float32)  # 0, 1, ..., -2, -1
    u = detector_positions(geom)
    if geom.kind == "parallel":
        tau = geom.det_spacing
        return _ramp(offsets, tau) * tau, jnp.ones_like(u)
    sdd = geom.s2r + geom.d2r
    if geom.kind == "fan_flat":
        tau = geom.det_spacing * geom.s2r / sdd
        s = u * geom.s2r / sdd
        return 0.5 * _ramp(offsets, tau) * tau, geom.s2r / jnp.sqrt(geom.s2r**2 + s**2)
    tau = geom.det_spacing / sdd
    gamma = offsets * tau
    ratio = jnp.where(offsets == 0, 1.0, gamma / jnp.sin(jnp.where(offsets == 0, 1.0, gamma)))
    return 0.5 * ratio**2 * _ramp(offsets, tau) * tau, geom.s2r * jnp.cos(u / sdd)


@functools.partial(jax.jit, static_argnames=("filter",))
def filter_sinogram(sino: jax.Array, geom: Geometry, filter: str = "ramp") -> jax.Array:
    """`(..., V, D)` pre-weighted and filtered projections Q (masked detectors in and out are 0, so a
    padded geometry reconstructs as its unpadded self)."""
    _check_shape(sino, geom.sino_shape, "filter_sinogram: sinogram")
    n_fft = fft_size(geom.n_det)
    kernel, weights = _kernel_and_weights(geom, n_fft)
    response = jnp.real(jnp.fft.fft(kernel)) * _window(filter, n_fft)
    q = sino.astype(jnp.float32) * (weights * geom.det_mask)
    spectrum = jnp.fft.rfft(q, n=n_fft, axis=-1) * response[: n_fft // 2 + 1]
    return jnp.fft.irfft(spectrum, n=n_fft, axis=-1)[..., : geom.n_det] * geom.det_mask


def _detector_coordinate(geom: Geometry, angle: jax.Array):
    """Per pixel `(H, W)`: the fractional detector index its ray hits at `angle`, and its weight."""
    x, y = pixel_centres(geom)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    across = x * cos + y * sin  # <r, e_u>
    if geom.kind == "parallel":
        return across / geom.det_spacing + geom.det_center, jnp.ones_like(x)
    along = geom.s2r + (-x * sin + y * cos)  # distance from the source along the central ray
    sdd = geom.s2r + geom.d2r
    if geom.kind == "fan_flat":
        s = geom.s2r * across / along
        return s / (geom.det_spacing * geom.s2r / sdd) + geom.det_center, (geom.s2r / along) ** 2
    gamma = jnp.arctan2(across, along)
    return gamma / (geom.det_spacing / sdd) + geom.det_center, 1 / (along**2 + across**2)


def _interpolate(q: jax.Array, coordinate: jax.Array) -> jax.Array:
    """Linear interpolation of rows `q (B, D)` at `coordinate (H, W)` (0 outside [0, D-1]) -> (B, H, W)."""
    d = q.shape[-1]
    padded = jnp.pad(q, ((0, 0), (1, 1)))
    lower = jnp.floor(coordinate)
    frac = coordinate - lower
    inside = (lower >= -1) & (lower <= d - 1)
    index = jnp.where(inside, lower + 1, 0).astype(jnp.int32)
    frac = jnp.where(inside, frac, 0.0)
    low = padded.T.at[index].get(mode="promise_in_bounds")  # (H, W, B); index in [0, d], index + 1 <= d + 1
    high = padded.T.at[index + 1].get(mode="promise_in_bounds")
    return jnp.moveaxis(low * (1 - frac)[..., None] + high * frac[..., None], -1, 0)


@functools.partial(jax.jit, static_argnames=("view_chunk",))
def weighted_backproject(q: jax.Array, geom: Geometry, *, view_chunk: int = 16) -> jax.Array:
    """Pixel-driven FBP back-projection of filtered `q (..., V, D)` -> `(..., H, W)` float32."""
    batch = _check_shape(q, geom.sino_shape, "weighted_backproject: filtered sinogram")
    q = jnp.moveaxis(q.reshape((-1,) + geom.sino_shape), 1, 0)  # (V, B, D)
    v = geom.n_views
    chunk = max(1, min(view_chunk, v))
    pad = -v % chunk
    angles = jnp.pad(geom.angles, (0, pad)).reshape((-1, chunk))
    mask = jnp.pad(geom.view_mask, (0, pad)).reshape((-1, chunk))
    q = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape((-1, chunk) + q.shape[1:])

    def one_view(angle, view_q, keep):
        coordinate, weight = _detector_coordinate(geom, angle)
        return _interpolate(view_q, coordinate) * (weight * keep)

    def body(total, xs):
        return total + jax.vmap(one_view)(*xs).sum(0), None

    total = jnp.zeros((q.shape[2],) + geom.image_shape, jnp.float32)
    total, _ = jax.lax.scan(body, total, (angles, q, mask))
    span = jnp.pi if geom.kind == "parallel" else 2 * jnp.pi
    total = total * (span / jnp.maximum(geom.view_mask.sum(), 1.0))
    return total.reshape(batch + geom.image_shape)


@functools.partial(jax.jit, static_argnames=("filter", "view_chunk"))
def fbp(sino: jax.Array, geom: Geometry, filter: str = "ramp", *, view_chunk: int = 16) -> jax.Array:
    """Filtered back-projection `(..., V, D)` -> `(..., H, W)` float32, in the projector's units."""
    return weighted_backproject(filter_sinogram(sino, geom, filter), geom, view_chunk=view_chunk)
