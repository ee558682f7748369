"""ImageNet-style ResNet-18 trunk (He et al. 2016; torchvision's layout) up to layer4, for AV-Net
(av_inpainting.md): a visual branch on RGB frames and an audio branch on 1-channel log-mel spectrograms.

conv7x7 s2 (no bias) BN ReLU, maxpool 3x3 s2 pad 1, then 4 stages of 2 BasicBlocks (64, 128, 256, 512
channels; stride 2 at the first block of stages 2-4, `layer4_stride` at stage 4: AV-Net's branches use
1, so a 224x224 frame gives a 14x14x512 map; `layer3_stride` 1 as well halves the map's stride again, for
small frames). Shortcuts are 1x1 conv + BN where the shape changes
(torchvision's "B"); convs are Kaiming-normal fan_out as torchvision; BatchNorm is PyTorch's
(jaxlab.models.layers.BatchNorm). The classification head (avgpool + fc) is not built: AV-Net never uses
it. Layout NHWC. Parameters with the default widths: 11,176,512 for 3 input channels, 11,170,240 for 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jaxlab.models.layers import Conv, check_conv_impl
from jaxlab.models.resnet_cifar import KAIMING_NORMAL_FAN_OUT, BasicBlock, _bn

RESNET18_WIDTHS = (64, 128, 256, 512)
RESNET18_BLOCKS = (2, 2, 2, 2)


class ResNet18(nn.Module):
    """(B, H, W, in_channels) -> layer4 features (B, H / s, W / s, widths[-1]),
    s = 8 * layer3_stride * layer4_stride.

    widths: channels of the stem and the four stages (narrow them for CPU tests); in_channels: the
    input's channels, checked (3 for frames, 1 for spectrograms)."""

    widths: Sequence[int] = RESNET18_WIDTHS
    layer4_stride: int = 2
    layer3_stride: int = 2
    in_channels: int = 3
    blocks: Sequence[int] = RESNET18_BLOCKS
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_conv_impl(self.conv_impl)
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"ResNet18 input must be (batch, height, width, {self.in_channels}), got {x.shape}")
        if len(self.widths) != 4 or len(self.blocks) != 4:
            raise ValueError(f"ResNet18 needs 4 stage widths and block counts, got {self.widths}, {self.blocks}")
        x = Conv(self.widths[0], (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                 kernel_init=KAIMING_NORMAL_FAN_OUT, impl=self.conv_impl, name="conv1")(x)
        x = nn.relu(_bn(train, "bn1")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # -inf padding, as torch's MaxPool2d
        for stage, (features, count) in enumerate(zip(self.widths, self.blocks)):
            first_stride = (1, 2, self.layer3_stride, self.layer4_stride)[stage]
            for i in range(count):
                block = BasicBlock(features, first_stride if i == 0 else 1, self.conv_impl, shortcut="B",
                                   kernel_init=KAIMING_NORMAL_FAN_OUT, name=f"layer{stage + 1}_{i}")
                x = block(x, train)
        return x
