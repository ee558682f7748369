"""2-D CT scan geometries (parallel beam, fan beam with a flat or an arc detector) as pytrees.

Coordinates. The image is `(H, W)` pixels of side `pixel_size` centred on the rotation axis; pixel
`(row, col)` has centre `x = (col - (W-1)/2) * pixel_size`, `y = ((H-1)/2 - row) * pixel_size` (row 0
at the top, y up). At view angle `theta` the detector axis is `e_u = (cos theta, sin theta)` and the
rays travel along `e_r = (-sin theta, cos theta)`:
- parallel: detector bin k reads the line `{u_k e_u + s e_r}`, i.e. `t = x cos + y sin = u_k`, the
  Radon convention of `skimage.transform.radon` (its `theta` in degrees is ours in radians);
- fan: the source sits at `-s2r e_r`, the detector centre at `+d2r e_r`. A flat ("equi-spaced")
  detector puts bin k at `d2r e_r + u_k e_u`; an arc ("equi-angular") detector, centred on the
  source, puts it at fan angle `gamma_k = u_k / (s2r + d2r)` (u_k is arc length).
`u_k = (k - det_center) * det_spacing`, `det_center = (n_det - 1)/2 + det_shift` (HyperFed's
binshift, in bins). Units: any length unit, the same for every length (HyperFed's table uses cm).

Everything that can differ between scanners of one shape (angles, spacings, distances, masks) is an
array leaf, so geometries with equal `(n_views, n_det, image_shape, kind)` stack into one batched
geometry for `jax.vmap`; `stack_geometries` pads views / detectors to a common size and masks the pads.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

KINDS = ("parallel", "fan_flat", "fan_arc")


@struct.dataclass
class Geometry:
    """One scanner: `angles (V,)` [rad], scalars in length units, `view_mask (V,)`, `det_mask (D,)`.

    Construct with `parallel_beam`, `fan_beam` or `from_protocol`; `kind` and `image_shape` are static.
    """

    angles: jax.Array
    det_spacing: jax.Array
    det_center: jax.Array
    pixel_size: jax.Array
    s2r: jax.Array
    d2r: jax.Array
    view_mask: jax.Array
    det_mask: jax.Array
    kind: str = struct.field(pytree_node=False, default="parallel")
    image_shape: tuple[int, int] = struct.field(pytree_node=False, default=(0, 0))

    @property
    def n_views(self) -> int:
        return self.angles.shape[-1]

    @property
    def n_det(self) -> int:
        return self.det_mask.shape[-1]

    @property
    def sino_shape(self) -> tuple[int, int]:
        return (self.n_views, self.n_det)


def _scalar(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _make(kind, angles, n_det, det_spacing, image_shape, pixel_size, s2r, d2r, det_shift) -> Geometry:
    if kind not in KINDS:
        raise ValueError(f"geometry kind {kind!r} is not one of {KINDS}")
    h, w = (image_shape, image_shape) if isinstance(image_shape, int) else tuple(image_shape)
    angles = jnp.asarray(angles, jnp.float32)
    if angles.ndim != 1 or angles.shape[0] < 1 or n_det < 1 or h < 1 or w < 1:
        raise ValueError(f"geometry needs >= 1 view, detector and pixel: angles {angles.shape}, "
                         f"n_det {n_det}, image_shape {(h, w)}")
    if kind != "parallel" and not (float(s2r) > 0 and float(d2r) >= 0):
        raise ValueError(f"fan beam needs s2r > 0 and d2r >= 0, got s2r={s2r}, d2r={d2r}")
    return Geometry(
        angles=angles, det_spacing=_scalar(det_spacing), det_center=_scalar((n_det - 1) / 2 + det_shift),
        pixel_size=_scalar(pixel_size), s2r=_scalar(s2r), d2r=_scalar(d2r),
        view_mask=jnp.ones(angles.shape, jnp.float32), det_mask=jnp.ones((n_det,), jnp.float32),
        kind=kind, image_shape=(int(h), int(w)))


def full_scan(n_views: int, kind: str) -> np.ndarray:
    """Equally spaced angles over the full scan: [0, pi) for parallel beam, [0, 2 pi) for fan beam."""
    span = np.pi if kind == "parallel" else 2 * np.pi
    return np.arange(n_views) * (span / n_views)


def parallel_beam(n_views: int | Sequence[float], n_det: int, image_shape: int | tuple[int, int], *,
                  det_spacing: float = 1.0, pixel_size: float = 1.0, det_shift: float = 0.0) -> Geometry:
    """Parallel beam; `n_views` an int (full scan over [0, pi)) or the angles in radians."""
    angles = full_scan(n_views, "parallel") if isinstance(n_views, int) else n_views
    return _make("parallel", angles, n_det, det_spacing, image_shape, pixel_size, 0.0, 0.0, det_shift)


def fan_beam(n_views: int | Sequence[float], n_det: int, image_shape: int | tuple[int, int], *,
             det_spacing: float, pixel_size: float, s2r: float, d2r: float, detector: str = "flat",
             det_shift: float = 0.0) -> Geometry:
    """Fan beam; `detector` 'flat' (equi-spaced) or 'arc' (equi-angular: `det_spacing` is arc length at
    radius s2r + d2r); `n_views` an int (full scan over [0, 2 pi)) or the angles in radians."""
    if detector not in ("flat", "arc"):
        raise ValueError(f"fan_beam detector must be 'flat' or 'arc', got {detector!r}")
    kind = f"fan_{detector}"
    angles = full_scan(n_views, kind) if isinstance(n_views, int) else n_views
    return _make(kind, angles, n_det, det_spacing, image_shape, pixel_size, s2r, d2r, det_shift)


def from_protocol(views: int, dets: int, width: int, height: int, dImg: float, dDet: float, s2r: float,
                  d2r: float, *, dAng: float | None = None, Ang0: float = 0.0, binshift: float = 0.0,
                  detector: str = "flat") -> Geometry:  # noqa: N803  (HyperFed's names)
    """A fan-beam geometry from HyperFed's protocol vector `[views, dets, width, height, dImg, dDet,
    dAng, s2r, d2r, binshift]` (I0 goes to `jaxlab.ct.noise`); dAng defaults to 2 pi / views."""
    d_ang = 2 * np.pi / views if dAng is None else dAng
    angles = Ang0 + np.arange(views) * d_ang
    return fan_beam(angles, dets, (height, width), det_spacing=dDet, pixel_size=dImg, s2r=s2r, d2r=d2r,
                    detector=detector, det_shift=binshift)


def pad_geometry(geom: Geometry, n_views: int, n_det: int) -> Geometry:
    """`geom` with views and detectors appended up to `(n_views, n_det)`; the pads are masked out
    (projections there are 0 and back-projections ignore them), so its active rays are unchanged."""
    v, d = geom.sino_shape
    if n_views < v or n_det < d:
        raise ValueError(f"pad_geometry: target {(n_views, n_det)} is smaller than the geometry {(v, d)}")
    angles = jnp.concatenate([geom.angles, jnp.broadcast_to(geom.angles[-1:], (n_views - v,))])
    return geom.replace(
        angles=angles,
        view_mask=jnp.concatenate([geom.view_mask, jnp.zeros((n_views - v,), jnp.float32)]),
        det_mask=jnp.concatenate([geom.det_mask, jnp.zeros((n_det - d,), jnp.float32)]))


def stack_geometries(geoms: Sequence[Geometry]) -> Geometry:
    """One batched geometry (leading axis = len(geoms)) for `jax.vmap(f, in_axes=(0, 0))`: views and
    detectors padded (and masked) to the largest; kind and image_shape must agree."""
    kinds = {(g.kind, g.image_shape) for g in geoms}
    if len(kinds) != 1:
        raise ValueError(f"stack_geometries: kind and image_shape must agree to vmap, got {sorted(kinds)}")
    n_views = max(g.n_views for g in geoms)
    n_det = max(g.n_det for g in geoms)
    padded = [pad_geometry(g, n_views, n_det) for g in geoms]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *padded)


def detector_positions(geom: Geometry) -> jax.Array:
    """`(D,)` u_k = (k - det_center) * det_spacing (arc length for an arc detector)."""
    return (jnp.arange(geom.n_det, dtype=jnp.float32) - geom.det_center) * geom.det_spacing


def rays(geom: Geometry, angles: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Ray lines of the views at `angles (V,)`: `(point, direction)`, each `(V, D, 2)` in (x, y); the
    direction is a unit vector from source to detector."""
    cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
    e_u = jnp.stack([cos, sin], -1)  # (V, 1, 2)
    e_r = jnp.stack([-sin, cos], -1)
    u = detector_positions(geom)[None, :, None]  # (1, D, 1)
    if geom.kind == "parallel":
        point = u * e_u
        return point, jnp.broadcast_to(e_r, point.shape)
    source = -geom.s2r * e_r
    if geom.kind == "fan_flat":
        target = geom.d2r * e_r + u * e_u
        direction = target - source
        direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
    else:
        gamma = u / (geom.s2r + geom.d2r)
        direction = jnp.cos(gamma) * e_r + jnp.sin(gamma) * e_u
    return jnp.broadcast_to(source, direction.shape), direction


def pixel_centres(geom: Geometry) -> tuple[jax.Array, jax.Array]:
    """`(x, y)` of the pixel centres, each `(H, W)`, in length units."""
    h, w = geom.image_shape
    x = (jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2) * geom.pixel_size
    y = ((h - 1) / 2 - jnp.arange(h, dtype=jnp.float32)) * geom.pixel_size
    return jnp.broadcast_to(x[None, :], (h, w)), jnp.broadcast_to(y[:, None], (h, w))
