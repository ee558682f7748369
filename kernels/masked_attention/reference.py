"""Masked-patch attention in plain XLA: the definition every other path is tested against.

Shapes: q, k, v are [batch, tokens, heads, head_dim]; valid_length is [batch] (int). Token t of
example b is valid when t < valid_length[b]. A valid query attends to the valid keys only; a padded
query outputs zeros; whatever padded positions hold (NaN included) never reaches valid outputs or
gradients. Softmax and accumulation run in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def default_scale(head_dim: int) -> float:
    """The softmax scale used when none is given: 1 / sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)


def check_inputs(
    q: jax.Array, k: jax.Array, v: jax.Array, valid_length: jax.Array | None
) -> jax.Array:
    """Validates q, k, v [batch, tokens, heads, head_dim] and returns valid_length as int32 [batch].

    valid_length=None means every token is valid; given lengths are clipped to [0, tokens].
    Raises ValueError naming the offending tensor and both shapes (or dtypes).
    """
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, tokens, heads, head_dim], got shape {q.shape}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} has shape {x.shape} but q has shape {q.shape}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has dtype {q.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not one of {[str(d) for d in SUPPORTED_DTYPES]}")
    batch, tokens = q.shape[:2]
    if valid_length is None:
        return jnp.full((batch,), tokens, jnp.int32)
    valid_length = jnp.asarray(valid_length)
    if valid_length.shape != (batch,):
        raise ValueError(
            f"valid_length has shape {valid_length.shape} but q has shape {q.shape}: "
            f"expected ({batch},), one length per example"
        )
    if not jnp.issubdtype(valid_length.dtype, jnp.integer):
        raise ValueError(f"valid_length must be an integer array, got dtype {valid_length.dtype}")
    return jnp.clip(valid_length, 0, tokens).astype(jnp.int32)


def token_validity(valid_length: jax.Array, tokens: int) -> jax.Array:
    """[batch] lengths -> bool [batch, tokens], True where token < valid_length."""
    return jnp.arange(tokens)[None, :] < valid_length[:, None]


def masked_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid_length: jax.Array | None = None,
    *,
    scale: float | None = None,
) -> jax.Array:
    """softmax(q k^T * scale) v over valid tokens, in float32. Returns float32 [batch, tokens, heads, head_dim].

    Materialises the [batch, heads, tokens, tokens] logits: for tests and small shapes.
    """
    valid_length = check_inputs(q, k, v, valid_length)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    valid = token_validity(valid_length, q.shape[1])  # [B, T]
    q, k, v = (jnp.where(valid[:, :, None, None], x, 0).astype(jnp.float32) for x in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    pair_valid = valid[:, None, :, None] & valid[:, None, None, :]  # [B, 1, Tq, Tk]
    logits = jnp.where(pair_valid, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1) * pair_valid
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
