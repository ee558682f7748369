"""A small U-Net in RoS-FL's three parts (rosfl.md: "encoder head / bottleneck body / decoder tail, skip
features held by the client"). The paper gives no layer table for its U-Net; this one is inferred:
blocks of two 3x3 convs (SAME) + ReLU, 2x2 max-pooling down, nearest 2x upsampling + 3x3 conv up.

    head (client): block(f0) -> skip1, pool, block(f1) -> skip2, pool      (B, H, W, C) -> (B, H/4, W/4, f1)
    body (server): block(f2), upsample + conv(f1)                          -> (B, H/2, W/2, f1)
    tail (client): concat skip2, block(f1), upsample + conv(f0), concat skip1, block(f0), 1x1 conv to
                   out_channels, + the input image if residual (restoration); logits otherwise
                   (segmentation).

The head returns (activation, kept) with kept = (skip1, skip2, image): in a split run only the
activation crosses; the skips and the image stay with the client for its tail. H and W must be
multiples of 4. Parameters {"head", "body", "tail"} as in `UNet`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.models.layers import Conv


class _Block(nn.Module):
    features: int
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.relu(Conv(self.features, (3, 3), padding="SAME", impl=self.conv_impl, name=f"conv{i}")(x))
        return x


def _pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def _up(x, features, impl, name):
    x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
    return nn.relu(Conv(features, (3, 3), padding="SAME", impl=impl, name=name)(x))


class UNetHead(nn.Module):
    features: Sequence[int] = (16, 32, 64)
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, image: jax.Array):
        if image.shape[-3] % 4 or image.shape[-2] % 4:
            raise ValueError(f"U-Net input {image.shape}: height and width must be multiples of 4")
        f0, f1, _ = self.features
        skip1 = _Block(f0, self.conv_impl, name="enc1")(image)
        skip2 = _Block(f1, self.conv_impl, name="enc2")(_pool(skip1))
        return _pool(skip2), (skip1, skip2, image)


class UNetBody(nn.Module):
    features: Sequence[int] = (16, 32, 64)
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        _, f1, f2 = self.features
        return _up(_Block(f2, self.conv_impl, name="bottleneck")(h), f1, self.conv_impl, "up2")


class UNetTail(nn.Module):
    features: Sequence[int] = (16, 32, 64)
    out_channels: int = 1
    residual: bool = True
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, h: jax.Array, kept) -> jax.Array:
        skip1, skip2, image = kept
        f0, f1, _ = self.features
        x = _Block(f1, self.conv_impl, name="dec2")(jnp.concatenate([h, skip2], -1))
        x = _up(x, f0, self.conv_impl, "up1")
        x = _Block(f0, self.conv_impl, name="dec1")(jnp.concatenate([x, skip1], -1))
        out = Conv(self.out_channels, (1, 1), impl=self.conv_impl, name="out")(x)
        return out + image if self.residual else out


class UNet(nn.Module):
    """The unsplit U-Net: tail(body(head(x).activation), head(x).kept)."""

    features: Sequence[int] = (16, 32, 64)
    out_channels: int = 1
    residual: bool = True
    conv_impl: str = "lax"

    def setup(self):
        self.head = UNetHead(self.features, self.conv_impl)
        self.body = UNetBody(self.features, self.conv_impl)
        self.tail = UNetTail(self.features, self.out_channels, self.residual, self.conv_impl)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, kept = self.head(x)
        return self.tail(self.body(h), kept)
