"""One interface for every dataset: a random-access `Source` named by a spec string.

    tfds:<name>         a TFDS dataset prepared under data_dir, read with tfds.data_source (ArrayRecord)
    file:<path>         user arrays: .npz or .h5/.hdf5 with equal leading dims (one row per example)
    folder:<path>       an image folder: <path>/<class_name>/*.png|jpg
    shipped:<name>      real data inside installed packages (scikit-learn, scikit-image, PyWavelets, pydicom)
    synthetic:<name>    a seeded procedural generator

A source returns dicts of numpy arrays for any index array, so batch order can be a pure function of
(seed, step) and resuming needs no iterator state. Nothing is downloaded at run time.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
    """A dataset that is not on this machine; the message says how to prepare it."""


class Source(Protocol):
    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `indices` of every feature, stacked on a leading axis."""
        ...


class ArraySource:
    """A source over in-memory arrays that share their leading (example) dimension."""

    def __init__(self, arrays: Mapping[str, np.ndarray], name: str = "arrays"):
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if not arrays:
            raise ValueError(f"source {name!r} has no arrays")
        lengths = {k: v.shape[0] for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"source {name!r}: arrays disagree on the number of examples: {lengths}")
        self.arrays = arrays
        self.name = name

    def __len__(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[indices] for k, v in self.arrays.items()}

    def __repr__(self) -> str:
        shapes = {k: (v.shape, str(v.dtype)) for k, v in self.arrays.items()}
        return f"ArraySource({self.name!r}, {shapes})"


# A loader takes (name, split, **options) and returns a Source.
Loader = Callable[..., Source]
_KINDS: dict[str, Loader] = {}
_NAMED: dict[str, dict[str, Callable[..., Mapping[str, np.ndarray]]]] = {"shipped": {}, "synthetic": {}}


def register_kind(kind: str):
    def deco(fn: Loader) -> Loader:
        _KINDS[kind] = fn
        return fn

    return deco


def register(kind: str, name: str):
    """Registers a named array builder `(split, seed, **options) -> dict of arrays` under shipped/synthetic."""

    def deco(fn):
        _NAMED[kind][name] = fn
        return fn

    return deco


def available() -> dict[str, list[str]]:
    """Registered source kinds and, for named kinds, their names (for `jaxlab list`)."""
    _import_builtin_sources()
    out = {k: [] for k in _KINDS}
    for kind, names in _NAMED.items():
        out[kind] = sorted(names)
    return out


def _import_builtin_sources() -> None:
    from jaxlab.data import ecg_beats, files, shipped, synthetic, tfds_source  # noqa: F401  (registration)


def get_source(spec: str, split: str = "train", *, seed: int = 0, **options: Any) -> Source:
    """Builds the source named by `spec` ('kind:name') for `split`."""
    _import_builtin_sources()
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"data source {spec!r} must look like kind:name with kind in {sorted(_KINDS)}")
    if kind not in _KINDS:
        near = difflib.get_close_matches(kind, _KINDS, n=2)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown data source kind {kind!r}.{hint} Known kinds: {sorted(_KINDS)}")
    return _KINDS[kind](name, split=split, seed=seed, **options)


def _named_loader(kind: str) -> Loader:
    def load(name: str, *, split: str, seed: int, **options) -> Source:
        builders = _NAMED[kind]
        if name not in builders:
            near = difflib.get_close_matches(name, builders, n=3)
            hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
            raise DatasetNotFoundError(f"no {kind} dataset {name!r}.{hint} Known: {sorted(builders)}")
        return ArraySource(builders[name](split=split, seed=seed, **options), name=f"{kind}:{name}")

    return load


register_kind("shipped")(_named_loader("shipped"))
register_kind("synthetic")(_named_loader("synthetic"))


def split_indices(n: int, split: str, *, test_fraction: float, seed: int) -> np.ndarray:
    """A fixed, seeded train/test partition of range(n): the same seed gives disjoint, stable splits."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    order = np.random.default_rng([seed, 0x5B1]).permutation(n)
    n_test = int(round(n * test_fraction))
    if split == "all":
        return np.sort(order)
    return np.sort(order[n_test:] if split == "train" else order[:n_test])
