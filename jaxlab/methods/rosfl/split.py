"""RED-CNN as RoS-FL's three-part chain on jaxlab.federated.chain: client head, server body, client tail.

The head keeps the client's input image for the tail's global residual (`keep_for=2`): it never
crosses. On the wire per batch (chain.Message): head activation up, body output down, d loss / d body
output up, d loss / d head activation down. Loss MSE, computed by the client's tail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlab.federated import chain
from jaxlab.models.red_cnn import FEATURES, RedBody, RedCNN, RedHead, RedTail
from jaxlab.models.unet import UNet, UNetBody, UNetHead, UNetTail


def mse_loss(outputs: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean squared error over the batch (PyTorch nn.MSELoss), and {"mse": ...}."""
    loss = jnp.mean((outputs.astype(jnp.float32) - labels.astype(jnp.float32)) ** 2)
    return loss, {"mse": loss}


def bce_dice_loss(logits: jax.Array, masks: jax.Array, eps: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Segmentation loss (rosfl.md "Data": BCE + Dice): mean binary cross-entropy of the logits plus the
    soft Dice loss 1 - (2 sum p m + eps) / (sum p + sum m + eps) over the batch, p = sigmoid(logits);
    logits and masks (B, H, W, 1). Returns the loss and {"bce", "dice_loss"}."""
    logits, masks = logits.astype(jnp.float32), masks.astype(jnp.float32)
    bce = jnp.mean(jnp.maximum(logits, 0) - logits * masks + jnp.log1p(jnp.exp(-jnp.abs(logits))))
    p = jax.nn.sigmoid(logits)
    dice = 1 - (2 * jnp.sum(p * masks) + eps) / (jnp.sum(p) + jnp.sum(masks) + eps)
    return bce + dice, {"bce": bce, "dice_loss": dice}


def three_part_chain(head, body, tail, *, head_keeps_input: bool) -> list[chain.Part]:
    """[head (client), body (server), tail (client)] of three Flax modules. The head's kept values go to
    the tail (`keep_for=2`): the input image itself when head_keeps_input (RED-CNN's global residual),
    else the head returns (activation, kept) (U-Net: its skip features and the image)."""

    def head_apply(params, state, x, rng):
        out = head.apply({"params": params}, x)
        return ((out, x) if head_keeps_input else out), state

    def body_apply(params, state, h, rng):
        return body.apply({"params": params}, h), state

    def tail_apply(params, state, inputs, rng):
        h, kept = inputs
        return tail.apply({"params": params}, h, kept), state

    return [chain.Part(head_apply, "client", keep_for=2), chain.Part(body_apply, "server"),
            chain.Part(tail_apply, "client")]


def red_cnn_parts(features: int = FEATURES, conv_impl: str = "lax") -> list[chain.Part]:
    """[head (client, keeps the input for the tail), body (server), tail (client)]."""
    return three_part_chain(RedHead(features, conv_impl), RedBody(features, conv_impl), RedTail(conv_impl),
                            head_keeps_input=True)


def unet_parts(features=(16, 32, 64), out_channels: int = 1, residual: bool = True,
               conv_impl: str = "lax") -> list[chain.Part]:
    """[encoder head (client, keeps its skip features and the input), bottleneck body (server), decoder
    tail (client)]: only the pooled encoder output goes up and the upsampled bottleneck comes down."""
    features = tuple(features)
    return three_part_chain(UNetHead(features, conv_impl), UNetBody(features, conv_impl),
                            UNetTail(features, out_channels, residual, conv_impl), head_keeps_input=False)


def init_unet(rng: jax.Array, image_shape: tuple[int, int], features=(16, 32, 64), out_channels: int = 1,
              residual: bool = True, in_channels: int = 1) -> list:
    """[head, body, tail] parameters of the unsplit UNet's init."""
    model = UNet(tuple(features), out_channels, residual)
    params = model.init(rng, jnp.zeros((1, *image_shape, in_channels)))["params"]
    return [params["head"], params["body"], params["tail"]]


def init_red_cnn(rng: jax.Array, image_shape: tuple[int, int], features: int = FEATURES) -> list:
    """[head, body, tail] parameters, taken from the unsplit RedCNN's init (same tree)."""
    params = RedCNN(features).init(rng, jnp.zeros((1, *image_shape, 1)))["params"]
    return [params["head"], params["body"], params["tail"]]


def cut_sizes(image_shape: tuple[int, int], features: int = FEATURES) -> list[int]:
    """Floats per example at the two cuts: d_head (head output) and d_body (body output)."""
    h, w = image_shape
    d = (h - 4) * (w - 4) * features
    return [d, d]
