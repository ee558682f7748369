"""Inpainting masks (1 = hole), numpy, deterministic by seed.

- Free-form stroke masks (the paper's I-masks; the release draws one of 6,000 PNGs per clip and uses it
  for all 5 frames): `strokes` random polylines, each of `vertices` segments with a random direction
  change, length and brush width, drawn as thick segments with round joints (the DeepFill v2 recipe,
  Yu et al. 2019, scaled to the frame). One mask per clip, the same in every frame.
- Object masks (the paper's S-masks, cut from the AV map's top 20%; here, offline, the sounding object's
  silhouette from the data): the per-frame silhouette dilated by `dilate` pixels (a disk), so the hole
  covers the object and its edge.
- `mask_bank(seed, n, size)`: n stroke masks (n, H, W) float32, the training draws index it in the step.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _segment_distance(yy, xx, p0, p1) -> np.ndarray:
    """Distance of every grid point (yy, xx) to the segment p0 -> p1 (points (y, x))."""
    d = np.subtract(p1, p0, dtype=np.float64)
    length2 = max(float(d @ d), 1e-12)
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / length2, 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def stroke_mask(rng: np.random.Generator, size: int, *, strokes: tuple[int, int] = (1, 4),
                vertices: tuple[int, int] = (2, 6), width: tuple[float, float] = (0.06, 0.14),
                length: tuple[float, float] = (0.1, 0.3)) -> np.ndarray:
    """One (size, size) float32 free-form mask; widths and lengths are fractions of `size`, ranges
    [lo, hi] (strokes and vertices inclusive)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(strokes[0], strokes[1] + 1)):
        point = rng.uniform(0, size, 2)
        brush = rng.uniform(*width) * size / 2
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(rng.integers(vertices[0], vertices[1] + 1)):
            angle += rng.uniform(-np.pi / 2, np.pi / 2)
            step = rng.uniform(*length) * size
            nxt = np.clip(point + step * np.array([np.sin(angle), np.cos(angle)]), 0, size - 1)
            mask |= _segment_distance(yy, xx, point, nxt) <= brush
            point = nxt
    return mask.astype(np.float32)


def mask_bank(seed: int, n: int, size: int, **stroke_options) -> np.ndarray:
    """n stroke masks (n, size, size) float32, mask i drawn from default_rng([seed, i]) (so a bank's
    first masks do not depend on n)."""
    return np.stack([stroke_mask(np.random.default_rng([seed, i]), size, **stroke_options) for i in range(n)])


def object_masks(silhouettes: np.ndarray, dilate: int = 2) -> np.ndarray:
    """(..., H, W) silhouettes (> 0.5 inside) -> float32 masks of the same shape, each frame's
    silhouette dilated by a disk of radius `dilate` pixels."""
    sil = np.asarray(silhouettes) > 0.5
    if dilate <= 0:
        return sil.astype(np.float32)
    r = np.arange(-dilate, dilate + 1)
    disk = (r[:, None] ** 2 + r[None, :] ** 2) <= dilate ** 2
    flat = sil.reshape((-1,) + sil.shape[-2:])
    out = np.stack([ndimage.binary_dilation(f, structure=disk) for f in flat])
    return out.reshape(sil.shape).astype(np.float32)


def stroke_video_masks(seed: int, n: int, frames: int, size: int, **stroke_options) -> np.ndarray:
    """n clips' stroke masks (n, T, size, size, 1): each clip's mask repeated over its T frames."""
    bank = mask_bank(seed, n, size, **stroke_options)
    return np.repeat(bank[:, None, :, :, None], frames, axis=1)
