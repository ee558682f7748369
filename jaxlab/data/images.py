"""Image arrays of any source as float RGB at one size: what the CIFAR-style methods (fl_vs_splitnn's
ResNet-20 / MobileNet cuts, the multi-exit backdoor) train on, whether the source holds CIFAR-10 itself
(tfds:, file:, folder:) or the offline stand-in (shipped:digits, 8x8 grey)."""

from __future__ import annotations

import jax
import numpy as np

from jaxlab.data.sources import get_source


def rgb_images(source: str, split: str, seed: int, data_dir: str | None, size: int, options) -> tuple:
    """(images (N, size, size, 3) float32 in [0, 1], labels (N,) int32) from any source with
    "image" (N, H, W, 1 or 3; uint8 or float in [0, 1]) and "label"; resized (bilinear) to size x size,
    grey repeated to 3 channels; options["limit"] keeps the first examples."""
    src = get_source(source, split, seed=seed, data_dir=data_dir, features=("image", "label"), **dict(options))
    limit = options.get("limit")
    batch = src.get(np.arange(min(len(src), limit or len(src))))
    x = np.asarray(batch["image"])
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{source}: images must be (N, H, W, 1 or 3), got {x.shape}")
    if x.shape[1:3] != (size, size):
        x = np.asarray(jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "linear"))
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x, np.asarray(batch["label"]).astype(np.int32)
