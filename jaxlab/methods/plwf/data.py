"""Task sequences from any labelled image source: split digits / CIFAR-100 / TinyImageNet into tasks of
disjoint classes.

`class_order(num_classes, seed)` fixes which classes come first (seed < 0: 0, 1, 2, ...; else a seeded
permutation); task t holds classes order[t*C : (t+1)*C] (C = classes_per_task). A `TaskSource` serves
one task's (or several tasks') examples of a base source with

    image (N, ...) as stored, label (N,) int32 the class index within its task (0..C-1),
    task (N,) int32 its task, class (N,) int32 its position in the class order (task * C + label)

so one batch can mix tasks (joint training, the evaluation over every task). Nothing is copied: rows
are read from the base source on demand (a TFDS data_source, user files, the shipped digits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.data.sources import DataSourceError, Source, get_source


def class_order(num_classes: int, seed: int) -> np.ndarray:
    """(num_classes,) the classes in task order: 0..n-1 when seed < 0, else a seeded permutation."""
    if seed < 0:
        return np.arange(num_classes)
    return np.random.default_rng([seed, 0xC1A55]).permutation(num_classes)


def read_labels(source: Source, key: str = "label", chunk: int = 4096) -> np.ndarray:
    """(N,) int labels of a source, read in chunks (a TFDS source reads row by row)."""
    n = len(source)
    if hasattr(source, "arrays") and key in source.arrays:
        return np.asarray(source.arrays[key]).astype(np.int64)
    parts = [np.asarray(source.get(np.arange(s, min(s + chunk, n)))[key]) for s in range(0, n, chunk)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0,), np.int64)


@dataclasses.dataclass(frozen=True)
class TaskSplit:
    """The class-to-task assignment: order (T*C,) classes in task order; num_tasks T; classes_per_task C."""

    order: np.ndarray
    num_tasks: int
    classes_per_task: int

    def classes(self, task: int) -> np.ndarray:
        c = self.classes_per_task
        return self.order[task * c:(task + 1) * c]

    def position(self, labels: np.ndarray) -> np.ndarray:
        """Original class ids -> their position in the order (-1 for classes not in any task)."""
        lookup = np.full(max(int(self.order.max()), int(labels.max(initial=0))) + 1, -1, np.int64)
        lookup[self.order] = np.arange(len(self.order))
        return lookup[labels]


def make_split(num_classes: int, num_tasks: int, classes_per_task: int, seed: int) -> TaskSplit:
    """The first num_tasks * classes_per_task classes of class_order(num_classes, seed), C per task."""
    used = num_tasks * classes_per_task
    if num_tasks < 1 or classes_per_task < 1:
        raise ValueError(f"cl.num_tasks={num_tasks} and cl.classes_per_task={classes_per_task} must be >= 1")
    if used > num_classes:
        raise ValueError(f"cl.num_tasks * cl.classes_per_task = {used} exceeds the dataset's {num_classes} classes")
    return TaskSplit(class_order(num_classes, seed)[:used], num_tasks, classes_per_task)


class TaskSource:
    """Rows `indices` of `base` with label/task/class as in the module docstring."""

    def __init__(self, base: Source, indices: np.ndarray, positions: np.ndarray, classes_per_task: int,
                 image_key: str = "image", label_key: str = "label"):
        self.base, self.indices, self.positions = base, np.asarray(indices), np.asarray(positions)
        self.classes_per_task, self.image_key, self.label_key = classes_per_task, image_key, label_key

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        rows = self.base.get(self.indices[indices])
        position = self.positions[indices]
        c = self.classes_per_task
        return {"image": np.asarray(rows[self.image_key]), "label": (position % c).astype(np.int32),
                "task": (position // c).astype(np.int32), "class": position.astype(np.int32)}


def task_sources(base: Source, split: TaskSplit, tasks: Sequence[int], labels: np.ndarray | None = None,
                 image_key: str = "image", label_key: str = "label") -> TaskSource:
    """The examples of `base` whose class belongs to one of `tasks`, in their stored order."""
    labels = read_labels(base, label_key) if labels is None else labels
    position = split.position(labels)
    task = np.where(position >= 0, position // split.classes_per_task, -1)
    keep = np.flatnonzero(np.isin(task, np.asarray(tasks)))
    if keep.size == 0:
        raise DataSourceError(f"no examples of tasks {list(tasks)} (classes "
                              f"{[int(c) for t in tasks for c in split.classes(t)]}) in the data source")
    return TaskSource(base, keep, position[keep], split.classes_per_task, image_key, label_key)


@dataclasses.dataclass
class TaskData:
    """Per-task training sources (train[t]: task t only), the cumulative ones (seen[t]: tasks 0..t, for
    joint training) and one test source over every task."""

    split: TaskSplit
    train: list
    seen: list
    test: TaskSource


def load_task_data(config) -> TaskData:
    """config.data.source split into config.cl's tasks (see the module docstring)."""
    d, cl = config.data, config.cl
    options = {k: v for k, v in dict(d.options).items() if v is not None}
    keys = dict(image=cl.image_key, label=cl.label_key)
    sources = {s: get_source(d.source, s, seed=d.seed, data_dir=d.data_dir, **options) for s in ("train", "test")}
    for name, src in sources.items():
        for role, key in keys.items():
            if len(src) and key not in src.get(np.arange(1)):
                raise DataSourceError(f"data source {d.source!r} ({name}) has no {role} feature {key!r}; "
                                      f"name it with --config.cl.{role}_key")
    labels = {s: read_labels(src, cl.label_key) for s, src in sources.items()}
    num_classes = int(cl.num_classes) or int(labels["train"].max()) + 1
    split = make_split(num_classes, int(cl.num_tasks), int(cl.classes_per_task), int(cl.class_order_seed))
    kw = dict(image_key=cl.image_key, label_key=cl.label_key)
    train = [task_sources(sources["train"], split, [t], labels["train"], **kw) for t in range(split.num_tasks)]
    seen = [task_sources(sources["train"], split, range(t + 1), labels["train"], **kw)
            for t in range(split.num_tasks)]
    test = task_sources(sources["test"], split, range(split.num_tasks), labels["test"], **kw)
    return TaskData(split, train, seen, test)


def image_transform(mean: Sequence[float], std: Sequence[float], scale: float):
    """Host transform: image as float32 / scale, normalised per channel by mean and std (empty: none);
    integer features as int32."""
    mean_a = np.asarray(mean, np.float32) if len(mean) else None
    std_a = np.asarray(std, np.float32) if len(std) else None

    def transform(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = np.asarray(batch["image"], np.float32) / np.float32(scale)
        if image.ndim == 3:  # (N, H, W) grey -> (N, H, W, 1)
            image = image[..., None]
        if mean_a is not None:
            image = (image - mean_a) / std_a
        out = {k: np.asarray(v, np.int32) for k, v in batch.items() if k != "image"}
        return {"image": image, **out}

    return transform


def augment_images(rng: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """CIFAR training augmentation in the step: per image, a random crop of the zero-padded image (pad
    pixels each side) back to (H, W) and a horizontal flip with probability 1/2. (B, H, W, C) -> same."""
    b, h, w, c = images.shape
    k_crop, k_flip = jax.random.split(rng)
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (b,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)
