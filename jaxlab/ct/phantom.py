"""Ellipse phantoms: images (by supersampled rasterisation) and their closed-form sinograms.

An ellipse set is an array `(E, 6)` of rows `[value, a, b, x0, y0, phi]`: value added inside, semi-axes
a (along the rotated x axis) and b, centre (x0, y0) and rotation phi [rad, counter-clockwise], all
lengths in the geometry's units (`geometry` module docstring: x right, y up, origin at the centre).
The line integral of one ellipse along the line `{p: <p, n> = t}` (n a unit normal at angle
`theta_n`) is `2 value a b sqrt(s^2 - tau^2) / s^2` for `|tau| < s`, with `tau = t - <c, n>` and
`s^2 = a^2 cos^2(theta_n - phi) + b^2 sin^2(theta_n - phi)` (Kak & Slaney, ch. 3); the sinogram of a
phantom is the sum over its ellipses, for any geometry's rays (`geometry.rays`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.ct.geometry import Geometry, pixel_centres, rays

# (value, a, b, x0, y0, phi in degrees) on the unit disc; Toft's modified Shepp-Logan (higher contrast)
# and the original values (Shepp & Logan 1974), as in Kak & Slaney table 3.1.
_SHEPP_LOGAN_SHAPES = np.array([
    [0.69, 0.92, 0.0, 0.0, 0.0], [0.6624, 0.874, 0.0, -0.0184, 0.0], [0.11, 0.31, 0.22, 0.0, -18.0],
    [0.16, 0.41, -0.22, 0.0, 18.0], [0.21, 0.25, 0.0, 0.35, 0.0], [0.046, 0.046, 0.0, 0.1, 0.0],
    [0.046, 0.046, 0.0, -0.1, 0.0], [0.046, 0.023, -0.08, -0.605, 0.0], [0.023, 0.023, 0.0, -0.606, 0.0],
    [0.023, 0.046, 0.06, -0.605, 0.0]])
_MODIFIED_VALUES = np.array([1.0, -0.8, -0.2, -0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
_ORIGINAL_VALUES = np.array([2.0, -0.98, -0.02, -0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])


def shepp_logan_ellipses(radius: float = 1.0, *, modified: bool = True, scale: float = 1.0) -> jax.Array:
    """`(10, 6)` Shepp-Logan ellipses scaled to a phantom of half-height `radius`, values times `scale`."""
    values = (_MODIFIED_VALUES if modified else _ORIGINAL_VALUES) * scale
    s = _SHEPP_LOGAN_SHAPES
    rows = np.stack([values, s[:, 0] * radius, s[:, 1] * radius, s[:, 2] * radius, s[:, 3] * radius,
                     np.deg2rad(s[:, 4])], axis=1)
    return jnp.asarray(rows, jnp.float32)


@functools.partial(jax.jit, static_argnames=("n",))
def random_ellipses(key: jax.Array, n: int, radius: float = 1.0, *, value: float = 1.0) -> jax.Array:
    """`(n + 1, 6)` a random phantom: a body ellipse (value `value`, semi-axes 0.75-0.95 radius) holding
    `n` inner ellipses (semi-axes 0.03-0.3 radius, values in +-0.5 value, centres inside the body)."""
    k_body, k_ax, k_c, k_v, k_phi = jax.random.split(key, 5)
    body_ab = jax.random.uniform(k_body, (2,), minval=0.75, maxval=0.95) * radius
    body = jnp.array([value, body_ab[0], body_ab[1], 0.0, 0.0, 0.0])
    ab = jax.random.uniform(k_ax, (n, 2), minval=0.03, maxval=0.3) * radius
    r = jnp.sqrt(jax.random.uniform(k_c, (n,))) * 0.6
    angle = jax.random.uniform(jax.random.fold_in(k_c, 1), (n,), maxval=2 * jnp.pi)
    centres = jnp.stack([r * jnp.cos(angle) * body_ab[0], r * jnp.sin(angle) * body_ab[1]], -1)
    values = jax.random.uniform(k_v, (n,), minval=-0.5, maxval=0.5) * value
    phi = jax.random.uniform(k_phi, (n,), maxval=jnp.pi)
    inner = jnp.concatenate([values[:, None], ab, centres, phi[:, None]], axis=1)
    return jnp.concatenate([body[None], inner], axis=0).astype(jnp.float32)


def _inside(ellipses: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Sum of the values of the ellipses containing each point; x, y any equal shape."""
    value, a, b, x0, y0, phi = (ellipses[:, i].reshape((-1,) + (1,) * x.ndim) for i in range(6))
    dx, dy = x - x0, y - y0
    xr = dx * jnp.cos(phi) + dy * jnp.sin(phi)
    yr = -dx * jnp.sin(phi) + dy * jnp.cos(phi)
    return jnp.sum(jnp.where((xr / a) ** 2 + (yr / b) ** 2 <= 1.0, value, 0.0), axis=0)


@functools.partial(jax.jit, static_argnames=("oversample",))
def ellipse_image(ellipses: jax.Array, geom: Geometry, *, oversample: int = 4) -> jax.Array:
    """`(H, W)` the phantom on the geometry's pixel grid, each pixel the mean of oversample^2 samples."""
    x, y = pixel_centres(geom)
    offsets = ((jnp.arange(oversample) + 0.5) / oversample - 0.5) * geom.pixel_size
    dx, dy = (o.ravel() for o in jnp.meshgrid(offsets, offsets))
    samples = _inside(ellipses, x[..., None] + dx, y[..., None] + dy)  # (H, W, oversample^2)
    return samples.mean(-1)


@jax.jit
def ellipse_sinogram(ellipses: jax.Array, geom: Geometry) -> jax.Array:
    """`(V, D)` the exact line integrals of the phantom along the geometry's rays (masked pads are 0)."""
    point, direction = rays(geom, geom.angles)
    normal = jnp.stack([-direction[..., 1], direction[..., 0]], -1)  # (V, D, 2)
    t = jnp.sum(point * normal, -1)
    theta_n = jnp.arctan2(normal[..., 1], normal[..., 0])
    value, a, b, x0, y0, phi = (ellipses[:, i][:, None, None] for i in range(6))
    tau = t - (x0 * normal[..., 0] + y0 * normal[..., 1])
    s2 = (a * jnp.cos(theta_n - phi)) ** 2 + (b * jnp.sin(theta_n - phi)) ** 2
    chord = 2 * value * a * b * jnp.sqrt(jnp.maximum(s2 - tau**2, 0.0)) / s2
    return chord.sum(0) * (geom.view_mask[:, None] * geom.det_mask[None, :])
