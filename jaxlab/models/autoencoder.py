"""A convolutional autoencoder whose every encoder layer can be read, and readouts from one encoder layer
to recorded neurons (DAE-NR, jaxlab.methods.dae_nr).

    encoder = ConvEncoder(features=(16, 32, 8))          # (B, H, W, C) -> [layer 0, layer 1, layer 2]
    decoder = ConvDecoder(features=(32, 16, 16), out_channels=1)   # code -> (B, H, W, 1) in [0, 1]
    readout = FactorizedReadout(num_neurons=64)          # layer (B, h, w, c) -> rates (B, N) > 0

Encoder layer i is a stride-2 3x3 convolution with `features[i]` channels, ReLU, so layer i has shape
(B, H / 2^(i+1), W / 2^(i+1), features[i]); the last layer is the code. The decoder mirrors it with
one 2x upsampling per encoder layer, ReLU, and a 3x3 convolution to `out_channels` with a sigmoid;
`decoder_features(encoder features)` gives the mirrored channels. An upsampling is a sub-pixel
convolution (Shi et al. 2016: a 3x3 convolution to 4 f channels, then depth-to-space), which contains
every stride-2 4x4 transposed convolution (each output phase sees a 3x3 input neighbourhood instead of
2x2) and trains ~10x faster than nn.ConvTranspose on XLA CPU (its gradient is slow there).

Readouts (r = rates, F = the mapped layer's activations (B, h, w, c)):
- FactorizedReadout (Klindt et al. 2017): r_n = softplus(sum_{y,x,k} F[y,x,k] mask_n[y,x] w_n[k] + b_n);
  params mask (N, h, w), features (N, c), bias (N,): N (h w + c + 1) numbers.
- LinearReadout: r_n = softplus(sum F[y,x,k] W[y x k, n] + b_n): N (h w c + 1) numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.models.layers import Conv

READOUTS = ("factorized", "linear")


class ConvEncoder(nn.Module):
    """(B, H, W, C) -> tuple of every layer's activations, layer i (B, H/2^(i+1), W/2^(i+1), features[i])."""

    features: Sequence[int] = (16, 32, 8)
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        layers = []
        for i, f in enumerate(self.features):
            conv = Conv(f, (3, 3), strides=(2, 2), padding="SAME", impl=self.conv_impl, name=f"conv_{i}")
            x = nn.relu(conv(x))
            layers.append(x)
        return tuple(layers)


class ConvDecoder(nn.Module):
    """code (B, h, w, c) -> image (B, h 2^L, w 2^L, out_channels) in [0, 1], L = len(features): one
    stride-2 transposed convolution per entry of `features` (its channels)."""

    features: Sequence[int] = (32, 16, 16)
    out_channels: int = 1

    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, code: jax.Array) -> jax.Array:
        x = code
        for i, f in enumerate(self.features):
            x = Conv(4 * f, (3, 3), padding="SAME", impl=self.conv_impl, name=f"up_{i}")(x)
            x = nn.relu(depth_to_space(x, 2))
        return nn.sigmoid(Conv(self.out_channels, (3, 3), padding="SAME", impl=self.conv_impl, name="out")(x))


def depth_to_space(x: jax.Array, block: int) -> jax.Array:
    """(B, h, w, block^2 c) -> (B, h block, w block, c): channel (i, j, k) goes to pixel (i, j) of its
    block."""
    b, h, w, channels = x.shape
    c = channels // (block * block)
    x = x.reshape(b, h, w, block, block, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * block, w * block, c)


def decoder_features(encoder_features: Sequence[int]) -> tuple[int, ...]:
    """The decoder's channels mirroring an encoder's: (16, 32, 8) -> (32, 16, 16) (layer i - 1's channels
    before upsampling past layer i, the first layer's channels for the last upsampling)."""
    f = tuple(encoder_features)
    return (*f[-2::-1], f[0])


class FactorizedReadout(nn.Module):
    """Mapped layer (B, h, w, c) -> rates (B, num_neurons) > 0: a spatial mask times feature weights per
    neuron (module docstring)."""

    num_neurons: int

    @nn.compact
    def __call__(self, layer: jax.Array) -> jax.Array:
        _, h, w, c = layer.shape
        n = self.num_neurons
        mask = self.param("mask", nn.initializers.normal(1.0 / (h * w) ** 0.5), (n, h, w))
        features = self.param("features", nn.initializers.normal(1.0 / c**0.5), (n, c))
        bias = self.param("bias", nn.initializers.zeros_init(), (n,))
        drive = jnp.einsum("byxk,nyx,nk->bn", layer, mask, features)
        return nn.softplus(drive + bias)


class LinearReadout(nn.Module):
    """Mapped layer (B, h, w, c) -> rates (B, num_neurons) > 0: one dense layer on the flattened layer."""

    num_neurons: int

    @nn.compact
    def __call__(self, layer: jax.Array) -> jax.Array:
        return nn.softplus(nn.Dense(self.num_neurons, name="dense")(layer.reshape(layer.shape[0], -1)))


def make_readout(kind: str, num_neurons: int) -> nn.Module:
    """The readout named `kind` (READOUTS) for `num_neurons` neurons."""
    if kind == "factorized":
        return FactorizedReadout(num_neurons)
    if kind == "linear":
        return LinearReadout(num_neurons)
    raise ValueError(f"model.readout must be one of {READOUTS}, got {kind!r}")


def readout_param_count(kind: str, layer_shape: Sequence[int], num_neurons: int) -> int:
    """Parameters of a readout from a layer of shape (h, w, c) to num_neurons neurons (module docstring)."""
    h, w, c = layer_shape
    if kind == "factorized":
        return num_neurons * (h * w + c + 1)
    if kind == "linear":
        return num_neurons * (h * w * c + 1)
    raise ValueError(f"model.readout must be one of {READOUTS}, got {kind!r}")
