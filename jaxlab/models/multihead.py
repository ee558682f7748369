"""Multi-head networks for continual learning: a shared backbone and one linear head per task, the heads
stacked on a leading task axis so that the network grows by one head per task and all heads apply as
one einsum.

    params = {"backbone": <Flax params>, "heads": {"kernel": (T, D, C), "bias": (T, C)}}
    feats, collections = backbone_features(backbone, params["backbone"], collections, x, train)  # (B, D)
    logits = head_logits(params["heads"], feats)                                               # (B, T, C)

Backbones: `MLPBackbone` (flattened input, Dense + ReLU layers; split digits) and `ResNetBackbone`
(CIFAR ResNet-(6n+2), option-A shortcuts, PyTorch-faithful BatchNorm, global average pool: the ResNet-32
that continual-learning libraries use on CIFAR-100 when n = 5). A head is nn.Dense's initialisation
(LeCun-normal kernel, zero bias), as a fresh torch.nn.Linear head would be re-initialised per task.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.models.layers import BatchNorm, Conv, check_conv_impl
from jaxlab.models.resnet_cifar import KAIMING_NORMAL, BasicBlock

PyTree = dict


class MLPBackbone(nn.Module):
    """(B, ...) -> (B, widths[-1]): flatten, then Dense + ReLU for every width."""

    widths: Sequence[int] = (100, 100)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
        return x


class ResNetBackbone(nn.Module):
    """ResNet-(6n+2) for (B, H, W, C) images without its classifier: conv3x3 16 BN ReLU, 3 stages of n
    blocks (16, 32, 64 channels, stride 2 at stages 2 and 3), global average pool -> (B, 64)."""

    blocks_per_stage: int = 5
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_conv_impl(self.conv_impl)
        if x.ndim != 4:
            raise ValueError(f"ResNetBackbone input must be (batch, height, width, channels), got {x.shape}")
        x = Conv(16, (3, 3), (1, 1), padding=[(1, 1), (1, 1)], use_bias=False, kernel_init=KAIMING_NORMAL,
                 impl=self.conv_impl, name="conv1")(x)
        x = nn.relu(BatchNorm(use_running_average=not train, momentum=0.1, epsilon=1e-5, name="bn1")(x))
        for stage, features in enumerate((16, 32, 64)):
            for i in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                x = BasicBlock(features=features, stride=stride, conv_impl=self.conv_impl,
                               name=f"stage{stage + 1}_block{i + 1}")(x, train)
        return x.mean(axis=(1, 2))


def make_backbone(name: str, *, widths: Sequence[int] = (100, 100), blocks_per_stage: int = 5,
                  conv_impl: str = "lax") -> nn.Module:
    """"mlp" -> MLPBackbone(widths); "resnet" -> ResNetBackbone(blocks_per_stage, conv_impl)."""
    if name == "mlp":
        return MLPBackbone(tuple(widths))
    if name == "resnet":
        return ResNetBackbone(blocks_per_stage, conv_impl)
    raise ValueError(f"model.backbone={name!r} is not one of 'mlp', 'resnet'")


def backbone_features(backbone: nn.Module, params: PyTree, collections: PyTree, x: jax.Array,
                      train: bool) -> tuple[jax.Array, PyTree]:
    """(B, ...) inputs -> ((B, D) features, collections): BatchNorm statistics are updated (and returned)
    only when training and the backbone has any; otherwise the collections come back unchanged."""
    variables = {"params": params, **collections}
    if train and collections:
        feats, updates = backbone.apply(variables, x, train=True, mutable=list(collections))
        return feats, {**collections, **updates}
    return backbone.apply(variables, x, train=train), collections


def init_head(rng: jax.Array, features: int, classes: int) -> PyTree:
    """One head: {"kernel": (D, C) LeCun-normal, "bias": (C,) zeros} (nn.Dense's initialisation)."""
    return nn.Dense(classes).init(rng, jnp.zeros((1, features)))["params"]


def stack_heads(heads: Sequence[PyTree]) -> PyTree:
    """[{"kernel": (D, C), "bias": (C,)}] * T -> {"kernel": (T, D, C), "bias": (T, C)}."""
    return jax.tree_util.tree_map(lambda *h: jnp.stack(h), *heads)


def add_head(heads: PyTree, head: PyTree) -> PyTree:
    """Stacked heads (T, ...) plus one head -> (T + 1, ...): the network grows by a head."""
    return jax.tree_util.tree_map(lambda hs, h: jnp.concatenate([hs, h[None]]), heads, head)


def head_logits(heads: PyTree, feats: jax.Array) -> jax.Array:
    """Stacked heads {"kernel": (T, D, C), "bias": (T, C)} on (B, D) features -> (B, T, C) logits."""
    if feats.ndim != 2 or feats.shape[-1] != heads["kernel"].shape[1]:
        raise ValueError(f"head_logits: features {feats.shape} do not fit heads' kernel {heads['kernel'].shape} "
                         "(need features (B, D) for a kernel (T, D, C))")
    return jnp.einsum("bd,tdc->btc", feats, heads["kernel"]) + heads["bias"][None]


def num_heads(heads: PyTree) -> int:
    return int(heads["bias"].shape[0])
