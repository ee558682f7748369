"""CIFAR-10 models of FL vs SplitNN (Gao et al. 2020, fl_vs_splitnn.md): ResNet-20 (He et al. 2016,
option A shortcuts) trained whole by FL, and the two SplitNN client cuts.

Layout NHWC: a (B, 32, 32, C) activation is PyTorch's (B, C, 32, 32). Convs have no bias (BN follows);
BatchNorm matches PyTorch's defaults (momentum 0.1 -> flax 0.9, eps 1e-5); batch statistics live in the
"batch_stats" collection (FL sends them with the weights). Parameter counts: ResNet-20 269,722;
ResNet-20 client 2,800; MobileNet client 1,280.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _bn(train: bool, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv3x3(features: int, stride: int = 1, name: str | None = None, groups: int = 1) -> nn.Conv:
    return nn.Conv(features, (3, 3), (stride, stride), padding=[(1, 1), (1, 1)], use_bias=False,
                   feature_group_count=groups, name=name)


def _check_images(x: jax.Array) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"CIFAR input must be (batch, height, width, 3), got {x.shape}")


def shortcut_a(x: jax.Array, features: int, stride: int) -> jax.Array:
    """Option A: subsample by `stride` and zero-pad channels to `features` (no parameters). (B,H,W,C) -> (B,H/s,W/s,F)."""
    if stride == 1 and x.shape[-1] == features:
        return x
    x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class BasicBlock(nn.Module):
    """conv3x3 BN ReLU conv3x3 BN, + option A shortcut, ReLU."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.relu(_bn(train)(_conv3x3(self.features, self.stride)(x)))
        y = _bn(train)(_conv3x3(self.features)(y))
        return nn.relu(y + shortcut_a(x, self.features, self.stride))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 images: conv3x3 16 BN ReLU; 3 stages of n blocks (16, 32, 64 channels,
    stride 2 at stages 2 and 3); global average pool; Dense num_classes. n = 3 is ResNet-20.
    (B, 32, 32, 3) -> logits (B, num_classes)."""

    blocks_per_stage: int = 3
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_images(x)
        x = nn.relu(_bn(train, "bn1")(_conv3x3(16, name="conv1")(x)))
        for stage, features in enumerate((16, 32, 64)):
            for i in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                x = BasicBlock(features, stride, name=f"stage{stage + 1}_block{i + 1}")(x, train)
        return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def resnet20(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(blocks_per_stage=3, num_classes=num_classes)


def _two_conv_cut(x: jax.Array, train: bool, features: int, second_groups: int) -> jax.Array:
    """Inside a compact module: conv3x3 3->features BN ReLU, conv3x3 (second_groups groups) BN ReLU."""
    _check_images(x)
    x = nn.relu(_bn(train, "bn1")(_conv3x3(features, name="conv1")(x)))
    return nn.relu(_bn(train, "bn2")(_conv3x3(features, name="conv2", groups=second_groups)(x)))


class ResNet20Client(nn.Module):
    """SplitNN ResNet-20 client: conv3x3 3->16 BN ReLU, conv3x3 16->16 BN ReLU (no residual).
    (B, 32, 32, 3) -> cut (B, 32, 32, 16): 16,384 floats a sample."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return _two_conv_cut(x, train, 16, second_groups=1)


class MobileNetClient(nn.Module):
    """SplitNN MobileNet client: conv3x3 3->32 BN ReLU, depthwise conv3x3 (32 groups, "conv2") BN ReLU.
    (B, 32, 32, 3) -> cut (B, 32, 32, 32): 32,768 floats a sample."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return _two_conv_cut(x, train, 32, second_groups=32)
