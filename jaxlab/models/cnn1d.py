"""1D CNNs for ECG beats (Abuadbba et al. 2020, split_ecg.md), split into a client and a server half.

Layout is NWC (batch, 128 samples, channels). Every model with convolutions takes `conv_impl` ("lax" or
"im2col", jaxlab.models.layers.Conv: same parameters, same values to float rounding). At the cut the activation (B, 32, 16) is flattened in
PyTorch's channel-major order (B, 16, 32) -> 512 so weights map one-to-one to the reference Conv1d
model. Parameter counts (two-layer): client 128 + 1,296; server 65,664 + 645; total 67,733.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.models.layers import Conv, check_conv_impl

LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU()'s default negative slope, which every reference model uses


def leaky_relu(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


def max_pool1d(x: jax.Array, size: int = 2) -> jax.Array:
    return nn.max_pool(x, (size,), strides=(size,))


def flatten_channel_major(x: jax.Array) -> jax.Array:
    """(B, L, C) -> (B, C*L), PyTorch's flatten of a (B, C, L) tensor."""
    return jnp.swapaxes(x, 1, 2).reshape(x.shape[0], -1)


class ECGClient(nn.Module):
    """Conv(1->16, k7, p3) LReLU MaxPool2, then (n_convs - 1) x [Conv(16->16, k5, p2) LReLU], MaxPool2.

    Input (B, 128, 1) -> cut activation (B, 32, 16). n_convs = 2 is the paper's "two-layer" model;
    3..8 are the leakage-mitigation variants (extra convs before the last pool).
    """

    n_convs: int = 2
    channels: int = 16
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_conv_impl(self.conv_impl)
        if not 2 <= self.n_convs <= 8:
            raise ValueError(f"ECGClient n_convs must be in 2..8, got {self.n_convs}")
        if x.ndim != 3 or x.shape[-1] != 1:
            raise ValueError(f"ECG input must be (batch, length, 1), got {x.shape}")
        conv = functools.partial(Conv, self.channels, impl=self.conv_impl)
        x = max_pool1d(leaky_relu(conv((7,), padding=[(3, 3)], name="conv1")(x)))
        for i in range(2, self.n_convs + 1):
            x = leaky_relu(conv((5,), padding=[(2, 2)], name=f"conv{i}")(x))
        return max_pool1d(x)


class ECGServer(nn.Module):
    """Flatten (channel-major) -> Dense 128 -> LReLU -> Dense num_classes (logits)."""

    num_classes: int = 5
    hidden: int = 128

    @nn.compact
    def __call__(self, activation: jax.Array) -> jax.Array:
        h = leaky_relu(nn.Dense(self.hidden, name="fc1")(flatten_channel_major(activation)))
        return nn.Dense(self.num_classes, name="fc2")(h)


class ECGSplitCNN(nn.Module):
    """client then server; `client` and `server` are the two parameter subtrees of the split."""

    n_convs: int = 2
    num_classes: int = 5
    conv_impl: str = "lax"

    def setup(self):
        check_conv_impl(self.conv_impl)
        self.client = ECGClient(self.n_convs, conv_impl=self.conv_impl)
        self.server = ECGServer(self.num_classes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.server(self.client(x))


# --- FL vs SplitNN (Gao et al. 2020, fl_vs_splitnn.md) ---------------------------------------------------


class ECGFLNet(nn.Module):
    """The FL ECG model: Conv(1->16, k7, no pad) LReLU MaxPool2; 3 x [Conv(16->16, k5, no pad) LReLU];
    MaxPool2; channel-major flatten; Dense 128 LReLU; Dense num_classes (logits).

    Length L -> (L-6)//2 -> -12 -> //2: a 128-sample beat gives (B, 24, 16) -> 384 features, so
    fc1 is 384 -> 128 (53,941 params in all). The reference's Linear(400, 128) (its comments: conv1 ->
    124) is what 130-sample beats give: (130-6)//2 - 12 = 50 -> 25 x 16 = 400 (55,989 params).
    """

    num_classes: int = 5
    channels: int = 16
    hidden: int = 128
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_conv_impl(self.conv_impl)
        if x.ndim != 3 or x.shape[-1] != 1:
            raise ValueError(f"ECG input must be (batch, length, 1), got {x.shape}")
        conv = functools.partial(Conv, self.channels, padding="VALID", impl=self.conv_impl)
        x = max_pool1d(leaky_relu(conv((7,), name="conv1")(x)))
        for i in range(2, 5):
            x = leaky_relu(conv((5,), name=f"conv{i}")(x))
        h = leaky_relu(nn.Dense(self.hidden, name="fc1")(flatten_channel_major(max_pool1d(x))))
        return nn.Dense(self.num_classes, name="fc2")(h)


class ECGSplitNNClient(nn.Module):
    """SplitNN ECG client: Conv(1->16, k7, p3) LReLU MaxPool2 Conv(16->16, k5, p2) LReLU.

    (B, 128, 1) -> cut activation (B, 64, 16): d = 1,024 floats a sample; 1,424 params.
    """

    channels: int = 16
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_conv_impl(self.conv_impl)
        if x.ndim != 3 or x.shape[-1] != 1:
            raise ValueError(f"ECG input must be (batch, length, 1), got {x.shape}")
        conv = functools.partial(Conv, self.channels, impl=self.conv_impl)
        x = max_pool1d(leaky_relu(conv((7,), padding=[(3, 3)], name="conv1")(x)))
        return leaky_relu(conv((5,), padding=[(2, 2)], name="conv2")(x))


class ECGSplitNNServer(nn.Module):
    """SplitNN ECG server: 3 x [Conv(16->16, k5, p2) LReLU] MaxPool2, channel-major flatten, Dense 128,
    LReLU, Dense num_classes (logits). The LeakyReLU between the two Dense layers is the reference's
    (EcgServer.relu6 = nn.LeakyReLU() in split_learning/ecg/ecg_sp_server.ipynb; it has no parameters).

    (B, 64, 16) -> (B, 32, 16) -> 512 -> 128 -> 5; 70,197 params.
    """

    num_classes: int = 5
    channels: int = 16
    hidden: int = 128
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, activation: jax.Array) -> jax.Array:
        check_conv_impl(self.conv_impl)
        if activation.ndim != 3 or activation.shape[-1] != self.channels:
            raise ValueError(f"ECG SplitNN server input must be the cut (batch, length, {self.channels}), "
                             f"got {activation.shape}")
        x = activation
        for i in range(3, 6):
            x = leaky_relu(Conv(self.channels, (5,), padding=[(2, 2)], impl=self.conv_impl, name=f"conv{i}")(x))
        h = leaky_relu(nn.Dense(self.hidden, name="fc1")(flatten_channel_major(max_pool1d(x))))
        return nn.Dense(self.num_classes, name="fc2")(h)
