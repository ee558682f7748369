"""Losses shared by methods (per-example values; the method reduces them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *, double_softmax: bool = False) -> jax.Array:
    """Per-example CE in float32, (B, C) logits and (B,) integer labels -> (B,). double_softmax reproduces
    references that apply CrossEntropyLoss on top of a Softmax output layer (the logits are softmax
    probabilities then)."""
    logits = logits.astype(jnp.float32)
    if double_softmax:
        logits = jax.nn.softmax(logits)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
