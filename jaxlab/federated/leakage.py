"""Leakage of raw inputs through cut activations (split_ecg.md): distance correlation and DTW, in JAX.

Per sample and per activation channel, then the mean over samples; channels are reported sorted.
- dCor between AvgPool1d(4)(x) (length 32) and activation channel a_c (length 32), taken as 32 paired
  scalar observations: biased V-statistic dCor = dCov(X, Y) / sqrt(dVar(X) dVar(Y)).
- DTW between x (length 128) and a_c (length 32) with squared-difference cost: the square root of the
  summed squared differences along the optimal warping path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _centred_distances(v: jax.Array) -> jax.Array:
    """(n,) scalar observations -> (n, n) double-centred distance matrix."""
    d = jnp.abs(v[:, None] - v[None, :])
    return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()


def distance_correlation(x: jax.Array, y: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Biased (V-statistic) distance correlation of paired scalar observations x, y of shape (n,)."""
    a, b = _centred_distances(x.astype(jnp.float32)), _centred_distances(y.astype(jnp.float32))
    dcov2 = jnp.mean(a * b)
    dvar2 = jnp.mean(a * a) * jnp.mean(b * b)
    dcor2 = jnp.where(dvar2 > eps, dcov2 / jnp.sqrt(jnp.maximum(dvar2, eps)), 0.0)
    return jnp.sqrt(jnp.maximum(dcor2, 0.0))


def dtw_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """DTW of x (n,) and y (m,): sqrt of the minimal summed squared difference over warping paths."""
    cost = (x[:, None].astype(jnp.float32) - y[None, :].astype(jnp.float32)) ** 2  # (n, m)
    m = y.shape[0]

    def row(prev, c_row):
        # D[i, j] = c[i, j] + min(D[i-1, j], D[i-1, j-1], D[i, j-1]), left to right along the row
        diag = jnp.concatenate([jnp.full((1,), jnp.inf), prev[:-1]])
        best_above = jnp.minimum(prev, diag)

        def cell(left, j):
            value = c_row[j] + jnp.minimum(best_above[j], left)
            return value, value

        _, current = jax.lax.scan(cell, jnp.inf, jnp.arange(m))
        return current, None

    first = jnp.cumsum(cost[0])
    last, _ = jax.lax.scan(row, first, cost[1:])
    return jnp.sqrt(last[-1])


def avg_pool(x: jax.Array, size: int) -> jax.Array:
    """(..., L) -> (..., L // size), PyTorch AvgPool1d(size) on the last axis."""
    return x[..., : x.shape[-1] // size * size].reshape(*x.shape[:-1], -1, size).mean(-1)


def leakage_report(signals: jax.Array, activations: jax.Array) -> dict[str, jax.Array]:
    """signals (B, L) raw beats, activations (B, L', C) cut activations (NWC).

    Returns per-channel means over samples: dcor (C,) and dtw (C,), with dcor on AvgPool(L / L')(x).
    """
    if signals.ndim != 2 or activations.ndim != 3 or signals.shape[0] != activations.shape[0]:
        raise ValueError(f"signals must be (B, L) and activations (B, L', C); got {signals.shape} and "
                         f"{activations.shape}")
    pooled = avg_pool(signals, signals.shape[1] // activations.shape[1])  # (B, L')
    channels = jnp.swapaxes(activations, 1, 2)  # (B, C, L')
    per_sample_dcor = jax.vmap(lambda x, a: jax.vmap(lambda c: distance_correlation(x, c))(a))(pooled, channels)
    per_sample_dtw = jax.vmap(lambda x, a: jax.vmap(lambda c: dtw_distance(x, c))(a))(signals, channels)
    return {"dcor": per_sample_dcor.mean(0), "dtw": per_sample_dtw.mean(0)}
