"""Moving between all tokens and the visible ones (MAR / VideoMAE encoders run on visible tokens only).

The visible count is static (e.g. 784 of 1,568 at 50% masking) so shapes stay fixed under jit; an
example with fewer visible tokens than that count is padded, and its valid_length says so (feed it to
masked_attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible_indices(mask: jax.Array, num_visible: int) -> tuple[jax.Array, jax.Array]:
    """Sorted positions of the visible tokens, with a static count.

    mask: bool [batch, tokens], True where a token is masked (hidden).
    Returns (indices int32 [batch, num_visible], valid_length int32 [batch]). Row b lists its visible
    positions in increasing order; when it has fewer than num_visible, the tail is padding (masked
    positions) and valid_length[b] < num_visible; when it has more, the last ones are dropped.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be [batch, tokens], got shape {mask.shape}")
    if not 0 < num_visible <= mask.shape[1]:
        raise ValueError(f"num_visible={num_visible} must be in [1, tokens={mask.shape[1]}]")
    order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)  # visible first, in order
    indices = order[:, :num_visible].astype(jnp.int32)
    valid_length = jnp.minimum(jnp.sum(~mask, axis=1), num_visible).astype(jnp.int32)
    return indices, valid_length


def gather_visible(tokens: jax.Array, indices: jax.Array) -> jax.Array:
    """tokens [batch, tokens, ...], indices int [batch, num_visible] -> [batch, num_visible, ...]."""
    if indices.ndim != 2 or indices.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"indices has shape {indices.shape} but tokens has shape {tokens.shape}: "
            "expected [batch, num_visible] with the same batch"
        )
    expanded = indices.reshape(indices.shape + (1,) * (tokens.ndim - 2))
    return jnp.take_along_axis(tokens, expanded, axis=1)


def scatter_visible(
    visible: jax.Array,
    indices: jax.Array,
    num_tokens: int,
    mask_token: jax.Array,
    valid_length: jax.Array | None = None,
) -> jax.Array:
    """Puts visible tokens back in place and fills every other position with mask_token.

    visible [batch, num_visible, ...], indices int [batch, num_visible], mask_token [...] (the
    per-token feature shape). Entries at or past valid_length[b] are padding and are not written.
    Returns [batch, num_tokens, ...] in visible's dtype.
    """
    batch, num_visible = indices.shape
    if visible.shape[:2] != (batch, num_visible):
        raise ValueError(
            f"visible has shape {visible.shape} but indices has shape {indices.shape}: "
            "expected the same [batch, num_visible] leading dims"
        )
    if mask_token.shape != visible.shape[2:]:
        raise ValueError(
            f"mask_token has shape {mask_token.shape} but visible has shape {visible.shape}: "
            f"expected {visible.shape[2:]}"
        )
    if valid_length is not None:  # padding goes out of range and is dropped
        padding = jnp.arange(num_visible)[None, :] >= valid_length[:, None]
        indices = jnp.where(padding, num_tokens, indices)
    full = jnp.broadcast_to(
        mask_token.astype(visible.dtype), (batch, num_tokens, *visible.shape[2:])
    )
    rows = jnp.arange(batch)[:, None]
    return full.at[rows, indices].set(visible, mode="drop")
