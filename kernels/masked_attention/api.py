"""Dispatcher: `masked_attention(q, k, v, *, valid_length=None, implementation="auto")`.

"auto" runs the Pallas kernels on GPU/TPU and the XLA path on CPU (where Pallas only interprets);
"pallas" or "xla" forces a path ("pallas" on CPU runs the real kernel body in interpret mode).
"""

from __future__ import annotations

import jax
from jaxlab.kernels import backend
from jaxlab.kernels.masked_attention.pallas import masked_attention_pallas
from jaxlab.kernels.masked_attention.reference import check_inputs, masked_attention_reference


def choose_implementation(implementation: str = "auto") -> str:
    """The path `masked_attention` takes on this backend: "pallas" or "xla"."""
    return backend.resolve_implementation(implementation)


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    valid_length: jax.Array | None = None,
    scale: float | None = None,
    implementation: str = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Attention among the valid tokens of each example.

    q, k, v: [batch, tokens, heads, head_dim], same dtype (float32, bfloat16 or float16).
    valid_length: int [batch]; token t of example b takes part when t < valid_length[b] (None: all).
    scale: softmax scale, default 1 / sqrt(head_dim).
    block_q, block_k: Pallas block sizes (powers of two); default chosen per backend and shape.
    Returns [batch, tokens, heads, head_dim] in q's dtype; padded query rows are zero.
    """
    check_inputs(q, k, v, valid_length)
    if choose_implementation(implementation) == "pallas":
        return masked_attention_pallas(
            q, k, v, valid_length, scale=scale, block_q=block_q, block_k=block_k
        )
    return masked_attention_reference(q, k, v, valid_length, scale=scale).astype(q.dtype)
