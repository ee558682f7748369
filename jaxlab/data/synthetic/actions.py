"""`synthetic:actions`: seeded procedural action clips whose class is the motion.

Each clip is `num_frames` RGB frames of `size` x `size` pixels (uint8, [N, T, H, W, 3]) seen by a camera
that moves over a static random world (a smooth colour texture of twice the frame size, with a few
coloured squares painted in it). The class is the camera motion only:

    0 pan right, 1 pan left, 2 pan down, 3 pan up, 4 clockwise circle, 5 anticlockwise circle,
    6 zoom in, 7 zoom out

(`classes` takes the first n; content moves the opposite way to the camera). Telling the classes apart
needs products of spatial and temporal differences (the mean colour does not change), which a tiny
ViT from scratch finds after a plateau of ~100-300 steps (at chance until then). The world, its colour
offset, start point, speed, radius, phase and zoom range are random per clip and shared by every
class, and every frame gets pixel noise (`noise`), so no single frame tells the class: only two frames
show it. Deterministic from (seed, split); the test split is drawn from another stream.
"""

from __future__ import annotations

import numpy as np

from jaxlab.data.sources import register

MOTIONS = ("pan_right", "pan_left", "pan_down", "pan_up", "clockwise", "anticlockwise", "zoom_in", "zoom_out")
SPLIT_SALT = {"train": 0, "test": 1}
CHUNK = 256  # clips generated at a time (bounds memory)


def _upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of [n, c, c, 3] to [n, size, size, 3]."""
    c = coarse.shape[1]
    pos = np.linspace(0, c - 1, size)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, c - 1)
    f = (pos - lo).astype(np.float32)
    rows = coarse[:, lo] * (1 - f)[None, :, None, None] + coarse[:, hi] * f[None, :, None, None]
    return rows[:, :, lo] * (1 - f)[None, None, :, None] + rows[:, :, hi] * f[None, None, :, None]


def _worlds(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Static worlds [n, 2 size, 2 size, 3] float32: smooth texture with a random colour offset, plus 4
    squares."""
    extent = 2 * size
    world = _upsample(rng.uniform(0, 1, (n, extent // 4, extent // 4, 3)).astype(np.float32), extent)
    world = world + rng.uniform(-0.2, 0.2, (n, 1, 1, 3)).astype(np.float32)
    grid = np.arange(extent)
    for _ in range(4):
        centre = rng.uniform(0, extent, (n, 2))
        half = rng.uniform(0.05, 0.12, (n, 1)) * size
        inside = ((np.abs(grid[None, :] - centre[:, :1]) <= half)[:, :, None]
                  & (np.abs(grid[None, :] - centre[:, 1:]) <= half)[:, None, :])
        world = np.where(inside[..., None], rng.uniform(0, 1, (n, 1, 1, 3)).astype(np.float32), world)
    return world


def _camera(rng, labels, num_frames, size):
    """Camera centre (x, y) in world pixels and zoom per clip and frame: three arrays [n, T]."""
    n = labels.size
    lab = labels[:, None]
    t = np.arange(num_frames)[None, :] / max(num_frames - 1, 1)
    travel = rng.uniform(0.3, 0.5, (n, 1)) * size
    mid = size + rng.uniform(-0.15, 0.15, (n, 2)) * size
    sweep = (t - 0.5) * travel
    x = mid[:, :1] + np.where(lab == 0, -sweep, np.where(lab == 1, sweep, 0.0))  # content right: camera left
    y = mid[:, 1:] + np.where(lab == 2, -sweep, np.where(lab == 3, sweep, 0.0))
    radius = rng.uniform(0.15, 0.25, (n, 1)) * size
    angle = rng.uniform(0, 2 * np.pi, (n, 1)) + np.where(lab == 4, -1.0, 1.0) * 1.5 * np.pi * t
    circular = (lab == 4) | (lab == 5)
    x = np.where(circular, mid[:, :1] + radius * np.cos(angle), x)
    y = np.where(circular, mid[:, 1:] + radius * np.sin(angle), y)
    span = rng.uniform(0.5, 0.8, (n, 1))
    zoom = np.where(lab == 6, 1.0 + span * (0.5 - t), np.where(lab == 7, 1.0 - span * (0.5 - t), 1.0))
    return x, y, zoom


def _clips(rng, labels, num_frames, size, noise):
    n = labels.size
    world = _worlds(rng, n, size)
    x, y, zoom = _camera(rng, labels, num_frames, size)
    offsets = np.arange(size) - (size - 1) / 2
    rows = np.arange(n)[:, None, None]
    clips = np.empty((n, num_frames, size, size, 3), np.uint8)
    for f in range(num_frames):
        ys = np.clip(np.rint(y[:, f:f + 1] + offsets[None, :] / zoom[:, f:f + 1]), 0, 2 * size - 1).astype(int)
        xs = np.clip(np.rint(x[:, f:f + 1] + offsets[None, :] / zoom[:, f:f + 1]), 0, 2 * size - 1).astype(int)
        frame = world[rows, ys[:, :, None], xs[:, None, :]]
        frame = frame + rng.normal(0.0, noise, frame.shape)
        clips[:, f] = np.clip(frame * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return clips


def generate(n: int, classes: int, num_frames: int, size: int, seed: int, salt: int = 0, noise: float = 0.03):
    """n clips uint8 [n, T, size, size, 3] and labels int32 [n] (balanced, shuffled)."""
    if not 2 <= classes <= len(MOTIONS):
        raise ValueError(f"classes={classes} must be in [2, {len(MOTIONS)}] ({', '.join(MOTIONS)})")
    rng = np.random.default_rng([seed, salt, 0xAC7])
    labels = rng.permutation(np.arange(n) % classes).astype(np.int32)
    clips = [_clips(rng, labels[i:i + CHUNK], num_frames, size, noise) for i in range(0, n, CHUNK)]
    return np.concatenate(clips), labels


@register("synthetic", "actions")
def actions(split: str, seed: int, *, train_clips: int = 2048, test_clips: int = 512, classes: int = 4,
            num_frames: int = 8, size: int = 32, noise: float = 0.03, **_) -> dict:
    """{'video': uint8 [N, T, H, W, 3], 'label': int32 [N]} of `split` (module docstring)."""
    if split not in SPLIT_SALT:
        raise ValueError(f"split {split!r} must be 'train' or 'test'")
    n = train_clips if split == "train" else test_clips
    video, label = generate(n, classes, num_frames, size, seed, SPLIT_SALT[split], noise)
    return {"video": video, "label": label}
