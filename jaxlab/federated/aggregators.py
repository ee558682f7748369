"""Aggregators: pure functions (updates [M, ...] pytree, weights [M], mask [M] bool) -> aggregate [...] pytree.

Masked-out clients (dropped, rejected, padding) never touch the result, even when their update is NaN.
With no client left the aggregate is zeros (the server then keeps its parameters).

Overflow: a float32 sum of client updates overflows long before any one update does (two clients of
2e38, or 20 examples times 3e37). Every aggregator here therefore
- normalises the weights first (w_m / max w, then / sum w, so the weights sum to 1), and
- divides each coordinate by a power of two 2^k with max_m |x_m| / 2^k < 4 before summing and
  multiplies back after (exact in binary floating point), so every partial sum stays under 4 in
  magnitude and a finite set of updates gives a finite aggregate.

Robust aggregators refuse a setting that does nothing: a trimmed mean that trims floor(trim * n) = 0
clients, or a median of fewer than 3 clients, is the plain mean. `get_aggregator(...,
clients_per_round=n)` raises at build time; inside a trace the slot count M is known and a warning is
logged on the jaxlab.federated logger.

A per-client update norm bound (`norm_bound(max_norm, mode)`) clips an update to L2 norm max_norm
("clip") or rejects it ("reject"); `bound_norms` applies it on the client axis (the round names the
clients it touched in a warning).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
Aggregator = Callable[[PyTree, jax.Array, jax.Array], PyTree]
log = logging.getLogger("jaxlab.federated")


def _expand(v: jax.Array, x: jax.Array) -> jax.Array:
    """v [M] reshaped to broadcast against x [M, ...]."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _compute_dtype(x: jax.Array):
    """At least float32 (bf16 / f16 updates are aggregated in float32, float64 stays float64)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _masked(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [M, ...] in the compute dtype with masked-out rows set to 0 (their NaN/inf never spreads)."""
    return jnp.where(_expand(mask, x), x.astype(_compute_dtype(x)), 0)


def _pow2(k: jax.Array, dtype) -> jax.Array:
    """2^k exactly (k an integer array in the normal exponent range), built from its bits."""
    if jnp.dtype(dtype) == jnp.float64:
        return jax.lax.bitcast_convert_type((k.astype(jnp.int64) + 1023) << 52, jnp.float64)
    return jax.lax.bitcast_convert_type((k.astype(jnp.int32) + 127) << 23, jnp.float32).astype(dtype)


def _scale_exponent(maxabs: jax.Array) -> jax.Array:
    """k >= 0 with maxabs / 2^k < 4: 0 below 4, else frexp's exponent - 2 (at most 126 in float32)."""
    _, e = jnp.frexp(maxabs)
    return jnp.where(maxabs >= 4, e - 2, 0)


def _scaled(x: jax.Array, mask: jax.Array, reduce: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """2^k reduce(x / 2^k) over the client axis, k per coordinate so that |x / 2^k| < 4: scaling by a
    power of two is exact, and a mean of values under 4 in magnitude cannot overflow. Masked rows are 0."""
    x = _masked(x, mask)
    k = _scale_exponent(jnp.max(jnp.abs(x), axis=0))
    return reduce(x * _pow2(-k, x.dtype)[None]) * _pow2(k, x.dtype)


def normalized_weights(weights: jax.Array, mask: jax.Array) -> jax.Array:
    """[M] float32 weights of the masked-in clients summing to 1 (all zeros if none or all weights 0).

    Divides by a power of two near the largest weight before summing, so huge weights cannot overflow
    the total (and a division by the largest weight itself could flush to zero: 1 / 3e38 is subnormal)."""
    w = jnp.where(mask, weights.astype(jnp.float32), 0.0)
    w = w * _pow2(-_scale_exponent(jnp.max(jnp.abs(w), initial=0.0)), jnp.float32)
    return w / jnp.maximum(w.sum(), jnp.finfo(jnp.float32).tiny)


def weighted_mean(updates: PyTree, weights: jax.Array, mask: jax.Array) -> PyTree:
    """sum_m p_m u_m with p_m = w_m / sum w over masked-in clients (FedAvg with w = sample counts);
    overflow-safe (module doc)."""
    p = normalized_weights(weights, mask)

    def mean(x):
        pw = _expand(p, x).astype(_compute_dtype(x))
        return _scaled(x, mask, lambda s: jnp.sum(pw * s, axis=0)).astype(x.dtype)

    return jax.tree_util.tree_map(mean, updates)


def _mean_of_ranks(x: jax.Array, mask: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Mean over ranks lo <= r < hi of the sorted masked-in values, per coordinate; zeros when the range
    is empty. Overflow-safe (computed on power-of-two-scaled values)."""
    lo, hi = jnp.maximum(lo, 0), jnp.minimum(hi, mask.sum())
    ranks = _expand(jnp.arange(x.shape[0]), x)
    keep = (ranks >= lo) & (ranks < hi)

    def reduce(s):  # masked-out rows sort to the end (+inf) and are never in [lo, hi)
        s = jnp.sort(jnp.where(_expand(mask, s), s, jnp.inf), axis=0)
        return jnp.where(keep, s, 0.0).sum(0) / jnp.maximum(hi - lo, 1)

    return _scaled(x, mask, reduce).astype(x.dtype)


def _slots(updates: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(updates)
    return leaves[0].shape[0] if leaves else 0


MEDIAN_MIN_CLIENTS = 3


def _median_check(clients: int) -> str | None:
    if clients < MEDIAN_MIN_CLIENTS:
        return (f"coordinate_median of {clients} clients per round is their plain mean; it needs at "
                f"least {MEDIAN_MIN_CLIENTS} clients per round")
    return None


def coordinate_median(updates: PyTree, weights: jax.Array, mask: jax.Array) -> PyTree:
    """Per-coordinate median over masked-in clients (mean of the two middle values for an even count).

    weights are ignored (the median is unweighted, as in Yin et al. 2018)."""
    problem = _median_check(_slots(updates)) if _slots(updates) else None  # nothing to aggregate: no warning
    if problem:
        log.warning("%s (at most %d clients reach this aggregator)", problem, _slots(updates))
    n = mask.sum()
    lo, hi = (n - 1) // 2, n // 2 + 1
    return jax.tree_util.tree_map(lambda x: _mean_of_ranks(x, mask, lo, hi), updates)


def _trim_check(trim: float, clients: int) -> str | None:
    """Why trimmed_mean(trim) over `clients` clients trims nothing, or None if it trims."""
    if math.floor(trim * clients) >= 1:
        return None
    need = math.ceil(1 / trim - 1e-9)
    return (f"trimmed_mean(trim={trim}) with {clients} clients per round trims floor({trim} * {clients}) = "
            f"{math.floor(trim * clients)} clients from each end: it is the plain mean; it needs at least "
            f"{need} clients per round (or trim >= {1 / clients:.3g})")


def _check_trim(trim: float) -> None:
    if not 0.0 < trim < 0.5:
        raise ValueError(f"trimmed_mean trim must be in (0, 0.5), got {trim} (trim 0 is the mean aggregator)")


def trimmed_mean(updates: PyTree, weights: jax.Array, mask: jax.Array, *, trim: float = 0.1) -> PyTree:
    """Per-coordinate mean after dropping the floor(trim * n) largest and smallest values (n masked-in
    clients, Yin et al. 2018); weights are ignored."""
    _check_trim(trim)
    problem = _trim_check(trim, _slots(updates)) if _slots(updates) else None
    if problem:
        log.warning("%s (at most %d clients reach this aggregator)", problem, _slots(updates))
    n = mask.sum()
    k = jnp.floor(trim * n).astype(n.dtype)
    return jax.tree_util.tree_map(lambda x: _mean_of_ranks(x, mask, k, n - k), updates)


AGGREGATORS: dict[str, Aggregator] = {
    "mean": weighted_mean,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
}


def get_aggregator(name: str, *, clients_per_round: int | None = None, **options) -> Aggregator:
    """By name, with options bound: get_aggregator("trimmed_mean", trim=0.2, clients_per_round=10).

    With clients_per_round given, a robust aggregator that would do nothing at that count (trimmed mean
    trimming 0 clients, median of < 3 clients) raises a ValueError naming the count it needs."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; valid: {sorted(AGGREGATORS)}")
    if name == "trimmed_mean":
        _check_trim(options.get("trim", 0.1))
    if clients_per_round is not None:
        if name == "trimmed_mean":
            problem = _trim_check(options.get("trim", 0.1), clients_per_round)
        elif name == "median":
            problem = _median_check(clients_per_round)
        else:
            problem = None
        if problem:
            raise ValueError(problem)
    fn = AGGREGATORS[name]
    return functools.partial(fn, **options) if options else fn


# --- per-client update norm bound -------------------------------------------------------------------------

NORM_MODES = ("clip", "reject")


class NormBound(NamedTuple):
    """Static config: max_norm (L2 over a client's whole update tree) and mode "clip" | "reject"."""

    max_norm: float
    mode: str = "clip"


def norm_bound(max_norm: float, mode: str = "clip") -> NormBound:
    """A per-client update norm bound: "clip" scales an update to norm max_norm, "reject" drops it."""
    if not max_norm > 0:
        raise ValueError(f"norm bound max_norm must be > 0, got {max_norm}")
    if mode not in NORM_MODES:
        raise ValueError(f"norm bound mode must be one of {NORM_MODES}, got {mode!r}")
    return NormBound(float(max_norm), mode)


def client_norms(updates: PyTree) -> jax.Array:
    """[M] L2 norm of each client's update over the whole tree, overflow-safe (3e37 entries give a
    finite norm): each client's entries are divided by a power of two (|x| / 2^k < 4) first."""
    leaves = [x.reshape(x.shape[0], -1).astype(_compute_dtype(x)) for x in jax.tree_util.tree_leaves(updates)]
    if not leaves:
        return jnp.zeros((0,), jnp.float32)
    flat = jnp.concatenate(leaves, axis=1) if len(leaves) > 1 else leaves[0]
    k = _scale_exponent(jnp.max(jnp.abs(flat), axis=1))
    scaled = flat * _pow2(-k, flat.dtype)[:, None]
    return jnp.sqrt(jnp.sum(scaled * scaled, axis=1)) * _pow2(k, flat.dtype)


def bound_norms(
    updates: PyTree, mask: jax.Array, bound: NormBound
) -> tuple[PyTree, jax.Array, jax.Array]:
    """Applies the bound to masked-in clients' updates [M, ...].

    Returns (updates, clipped [M] bool, rejected [M] bool): in "clip" mode the over-bound updates are
    scaled to norm max_norm and marked clipped; in "reject" mode they are left as they are and marked
    rejected (the caller masks them out)."""
    norms = client_norms(updates)
    over = mask & (norms > bound.max_norm)
    if bound.mode == "reject":
        return updates, jnp.zeros_like(over), over
    # x / norm * max_norm, with x and norm first divided by the same power of two (norm / 2^k < 4):
    # XLA may divide as x * (1 / norm), and 1 / 3e38 is subnormal (flushed to zero on CPU).
    k = _scale_exponent(norms)
    divisor = jnp.where(over, norms * _pow2(-k, norms.dtype), 1.0)

    def clip(x):
        y = x.astype(_compute_dtype(x))
        down = _expand(_pow2(-k, y.dtype), y)
        clipped = (y * down) / _expand(divisor, y).astype(y.dtype) * bound.max_norm
        return jnp.where(_expand(over, y), clipped, y).astype(x.dtype)

    return jax.tree_util.tree_map(clip, updates), over, jnp.zeros_like(over)
