"""SwinDRNet's training loss (trainer.get_loss_depth_restoration and utils/ of PKU-EPIC/DREDS).

Per pixel, for a depth map d against the truth d*:
    l(d) = |d - d*| + w_n * mean_c |n(d) - n(d*)| + w_g * (|S_x d - S_x d*| + |S_y d - S_y d*|)
with w_n = 0.1, w_g = 0.6; per pixel total = l(d) + 0.4 * l(d_initial); the loss is
1.0 * mean over object pixels + 0.4 * mean over background pixels (each mean over the batch's pixels).

- n(d): back-project with the camera (x = d (u - cx) / fx, y = d (v - cy) / fy, z = d), forward
  differences along columns (dx) and rows (dy) with the last column of dx and last row of dy set to 0,
  n = dx x dy / (|dx x dy| + 1e-8). The released code scales f = 446.31 (for 640 x 360) to the input
  size (fx = f W / 640, fy = f H / 360) and puts the centre at (W // 2 - 0.5, H // 2 - 0.5); here the
  intrinsics come with each example (the simulator records exactly that camera).
- S_x, S_y: 3x3 Sobel cross-correlations with zero padding 1: kx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]],
  ky = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]] (so S_x is positive where depth falls to the right).
Depths are [B, H, W] in metres, intrinsics [B, 4] = (fx, fy, cx, cy) in pixels, masks [B, H, W].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SOBEL_X = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], np.float32)
SOBEL_Y = SOBEL_X.T.copy()  # [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
WEIGHTS = {"normal": 0.1, "gradient": 0.6, "initial": 0.4, "object": 1.0, "background": 0.4}


def sobel(depth: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(S_x d, S_y d), each [B, H, W]: the released Sobel (cross-correlation, zero padding 1)."""
    padded = jnp.pad(depth, ((0, 0), (1, 1), (1, 1)))
    h, w = depth.shape[1:]

    def correlate(kernel):
        return sum(float(kernel[i, j]) * padded[:, i:i + h, j:j + w]
                   for i in range(3) for j in range(3) if kernel[i, j])

    return correlate(SOBEL_X), correlate(SOBEL_Y)


def back_project(depth: jax.Array, intrinsics: jax.Array) -> jax.Array:
    """Camera points [B, H, W, 3] of depth [B, H, W] with intrinsics [B, 4] = (fx, fy, cx, cy)."""
    h, w = depth.shape[1:]
    fx, fy, cx, cy = (intrinsics[:, i, None, None] for i in range(4))
    u = jnp.arange(w, dtype=depth.dtype)[None, None, :]
    v = jnp.arange(h, dtype=depth.dtype)[None, :, None]
    return jnp.stack([depth * (u - cx) / fx, depth * (v - cy) / fy, depth], axis=-1)


def surface_normals(depth: jax.Array, intrinsics: jax.Array) -> jax.Array:
    """Unit normals [B, H, W, 3] = normalised cross(dx, dy) of the back-projected points (docstring)."""
    xyz = back_project(depth, intrinsics)
    dx = jnp.pad(xyz[:, :, 1:] - xyz[:, :, :-1], ((0, 0), (0, 0), (0, 1), (0, 0)))
    dy = jnp.pad(xyz[:, 1:] - xyz[:, :-1], ((0, 0), (0, 1), (0, 0), (0, 0)))
    n = jnp.cross(dx, dy)
    # |n| with a zero (not NaN) gradient where n = 0 (the last row and column), as torch.norm's
    norm = jnp.sqrt(jnp.maximum(jnp.sum(n * n, axis=-1, keepdims=True), 1e-30))
    return n / (norm + 1e-8)


def pixel_loss(pred: jax.Array, target: jax.Array, intrinsics: jax.Array, target_normals: jax.Array,
               normal_weight: float = WEIGHTS["normal"], gradient_weight: float = WEIGHTS["gradient"]):
    """l(d) per pixel [B, H, W] (module docstring); target_normals = surface_normals(target)."""
    l1 = jnp.abs(pred - target)
    normal = jnp.mean(jnp.abs(surface_normals(pred, intrinsics) - target_normals), axis=-1)
    (px, py), (tx, ty) = sobel(pred), sobel(target)
    return l1 + normal_weight * normal + gradient_weight * (jnp.abs(px - tx) + jnp.abs(py - ty))


def region_means(per_pixel: jax.Array, object_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean over object pixels, mean over background pixels) over the whole batch; an empty region
    gives 0 (the released code would divide by zero)."""
    obj = object_mask.astype(per_pixel.dtype)
    back = 1.0 - obj
    return ((per_pixel * obj).sum() / jnp.maximum(obj.sum(), 1.0),
            (per_pixel * back).sum() / jnp.maximum(back.sum(), 1.0))


def swindrnet_loss(depth: jax.Array, depth_initial: jax.Array, target: jax.Array, intrinsics: jax.Array,
                   object_mask: jax.Array, weights: dict | None = None) -> tuple[jax.Array, dict]:
    """The training loss (module docstring) -> (scalar, {"object": ..., "background": ...})."""
    w = {**WEIGHTS, **(weights or {})}
    target_normals = surface_normals(target, intrinsics)
    per_pixel = (pixel_loss(depth, target, intrinsics, target_normals, w["normal"], w["gradient"])
                 + w["initial"] * pixel_loss(depth_initial, target, intrinsics, target_normals,
                                             w["normal"], w["gradient"]))
    obj, back = region_means(per_pixel, object_mask)
    return w["object"] * obj + w["background"] * back, {"loss_object": obj, "loss_background": back}
