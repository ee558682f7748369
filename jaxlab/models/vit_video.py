"""The VideoMAE video ViT, its MAE decoder and MAR's bridging classifier (pure Flax modules).

Follows VideoMAE (MCG-NJU/VideoMAE modeling_pretrain.py / modeling_finetune.py) as MAR uses it
(alibaba-mmai-research/Masked-Action-Recognition models/base/vit_videomae.py, models.py,
module_zoo/heads/decoder_head.py):

- VideoEncoder: tubelet Conv3d embedding (kernel = stride = tubelet x patch x patch), fixed sinusoidal
  position table (no cls token), pre-norm blocks with LayerNorm eps 1e-6, attention with q and v biases
  but no k bias, MLP ratio 4 with exact (erf) GELU, drop-path rising linearly 0 -> rate over depth, and a
  final LayerNorm. It runs on the visible tokens only (gathered by sorted index, static count) through
  the masked-attention kernel's dispatcher (jaxlab.kernels.masked_attention).
- MAEDecoder: Linear(D -> Dd, no bias) on the visible encoder tokens, scatter into the full sequence
  filled with a learned mask token, + a fixed sinusoidal table of width Dd, VideoMAE blocks, LayerNorm,
  Linear(Dd -> tubelet * patch^2 * 3).
- BridgingClassifier: Linear(D -> 512, no bias) on the visible encoder tokens (no mask token, no
  position embedding), 2 pre-LN blocks (512 wide, 4 heads, full qkv bias, MLP x4 GELU), mean pool,
  LayerNorm, dropout, Linear(num_classes).

Inputs are channels-last videos [batch, frames, height, width, channels]; tokens are ordered
(time, row, column), as PyTorch's Conv3d(...).flatten(2) orders them. Initialisation follows the
official code: Xavier-uniform Linear weights with zero biases, LayerNorm 1/0, PyTorch's default
Conv3d init for the tubelet embedding and its default Linear init for MAR's encoder_to_cls_decoder,
truncated-normal(0.02) mask token (VideoMAE pre-training).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.kernels.masked_attention import gather_visible, masked_attention, scatter_visible

# (embed dim, depth, heads) of the VideoMAE encoders and the MAE decoders paired with them.
ENCODER_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "H": (1280, 32, 16)}
DECODER_SIZES = {"S": (192, 4, 3), "B": (384, 4, 6), "L": (512, 12, 8), "H": (640, 4, 8)}
DROP_PATH = {"S": 0.1, "B": 0.1, "L": 0.2, "H": 0.2}
LN_EPS = 1e-6

xavier = nn.initializers.xavier_uniform()
# PyTorch's default Linear / Conv init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) for the weight.
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
    """PyTorch's default bias init for a layer with `fan_in` inputs: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
    """The fixed position table [num_positions, dim] (float32): angle(p, j) = p / 10000^(2 (j // 2) / dim),
    sin on even j, cos on odd j (VideoMAE get_sinusoid_encoding_table)."""
    positions = np.arange(num_positions, dtype=np.float64)[:, None]
    exponents = 2 * (np.arange(dim) // 2) / dim
    angles = positions / np.power(10000.0, exponents)[None, :]
    table = np.empty_like(angles)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return table.astype(np.float32)


def layer_norm(name: str | None = None) -> nn.LayerNorm:
    """PyTorch-faithful LayerNorm (eps 1e-6, two-pass variance)."""
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


class Attention(nn.Module):
    """Multi-head self-attention over [batch, tokens, dim] through the masked-attention dispatcher.

    bias: "qv" (VideoMAE: q and v biases, none on k; qkv kernel without bias), "qkv" (a full qkv bias,
    MAR's bridging blocks) or "none". valid_length [batch]: tokens past it are padding (outputs zero).
    """

    dim: int
    heads: int
    bias: str = "qv"
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, valid_length: jax.Array | None = None) -> jax.Array:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} does not split into {self.heads} heads")
        if self.bias not in ("qv", "qkv", "none"):
            raise ValueError(f"Attention bias={self.bias!r} must be 'qv', 'qkv' or 'none'")
        batch, tokens, _ = x.shape
        qkv = nn.Dense(3 * self.dim, use_bias=self.bias == "qkv", kernel_init=xavier,
                       bias_init=nn.initializers.zeros, name="qkv")(x)
        if self.bias == "qv":
            q_bias = self.param("q_bias", nn.initializers.zeros, (self.dim,))
            v_bias = self.param("v_bias", nn.initializers.zeros, (self.dim,))
            qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(v_bias), v_bias]).astype(qkv.dtype)
        qkv = qkv.reshape(batch, tokens, 3, self.heads, self.dim // self.heads)
        out = masked_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], valid_length=valid_length,
                               implementation=self.implementation)
        out = out.reshape(batch, tokens, self.dim)
        return nn.Dense(self.dim, kernel_init=xavier, bias_init=nn.initializers.zeros, name="proj")(out)


class Mlp(nn.Module):
    """Linear(dim -> hidden), exact GELU, Linear(hidden -> dim)."""

    dim: int
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.hidden, kernel_init=xavier, bias_init=nn.initializers.zeros, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(self.dim, kernel_init=xavier, bias_init=nn.initializers.zeros, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))).

    Drop-path drops a whole example's residual branch with probability drop_path (rng "dropout"),
    scaling kept ones by 1 / (1 - drop_path), only when train=True."""

    dim: int
    heads: int
    mlp_ratio: float = 4.0
    bias: str = "qv"
    drop_path: float = 0.0
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x, valid_length=None, train: bool = False):
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
        attn = Attention(self.dim, self.heads, self.bias, self.implementation, name="attn")
        x = x + drop(attn(layer_norm("norm1")(x), valid_length))
        mlp = Mlp(self.dim, int(self.dim * self.mlp_ratio), name="mlp")
        return x + drop(mlp(layer_norm("norm2")(x)))


@dataclasses.dataclass(frozen=True)
class VideoGeometry:
    """Input and token grid: frames x size x size clips, tubelet x patch x patch tokens."""

    num_frames: int = 16
    image_size: int = 224
    patch_size: int = 16
    tubelet_size: int = 2
    channels: int = 3

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        return (self.num_frames // self.tubelet_size, self.image_size // self.patch_size,
                self.image_size // self.patch_size)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        """Values a token's reconstruction target holds: tubelet * patch^2 * channels."""
        return self.tubelet_size * self.patch_size ** 2 * self.channels

    def check(self) -> None:
        if self.num_frames % self.tubelet_size or self.image_size % self.patch_size:
            raise ValueError(f"{self.num_frames} frames of {self.image_size}px do not split into "
                             f"{self.tubelet_size}x{self.patch_size}x{self.patch_size} tubelets")


class VideoEncoder(nn.Module):
    """VideoMAE ViT encoder.

    __call__(video [B, T, H, W, C], visible [B, Nv] int sorted token indices or None (all tokens),
    valid_length [B] or None, train) -> [B, Nv, dim] after the final LayerNorm.
    """

    geometry: VideoGeometry
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    implementation: str = "auto"

    @nn.compact
    def __call__(self, video, visible=None, valid_length=None, train: bool = False):
        g = self.geometry
        g.check()
        expected = (g.num_frames, g.image_size, g.image_size, g.channels)
        if video.shape[1:] != expected:
            raise ValueError(f"video has shape {video.shape}, expected [batch, {', '.join(map(str, expected))}]")
        kernel = (g.tubelet_size, g.patch_size, g.patch_size)
        fan_in = g.channels * g.tubelet_size * g.patch_size ** 2
        tokens = nn.Conv(self.dim, kernel, strides=kernel, padding="VALID", kernel_init=torch_default_kernel,
                         bias_init=torch_default_bias(fan_in), name="patch_embed")(video)
        tokens = tokens.reshape(video.shape[0], -1, self.dim)
        tokens = tokens + jnp.asarray(sinusoid_table(g.num_tokens, self.dim), tokens.dtype)[None]
        if visible is not None:
            tokens = gather_visible(tokens, visible)
        rates = np.linspace(0.0, self.drop_path, self.depth)
        for i in range(self.depth):
            tokens = Block(self.dim, self.heads, self.mlp_ratio, "qv", float(rates[i]), self.implementation,
                           name=f"blocks_{i}")(tokens, valid_length, train)
        return layer_norm("norm")(tokens)


class MAEDecoder(nn.Module):
    """VideoMAE / MAR reconstruction decoder.

    __call__(encoded [B, Nv, D], visible [B, Nv] sorted indices, valid_length [B] or None) ->
    predicted normalised pixels [B, N, patch_dim] for every token (the loss keeps the masked ones).
    """

    geometry: VideoGeometry
    dim: int = 384
    depth: int = 4
    heads: int = 6
    mlp_ratio: float = 4.0
    implementation: str = "auto"

    @nn.compact
    def __call__(self, encoded, visible, valid_length=None):
        g = self.geometry
        x = nn.Dense(self.dim, use_bias=False, kernel_init=xavier, name="encoder_to_decoder")(encoded)
        mask_token = self.param("mask_token", nn.initializers.truncated_normal(0.02), (1, 1, self.dim))
        x = scatter_visible(x, visible, g.num_tokens, mask_token[0, 0], valid_length)
        x = x + jnp.asarray(sinusoid_table(g.num_tokens, self.dim), x.dtype)[None]
        for i in range(self.depth):
            x = Block(self.dim, self.heads, self.mlp_ratio, "qv", 0.0, self.implementation,
                      name=f"blocks_{i}")(x)
        x = layer_norm("norm")(x)
        return nn.Dense(g.patch_dim, kernel_init=xavier, bias_init=nn.initializers.zeros, name="head")(x)


class BridgingClassifier(nn.Module):
    """MAR's bridging classifier on the visible encoder tokens.

    __call__(encoded [B, Nv, D], valid_length [B] or None, train) -> logits [B, num_classes]. The mean
    pool covers the valid tokens only."""

    num_classes: int
    dim: int = 512
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    drop_path: float = 0.0
    implementation: str = "auto"

    @nn.compact
    def __call__(self, encoded, valid_length=None, train: bool = False):
        x = nn.Dense(self.dim, use_bias=False, kernel_init=torch_default_kernel,
                     name="encoder_to_cls_decoder")(encoded)
        rates = np.linspace(0.0, self.drop_path, self.depth)
        for i in range(self.depth):
            x = Block(self.dim, self.heads, self.mlp_ratio, "qkv", float(rates[i]), self.implementation,
                      name=f"blocks_{i}")(x, valid_length, train)
        if valid_length is None:
            pooled = x.mean(axis=1)
        else:
            weights = (jnp.arange(x.shape[1])[None, :] < valid_length[:, None]).astype(x.dtype)
            pooled = (x * weights[..., None]).sum(1) / jnp.maximum(weights.sum(1, keepdims=True), 1)
        pooled = layer_norm("norm")(pooled)
        pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
        return nn.Dense(self.num_classes, kernel_init=xavier, bias_init=nn.initializers.zeros, name="head")(pooled)


@dataclasses.dataclass(frozen=True)
class MARModelConfig:
    """Sizes of the three modules; `size` picks VideoMAE's S/B/L/H unless dims are given explicitly."""

    geometry: VideoGeometry = VideoGeometry()
    dim: int = 768
    depth: int = 12
    heads: int = 12
    drop_path: float = 0.1
    decoder_dim: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 6
    cls_dim: int = 512
    cls_depth: int = 2
    cls_heads: int = 4
    cls_dropout: float = 0.1
    num_classes: int = 400
    implementation: str = "auto"

    @classmethod
    def of_size(cls, size: str, **overrides) -> MARModelConfig:
        if size not in ENCODER_SIZES:
            raise ValueError(f"unknown ViT size {size!r}; sizes: {sorted(ENCODER_SIZES)}")
        dim, depth, heads = ENCODER_SIZES[size]
        ddim, ddepth, dheads = DECODER_SIZES[size]
        base = dict(dim=dim, depth=depth, heads=heads, drop_path=DROP_PATH[size], decoder_dim=ddim,
                    decoder_depth=ddepth, decoder_heads=dheads)
        return cls(**{**base, **overrides})

    def encoder(self) -> VideoEncoder:
        return VideoEncoder(self.geometry, self.dim, self.depth, self.heads, drop_path=self.drop_path,
                            implementation=self.implementation)

    def decoder(self) -> MAEDecoder:
        return MAEDecoder(self.geometry, self.decoder_dim, self.decoder_depth, self.decoder_heads,
                          implementation=self.implementation)

    def classifier(self) -> BridgingClassifier:
        return BridgingClassifier(self.num_classes, self.cls_dim, self.cls_depth, self.cls_heads,
                                  dropout=self.cls_dropout, implementation=self.implementation)


def init_modules(config: MARModelConfig, rng: jax.Array, num_visible: int,
                 parts: Sequence[str] = ("encoder", "decoder", "classifier"), batch: int = 1) -> dict:
    """{part: params} of the named modules, initialised for `num_visible` visible tokens (shapes only
    depend on the config; wrap in jax.eval_shape to count parameters without allocating them)."""
    g = config.geometry
    video = jnp.zeros((batch, g.num_frames, g.image_size, g.image_size, g.channels), jnp.float32)
    visible = jnp.broadcast_to(jnp.arange(num_visible, dtype=jnp.int32), (batch, num_visible))
    encoded = jnp.zeros((batch, num_visible, config.dim), jnp.float32)
    keys = dict(zip(("encoder", "decoder", "classifier"), jax.random.split(rng, 3)))
    builders = {
        "encoder": lambda k: config.encoder().init(k, video, visible),
        "decoder": lambda k: config.decoder().init(k, encoded, visible),
        "classifier": lambda k: config.classifier().init(k, encoded),
    }
    unknown = [p for p in parts if p not in builders]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; parts: {sorted(builders)}")
    return {p: builders[p](keys[p])["params"] for p in parts}
