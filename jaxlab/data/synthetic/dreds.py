"""A seeded procedural DREDS-like simulator: table-top scenes seen by an active-stereo depth camera.

Every frame is ray-cast analytically (numpy, no renderer): a tilted table plane and a back wall, and
2-5 objects standing on the table (spheres, boxes and capped cylinders, turned about the table normal),
each labelled diffuse, specular or transparent (at least one of the last two per frame).

Camera (what SwinDRNet's loss assumes for DREDS): f = 446.31 px at 640 x 360 scaled to the frame,
fx = f W / 640, fy = f H / 360, centre (W // 2 - 0.5, H // 2 - 0.5); depth is the z coordinate in metres.

Outputs per frame: rgb [H, W, 3] in [0, 1] (Lambertian shading with a texture on the table, a Phong
highlight on specular objects, transparent objects mostly showing what lies behind them plus a tint
and a highlight, a little sensor noise), depth [H, W] (the truth), material [H, W] uint8 (0 background,
1 diffuse, 2 specular, 3 transparent; metrics.MATERIALS), intrinsics [4] = (fx, fy, cx, cy), and the
sensor's raw_depth [H, W]:
- on specular and transparent objects only: a bias toward what lies behind the object (the next surface
  along the ray; a fraction U(0.5, 1) of the way on transparent, U(0, 0.3) on specular objects), holes
  (0) in smooth random blobs (and under the specular highlight), and edge noise on the object's border
  pixels (a hole or N(0, 2 cm));
- everywhere: the stereo matcher's quantisation, disparity = F B / z rounded to 1/16 px with the
  sensor's native focal F = 446.31 px and baseline B = 0.055 m (so diffuse objects and the background
  read exactly quantise(depth)).
DREDS renders with Blender and simulates the IR stereo pair; here the sensor artefacts are drawn
directly (inferred: their sizes are our choice, picked to look like the paper's examples).
"""

from __future__ import annotations

import numpy as np

FOCAL, REF_WIDTH, REF_HEIGHT = 446.31, 640, 360  # DREDS' simulated camera
BASELINE, SUBPIXEL = 0.055, 16
DIFFUSE, SPECULAR, TRANSPARENT = 1, 2, 3
SHAPES = ("sphere", "box", "cylinder")


def intrinsics_for(height: int, width: int) -> np.ndarray:
    """(fx, fy, cx, cy) float32 of the DREDS camera scaled to a height x width frame."""
    return np.array([FOCAL * width / REF_WIDTH, FOCAL * height / REF_HEIGHT, width // 2 - 0.5,
                     height // 2 - 0.5], np.float32)


def quantise(depth: np.ndarray) -> np.ndarray:
    """Depth read through a disparity quantised to 1/SUBPIXEL px (0 stays 0): [...] -> [...]."""
    fb = FOCAL * BASELINE
    disparity = np.round(fb / np.where(depth > 0, depth, np.inf) * SUBPIXEL) / SUBPIXEL
    return np.where((depth > 0) & (disparity > 0), fb / np.maximum(disparity, 1e-12), 0.0)


def rays(height: int, width: int, intr: np.ndarray) -> np.ndarray:
    """Ray directions [H, W, 3] with z = 1 (so a hit's ray parameter is its depth)."""
    fx, fy, cx, cy = intr
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1)


def hit_plane(d: np.ndarray, point: np.ndarray, normal: np.ndarray):
    """Ray parameter [H, W] (inf on a miss) and normal [H, W, 3] of the plane through point."""
    denom = d @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (point @ normal) / denom
    t = np.where((np.abs(denom) > 1e-9) & (t > 0), t, np.inf)
    return t, np.broadcast_to(normal, d.shape).copy()


def hit_sphere(d: np.ndarray, centre: np.ndarray, radius: float):
    """Nearest hit [H, W] and outward normal [H, W, 3] of a sphere."""
    a, b = np.sum(d * d, -1), d @ centre
    disc = b * b - a * (centre @ centre - radius**2)
    t = np.where(disc > 0, (b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
    t = np.where(t > 0, t, np.inf)
    n = (np.where(np.isfinite(t), t, 0)[..., None] * d - centre) / radius
    return t, n


def hit_box(d: np.ndarray, centre: np.ndarray, frame: np.ndarray, half: np.ndarray):
    """Nearest hit and normal of a box with axes frame [3, 3] (rows) and half sizes half [3] (slabs)."""
    o_local = -(frame @ centre)  # the camera (origin) in box coordinates
    d_local = d @ frame.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - o_local) / d_local
        t2 = (half - o_local) / d_local
    t_lo, t_hi = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = t_lo.max(-1), t_hi.min(-1)
    t = np.where((t_near < t_far) & (t_near > 0), t_near, np.inf)
    axis = np.argmax(t_lo, -1)
    sign = -np.sign(np.take_along_axis(d_local, axis[..., None], -1))[..., 0]
    n = frame[axis] * sign[..., None]
    return t, n


def hit_cylinder(d: np.ndarray, base: np.ndarray, axis: np.ndarray, radius: float, height: float):
    """Nearest hit and normal of a capped cylinder from base along unit axis."""
    o = -base
    dp = d - (d @ axis)[..., None] * axis
    op = o - (o @ axis) * axis
    a, b, c = np.sum(dp * dp, -1), dp @ op, op @ op - radius**2
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = np.where(disc > 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
    s = o @ axis + t_side * (d @ axis)
    t_side = np.where((t_side > 0) & (s >= 0) & (s <= height), t_side, np.inf)
    best_t, best_n = t_side, (np.where(np.isfinite(t_side), t_side, 0)[..., None] * d - base
                              - np.where(np.isfinite(t_side), s, 0)[..., None] * axis) / radius
    for level, sign in ((height, 1.0), (0.0, -1.0)):
        t_cap, _ = hit_plane(d, base + level * axis, axis)
        p = np.where(np.isfinite(t_cap), t_cap, 0)[..., None] * d - base - level * axis
        inside = np.sum(p * p, -1) <= radius**2
        t_cap = np.where(inside, t_cap, np.inf)
        nearer = t_cap < best_t
        best_t = np.where(nearer, t_cap, best_t)
        best_n = np.where(nearer[..., None], sign * axis, best_n)
    return best_t, best_n


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def smooth_field(rng: np.random.Generator, height: int, width: int, cell: int = 8) -> np.ndarray:
    """Smooth noise in [0, 1] [H, W]: a coarse uniform grid, bilinearly zoomed."""
    from scipy import ndimage  # here, not at import: every source lookup imports this module

    coarse = rng.uniform(size=(height // cell + 2, width // cell + 2))
    field = ndimage.zoom(coarse, (height / coarse.shape[0], width / coarse.shape[1]), order=1)
    return field[:height, :width]


def border(mask: np.ndarray) -> np.ndarray:
    """Pixels of mask with a 4-neighbour outside it (the object's own edge)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def scene_primitives(rng: np.random.Generator, d: np.ndarray):
    """(t [P, H, W], normals [P, H, W, 3], albedo [P, 3], material [P], shape names) for table, wall and
    the objects (P = 2 + objects)."""
    h, w = d.shape[:2]
    z_table = rng.uniform(0.6, 0.9)
    table_n = unit(np.array([rng.uniform(-0.2, 0.2), -rng.uniform(0.8, 1.5), -1.0]))
    wall_z = rng.uniform(1.2, 1.8)
    wall_n = unit(np.array([rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15), -1.0]))
    hits = [hit_plane(d, np.array([0.0, 0.0, z_table]), table_n), hit_plane(d, np.array([0.0, 0.0, wall_z]),
                                                                             wall_n)]
    albedo = [rng.uniform(0.3, 0.8, 3), rng.uniform(0.5, 0.9, 3)]
    material = [0, 0]
    shapes = ["table", "wall"]
    up = table_n  # the table's normal faces the camera: objects stand on that side
    side = unit(np.cross(up, np.array([0.0, 0.0, 1.0])))
    n_objects = int(rng.integers(3, 7))
    for k in range(n_objects):
        u, v = rng.uniform(0.2, 0.8) * w, rng.uniform(0.35, 0.85) * h
        ray = d[int(v), int(u)]
        foot = ray * hits[0][0][int(v), int(u)] if np.isfinite(hits[0][0][int(v), int(u)]) else ray * z_table
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = rng.uniform(0.035, 0.08)
        angle = rng.uniform(0, np.pi)
        e1 = np.cos(angle) * side + np.sin(angle) * unit(np.cross(up, side))
        e2 = unit(np.cross(up, e1))
        if shape == "sphere":
            hits.append(hit_sphere(d, foot + up * size, size))
        elif shape == "box":
            half = np.array([size, size * rng.uniform(0.6, 1.4), size * rng.uniform(0.6, 1.3)])
            hits.append(hit_box(d, foot + up * half[2], np.stack([e1, e2, up]), half))
        else:
            hits.append(hit_cylinder(d, foot, up, size * 0.8, size * rng.uniform(1.2, 2.2)))
        shapes.append(shape)
        albedo.append(rng.uniform(0.1, 0.95, 3))
        material.append(int(rng.choice([SPECULAR, TRANSPARENT])) if k == 0
                        else int(rng.choice([DIFFUSE, SPECULAR, TRANSPARENT])))
    t = np.stack([x[0] for x in hits])
    normals = np.stack([x[1] for x in hits])
    return t, normals, np.stack(albedo), np.array(material), shapes


def shade(rng, d, t, normals, albedo, material, table_texture):
    """Colour of every primitive at every pixel [P, H, W, 3] and the specular highlight [P, H, W]."""
    light = unit(np.array([rng.uniform(-0.5, 0.5), -1.0, -rng.uniform(0.3, 1.0)]))
    n = normals * np.where(np.sum(normals * d, -1, keepdims=True) > 0, -1.0, 1.0)  # face the camera
    lambert = np.clip(np.sum(n * light, -1), 0, 1)
    view = -d / np.linalg.norm(d, axis=-1, keepdims=True)
    reflect = 2 * np.sum(n * light, -1, keepdims=True) * n - light
    highlight = np.clip(np.sum(reflect * view, -1), 0, 1) ** 30
    colour = albedo[:, None, None, :] * (0.25 + 0.75 * lambert[..., None])
    colour[0] = colour[0] * table_texture[..., None]
    is_specular = (material == SPECULAR)[:, None, None]
    colour = np.where(is_specular[..., None], 0.5 * colour + 0.1, colour) + (
        np.where(is_specular, 1.0, np.where((material == TRANSPARENT)[:, None, None], 0.6, 0.1))
        * highlight)[..., None]
    return colour, highlight


def render_frame(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    """One scene (module docstring): rgb, depth, raw_depth, material, intrinsics."""
    intr = intrinsics_for(height, width)
    d = rays(height, width, intr)
    t, normals, albedo, material, _ = scene_primitives(rng, d)
    order = np.argsort(t, axis=0)
    front, behind = order[0], order[1]
    depth = np.take_along_axis(t, front[None], 0)[0]
    depth_behind = np.take_along_axis(t, behind[None], 0)[0]
    texture = 0.75 + 0.25 * np.sign(np.sin(d[..., 0] * depth * 60) * np.sin(depth * 40))
    colour, highlight = shade(rng, d, t, normals, albedo, material, texture)
    pick = lambda a, idx: np.take_along_axis(a, idx[None, ..., None] if a.ndim == 4 else idx[None], 0)[0]
    mat = material[front].astype(np.uint8)
    rgb = pick(colour, front)
    tint = albedo[front]
    transparent = (mat == TRANSPARENT)[..., None]
    rgb = np.where(transparent, 0.75 * pick(colour, behind) + 0.25 * tint + 0.6 * pick(highlight, front)[..., None],
                   rgb)
    rgb = np.clip(rgb + rng.normal(0, 0.01, rgb.shape), 0, 1)
    raw = corrupt_depth(rng, depth, depth_behind, front, material, pick(highlight, front))
    return {"rgb": rgb.astype(np.float32), "depth": depth.astype(np.float32), "raw_depth": raw,
            "material": mat, "intrinsics": intr}


def corrupt_depth(rng, depth, depth_behind, front, material, highlight) -> np.ndarray:
    """The sensor's raw depth [H, W] float32 (module docstring): per specular / transparent object a bias
    toward depth_behind, blob holes (and highlight holes on specular ones), border noise; then quantise."""
    raw = depth.copy()
    h, w = depth.shape
    for k in np.flatnonzero((material == SPECULAR) | (material == TRANSPARENT)):
        mask = front == k
        if not mask.any():
            continue
        transparent = material[k] == TRANSPARENT
        alpha = rng.uniform(0.5, 1.0) if transparent else rng.uniform(0.0, 0.3)
        raw = np.where(mask, depth + alpha * (depth_behind - depth), raw)
        holes = smooth_field(rng, h, w, cell=max(2, min(h, w) // 8)) > (0.55 if transparent else 0.7)
        if not transparent:
            holes |= highlight > 0.5
            raw = np.where(mask, raw + rng.normal(0, 0.005, raw.shape), raw)
        raw = np.where(mask & holes, 0.0, raw)
        edge = border(mask)
        edge_hole = rng.uniform(size=raw.shape) < 0.5
        raw = np.where(edge & edge_hole, 0.0, np.where(edge, raw + rng.normal(0, 0.02, raw.shape), raw))
    return quantise(np.maximum(raw, 0.0)).astype(np.float32)


def simulate(n: int, *, height: int = 64, width: int = 64, seed: int = 0, stream: int = 0) -> dict:
    """n frames stacked (render_frame's arrays with a leading axis); frame i is seeded by
    (seed, stream, i), so it does not depend on n."""
    frames = [render_frame(np.random.default_rng([seed, stream, i]), height, width) for i in range(n)]
    return {k: np.stack([f[k] for f in frames]) for k in frames[0]}
