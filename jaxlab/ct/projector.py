"""The projector A (image -> sinogram) and its exact transpose A^T, in pure JAX.

Discretisation: ray-driven, Joseph's method. Each ray (one per view and detector bin, from
`geometry.rays`) is cut by the K = max(H, W) rows (if it runs closer to vertical) or columns (if
closer to horizontal) of the image; at each crossing the image is linearly interpolated between the
two nearest pixel centres of that row/column and the K samples are summed times the path length per
row/column, `pixel_size / |cos(angle to the stepping axis)|`. So A is a sparse matrix with <= 2K
non-zeros per ray, written as two gathers from the zero-bordered, flattened image (no sparse format,
no scatter): XLA fuses the index arithmetic, gathers and weighted sum. Views are processed in chunks
(`jax.lax.map(..., batch_size=view_chunk)`) so memory is O(view_chunk * D * K), not O(V * D * K).
Projections of masked views / detectors (the pads of `stack_geometries`) are 0.

Adjoint: `backproject` is `jax.linear_transpose(project)`: the transpose of this same matrix (gathers
become scatter-adds), exact to float rounding, so <A x, y> = <x, A^T y>. Reverse-mode autodiff
through `project` produces this same transpose, and autodiff through `backproject` transposes back to
A's gathers, so gradients always use the matched pair; forward mode, jit and vmap (also over a
stacked geometry, `geometry.stack_geometries`) work as for any JAX function. For FBP the usual
pixel-driven, distance-weighted back-projection lives in `jaxlab.ct.fbp` (it is not A^T).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlab.ct.geometry import Geometry, rays

CHUNK_ELEMENTS = 1 << 22  # gathered samples per view chunk (x batch): bounds the working set


def _check_shape(x: jax.Array, expected: tuple[int, int], what: str) -> tuple[int, ...]:
    if x.ndim < 2 or tuple(x.shape[-2:]) != tuple(expected):
        raise ValueError(f"{what} has shape {x.shape}; its last two axes must be {tuple(expected)}")
    return tuple(x.shape[:-2])


def default_view_chunk(geom: Geometry, batch: int = 1) -> int:
    """Views per chunk so that one chunk gathers about CHUNK_ELEMENTS samples."""
    k = max(geom.image_shape)
    return int(max(1, min(geom.n_views, CHUNK_ELEMENTS // max(1, geom.n_det * k * batch))))


def joseph_taps(geom: Geometry, angles: jax.Array):
    """Joseph interpolation taps of the rays of `angles (V,)`.

    Returns `(index, stride, w0, w1)`: flat indices `(V, D, K)` into the image padded by one zero pixel
    on each side and flattened ((H+2)*(W+2)), the step to the second tap `(V, D, 1)` (1 along a row,
    W+2 along a column), and the weights `(V, D, K)` of the two taps (path length x linear
    interpolation; 0 outside the image).
    """
    h, w = geom.image_shape
    wp, k = w + 2, max(h, w)
    point, direction = rays(geom, angles)
    ps = geom.pixel_size
    p_row = (h - 1) / 2 - point[..., 1] / ps  # fractional (row, col) index coordinates of the ray point
    p_col = point[..., 0] / ps + (w - 1) / 2
    d_row, d_col = -direction[..., 1], direction[..., 0]
    vertical = jnp.abs(d_row) >= jnp.abs(d_col)  # step over rows, interpolate within each row
    major = jnp.where(vertical, d_row, d_col)
    minor = jnp.where(vertical, d_col, d_row)
    p_major = jnp.where(vertical, p_row, p_col)
    p_minor = jnp.where(vertical, p_col, p_row)
    steps = jnp.arange(k, dtype=jnp.float32)
    pos = p_minor[..., None] + (steps - p_major[..., None]) * (minor / major)[..., None]
    lower = jnp.floor(pos)
    frac = pos - lower
    n_major = jnp.where(vertical, h, w)[..., None]
    n_minor = jnp.where(vertical, w, h)[..., None]
    valid = (steps < n_major) & (lower >= -1) & (lower <= n_minor - 1)
    lower = jnp.where(valid, lower, 0).astype(jnp.int32)
    step_i = jnp.arange(k, dtype=jnp.int32)
    index = jnp.where(vertical[..., None], (step_i + 1) * wp + lower + 1, (lower + 1) * wp + step_i + 1)
    index = jnp.where(valid, index, 0)
    stride = jnp.where(vertical, 1, wp)[..., None]
    length = jnp.where(valid, (ps / jnp.abs(major))[..., None], 0.0)
    return index, stride, length * (1 - frac), length * frac


@functools.partial(jax.jit, static_argnames=("view_chunk",))
def project(image: jax.Array, geom: Geometry, *, view_chunk: int | None = None) -> jax.Array:
    """A: line integrals of `image (..., H, W)` along the rays of `geom` -> `(..., V, D)`.

    Units: image values (e.g. attenuation per length unit) times length. Accumulates in float32 and
    returns the image's dtype (bf16 images are gathered in bf16).
    """
    batch = _check_shape(image, geom.image_shape, "project: image")
    h, w = geom.image_shape
    padded = jnp.pad(image.reshape((-1, h, w)), ((0, 0), (1, 1), (1, 1)))
    table = padded.reshape((-1, (h + 2) * (w + 2))).T  # (P, B): a gathered pixel brings the whole batch
    chunk = view_chunk or default_view_chunk(geom, table.shape[1])

    def one_view(angle):
        index, stride, w0, w1 = (t[0] for t in joseph_taps(geom, angle[None]))
        low = table.at[index].get(mode="promise_in_bounds")  # (D, K, B); joseph_taps keeps indices in range
        high = table.at[index + stride].get(mode="promise_in_bounds")
        return (low * w0[..., None] + high * w1[..., None]).sum(1, dtype=jnp.float32)  # (D, B)

    sino = jax.lax.map(one_view, geom.angles, batch_size=chunk)  # (V, D, B)
    sino = jnp.moveaxis(sino, -1, 0) * (geom.view_mask[:, None] * geom.det_mask[None, :])
    return sino.reshape(batch + geom.sino_shape).astype(image.dtype)


@functools.partial(jax.jit, static_argnames=("view_chunk",))
def backproject(sino: jax.Array, geom: Geometry, *, view_chunk: int | None = None) -> jax.Array:
    """A^T: the exact transpose of `project`, `sino (..., V, D)` -> `(..., H, W)` (scatter-adds)."""
    batch = _check_shape(sino, geom.sino_shape, "backproject: sinogram")
    spec = jax.ShapeDtypeStruct(batch + geom.image_shape, sino.dtype)
    transpose = jax.linear_transpose(functools.partial(project, geom=geom, view_chunk=view_chunk), spec)
    return transpose(sino)[0]


@functools.partial(jax.jit, static_argnames=("iters", "seed"))
def operator_norm(geom: Geometry, iters: int = 30, seed: int = 0) -> jax.Array:
    """||A||_2 by power iteration on A^T A (e.g. for a gradient step size 1 / ||A||^2)."""
    x = jax.random.normal(jax.random.key(seed), geom.image_shape)

    def body(_, x):
        y = backproject(project(x, geom), geom)
        return y / jnp.linalg.norm(y)

    x = jax.lax.fori_loop(0, iters, body, x / jnp.linalg.norm(x))
    return jnp.linalg.norm(project(x, geom))
