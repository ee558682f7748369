"""Aggregators: pure functions (updates [M, ...] pytree, weights [M], mask [M] bool) -> aggregate [...] pytree.

Masked-out clients (dropped, rejected, padding) never touch the result, even when their update is NaN.
With no client left the aggregate is zeros (the server then keeps its parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
Aggregator = Callable[[PyTree, jax.Array, jax.Array], PyTree]


def _expand(v: jax.Array, x: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def weighted_mean(updates: PyTree, weights: jax.Array, mask: jax.Array) -> PyTree:
    """sum_m w_m u_m / sum_m w_m over masked-in clients (FedAvg with w = sample counts)."""
    w = jnp.where(mask, weights, 0.0).astype(jnp.float32)
    total = jnp.maximum(w.sum(), jnp.finfo(jnp.float32).tiny)

    def mean(x):
        x = jnp.where(_expand(mask, x), x, 0)
        return (jnp.sum(_expand(w, x) * x, axis=0) / total).astype(x.dtype)

    return jax.tree_util.tree_map(mean, updates)


def _sorted_valid(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Sorts along the client axis with masked-out entries pushed to the end (+inf)."""
    return jnp.sort(jnp.where(_expand(mask, x), x, jnp.inf), axis=0)


def _mean_of_ranks(x: jax.Array, mask: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Mean over ranks lo <= r < hi of the sorted valid values, per coordinate; zeros when the range is empty."""
    lo, hi = jnp.maximum(lo, 0), jnp.minimum(hi, mask.sum())
    ranks = _expand(jnp.arange(x.shape[0]), x)
    keep = (ranks >= lo) & (ranks < hi)
    s = jnp.where(keep, _sorted_valid(x, mask), 0.0)
    return (s.sum(0) / jnp.maximum(hi - lo, 1)).astype(x.dtype)


def coordinate_median(updates: PyTree, weights: jax.Array, mask: jax.Array) -> PyTree:
    """Per-coordinate median over masked-in clients (mean of the two middle values for an even count).

    weights are ignored (the median is unweighted, as in Yin et al. 2018).
    """
    n = mask.sum()
    lo, hi = (n - 1) // 2, n // 2 + 1
    return jax.tree_util.tree_map(lambda x: _mean_of_ranks(x, mask, lo, hi), updates)


def trimmed_mean(
    updates: PyTree, weights: jax.Array, mask: jax.Array, *, trim: float = 0.1
) -> PyTree:
    """Per-coordinate mean after dropping the floor(trim * n) largest and smallest values (n masked-in clients)."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trimmed_mean trim must be in [0, 0.5), got {trim}")
    n = mask.sum()
    k = jnp.floor(trim * n).astype(n.dtype)
    return jax.tree_util.tree_map(lambda x: _mean_of_ranks(x, mask, k, n - k), updates)


AGGREGATORS: dict[str, Aggregator] = {
    "mean": weighted_mean,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
}


def get_aggregator(name: str, **options) -> Aggregator:
    """By name, with options bound: get_aggregator("trimmed_mean", trim=0.2)."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; valid: {sorted(AGGREGATORS)}")
    fn = AGGREGATORS[name]
    return (lambda u, w, m: fn(u, w, m, **options)) if options else fn
