"""Dispatcher for Swin shifted-window attention: implementation="auto" | "pallas" | "xla".

auto = the fused Pallas kernel on GPU (Triton lowering) and TPU (Mosaic), the XLA reference on CPU;
"pallas" on CPU runs the kernel body in interpret mode (what the tests do).

Input layout: q, k, v are projected feature maps [B, H_img, W_img, heads, head_dim]; the output has
the same shape and q's dtype. The pad / cyclic shift / window partition (and their inverse) happen
inside, with mmseg-Swin semantics (see reference.py).
"""

from __future__ import annotations

import jax
from jaxlab.kernels.backend import resolve_implementation
from jaxlab.kernels.window_attention.pallas import window_attention_pallas
from jaxlab.kernels.window_attention.reference import PadValues, window_attention_reference

Array = jax.Array


def window_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    window: int,
    shift: int,
    rel_pos_bias_table: Array,
    implementation: str = "auto",
    scale: float | None = None,
    kv_pad_values: PadValues = None,
) -> Array:
    """(Shifted) window multi-head attention with relative position bias, as in Swin's W-MSA/SW-MSA.

    Args:
      q, k, v: [B, H_img, W_img, heads, head_dim], one dtype (float32 or bfloat16).
      window: window side w (N = w*w tokens per window); maps not divisible by w are padded after.
      shift: cyclic shift (0 <= shift < w); the -100 region mask applies whenever shift > 0, also
        when the map is a single window.
      rel_pos_bias_table: [(2w-1)^2, heads], gathered by relative_position_index(w).
      implementation: "auto" (Pallas on GPU/TPU, XLA on CPU), "pallas" or "xla".
      scale: logit scale applied to q before QK; default head_dim ** -0.5.
      kv_pad_values: optional (k_pad, v_pad), each [heads, head_dim]: the values of padded key and
        value tokens (pass the qkv bias to match mmseg-Swin, which pads before projecting).
    Returns:
      [B, H_img, W_img, heads, head_dim] in q's dtype.
    """
    kwargs = {
        "window": window,
        "shift": shift,
        "rel_pos_bias_table": rel_pos_bias_table,
        "scale": scale,
        "kv_pad_values": kv_pad_values,
    }
    if resolve_implementation(implementation) == "pallas":
        return window_attention_pallas(q, k, v, **kwargs)
    return window_attention_reference(q, k, v, **kwargs)


def window_cross_attention(queries: Array, keys: Array, values: Array, **options) -> Array:
    """Cross-stream window attention (SwinDRNet fusion): queries from one stream, keys and values
    from the other, same windows, bias and shift mask.

    It is window_attention with q taken from the other stream (same kernel, same keyword options:
    window, shift, rel_pos_bias_table, implementation, scale, kv_pad_values); e.g.
    attn_1 = window_cross_attention(q_depth, k_rgb, v_rgb, window=7, shift=s, rel_pos_bias_table=t1).
    All three maps are [B, H_img, W_img, heads, head_dim] on the same grid.
    """
    return window_attention(queries, keys, values, **options)
