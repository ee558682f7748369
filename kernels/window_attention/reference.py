"""Swin (shifted) window attention in plain XLA: the math the Pallas kernel is held to.

Semantics follow the mmseg-style Swin of SwinDRNet (PKU-EPIC/DREDS SwinDRNet/networks/SwinTransformer.py):

1. pad the map after (bottom, right) to a multiple of the window (before shifting; cropped at the end),
2. cyclic shift: roll by (-shift, -shift) over (height, width); applied whenever shift > 0, even when
   the map equals the window (the 7x7 stage),
3. window partition into (H_pad/w) x (W_pad/w) windows of N = w*w tokens (row-major inside a window),
4. logits = (q * scale) k^T + relative position bias (table[relative_position_index]) + shift mask,
   where the shift mask is -100 (not -inf) between tokens of different `img_mask` regions and is
   only added when shift > 0,
5. softmax, PV, window reverse, roll back by (+shift, +shift), crop.

Layout: q, k, v are projected feature maps [B, H_img, W_img, heads, head_dim]. Cross attention
(SwinDRNet fusion) is the same call with q taken from the other stream.

Padding: padded key/value tokens are zero by default. In mmseg-Swin the map is padded *before* the qkv
projection, so a padded token has k = b_k and v = b_v (the qkv bias); pass `kv_pad_values=(b_k, b_v)`
(each [heads, head_dim]) to reproduce that exactly. Padded queries are cropped, so their value is moot.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxlab.kernels.backend import check_qkv

SHIFT_MASK_VALUE = -100.0  # Swin's value for token pairs from different shift regions (not -inf)

Array = jax.Array
PadValues = Sequence[Array] | None  # (k_pad, v_pad), each [heads, head_dim]


def padded_size(size: int, window: int) -> int:
    """Smallest multiple of `window` that is >= `size`."""
    return -(-size // window) * window


def relative_position_index(window: int) -> np.ndarray:
    """Swin's relative_position_index: int32 [N, N], N = window**2, values in [0, (2w-1)^2).

    Entry (i, j) = (dy + w - 1) * (2w - 1) + (dx + w - 1) where (dy, dx) = position(i) - position(j)
    and tokens are numbered row-major inside the window.
    """
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(
        2, -1
    )
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # 2, N, N
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def shift_region_ids(padded_height: int, padded_width: int, window: int, shift: int) -> np.ndarray:
    """Swin's `img_mask`: int32 [H_pad, W_pad] region ids 0..8 in the rolled frame.

    Rows (and columns) split into slices [0, -w), [-w, -shift), [-shift, end); region = 3*row + col.
    """
    img_mask = np.zeros((padded_height, padded_width), np.int32)
    if shift == 0:  # Swin uses no mask then; slice(-0, None) would cover the whole map
        return img_mask
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for h in slices:
        for w in slices:
            img_mask[h, w] = count
            count += 1
    return img_mask


def shift_attention_mask(
    padded_height: int, padded_width: int, window: int, shift: int
) -> np.ndarray:
    """Swin's attn_mask: float32 [nW, N, N], 0 within a region and -100 across regions."""
    ids = shift_region_ids(padded_height, padded_width, window, shift)
    ids = ids.reshape(padded_height // window, window, padded_width // window, window)
    ids = ids.transpose(0, 2, 1, 3).reshape(-1, window * window)
    diff = ids[:, None, :] != ids[:, :, None]
    return np.where(diff, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def relative_position_bias(table: Array, window: int) -> Array:
    """Gathers the bias: table [(2w-1)^2, heads] -> [heads, N, N]."""
    index = relative_position_index(window)
    return jnp.transpose(table[index.reshape(-1)].reshape(*index.shape, -1), (2, 0, 1))


def validate_inputs(
    q: Array, k: Array, v: Array, *, window: int, shift: int, rel_pos_bias_table: Array
) -> None:
    """Raises ValueError naming the tensor and shapes when inputs do not fit together."""
    check_qkv(q, k, v, "[B, H_img, W_img, heads, head_dim]")
    if window < 1 or not 0 <= shift < window:
        raise ValueError(
            f"need window >= 1 and 0 <= shift < window; got window={window}, shift={shift}"
        )
    expected = ((2 * window - 1) ** 2, q.shape[3])
    if rel_pos_bias_table.shape != expected:
        raise ValueError(
            f"rel_pos_bias_table.shape={rel_pos_bias_table.shape}, expected {expected} "
            f"((2*window-1)^2, heads) for window={window}, q.shape={q.shape}"
        )


def pad_feature_map(x: Array, window: int, pad_value: Array | None = None) -> Array:
    """[B, H, W, heads, d] -> [B, H_pad, W_pad, heads, d], padded after; pad_value is [heads, d]."""
    height, width = x.shape[1:3]
    extra_h, extra_w = padded_size(height, window) - height, padded_size(width, window) - width
    if not (extra_h or extra_w):
        return x
    padded = jnp.pad(x, ((0, 0), (0, extra_h), (0, extra_w), (0, 0), (0, 0)))
    if pad_value is None:
        return padded
    inside = jnp.zeros(padded.shape[1:3], bool).at[:height, :width].set(True)
    return jnp.where(inside[None, :, :, None, None], padded, pad_value.astype(x.dtype))


def window_partition(x: Array, window: int) -> Array:
    """[B, H_pad, W_pad, heads, d] -> [B, nW, N, heads, d], windows row-major, tokens row-major."""
    b, hp, wp, heads, d = x.shape
    x = x.reshape(b, hp // window, window, wp // window, window, heads, d)
    return x.transpose(0, 1, 3, 2, 4, 5, 6).reshape(b, -1, window * window, heads, d)


def window_reverse(windows: Array, window: int, padded_height: int, padded_width: int) -> Array:
    """Inverse of window_partition: [B, nW, N, heads, d] -> [B, H_pad, W_pad, heads, d]."""
    b, _, _, heads, d = windows.shape
    nh, nw = padded_height // window, padded_width // window
    x = windows.reshape(b, nh, nw, window, window, heads, d).transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(b, padded_height, padded_width, heads, d)


def to_windows(x: Array, window: int, shift: int, pad_value: Array | None = None) -> Array:
    """Pad, cyclic shift and partition: [B, H, W, heads, d] -> [B, nW, N, heads, d]."""
    x = pad_feature_map(x, window, pad_value)
    if shift:
        x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
    return window_partition(x, window)


def from_windows(windows: Array, window: int, shift: int, height: int, width: int) -> Array:
    """Reverse, roll back and crop: [B, nW, N, heads, d] -> [B, height, width, heads, d]."""
    x = window_reverse(windows, window, padded_size(height, window), padded_size(width, window))
    if shift:
        x = jnp.roll(x, (shift, shift), axis=(1, 2))
    return x[:, :height, :width]


def default_scale(head_dim: int) -> float:
    """Swin's qk scale head_dim ** -0.5."""
    return head_dim**-0.5


def window_attention_reference(
    q: Array,
    k: Array,
    v: Array,
    *,
    window: int,
    shift: int,
    rel_pos_bias_table: Array,
    scale: float | None = None,
    kv_pad_values: PadValues = None,
) -> Array:
    """Shifted-window attention in float32 XLA; q, k, v [B, H, W, heads, d] -> [B, H, W, heads, d].

    rel_pos_bias_table: [(2w-1)^2, heads]. Output has q's dtype. See the module docstring for the
    exact semantics (padding, shift, mask, bias).
    """
    validate_inputs(q, k, v, window=window, shift=shift, rel_pos_bias_table=rel_pos_bias_table)
    _, height, width, _, head_dim = q.shape
    scale = default_scale(head_dim) if scale is None else scale
    k_pad, v_pad = (None, None) if kv_pad_values is None else kv_pad_values
    qw = to_windows(q, window, shift).astype(jnp.float32) * scale
    kw = to_windows(k, window, shift, k_pad).astype(jnp.float32)
    vw = to_windows(v, window, shift, v_pad).astype(jnp.float32)
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", qw, kw)
    logits = logits + relative_position_bias(rel_pos_bias_table.astype(jnp.float32), window)
    if shift:
        mask = shift_attention_mask(
            padded_size(height, window), padded_size(width, window), window, shift
        )
        logits = logits + mask[None, :, None]
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, vw)
    return from_windows(out, window, shift, height, width).astype(q.dtype)
