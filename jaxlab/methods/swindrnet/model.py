"""SwinDRNet: two Swin streams, cross-attention fusion per stage, two UPerNet heads (swindrnet.md).

    net = SwinDRNet(size="tiny")
    out = net.apply(variables, rgb, raw_depth, train=False)
    # rgb [B, H, W, 3] in [0, 1], raw_depth [B, H, W] metres ->
    # {"depth": [B, H, W], "depth_initial": [B, H, W], "confidence": [B, H, W, 2]}

Fusion (CrossAttention.py of PKU-EPIC/DREDS, one block of one head at shift 0, window 7, per stage):
rgb r and depth d maps [B, h, w, C]; LN1 per branch; one qkv Linear per branch; windowed cross
attention through the window-attention dispatcher with its own bias table per direction
    a_1 = softmax(q_d k_r^T * s + RPB_1) v_r,   a_2 = softmax(q_r k_d^T * s + RPB_2) v_d,
proj per branch, residual, per-branch MLP with its LN2 (residual), then Linear(2C -> C) "fuse" on
concat(branch_1, branch_2) and LayerNorm "norm". The head input of a stage is concat(fused, r, d).

`fusion="paper"` (default) is the above. `fusion="released"` reproduces the released code: at shift 0
its block returns the normed input instead of the attention output, and its second branch adds the
(updated) first: b_1 = r + LN1_1(r), b_2 = d + b_1, then the MLPs, fuse and norm; qkv, proj and the
bias tables exist (same parameter count) but get no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.kernels.window_attention import window_cross_attention
from jaxlab.models.swin import SWIN_SIZES, Mlp, SwinTransformer, bias_table, dense, layer_norm, project_qkv
from jaxlab.models.upernet import UPerHead

FUSIONS = ("paper", "released")


class WindowCrossAttention(nn.Module):
    """Both directions of windowed cross attention on normed maps r, d [B, h, w, C] -> (a_1, a_2).

    Params: qkv_branch_{1,2}, relative_position_bias_table_{1,2}, proj_branch_{1,2} (names as released).
    """

    heads: int = 1
    window: int = 7
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, rgb: jax.Array, depth: jax.Array, shift: int = 0):
        b, h, w, c = rgb.shape
        q1, k1, v1, pads1 = project_qkv(dense(3 * c, "qkv_branch_1"), rgb, self.heads)
        q2, k2, v2, pads2 = project_qkv(dense(3 * c, "qkv_branch_2"), depth, self.heads)
        t1 = bias_table(self, "relative_position_bias_table_1", self.window, self.heads)
        t2 = bias_table(self, "relative_position_bias_table_2", self.window, self.heads)
        opts = {"window": self.window, "shift": shift, "implementation": self.attention_impl}
        a1 = window_cross_attention(q2, k1, v1, rel_pos_bias_table=t1, kv_pad_values=pads1, **opts)
        a2 = window_cross_attention(q1, k2, v2, rel_pos_bias_table=t2, kv_pad_values=pads2, **opts)
        return (dense(c, "proj_branch_1")(a1.reshape(b, h, w, c)),
                dense(c, "proj_branch_2")(a2.reshape(b, h, w, c)))


class CrossAttentionFusion(nn.Module):
    """One stage's fusion (module docstring): rgb, depth [B, h, w, C] -> fused [B, h, w, C]."""

    heads: int = 1
    window: int = 7
    mlp_ratio: float = 4.0
    fusion: str = "paper"
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, rgb: jax.Array, depth: jax.Array) -> jax.Array:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r} is not one of {FUSIONS}")
        c = rgb.shape[-1]
        n1, n2 = layer_norm("norm1_branch_1")(rgb), layer_norm("norm1_branch_2")(depth)
        a1, a2 = WindowCrossAttention(self.heads, self.window, self.attention_impl, name="attn")(n1, n2)
        if self.fusion == "paper":
            b1, b2 = rgb + a1, depth + a2
        else:  # released: the attention output is discarded at shift 0; branch 2 adds the new branch 1
            b1 = rgb + n1
            b2 = depth + b1
        hidden = int(c * self.mlp_ratio)
        b1 = b1 + Mlp(hidden, name="mlp_branch_1")(layer_norm("norm2_branch_1")(b1))
        b2 = b2 + Mlp(hidden, name="mlp_branch_2")(layer_norm("norm2_branch_2")(b2))
        return layer_norm("norm")(dense(c, "fuse")(jnp.concatenate([b1, b2], -1)))


class SwinDRNet(nn.Module):
    """The network of the module docstring; `size` picks the Swin size of both streams."""

    size: str = "tiny"
    embed_dim: int | None = None  # overrides of the size's widths (the CPU config shrinks them)
    depths: Sequence[int] | None = None
    num_heads: Sequence[int] | None = None
    window: int = 7
    drop_path_rate: float = 0.2
    head_channels: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    fusion: str = "paper"
    fusion_heads: int = 1
    attention_impl: str = "auto"

    def backbone(self, name: str) -> SwinTransformer:
        if self.size not in SWIN_SIZES:
            raise ValueError(f"unknown Swin size {self.size!r}; known: {sorted(SWIN_SIZES)}")
        sizes = dict(SWIN_SIZES[self.size])
        for key in ("embed_dim", "depths", "num_heads"):
            if getattr(self, key) is not None:
                sizes[key] = getattr(self, key)
        return SwinTransformer(**sizes, window=self.window, drop_path_rate=self.drop_path_rate,
                               attention_impl=self.attention_impl, name=name)

    @nn.compact
    def __call__(self, rgb: jax.Array, raw_depth: jax.Array, train: bool = False) -> dict:
        if rgb.shape[:3] != raw_depth.shape[:3] or rgb.ndim != 4:
            raise ValueError(f"SwinDRNet: rgb {rgb.shape} must be [B, H, W, 3] on raw_depth's grid "
                             f"{raw_depth.shape} ([B, H, W])")
        depth3 = jnp.repeat(raw_depth[..., None], 3, axis=-1)  # depth repeated to 3 channels
        rgb_maps = self.backbone("backbone_rgb_branch")(rgb, train)
        depth_maps = self.backbone("backbone_xyz_branch")(depth3, train)
        features = []
        for i, (r, d) in enumerate(zip(rgb_maps, depth_maps)):
            fused = CrossAttentionFusion(self.fusion_heads, self.window, fusion=self.fusion,
                                         attention_impl=self.attention_impl, name=f"cross_attention_{i}")(r, d)
            features.append(jnp.concatenate([fused, r, d], -1))
        size = rgb.shape[1:3]
        initial = UPerHead(1, self.head_channels, self.pool_scales, name="decode_head_depth_restoration")(
            features, size, train)[..., 0]
        logits = UPerHead(2, self.head_channels, self.pool_scales, name="decode_head_confidence")(
            features, size, train)
        confidence = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        depth = confidence[..., 0] * raw_depth + confidence[..., 1] * initial
        return {"depth": depth, "depth_initial": initial, "confidence": confidence}
