"""CIFAR-10 ResNet-20 of FL vs SplitNN (Gao et al. 2020, fl_vs_splitnn.md): ResNet-20 (He et al. 2016,
option A shortcuts) trained whole by FL, and its SplitNN client and server halves. (MobileNet:
jaxlab.models.mobilenet_cifar.)

Layout NHWC: a (B, 32, 32, C) activation is PyTorch's (B, C, 32, 32). Convs have no bias (BN follows)
and the reference's Kaiming-normal init (std sqrt(2 / fan_in)); BatchNorm is PyTorch's
(jaxlab.models.layers.BatchNorm: momentum 0.1, eps 1e-5, running variance from the unbiased batch
variance); batch statistics live in the "batch_stats" collection (FL sends them with the weights).
Every model takes `conv_impl` ("lax" or "im2col", jaxlab.models.layers.Conv). The split follows the reference: the client holds the stem and the first
conv (+BN, ReLU) of stage 1 block 1; the server finishes that block (conv, BN) with an identity shortcut
from the cut activation (not from the block input, which stays on the client), then the rest.
Parameter counts: ResNet-20 269,722 = client 2,800 + server 266,922.

Multi-exit backbones (backdoor on multi-exit networks, multiexit_backdoor.md): `ResNetCifarBlocks` is the
Shallow-Deep-Networks / BackdoorDynamicDNN ResNet-(6n+2) (ResNet-56: n = 9): option B shortcuts (1x1 conv +
BN when the shape changes), Kaiming-normal fan_out convs, and it returns every block's output (the
"taps" that internal classifiers attach to; jaxlab.models.exits). ResNet-56 on 32x32: 855,770 params.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.models.layers import BatchNorm, Conv, check_conv_impl


def _bn(train: bool, name: str | None = None) -> BatchNorm:
    """torch.nn.BatchNorm2d's defaults (momentum 0.1, eps 1e-5); batch statistics when training."""
    return BatchNorm(use_running_average=not train, momentum=0.1, epsilon=1e-5, name=name)


KAIMING_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # torch kaiming_normal_


def _conv3x3(features: int, stride: int = 1, name: str | None = None, impl: str = "lax") -> Conv:
    return Conv(features, (3, 3), (stride, stride), padding=[(1, 1), (1, 1)], use_bias=False,
                kernel_init=KAIMING_NORMAL, impl=impl, name=name)


def check_images(x: jax.Array) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"CIFAR input must be (batch, height, width, 3), got {x.shape}")


def shortcut_a(x: jax.Array, features: int, stride: int) -> jax.Array:
    """Option A: subsample by `stride` and zero-pad channels to `features` (no parameters). (B,H,W,C) -> (B,H/s,W/s,F)."""
    if stride == 1 and x.shape[-1] == features:
        return x
    x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


KAIMING_NORMAL_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # mode='fan_out'


class BasicBlock(nn.Module):
    """conv3x3 BN ReLU conv3x3 BN, + shortcut, ReLU.

    shortcut "A" (ResNet-20 of fl_vs_splitnn): subsample and zero-pad, no parameters; "B" (the SDN /
    BackdoorDynamicDNN ResNet-56): conv1x1(stride) + BN when the stride or width changes, else identity.
    with_pre_relu: return (output, the sum before the last ReLU) instead of the output alone (the
    reference's ICs read the pre-ReLU sum)."""

    features: int
    stride: int = 1
    conv_impl: str = "lax"
    shortcut: str = "A"
    kernel_init: nn.initializers.Initializer = KAIMING_NORMAL
    with_pre_relu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool):
        conv = lambda f, s=1: Conv(f, (3, 3), (s, s), padding=[(1, 1), (1, 1)], use_bias=False,  # noqa: E731
                                   kernel_init=self.kernel_init, impl=self.conv_impl)
        y = nn.relu(_bn(train)(conv(self.features, self.stride)(x)))
        y = _bn(train)(conv(self.features)(y))
        if self.shortcut == "A":
            skip = shortcut_a(x, self.features, self.stride)
        elif self.shortcut == "B":
            skip = x
            if self.stride != 1 or x.shape[-1] != self.features:
                skip = Conv(self.features, (1, 1), (self.stride, self.stride), padding="VALID", use_bias=False,
                            kernel_init=self.kernel_init, impl=self.conv_impl)(x)
                skip = _bn(train)(skip)
        else:
            raise ValueError(f"BasicBlock shortcut must be 'A' or 'B', got {self.shortcut!r}")
        total = y + skip
        return (nn.relu(total), total) if self.with_pre_relu else nn.relu(total)


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 images: conv3x3 16 BN ReLU; 3 stages of n blocks (16, 32, 64 channels,
    stride 2 at stages 2 and 3); global average pool; Dense num_classes. n = 3 is ResNet-20.
    (B, 32, 32, 3) -> logits (B, num_classes)."""

    blocks_per_stage: int = 3
    num_classes: int = 10
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_conv_impl(self.conv_impl)
        check_images(x)
        x = nn.relu(_bn(train, "bn1")(_conv3x3(16, name="conv1", impl=self.conv_impl)(x)))
        return _stages_and_head(x, train, self.blocks_per_stage, self.num_classes, 0, self.conv_impl)


def _stages_and_head(x, train: bool, blocks_per_stage: int, num_classes: int, first: int,
                     conv_impl: str) -> jax.Array:
    """Inside a compact module: the residual stages from block index `first` of stage 1 on, global
    average pool, Dense "fc"."""
    for stage, features in enumerate((16, 32, 64)):
        for i in range(first if stage == 0 else 0, blocks_per_stage):
            stride = 2 if stage > 0 and i == 0 else 1
            block = BasicBlock(features, stride, conv_impl, name=f"stage{stage + 1}_block{i + 1}")
            x = block(x, train)
    dense = nn.Dense(num_classes, kernel_init=KAIMING_NORMAL, name="fc")
    return dense(x.mean(axis=(1, 2)))


def resnet20(num_classes: int = 10, conv_impl: str = "lax") -> ResNetCifar:
    return ResNetCifar(blocks_per_stage=3, num_classes=num_classes, conv_impl=conv_impl)


class ResNet20Client(nn.Module):
    """SplitNN ResNet-20 client: conv3x3 3->16 BN ReLU, conv3x3 16->16 BN ReLU (no residual).
    (B, 32, 32, 3) -> cut (B, 32, 32, 16): 16,384 floats a sample."""

    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_conv_impl(self.conv_impl)
        check_images(x)
        x = nn.relu(_bn(train, "bn1")(_conv3x3(16, name="conv1", impl=self.conv_impl)(x)))
        return nn.relu(_bn(train, "bn2")(_conv3x3(16, name="conv2", impl=self.conv_impl)(x)))


class ResNet20Server(nn.Module):
    """SplitNN ResNet-20 server: conv3x3 16->16 BN, + the cut activation (identity shortcut), ReLU; then
    stage 1 blocks 2-3, stages 2-3, pool, Dense. cut (B, 32, 32, 16) -> logits (B, num_classes)."""

    blocks_per_stage: int = 3
    num_classes: int = 10
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, a: jax.Array, train: bool = False) -> jax.Array:
        check_conv_impl(self.conv_impl)
        if a.ndim != 4 or a.shape[-1] != 16:
            raise ValueError(f"ResNet-20 server input must be the cut (batch, h, w, 16), got {a.shape}")
        y = _bn(train, "bn2")(_conv3x3(16, name="conv2", impl=self.conv_impl)(a))
        x = nn.relu(y + a)
        return _stages_and_head(x, train, self.blocks_per_stage, self.num_classes, 1, self.conv_impl)


TAPS = ("output", "pre_relu")


class TorchLinear(nn.Module):
    """torch.nn.Linear with its default init: kernel (in, features) and bias ~ U(-1/sqrt(in), 1/sqrt(in)).
    (..., in) -> (..., features)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bound = 1.0 / float(x.shape[-1]) ** 0.5
        init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)  # noqa: E731
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        return x @ kernel + self.param("bias", init, (self.features,))


class ResNetCifarBlocks(nn.Module):
    """SDN / BackdoorDynamicDNN ResNet-(6n+2) with every block's output exposed (ResNet-56: n = 9).

    conv3x3 16 (stride 2 for 64x64 inputs: Tiny-ImageNet) BN ReLU; 3 stages of n option-B basic blocks
    (16, 32, 64 channels; stride 2 at stages 2, 3); global average pool; Linear num_classes (torch init).
    (B, S, S, 3) -> (logits (B, num_classes), taps: list of 3n (B, h, w, C) block outputs). `tap`:
    "output" (the block's output) or "pre_relu" (the sum before its last ReLU, which the reference's ICs
    read). `upto` = k stops after block k (0-based) and returns (None, taps[:k + 1]) (exit costs)."""

    blocks_per_stage: int = 9
    num_classes: int = 10
    tap: str = "output"
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, upto: int | None = None):
        check_conv_impl(self.conv_impl)
        check_images(x)
        if self.tap not in TAPS:
            raise ValueError(f"ResNetCifarBlocks tap must be one of {TAPS}, got {self.tap!r}")
        stem_stride = 2 if x.shape[1] >= 64 else 1
        stem = Conv(16, (3, 3), (stem_stride,) * 2, padding=[(1, 1), (1, 1)], use_bias=False,
                    kernel_init=KAIMING_NORMAL_FAN_OUT, impl=self.conv_impl, name="conv1")
        x = nn.relu(_bn(train, "bn1")(stem(x)))
        taps = []
        for stage, features in enumerate((16, 32, 64)):
            for i in range(self.blocks_per_stage):
                block = BasicBlock(features, 2 if stage > 0 and i == 0 else 1, self.conv_impl, "B",
                                   KAIMING_NORMAL_FAN_OUT, True, name=f"stage{stage + 1}_block{i + 1}")
                x, pre = block(x, train)
                taps.append(x if self.tap == "output" else pre)
                if upto is not None and len(taps) > upto:
                    return None, taps
        return TorchLinear(self.num_classes, name="fc")(x.mean(axis=(1, 2))), taps


def resnet56_blocks(num_classes: int = 10, tap: str = "output", conv_impl: str = "lax") -> ResNetCifarBlocks:
    return ResNetCifarBlocks(9, num_classes, tap, conv_impl)
