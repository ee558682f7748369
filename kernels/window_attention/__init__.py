"""Swin shifted-window attention: XLA reference, fused Pallas kernel (forward + backward), dispatcher.

    from jaxlab.kernels.window_attention import window_attention, relative_position_index
    out = window_attention(q, k, v, window=7, shift=3, rel_pos_bias_table=table)  # q: [B, H, W, heads, d]

Helpers for the Swin model: relative_position_index(w), shift_region_ids / shift_attention_mask
(Swin's img_mask and attn_mask), padded_size, to_windows / from_windows (pad + roll + partition).
"""

from jaxlab.kernels.window_attention.api import window_attention, window_cross_attention
from jaxlab.kernels.window_attention.reference import (
    SHIFT_MASK_VALUE,
    from_windows,
    padded_size,
    relative_position_bias,
    relative_position_index,
    shift_attention_mask,
    shift_region_ids,
    to_windows,
    window_attention_reference,
)

__all__ = [
    "SHIFT_MASK_VALUE",
    "from_windows",
    "padded_size",
    "relative_position_bias",
    "relative_position_index",
    "shift_attention_mask",
    "shift_region_ids",
    "to_windows",
    "window_attention",
    "window_attention_reference",
    "window_cross_attention",
]
