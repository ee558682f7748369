"""One interface for every dataset: a random-access `Source` named by a spec string.

    tfds:<name>         a TFDS dataset prepared under data_dir, read with tfds.data_source (ArrayRecord)
    file:<path>         user arrays: .npz or .h5/.hdf5 with equal leading dims (one row per example)
    folder:<path>       an image folder: <path>/<class_name>/*.png|jpg
    shipped:<name>      real data inside installed packages (scikit-learn, scikit-image, PyWavelets, pydicom)
    synthetic:<name>    a seeded procedural generator

A source returns dicts of numpy arrays for any index array, so batch order can be a pure function of
(seed, step) and resuming needs no iterator state. Nothing is downloaded at run time.

Every kind takes the option `keys`, which renames features: {"signal": "x"} (or the command-line form
"signal:x,label:y") serves the stored "x" as "signal", and only the features it names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from jaxlab.errors import UserError


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset that is not on this machine; the message says how to prepare it."""

    exit_code = 2


class DataSourceError(UserError, ValueError):
    """A data source spec, option or file that cannot be used as asked; the message says what would."""

    exit_code = 2


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
_RENAMES_ITSELF: set[str] = set()  # kinds whose loader applies `keys` while reading (file:)
_NAMED: dict[str, dict[str, Callable[..., Mapping[str, np.ndarray]]]] = {"shipped": {}, "synthetic": {}}


def register_kind(kind: str, *, renames: bool = False):
    """Registers a loader for `kind:`; `renames`: it takes the `keys` option itself (else get_source
    renames what it returns)."""

    def deco(fn: Loader) -> Loader:
        _KINDS[kind] = fn
        if renames:
            _RENAMES_ITSELF.add(kind)
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
    from jaxlab.data import (av_clips, ecg_beats, files, neural, rgbd, shipped, synthetic,  # noqa: F401
                             tfds_source, video)  # (registration)


def get_source(
    spec: str, split: str = "train", *, seed: int = 0, keys: Any = None, features: Sequence[str] | None = None,
    **options: Any,
) -> Source:
    """Builds the source named by `spec` ('kind:name') for `split`.

    keys: renames features, {"served name": "stored name"} or "served:stored,..." (see parse_keys).
    features: names the caller needs; a source without them fails here, naming what it has and how to
    map them, instead of a KeyError deep in a step.
    """
    _import_builtin_sources()
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise DataSourceError(f"data source {spec!r} must look like kind:name with kind in {sorted(_KINDS)}")
    if kind not in _KINDS:
        near = difflib.get_close_matches(kind, _KINDS, n=2)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise DataSourceError(f"unknown data source kind {kind!r}.{hint} Known kinds: {sorted(_KINDS)}")
    keys = parse_keys(keys)
    if kind in _RENAMES_ITSELF:
        source = _KINDS[kind](name, split=split, seed=seed, keys=keys, **options)
    else:
        source = _KINDS[kind](name, split=split, seed=seed, **options)
        if keys:
            source = rename_features(source, keys, spec)
    if features:
        check_features(source, features, spec)
    return source


def parse_keys(keys: Any) -> dict[str, str] | None:
    """The `keys` option as {served: stored}: from a mapping, a "served:stored,served:stored" string (the
    command-line form: --config.data.options.keys=signal:x,label:y) or (served, stored) pairs."""
    if keys is None or keys == "" or keys == {}:
        return None
    if isinstance(keys, str):
        pairs = [part.split(":", 1) for part in keys.split(",") if part.strip()]
        if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
            raise DataSourceError(f"data.options.keys={keys!r} must look like served:stored,served:stored "
                                  "(e.g. signal:x,label:y)")
        return {a.strip(): b.strip() for a, b in pairs}
    if isinstance(keys, Mapping):
        return {str(a): str(b) for a, b in keys.items()}
    try:
        return {str(a): str(b) for a, b in keys}
    except (TypeError, ValueError):
        raise DataSourceError(f"data.options.keys={keys!r} must be a mapping or served:stored,... "
                              "(e.g. signal:x,label:y)") from None


def _keys_hint(names: Sequence[str], found: Sequence[str]) -> str:
    example = ",".join(f"{n}:{f}" for n, f in zip(names, list(found) + ["<name>"] * len(names)))
    return f"map them with --config.data.options.keys={example}"


def feature_names(source: Source) -> list[str]:
    """The feature names a source serves (read from one example unless it holds arrays)."""
    if hasattr(source, "arrays"):
        return sorted(source.arrays)
    return sorted(source.get(np.arange(min(1, len(source))))) if len(source) else []


def check_features(source: Source, features: Sequence[str], spec: str) -> None:
    """Raises DataSourceError naming the missing features, the ones `source` has, and the rename."""
    found = feature_names(source)
    missing = [f for f in features if f not in found]
    if missing:
        spare = [f for f in found if f not in features]
        raise DataSourceError(
            f"data source {spec!r} has no feature {', '.join(map(repr, missing))} (needed: "
            f"{', '.join(features)}; it has: {', '.join(found) or 'nothing'}); {_keys_hint(missing, spare)}"
        )


class RenamedSource:
    """A source serving `keys` = {served: stored} of another source's features."""

    def __init__(self, source: Source, keys: Mapping[str, str]):
        self.source, self.keys = source, dict(keys)

    def __len__(self) -> int:
        return len(self.source)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = self.source.get(indices)
        return {served: rows[stored] for served, stored in self.keys.items()}


def rename_features(source: Source, keys: Mapping[str, str], spec: str) -> Source:
    """`source` with features renamed (only those `keys` names); fails naming stored names it lacks."""
    found = feature_names(source)
    missing = [stored for stored in keys.values() if stored not in found]
    if missing:
        asked = ",".join(f"{a}:{b}" for a, b in keys.items())
        raise DataSourceError(f"data source {spec!r} has no {', '.join(map(repr, missing))} (asked for by "
                              f"data.options.keys={asked}); it has: {', '.join(found)}")
    if isinstance(source, ArraySource):
        arrays = {served: source.arrays[stored] for served, stored in keys.items()}
        return ArraySource(arrays, name=source.name)
    return RenamedSource(source, keys)


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
        raise DataSourceError(f"split must be 'train', 'test' or 'all', got {split!r}")
    order = np.random.default_rng([seed, 0x5B1]).permutation(n)
    n_test = int(round(n * test_fraction))
    if split == "all":
        return np.sort(order)
    return np.sort(order[n_test:] if split == "train" else order[:n_test])
