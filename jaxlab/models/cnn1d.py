"""1D CNNs for ECG beats (Abuadbba et al. 2020, split_ecg.md), split into a client and a server half.

Layout is NWC (batch, 128 samples, channels). At the cut the activation (B, 32, 16) is flattened in
PyTorch's channel-major order (B, 16, 32) -> 512 so weights map one-to-one to the reference Conv1d
model. Parameter counts (two-layer): client 128 + 1,296; server 65,664 + 645; total 67,733.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

LEAKY_SLOPE = 0.01


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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not 2 <= self.n_convs <= 8:
            raise ValueError(f"ECGClient n_convs must be in 2..8, got {self.n_convs}")
        if x.ndim != 3 or x.shape[-1] != 1:
            raise ValueError(f"ECG input must be (batch, length, 1), got {x.shape}")
        x = max_pool1d(leaky_relu(nn.Conv(self.channels, (7,), padding=[(3, 3)], name="conv1")(x)))
        for i in range(2, self.n_convs + 1):
            x = leaky_relu(nn.Conv(self.channels, (5,), padding=[(2, 2)], name=f"conv{i}")(x))
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

    def setup(self):
        self.client = ECGClient(self.n_convs)
        self.server = ECGServer(self.num_classes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.server(self.client(x))
