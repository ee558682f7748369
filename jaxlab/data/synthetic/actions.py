"""`synthetic:actions`: seeded procedural action clips whose class is the motion.

Each clip is `num_frames` RGB frames of `size` x `size` pixels (uint8, [N, T, H, W, 3]): a smooth random
background texture with pixel noise, and one coloured square that moves. The class is the motion only:

    0 right, 1 left, 2 down, 3 up, 4 clockwise circle, 5 anticlockwise circle, 6 grow, 7 shrink

(`classes` takes the first n). Start position, speed, radius, phase, size, colours and texture are
random per clip and shared by every class, so no single frame tells the class: telling "right" from
"left" needs two frames. Deterministic from (seed, split); the test split is drawn from another stream.
"""

from __future__ import annotations

import numpy as np

from jaxlab.data.sources import register

MOTIONS = ("right", "left", "down", "up", "clockwise", "anticlockwise", "grow", "shrink")
SPLIT_SALT = {"train": 0, "test": 1}


def _background(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Smooth texture [n, size, size, 3] in [0, 0.5]: a random 4x4 grid upsampled by bilinear-ish repeat."""
    coarse = rng.uniform(0.0, 0.5, (n, 4, 4, 3))
    idx = np.linspace(0, 3, size)
    lo = np.floor(idx).astype(int)
    hi = np.minimum(lo + 1, 3)
    frac = (idx - lo)[None, :, None, None]
    rows = coarse[:, lo] * (1 - frac) + coarse[:, hi] * frac
    frac = (idx - lo)[None, None, :, None]
    return rows[:, :, lo] * (1 - frac) + rows[:, :, hi] * frac


def _trajectories(rng, labels, num_frames, size):
    """Centre (x, y) and half-size of the square per clip and frame: three arrays [n, T]."""
    n = labels.size
    t = np.arange(num_frames)[None, :]
    half = rng.uniform(0.08, 0.14, (n, 1)) * size
    speed = rng.uniform(0.5, 1.0, (n, 1)) * (size * 0.6) / max(num_frames - 1, 1)
    lo, hi = half + 1, size - half - 1
    travel = speed * (num_frames - 1)
    start = rng.uniform(lo, np.maximum(hi - travel, lo + 1e-3), (n, 1))
    across = rng.uniform(lo, hi, (n, 1))
    forward = start + speed * t
    backward = size - 1 - forward
    x = np.where(labels[:, None] == 0, forward, np.where(labels[:, None] == 1, backward, across))
    y = np.where(labels[:, None] == 2, forward, np.where(labels[:, None] == 3, backward, across))
    y = np.where(labels[:, None] <= 1, across, y)
    circular = (labels == 4) | (labels == 5)
    radius = rng.uniform(0.18, 0.28, (n, 1)) * size
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    turn = np.where(labels[:, None] == 4, 1.0, -1.0) * 1.5 * np.pi * t / max(num_frames - 1, 1)
    cx = size / 2 + radius * np.cos(phase + turn)
    cy = size / 2 + radius * np.sin(phase + turn)
    x = np.where(circular[:, None], cx, x)
    y = np.where(circular[:, None], cy, y)
    centre = ((labels == 6) | (labels == 7))[:, None]
    x = np.where(centre, size / 2 + rng.uniform(-0.15, 0.15, (n, 1)) * size, x)
    y = np.where(centre, size / 2 + rng.uniform(-0.15, 0.15, (n, 1)) * size, y)
    growth = np.linspace(0.5, 1.8, num_frames)[None, :]
    scale = np.where(labels[:, None] == 6, growth, np.where(labels[:, None] == 7, growth[:, ::-1], 1.0))
    return x, y, half * scale


def generate(n: int, classes: int, num_frames: int, size: int, seed: int, salt: int = 0):
    """n clips uint8 [n, T, size, size, 3] and labels int32 [n] (balanced, shuffled)."""
    if not 2 <= classes <= len(MOTIONS):
        raise ValueError(f"classes={classes} must be in [2, {len(MOTIONS)}] ({', '.join(MOTIONS)})")
    rng = np.random.default_rng([seed, salt, 0xAC7])
    labels = rng.permutation(np.arange(n) % classes).astype(np.int32)
    x, y, half = _trajectories(rng, labels, num_frames, size)
    background = _background(rng, n, size)
    colour = rng.uniform(0.6, 1.0, (n, 3)) * rng.choice([-1, 1], (n, 3)) * 0.5 + 0.5
    grid = np.arange(size, dtype=np.float64)
    clips = np.empty((n, num_frames, size, size, 3), np.uint8)
    for f in range(num_frames):
        inside_x = np.abs(grid[None, :] - x[:, f:f + 1]) <= half[:, f:f + 1]
        inside_y = np.abs(grid[None, :] - y[:, f:f + 1]) <= half[:, f:f + 1]
        square = (inside_y[:, :, None] & inside_x[:, None, :])[..., None]
        frame = np.where(square, colour[:, None, None, :], background)
        frame = frame + rng.normal(0.0, 0.04, frame.shape)
        clips[:, f] = np.clip(frame * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return clips, labels


@register("synthetic", "actions")
def actions(split: str, seed: int, *, train_clips: int = 2048, test_clips: int = 512, classes: int = 4,
            num_frames: int = 8, size: int = 32, **_) -> dict:
    """{'video': uint8 [N, T, H, W, 3], 'label': int32 [N]} of `split` (module docstring)."""
    if split not in SPLIT_SALT:
        raise ValueError(f"split {split!r} must be 'train' or 'test'")
    n = train_clips if split == "train" else test_clips
    video, label = generate(n, classes, num_frames, size, seed, SPLIT_SALT[split])
    return {"video": video, "label": label}
