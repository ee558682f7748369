"""Client partitioners over a label array: each returns a list of per-client index arrays (int64).

Schemes (fl_vs_splitnn.md): `iid` (shuffled equal slices), `dirichlet` (label skew, per-class client
shares ~ Dir(alpha)), `shards` (k classes per client; k=1 is the paper's extreme non-IID), and
`quantity` (IID labels, client sizes ~ Dir(alpha)), and `imbalanced` (classes subsampled to given ratios,
default the natural MIT-BIH ratio, then IID; indices used at most once). Every scheme is seeded (numpy Generator), uses each
index at most once, and every index exactly once where it says so; `validate_partition` checks both and
the minimum client size. `label_histogram` is the (clients, classes) count table for reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Partition = list[np.ndarray]


def _as_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    return labels


def _check_clients(n: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients * min_size > n:
        raise ValueError(f"{n} examples cannot give {num_clients} clients at least {min_size} each")


def _sorted_parts(parts: Sequence[np.ndarray]) -> Partition:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels, num_clients: int, *, seed: int = 0, min_size: int = 1) -> Partition:
    """Shuffle all n indices and cut them into num_clients near-equal slices (every index exactly once)."""
    n = len(_as_labels(labels))
    _check_clients(n, num_clients, min_size)
    order = np.random.default_rng(seed).permutation(n)
    return _sorted_parts(np.array_split(order, num_clients))


def dirichlet(
    labels,
    num_clients: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> Partition:
    """Label skew: for every class, its (shuffled) indices are split over clients by shares ~ Dir(alpha).

    Resamples (up to max_tries) until every client holds at least min_size examples; every index exactly
    once. Small alpha = strong skew; large alpha -> IID.
    """
    labels = _as_labels(labels)
    _check_clients(len(labels), num_clients, min_size)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        out = _sorted_parts([np.concatenate(p) for p in parts])
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(
        f"dirichlet(alpha={alpha}) found no partition of {len(labels)} examples over {num_clients} clients"
        f" with at least {min_size} each in {max_tries} tries; raise alpha or lower min_size"
    )


def shards(
    labels, num_clients: int, *, classes_per_client: int = 1, seed: int = 0, min_size: int = 1
) -> Partition:
    """k classes per client: client i holds classes (i*k + j) mod C for j < k (C = number of classes).

    Each class's shuffled indices are split evenly over the clients holding it. classes_per_client=1 with
    num_clients >= C is the extreme non-IID case (one class each). Every index is used exactly once when
    num_clients * k >= C (every class has a holder); otherwise the unheld classes are left out.
    """
    labels = _as_labels(labels)
    _check_clients(len(labels), num_clients, min_size)
    classes = np.unique(labels)
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(
            f"classes_per_client must be in 1..{len(classes)}, got {classes_per_client}"
        )
    rng = np.random.default_rng(seed)
    held = [
        [classes[(i * classes_per_client + j) % len(classes)] for j in range(classes_per_client)]
        for i in range(num_clients)
    ]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        holders = [i for i in range(num_clients) if c in held[i]]
        idx = rng.permutation(np.flatnonzero(labels == c))
        for i, piece in zip(holders, np.array_split(idx, max(len(holders), 1))):
            parts[i].append(piece)
    out = _sorted_parts([np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts])
    _check_min_size(out, min_size, "shards")
    return out


def quantity(
    labels, num_clients: int, *, alpha: float = 1.0, seed: int = 0, min_size: int = 1
) -> Partition:
    """Quantity skew: IID labels, client sizes = min_size + Dir(alpha) shares of the rest (exactly once)."""
    n = len(_as_labels(labels))
    _check_clients(n, num_clients, min_size)
    if alpha <= 0:
        raise ValueError(f"quantity alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    rest = n - num_clients * min_size
    sizes = min_size + np.floor(rng.dirichlet(np.full(num_clients, alpha)) * rest).astype(int)
    sizes[: n - sizes.sum()] += 1  # hand out the rounding remainder
    order = rng.permutation(n)
    return _sorted_parts(np.split(order, np.cumsum(sizes)[:-1]))


MITBIH_CLASS_COUNTS = (71_732, 8_036, 7_231, 2_491, 6_559)  # N, L, R, A, V (fl_vs_splitnn.md)


def imbalanced(
    labels,
    num_clients: int,
    *,
    ratios: Sequence[float] = MITBIH_CLASS_COUNTS,
    seed: int = 0,
    min_size: int = 1,
) -> Partition:
    """Natural class imbalance: subsample class c to counts proportional to ratios[c], then split IID.

    Keeps as many examples as the ratios allow (the scarcest class relative to its ratio is kept whole);
    each index is used at most once. Default ratios: the MIT-BIH beat counts N/L/R/A/V.
    """
    labels = _as_labels(labels)
    classes = np.unique(labels)
    if len(ratios) < classes.max() + 1 or min(ratios) <= 0:
        raise ValueError(
            f"need a positive ratio for each of classes 0..{classes.max()}, got {list(ratios)}"
        )
    counts = np.bincount(labels, minlength=len(ratios))[: len(ratios)]
    ratios = np.asarray(ratios, float)
    held = counts > 0
    scale = (counts[held] / ratios[held]).min()
    keep = np.floor(scale * ratios + 1e-9).astype(int)
    rng = np.random.default_rng(seed)
    kept = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[: keep[c]] for c in classes]
    )
    _check_clients(len(kept), num_clients, min_size)
    return _sorted_parts(np.array_split(rng.permutation(kept), num_clients))


def _check_min_size(parts: Partition, min_size: int, scheme: str) -> None:
    sizes = [len(p) for p in parts]
    if min(sizes) < min_size:
        raise ValueError(
            f"{scheme}: client {int(np.argmin(sizes))} has {min(sizes)} examples, fewer than {min_size}"
        )


SCHEMES: dict[str, Callable[..., Partition]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity": quantity,
    "imbalanced": imbalanced,
}


def partition(scheme: str, labels, num_clients: int, *, seed: int = 0, **options) -> Partition:
    """Dispatch by name: partition("dirichlet", labels, 10, alpha=0.1, seed=0)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid: {sorted(SCHEMES)}")
    return SCHEMES[scheme](labels, num_clients, seed=seed, **options)


def validate_partition(parts: Partition, n: int, *, exact: bool = True, min_size: int = 1) -> None:
    """Raises ValueError unless indices are in [0, n), used at most once (exactly once if exact), sizes >= min_size."""
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n):
        raise ValueError(f"partition has indices outside [0, {n})")
    counts = np.bincount(flat, minlength=n)
    if (counts > 1).any():
        raise ValueError(f"partition uses {int((counts > 1).sum())} indices more than once")
    if exact and (counts == 0).any():
        raise ValueError(f"partition leaves {int((counts == 0).sum())} of {n} indices unused")
    _check_min_size(parts, min_size, "partition")


def label_histogram(parts: Partition, labels, num_classes: int | None = None) -> np.ndarray:
    """(clients, classes) int64 table: how many examples of each class every client holds."""
    labels = _as_labels(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(np.int64)


def format_histogram(hist: np.ndarray, class_names: Sequence[str] | None = None) -> str:
    """Plain-text table of a label histogram, one row per client, with a total column."""
    names = list(class_names) if class_names is not None else [str(c) for c in range(hist.shape[1])]
    width = max(6, *(len(s) for s in names), len(str(hist.max(initial=0))))
    head = "client".rjust(6) + "".join(s.rjust(width + 1) for s in names) + "total".rjust(width + 1)
    rows = [
        str(k).rjust(6)
        + "".join(str(v).rjust(width + 1) for v in row)
        + str(row.sum()).rjust(width + 1)
        for k, row in enumerate(hist)
    ]
    return "\n".join([head, *rows])


def plot_histogram(hist: np.ndarray, path: str, class_names: Sequence[str] | None = None) -> str:
    """Stacked bar chart (clients on x, counts by class) written to a PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(class_names) if class_names is not None else [str(c) for c in range(hist.shape[1])]
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(hist)), 3))
    bottom = np.zeros(len(hist))
    for c, name in enumerate(names):
        ax.bar(np.arange(len(hist)), hist[:, c], bottom=bottom, label=name)
        bottom += hist[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
