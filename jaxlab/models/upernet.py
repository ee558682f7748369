"""UPerNet decode head (Xiao et al. 2018) as mmseg / SwinDRNet's UPerNet.py build it, channels last.

    head = UPerHead(num_classes=1)                       # PPM scales (1, 2, 3, 6), 512 channels
    out = head.apply(variables, features, (H, W), train)  # 4 maps [B, h_i, w_i, C_i] -> [B, H, W, classes]

- ConvModule: Conv (no bias) -> PyTorch BatchNorm (jaxlab.models.layers.BatchNorm) -> ReLU.
- PPM on the last map: AdaptiveAvgPool2d(s) (PyTorch's bins: [floor(i*n/s), ceil((i+1)*n/s)), which
  overlap when s does not divide n) -> 1x1 ConvModule -> bilinear resize back; concat [x, ppm...] ->
  3x3 ConvModule "bottleneck".
- FPN: 1x1 lateral ConvModules on the other maps, top-down sum with bilinear upsampling, 3x3 ConvModules
  "fpn_convs", every level resized to the finest and concatenated -> 3x3 ConvModule "fpn_bottleneck" ->
  Dropout2d(0.1) -> 1x1 Conv "conv_seg" (bias; normal(0.01) init) -> bilinear resize to the input size.
- Every resize is F.interpolate(mode="bilinear", align_corners=False) with no antialiasing (also when
  shrinking), done here with explicit interpolation matrices (jax.image.resize antialiases on shrink).
Conv kernels not re-initialised by the PyTorch code keep torch's default (kaiming_uniform(a=sqrt(5)) =
variance_scaling(1/3, fan_in, uniform)).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.models.layers import BatchNorm, Conv

torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of torch bilinear interpolation, align_corners=False, no antialias:
    src = max((dst + 0.5) * size_in / size_out - 0.5, 0), between floor(src) and the next (clamped)."""
    src = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    m = np.zeros((size_out, size_in), np.float32)
    np.add.at(m, (np.arange(size_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(size_out), hi), frac)
    return m


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] averaging weights of torch AdaptiveAvgPool over one axis:
    bin i covers [floor(i * n / s), ceil((i + 1) * n / s))."""
    m = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def apply_separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """[B, H, W, C] -> [B, h, w, C] with rows [h, H] and cols [w, W] applied on the two spatial axes."""
    rows, cols = jnp.asarray(rows, x.dtype), jnp.asarray(cols, x.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", rows, x, cols)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """F.interpolate(x, size, mode="bilinear", align_corners=False) on [B, H, W, C]."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    return apply_separable(x, bilinear_matrix(h, size[0]), bilinear_matrix(w, size[1]))


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """nn.AdaptiveAvgPool2d(size) on [B, H, W, C] -> [B, size, size, C]."""
    h, w = x.shape[1:3]
    return apply_separable(x, adaptive_pool_matrix(h, size), adaptive_pool_matrix(w, size))


class ConvModule(nn.Module):
    """Conv(k, padding k // 2, no bias) "conv" -> BatchNorm "bn" -> ReLU: [B, H, W, Cin] -> [..., features]."""

    features: int
    kernel: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        k = self.kernel
        x = Conv(self.features, (k, k), padding=k // 2, use_bias=False, kernel_init=torch_default_init,
                 name="conv")(x)
        return nn.relu(BatchNorm(use_running_average=not train, name="bn")(x))


class UPerHead(nn.Module):
    """UPerNet head (module docstring): features (maps finest first) -> [B, *out_size, num_classes]."""

    num_classes: int
    channels: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], out_size: Sequence[int], train: bool = False):
        top = features[-1]
        pooled = [resize_bilinear(ConvModule(self.channels, 1, name=f"psp_modules_{i}")(
            adaptive_avg_pool(top, s), train), top.shape[1:3]) for i, s in enumerate(self.pool_scales)]
        laterals = [ConvModule(self.channels, 1, name=f"lateral_convs_{i}")(f, train)
                    for i, f in enumerate(features[:-1])]
        laterals.append(ConvModule(self.channels, 3, name="bottleneck")(
            jnp.concatenate([top, *pooled], -1), train))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
        outs = [ConvModule(self.channels, 3, name=f"fpn_convs_{i}")(laterals[i], train)
                for i in range(len(laterals) - 1)]
        outs.append(laterals[-1])
        outs = [resize_bilinear(o, outs[0].shape[1:3]) for o in outs]
        x = ConvModule(self.channels, 3, name="fpn_bottleneck")(jnp.concatenate(outs, -1), train)
        x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)  # Dropout2d
        x = Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.01), name="conv_seg")(x)
        return resize_bilinear(x, out_size)
