"""CIFAR-10 MobileNet of FL vs SplitNN (Gao et al. 2020, fl_vs_splitnn.md; the reference uses a CIFAR
MobileNet-v1): trained whole by FL, and its SplitNN client and server halves.

MobileNet: conv3x3 3->32 BN ReLU; 13 depthwise-separable blocks (depthwise conv3x3 BN ReLU, pointwise
conv1x1 BN ReLU) with (out channels, stride) in BLOCKS; global average pool; Dropout 0.5; Dense 10.
As in the reference, convs keep their bias (PyTorch's default) although BN follows; BatchNorm is
PyTorch's (jaxlab.models.layers.BatchNorm). Layout NHWC. Every model takes `conv_impl` ("lax" or
"im2col", jaxlab.models.layers.Conv).
The split: the client holds the first conv and the depthwise half of block 1, the server begins with
block 1's pointwise conv. (B, 32, 32, 3) -> cut (B, 32, 32, 32): 32,768 floats a sample.
Parameter counts: MobileNet 3,228,170 = client 1,344 + server 3,226,826.

Multi-exit backbone (backdoor on multi-exit networks, multiexit_backdoor.md): `MobileNetBlocks` is the
Shallow-Deep-Networks / BackdoorDynamicDNN MobileNet v1: the same stem and 13 blocks but bias-free convs
with PyTorch's default init, no Dropout, Linear 1024 -> num_classes; it returns every block's output (the
taps internal classifiers attach to, jaxlab.models.exits). 3,217,226 params for 10 classes.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxlab.models.layers import Conv, check_conv_impl
from jaxlab.models.resnet_cifar import TorchLinear, _bn, check_images

STEM = 32
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


TORCH_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # torch Conv2d default


def _conv_bn_relu(x, train: bool, features: int, kernel: int, stride: int, groups: int, name: str,
                  impl: str, bias: bool = True, kernel_init=nn.initializers.lecun_normal()):
    pad = kernel // 2
    conv = Conv(features, (kernel, kernel), (stride, stride), padding=[(pad, pad), (pad, pad)],
                feature_group_count=groups, use_bias=bias, kernel_init=kernel_init, impl=impl,
                name=f"{name}_conv")
    return nn.relu(_bn(train, f"{name}_bn")(conv(x)))


def _depthwise(x, train: bool, stride: int, name: str, impl: str):
    return _conv_bn_relu(x, train, x.shape[-1], 3, stride, x.shape[-1], f"{name}_dw", impl)


def _pointwise(x, train: bool, features: int, name: str, impl: str):
    return _conv_bn_relu(x, train, features, 1, 1, 1, f"{name}_pw", impl)


def _client_layers(x, train: bool, impl: str):
    check_conv_impl(impl)
    check_images(x)
    x = _conv_bn_relu(x, train, STEM, 3, 1, 1, "stem", impl)
    return _depthwise(x, train, BLOCKS[0][1], "block1", impl)


def _server_layers(a, train: bool, num_classes: int, dropout: float, impl: str):
    check_conv_impl(impl)
    x = _pointwise(a, train, BLOCKS[0][0], "block1", impl)
    for i, (features, stride) in enumerate(BLOCKS[1:], start=2):
        x = _depthwise(x, train, stride, f"block{i}", impl)
        x = _pointwise(x, train, features, f"block{i}", impl)
    x = nn.Dropout(dropout, deterministic=not train)(x.mean(axis=(1, 2)))
    return nn.Dense(num_classes, name="fc")(x)


class MobileNetCifar(nn.Module):
    """The whole MobileNet for FL. (B, 32, 32, 3) -> logits (B, num_classes); train needs a "dropout" rng."""

    num_classes: int = 10
    dropout: float = 0.5
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        a = _client_layers(x, train, self.conv_impl)
        return _server_layers(a, train, self.num_classes, self.dropout, self.conv_impl)


class MobileNetClient(nn.Module):
    """SplitNN MobileNet client: conv3x3 3->32 BN ReLU, depthwise conv3x3 (32 groups) BN ReLU."""

    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return _client_layers(x, train, self.conv_impl)


class MobileNetServer(nn.Module):
    """SplitNN MobileNet server: block 1's pointwise conv 32->64 BN ReLU, blocks 2-13, pool, Dropout, Dense."""

    num_classes: int = 10
    dropout: float = 0.5
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, a: jax.Array, train: bool = False) -> jax.Array:
        if a.ndim != 4 or a.shape[-1] != STEM:
            raise ValueError(f"MobileNet server input must be the cut (batch, h, w, {STEM}), got {a.shape}")
        return _server_layers(a, train, self.num_classes, self.dropout, self.conv_impl)


class MobileNetBlocks(nn.Module):
    """The SDN / BackdoorDynamicDNN MobileNet v1 with every block's output exposed.

    conv3x3 3->32 BN ReLU; the 13 blocks of BLOCKS (depthwise conv3x3 BN ReLU, pointwise conv1x1 BN
    ReLU; convs without bias, torch default init); global average pool (the reference's AvgPool 2 on
    32x32 inputs, 4 on 64x64: the whole final map); Linear 1024 -> num_classes.
    (B, S, S, 3) -> (logits (B, num_classes), taps: 13 block outputs (B, h, w, C)); `upto` = k stops
    after block k and returns (None, taps[:k + 1])."""

    num_classes: int = 10
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, upto: int | None = None):
        check_conv_impl(self.conv_impl)
        check_images(x)
        layer = lambda x, *a: _conv_bn_relu(x, train, *a, impl=self.conv_impl, bias=False,  # noqa: E731
                                            kernel_init=TORCH_CONV_INIT)
        x = layer(x, STEM, 3, 1, 1, "stem")
        taps = []
        for i, (features, stride) in enumerate(BLOCKS, start=1):
            x = layer(x, x.shape[-1], 3, stride, x.shape[-1], f"block{i}_dw")
            x = layer(x, features, 1, 1, 1, f"block{i}_pw")
            taps.append(x)
            if upto is not None and len(taps) > upto:
                return None, taps
        return TorchLinear(self.num_classes, name="fc")(x.mean(axis=(1, 2))), taps
