"""RED-CNN (Chen et al. 2017, residual encoder-decoder CNN for low-dose CT) in the three parts of
RoS-FL / DC-SFL's split (Zi-YuanYang/DC-SFL, Server_Model.py): 96 channels, all kernels 5x5, stride 1,
no padding.

    head (client):  conv1 1->96, ReLU                                     (B, H, W, 1) -> (B, H-4, W-4, 96)
    body (server):  conv2..conv5 (+ReLU), tconv1 + residual_3, tconv2, tconv3 + residual_2, tconv4
                    (each tconv after a ReLU of its input)                 -> (B, H-4, W-4, 96), pre-ReLU
    tail (client):  ReLU, tconv5 96->1, + the client's input image, ReLU  -> (B, H, W, 1)

A stride-1 transposed convolution with no padding is a convolution with full padding (k - 1 = 4 on
each side) and the spatially flipped, in/out-swapped kernel; the tconvs are written that way
(jaxlab.models.layers.Conv, padding 4), which is the same function class with the same parameter
shapes (5, 5, in, out) + (out,), and lets `conv_impl="im2col"` run every layer as patches @ kernel
(much faster than lax's convolution inside vmapped clients on XLA CPU). Loading PyTorch weights would
flip the tconv kernels spatially and swap their in/out axes.

`RedCNN` is the unsplit network with the same parameter tree {"head", "body", "tail"}, so a split
run's parts are `params["head"]`, `params["body"]`, `params["tail"]`. Parameters: head 2,496; body
4 x 230,496 + 4 x 230,496 = 1,843,968; tail 2,401; total 1,848,865. Images NHWC.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxlab.models.layers import Conv

FEATURES = 96
KERNEL = 5


def _conv(features: int, name: str, impl: str) -> Conv:
    """Conv2d(k=5, stride 1, padding 0): each spatial axis shrinks by 4."""
    return Conv(features, (KERNEL, KERNEL), padding="VALID", impl=impl, name=name)


def _tconv(features: int, name: str, impl: str) -> Conv:
    """ConvTranspose2d(k=5, stride 1, padding 0) as a full-padding conv: each spatial axis grows by 4."""
    return Conv(features, (KERNEL, KERNEL), padding=KERNEL - 1, impl=impl, name=name)


class RedHead(nn.Module):
    """conv1 + ReLU: (B, H, W, 1) -> (B, H-4, W-4, features)."""

    features: int = FEATURES
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(_conv(self.features, "conv1", self.conv_impl)(x))


class RedBody(nn.Module):
    """The server's body with both skips: (B, H-4, W-4, F) -> same shape (tconv4's output, pre-ReLU)."""

    features: int = FEATURES
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        if min(h.shape[-3:-1]) < 4 * (KERNEL - 1) + 1:
            raise ValueError(f"RED-CNN body input {h.shape} is too small: conv2..conv5 shrink each spatial "
                             f"axis by {4 * (KERNEL - 1)}, so images must be at least 21 x 21")

        def conv(name):
            return _conv(self.features, name, self.conv_impl)

        def tconv(name):
            return _tconv(self.features, name, self.conv_impl)

        out = nn.relu(conv("conv2")(h))
        residual_2 = out
        out = nn.relu(conv("conv4")(nn.relu(conv("conv3")(out))))
        residual_3 = out
        out = nn.relu(conv("conv5")(out))
        out = tconv("tconv1")(out) + residual_3
        out = tconv("tconv2")(nn.relu(out))
        out = tconv("tconv3")(nn.relu(out)) + residual_2
        return tconv("tconv4")(nn.relu(out))


class RedTail(nn.Module):
    """ReLU, tconv5 to one channel, + the input image (global residual), ReLU: -> (B, H, W, 1)."""

    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, h: jax.Array, image: jax.Array) -> jax.Array:
        return nn.relu(_tconv(1, "tconv5", self.conv_impl)(nn.relu(h)) + image)


class RedCNN(nn.Module):
    """The unsplit RED-CNN: tail(body(head(x)), x), parameters {"head", "body", "tail"}."""

    features: int = FEATURES
    conv_impl: str = "lax"

    def setup(self):
        self.head = RedHead(self.features, self.conv_impl)
        self.body = RedBody(self.features, self.conv_impl)
        self.tail = RedTail(self.conv_impl)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.tail(self.body(self.head(x)), x)


def part_param_counts(features: int = FEATURES) -> dict[str, int]:
    """Parameter counts derived from the spec (weights + biases), per part."""
    conv = KERNEL * KERNEL * features * features + features
    return {"head": KERNEL * KERNEL * features + features, "body": 8 * conv, "tail": KERNEL * KERNEL * features + 1}
