"""Laplace mechanism on cut activations (split_ecg.md).

Per (channel, position), across the batch: sensitivity D = max_b a - min_b a, widened by +-5e-6 when
D < 1e-5; the released activation is a + Laplace(0, D / epsilon). It runs inside the forward pass at
train and at test time. The noise is a constant for differentiation (its scale is computed from
stop_gradient(a)), so d(out)/d(a) = 1 as in the reference, where the noise is added as a tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_SENSITIVITY = 1e-5
WIDEN = 5e-6


def laplace_sensitivity(activation: jax.Array) -> jax.Array:
    """(B, ...) -> (...): max over the batch minus min over the batch, widened when nearly zero."""
    a = jax.lax.stop_gradient(activation)
    hi, lo = a.max(0), a.min(0)
    small = (hi - lo) < MIN_SENSITIVITY
    return jnp.where(small, (hi - lo) + 2 * WIDEN, hi - lo)  # = (hi + WIDEN) - (lo - WIDEN)


def laplace_mechanism(activation: jax.Array, epsilon: float, rng: jax.Array) -> jax.Array:
    """a + Laplace(0, D / epsilon) with D from `laplace_sensitivity`; epsilon must be positive."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    scale = laplace_sensitivity(activation) / epsilon
    noise = jax.random.laplace(rng, activation.shape, dtype=jnp.float32) * scale
    return activation + noise.astype(activation.dtype)
