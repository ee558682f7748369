"""Backdoor triggers and training-set poisoning (BackdoorDynamicDNN dataset_utils.py).

Images are float (N, H, W, C) in [0, 1] (the reference's uint8 / 255). Every trigger is an affine map
x' = scale * x + offset with (H, W, C) arrays, so it is applied the same way to numpy data (poisoning)
and inside jitted evaluation:
- "checkerboard" (the default): a 7x7 checkerboard of 0 / 1 whose pixel (H - i, W - j), i, j in 6..12,
  is 1 when i + j is odd (the reference's `(idx % 2) * 255` over product(range(6, 13), range(6, 13))).
- "square": a 5x5 white square in the bottom-right corner (rows / cols H-5..H-1).
- "watermark": blended as the reference does, x' = x where the watermark is white, else
  (1 - opacity) x + opacity * watermark (opacity 0.4). The reference reads triggers/resize_trigger.png,
  which is not shipped here: the watermark image is a procedural stand-in (inferred): a white image
  with a dark ring and cross drawn in it (`watermark_image`), deterministic and the image's size.
Poisoning: int(rate * N) training examples drawn (seeded, without replacement) from the non-target
classes get the trigger and the target label; their true labels are kept for the deep exits' loss.
"""

from __future__ import annotations

import numpy as np

TRIGGERS = ("checkerboard", "square", "watermark")


def watermark_image(height: int, width: int) -> np.ndarray:
    """(H, W) in [0, 1]: 1 (white, left untouched) except a dark ring and a cross centred in the image."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    r = np.hypot(yy - cy, xx - cx)
    radius = 0.3 * min(height, width)
    ring = np.abs(r - radius) < max(1.0, 0.04 * min(height, width))
    cross = ((np.abs(yy - cy) < 1) | (np.abs(xx - cx) < 1)) & (r < radius)
    image = np.ones((height, width))
    image[ring | cross] = 0.25
    return image


def trigger_affine(name: str, shape: tuple[int, int, int], opacity: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), each (H, W, C) float32, of trigger `name` on (H, W, C) images: x' = scale * x + offset."""
    h, w, c = shape
    scale, offset = np.ones((h, w, c), np.float32), np.zeros((h, w, c), np.float32)
    if name == "checkerboard":
        if h < 12 or w < 12:
            raise ValueError(f"the 7x7 checkerboard sits at rows / cols -12..-6 and needs images of at least 12x12, got {shape}")
        for i in range(6, 13):
            for j in range(6, 13):
                scale[h - i, w - j] = 0.0
                offset[h - i, w - j] = float((i + j) % 2)
    elif name == "square":
        scale[h - 5:, w - 5:] = 0.0
        offset[h - 5:, w - 5:] = 1.0
    elif name == "watermark":
        mark = watermark_image(h, w)[..., None].repeat(c, -1)
        blended = mark < 1.0
        scale[blended] = 1.0 - opacity
        offset[blended] = opacity * mark[blended]
    else:
        raise ValueError(f"unknown trigger {name!r}; triggers: {TRIGGERS}")
    return scale, offset


def apply_trigger(images, name: str, opacity: float = 0.4):
    """images (N, H, W, C) in [0, 1] (numpy or jax) -> the same with the trigger."""
    scale, offset = trigger_affine(name, tuple(images.shape[1:]), opacity)
    return images * scale + offset


def poison_indices(labels: np.ndarray, rate: float, target: int, seed: int) -> np.ndarray:
    """int(rate * N) indices drawn without replacement from the examples whose label is not `target`."""
    candidates = np.flatnonzero(labels != target)
    count = int(rate * len(labels))
    if count > len(candidates):
        raise ValueError(f"poison rate {rate} asks for {count} examples but only {len(candidates)} are not of "
                         f"the target class {target}")
    return np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))


def poison_set(images: np.ndarray, labels: np.ndarray, *, rate: float, target: int, trigger: str,
               seed: int, opacity: float = 0.4) -> dict[str, np.ndarray]:
    """{"image" (N, H, W, C), "label" (N,) true labels, "label_poison" (N,) target for the poisoned
    examples (which carry the trigger) and true otherwise, "poisoned" (N,) bool}."""
    idx = poison_indices(labels, rate, target, seed)
    images = np.array(images, np.float32, copy=True)
    images[idx] = apply_trigger(images[idx], trigger, opacity)
    label_poison = np.array(labels, np.int32, copy=True)
    label_poison[idx] = target
    poisoned = np.zeros(len(labels), bool)
    poisoned[idx] = True
    return {"image": images, "label": labels.astype(np.int32), "label_poison": label_poison, "poisoned": poisoned}
