"""Swin Transformer (Liu et al. 2021) as a Flax backbone, mmseg-style as SwinDRNet uses it.

    backbone = SwinTransformer(**SWIN_SIZES["tiny"])           # Swin-T: 96, (2, 2, 6, 2), (3, 6, 12, 24)
    feats = backbone.apply(variables, images, train=False)    # images [B, H, W, 3] -> 4 maps [B, h, w, C]

Pieces (names follow microsoft/Swin-Transformer and PKU-EPIC/DREDS SwinDRNet/networks/SwinTransformer.py,
so the public checkpoints map key by key, see jaxlab.methods.swindrnet.convert):
- PatchEmbed: pad H, W after to multiples of the patch, Conv(patch, stride patch) "proj", LayerNorm "norm".
- SwinBlock: x + DropPath(W-MSA(LN(x))), then x + DropPath(MLP(LN(x))); the attention runs through the
  window-attention dispatcher (jaxlab.kernels.window_attention: pad after to window multiples, cyclic
  shift, -100 region mask, relative position bias table [(2w-1)^2, heads]). The map is padded *after*
  norm1 and *before* the qkv projection in the PyTorch code, so padded keys / values equal the qkv bias:
  passed to the kernel as kv_pad_values.
- PatchMerging: pad to even H, W, concat (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]) on
  channels, LayerNorm(4C) "norm", Linear(4C -> 2C, no bias) "reduction".
- Stages "layers_i" with blocks alternating shift 0 and window // 2; the stage's patch merging is its
  "downsample" (stages 0..n-2); stochastic depth linspace(0, drop_path_rate, sum(depths)) over blocks.
- Outputs: the segmentation backbone returns every stage's map through its own LayerNorm "norm{i}" (the
  map before merging); with num_classes > 0 it is the ImageNet classifier instead (final LayerNorm
  "norm", global average pool, Linear "head").

Details as PyTorch: LayerNorm eps 1e-5, exact (erf) GELU, qkv bias, qk scale head_dim ** -0.5, Linear
weights trunc_normal(0.02) with zero bias, bias tables trunc_normal(0.02), no absolute position
embedding (ape False), attention and projection dropout 0 (Swin's defaults, so they are not modelled).
`shift_single_window`: mmseg's backbone shifts even when a stage's map fits in one window (SwinDRNet's
7x7 stage; the default); the ImageNet classifier turns the shift off and shrinks the window to the map
there (False).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.kernels.window_attention import window_attention
from jaxlab.models.layers import Conv

SWIN_SIZES = {
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
    "small": {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)},
    "base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
}
LN_EPS = 1e-5  # torch.nn.LayerNorm's default
dense_init = nn.initializers.truncated_normal(0.02)


def layer_norm(name: str) -> nn.LayerNorm:
    """torch.nn.LayerNorm(C): eps 1e-5, scale and bias."""
    return nn.LayerNorm(epsilon=LN_EPS, name=name)


def dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
    """torch.nn.Linear as Swin initialises it: trunc_normal(std 0.02) weight, zero bias."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=dense_init, name=name)


def gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU(): the exact (erf) form."""
    return jax.nn.gelu(x, approximate=False)


class DropPath(nn.Module):
    """Stochastic depth (timm DropPath): zero a sample's branch with probability `rate`, else scale it
    by 1 / (1 - rate). x [B, ...]; rng stream "dropout"; identity when not training or rate == 0."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (dropout 0): [..., C] -> [..., out or C]."""

    hidden: int
    out: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = gelu(dense(self.hidden, "fc1")(x))
        return dense(self.out or x.shape[-1], "fc2")(h)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, heads, C // heads]."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def project_qkv(layer: nn.Dense, x: jax.Array, heads: int):
    """Swin's fused qkv Linear(C -> 3C) `layer` on [B, H, W, C] -> q, k, v [B, H, W, heads, d] and
    (k_pad, v_pad), each [heads, d]: what a zero (padded) token projects to (the bias, or zeros)."""
    dim = x.shape[-1]
    q, k, v = (split_heads(t, heads) for t in jnp.split(layer(x), 3, axis=-1))
    _, k_pad, v_pad = (t.reshape(heads, dim // heads) for t in jnp.split(layer(jnp.zeros((dim,), x.dtype)), 3))
    return q, k, v, (k_pad, v_pad)


def bias_table(module: nn.Module, name: str, window: int, heads: int) -> jax.Array:
    """A relative position bias table parameter [(2w-1)^2, heads], trunc_normal(0.02)."""
    return module.param(name, dense_init, ((2 * window - 1) ** 2, heads))


class WindowAttention(nn.Module):
    """W-MSA / SW-MSA with relative position bias: normed map [B, H, W, C] -> [B, H, W, C].

    Params: "qkv" (Linear C -> 3C), "relative_position_bias_table" [(2w-1)^2, heads], "proj" (Linear).
    """

    heads: int
    window: int
    qkv_bias: bool = True
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, shift: int) -> jax.Array:
        b, h, w, c = x.shape
        q, k, v, pads = project_qkv(dense(3 * c, "qkv", self.qkv_bias), x, self.heads)
        table = bias_table(self, "relative_position_bias_table", self.window, self.heads)
        out = window_attention(q, k, v, window=self.window, shift=shift, rel_pos_bias_table=table,
                               implementation=self.attention_impl, kv_pad_values=pads)
        return dense(c, "proj")(out.reshape(b, h, w, c))


def effective_window(height: int, width: int, window: int, shift: int, shift_single_window: bool):
    """(window, shift) a block uses on an [height, width] map: mmseg keeps both; the ImageNet Swin
    (shift_single_window False) uses window = min(H, W) and no shift once the map fits one window."""
    if shift_single_window or min(height, width) > window:
        return window, shift
    return min(height, width), 0


class SwinBlock(nn.Module):
    """One Swin Transformer block on [B, H, W, C] (module docstring): norm1, attn, norm2, mlp."""

    heads: int
    window: int = 7
    shift: int = 0
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    qkv_bias: bool = True
    attention_impl: str = "auto"
    shift_single_window: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        window, shift = effective_window(x.shape[1], x.shape[2], self.window, self.shift,
                                         self.shift_single_window)
        attn = WindowAttention(self.heads, window, self.qkv_bias, self.attention_impl, name="attn")
        drop = DropPath(self.drop_path)
        x = x + drop(attn(layer_norm("norm1")(x), shift), train)
        mlp = Mlp(int(x.shape[-1] * self.mlp_ratio), name="mlp")
        return x + drop(mlp(layer_norm("norm2")(x)), train)


def merge_patches(x: jax.Array) -> jax.Array:
    """Swin's 2x2 gather: [B, H, W, C] (padded after to even H, W) -> [B, ceil(H/2), ceil(W/2), 4C] with
    channels ordered x0 = [0::2, 0::2], x1 = [1::2, 0::2], x2 = [0::2, 1::2], x3 = [1::2, 1::2]."""
    x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
    return jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)


class PatchMerging(nn.Module):
    """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]: merge_patches, LayerNorm "norm", "reduction"."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        return dense(2 * c, "reduction", use_bias=False)(layer_norm("norm")(merge_patches(x)))


class PatchEmbed(nn.Module):
    """[B, H, W, Cin] -> [B, ceil(H/p), ceil(W/p), D]: pad after, Conv(p, stride p) "proj", LN "norm"."""

    patch: int = 4
    embed_dim: int = 96
    patch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch
        x = jnp.pad(x, ((0, 0), (0, -x.shape[1] % p), (0, -x.shape[2] % p), (0, 0)))
        x = Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="proj")(x)
        return layer_norm("norm")(x) if self.patch_norm else x


def drop_path_rates(depths: Sequence[int], rate: float) -> list[list[float]]:
    """Per stage, per block: linspace(0, rate, sum(depths)) split by depths (Swin's decay rule)."""
    total = sum(depths)
    flat = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out


class SwinTransformer(nn.Module):
    """Swin backbone (num_classes 0: the stage maps) or ImageNet classifier (num_classes > 0: logits).

    images [B, H, W, in_chans] -> list of [B, H/4/2^i, W/4/2^i, embed_dim * 2^i] for i in out_indices
    (each through LayerNorm "norm{i}"), or logits [B, num_classes].
    """

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window: int = 7
    patch: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.2
    patch_norm: bool = True
    out_indices: Sequence[int] = (0, 1, 2, 3)
    num_classes: int = 0
    shift_single_window: bool = True
    attention_impl: str = "auto"

    @property
    def num_features(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(len(self.depths))]

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False):
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"SwinTransformer: depths {tuple(self.depths)} and num_heads "
                             f"{tuple(self.num_heads)} must have one entry per stage")
        x = PatchEmbed(self.patch, self.embed_dim, self.patch_norm, name="patch_embed")(images)
        rates = drop_path_rates(self.depths, self.drop_path_rate)
        outs = []
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            x_out, x = SwinStage(depth, heads, self.window, self.mlp_ratio, tuple(rates[i]), self.qkv_bias,
                                 downsample=i < len(self.depths) - 1, attention_impl=self.attention_impl,
                                 shift_single_window=self.shift_single_window, name=f"layers_{i}")(x, train)
            if self.num_classes == 0 and i in self.out_indices:
                outs.append(layer_norm(f"norm{i}")(x_out))
        if self.num_classes == 0:
            return outs
        pooled = layer_norm("norm")(x).mean(axis=(1, 2))
        return dense(self.num_classes, "head")(pooled)


class SwinStage(nn.Module):
    """`depth` blocks (shift 0, w//2, 0, ...) then, if downsample, PatchMerging "downsample".
    [B, H, W, C] -> (stage map [B, H, W, C], next input [B, H/2, W/2, 2C] or the map itself)."""

    depth: int
    heads: int
    window: int
    mlp_ratio: float
    drop_path: Sequence[float]
    qkv_bias: bool
    downsample: bool
    attention_impl: str = "auto"
    shift_single_window: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        for j in range(self.depth):
            x = SwinBlock(self.heads, self.window, 0 if j % 2 == 0 else self.window // 2, self.mlp_ratio,
                          self.drop_path[j], self.qkv_bias, self.attention_impl, self.shift_single_window,
                          name=f"blocks_{j}")(x, train)
        return x, (PatchMerging(name="downsample")(x) if self.downsample else x)


def swin(size: str = "tiny", **overrides) -> SwinTransformer:
    """SwinTransformer of a named size ("tiny", "small", "base") with keyword overrides."""
    if size not in SWIN_SIZES:
        raise ValueError(f"unknown Swin size {size!r}; known: {sorted(SWIN_SIZES)}")
    return SwinTransformer(**{**SWIN_SIZES[size], **overrides})
