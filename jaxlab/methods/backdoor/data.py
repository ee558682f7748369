"""The backdoor experiment's images: clean train / test splits in [0, 1], the poisoned training set, and
the per-channel statistics the models normalise with.

Any image source with "image" (N, H, W, 1 or 3; uint8 or float in [0, 1]) and "label" works (resized
bilinearly to model.image_size, grey repeated to 3 channels, by jaxlab.data.images.rgb_images):
  shipped:digits                  the offline default: scikit-learn digits upsampled to 32x32x3
  tfds:cifar10, tfds:svhn_cropped TFDS prepared under data.data_dir (tfds build ... --file_format array_record)
  folder:<root>                   GTSRB or Tiny-ImageNet as <root>/<class>/<image> (data.options.image_size)
  file:<path>.npz                 any arrays (`<name>_train.npz` / `<name>_test.npz` for fixed splits)
Normalisation (x - mean) / std with the clean train split's channel statistics happens inside the
model function, after the trigger, as the reference's Normalize follows its uint8 trigger.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxlab.data.sources import ArraySource
from jaxlab.methods.backdoor.triggers import poison_set
from jaxlab.data.images import rgb_images


def load_split(config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, S, S, 3) float32 in [0, 1], labels (N,) int32) of `split` ("train" / "test");
    data.options.limit > 0 keeps the first examples. Labels must lie in [0, model.num_classes)."""
    d = config.data
    x, y = _cached_split(d.source, split, d.seed, d.data_dir, config.model.image_size,
                         tuple(sorted(dict(d.options).items())))
    if len(y) and (y.min() < 0 or y.max() >= config.model.num_classes):
        raise ValueError(f"{d.source} ({split}): labels span {y.min()}..{y.max()} but model.num_classes is "
                         f"{config.model.num_classes}")
    return x, y


@functools.lru_cache(maxsize=8)
def _cached_split(source, split, seed, data_dir, size, options):
    return rgb_images(source, split, seed, data_dir, size, dict(options))


def channel_stats(config) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (3,) of the clean train split."""
    x, _ = load_split(config, "train")
    return x.mean(axis=(0, 1, 2)), np.maximum(x.std(axis=(0, 1, 2)), 1e-6)


def clean_source(config, split: str) -> ArraySource:
    """{"image", "label", "label_poison" (= label)} of the clean split."""
    x, y = load_split(config, split)
    return ArraySource({"image": x, "label": y, "label_poison": y}, name=f"{config.data.source}[{split}]")


def poisoned_source(config) -> ArraySource:
    """The attacker's poisoned training set (triggers.poison_set with config.attack)."""
    x, y = load_split(config, "train")
    a = config.attack
    arrays = poison_set(x, y, rate=a.poison_rate, target=a.target, trigger=a.trigger, seed=a.seed,
                        opacity=a.watermark_opacity)
    arrays.pop("poisoned")
    return ArraySource(arrays, name=f"{config.data.source}[train, poisoned]")
