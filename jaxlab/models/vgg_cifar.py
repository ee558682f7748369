"""VGG-16 with BatchNorm for 32x32 (CIFAR) and 64x64 (Tiny-ImageNet) images, as the Shallow-Deep-Networks
and BackdoorDynamicDNN code define it (backdoor on multi-exit networks, multiexit_backdoor.md), with every
block's output exposed so internal classifiers (jaxlab.models.exits) attach after any block.

13 conv blocks: conv3x3 (with bias) BN ReLU, then MaxPool 2 where POOLS says so, with CHANNELS widths;
flatten; FC block: Linear -> fc_sizes[0], ReLU, Dropout 0.5 (the 14th tap); end: Linear -> fc_sizes[1],
ReLU, Dropout 0.5, Linear -> num_classes. fc_sizes = (512, 512) for 32x32 inputs, (2048, 1024) for 64x64.
Init as the reference's initialize_weights: conv kernels N(0, sqrt(2 / (k * k * out))), conv bias 0;
BN 1 / 0; Linear N(0, 0.01), bias 0. BatchNorm is PyTorch's (jaxlab.models.layers.BatchNorm). Layout NHWC.
Parameter count for 10 classes on 32x32: 15,253,578.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxlab.models.layers import Conv, check_conv_impl
from jaxlab.models.resnet_cifar import _bn, check_images

CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
POOLS = (1, 2, 1, 2, 1, 1, 2, 1, 1, 2, 1, 1, 2)
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # N(0, sqrt(2 / (k k out)))
LINEAR_INIT = nn.initializers.normal(0.01)


def fc_sizes(image_size: int) -> tuple[int, int]:
    """The reference's FC widths: (512, 512) for 32x32 inputs, (2048, 1024) otherwise (64x64)."""
    return (512, 512) if image_size == 32 else (2048, 1024)


class VGG16BN(nn.Module):
    """(B, S, S, 3) -> (logits (B, num_classes), taps: 13 conv-block outputs (after their pool) and the
    first FC block's output (B, fc_sizes[0])). `upto` = k stops after block k and returns
    (None, taps[:k + 1]). Dropout needs a "dropout" rng when train=True."""

    num_classes: int = 10
    dropout: float = 0.5
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, upto: int | None = None):
        check_conv_impl(self.conv_impl)
        check_images(x)
        first, second = fc_sizes(x.shape[1])
        taps = []
        for i, (features, pool) in enumerate(zip(CHANNELS, POOLS), start=1):
            conv = Conv(features, (3, 3), padding=[(1, 1), (1, 1)], kernel_init=CONV_INIT,
                        impl=self.conv_impl, name=f"conv{i}")
            x = nn.relu(_bn(train, f"bn{i}")(conv(x)))
            if pool > 1:
                x = nn.max_pool(x, (pool, pool), (pool, pool))
            taps.append(x)
            if upto is not None and len(taps) > upto:
                return None, taps
        dense = lambda f, name: nn.Dense(f, kernel_init=LINEAR_INIT, name=name)  # noqa: E731
        drop = nn.Dropout(self.dropout, deterministic=not train)
        x = drop(nn.relu(dense(first, "fc1")(x.reshape(x.shape[0], -1))))
        taps.append(x)
        if upto is not None:
            return None, taps
        x = drop(nn.relu(dense(second, "fc2")(x)))
        return dense(self.num_classes, "fc3")(x), taps
