"""The inpainting losses (av_inpainting.md, Eq. 5; the released core/trainer.py and core/loss.py).

Videos (B, T, H, W, 3) in [-1, 1], masks (B, T, H, W, 1) with 1 = hole.

- hole / valid L1: mean|m (pred - gt)| / mean(m) + mean|(1 - m)(pred - gt)| / mean(1 - m), on the raw
  prediction (not the composite), means over every element (nn.L1Loss) divided by the mask's mean;
- hinge GAN: discriminator (mean relu(1 - D(real)) + mean relu(1 + D(fake))) / 2, generator -mean D(fake);
- AV attention loss: mean over (B T, h, w) of (M(a, v_hat) - M(a, v))^2 = ||.||^2 / hw per frame,
  averaged over frames (nn.MSELoss on the maps);
- AV pseudo-class consistency: CE with the audio classifier's softmax as the soft target,
  CE(softmax(y_A(a)), y_V(v_hat)) (a constant target: the AV-Net is frozen);
- imagenet_normalize: [-1, 1] -> ImageNet statistics, the AV-Net's input (x * 0.5 + 0.5 - mean) / std.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hole_valid_l1(pred: jax.Array, target: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(hole L1, valid L1): mean|m (pred - target)| / mean(m) and the same with 1 - m; pred, target
    (..., C), mask (..., 1) broadcast over C. A mask with no hole (or no valid pixel) gives 0 for that
    term."""
    err = jnp.abs(pred - target)
    m = jnp.broadcast_to(mask, err.shape)
    hole = jnp.mean(m * err) / jnp.maximum(jnp.mean(m), 1e-8)
    valid = jnp.mean((1 - m) * err) / jnp.maximum(jnp.mean(1 - m), 1e-8)
    return hole, valid


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Discriminator hinge loss, averaged over the real and the fake half as the release does."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
    """Generator hinge loss: -mean D(fake)."""
    return -jnp.mean(fake_logits)


def imagenet_normalize(video: jax.Array) -> jax.Array:
    """(..., 3) in [-1, 1] -> ImageNet-normalised (the AV-Net's visual input)."""
    mean = jnp.asarray(IMAGENET_MEAN, video.dtype)
    std = jnp.asarray(IMAGENET_STD, video.dtype)
    return (video * 0.5 + 0.5 - mean) / std


def av_attention_loss(map_pred: jax.Array, map_true: jax.Array) -> jax.Array:
    """||M(a, v_hat) - M(a, v)||^2 / (h w), averaged over the maps: maps (N, h, w) -> scalar."""
    if map_pred.shape != map_true.shape:
        raise ValueError(f"attention maps differ in shape: {map_pred.shape} vs {map_true.shape}")
    return jnp.mean(jnp.square(map_pred - map_true))


def av_class_loss(audio_logits: jax.Array, visual_logits: jax.Array) -> jax.Array:
    """CE(y_A(a), y_V(v_hat)) with softmax(audio logits) as a constant soft target: (N, K) x2 -> scalar."""
    target = jax.nn.softmax(jax.lax.stop_gradient(audio_logits.astype(jnp.float32)), axis=-1)
    return jnp.mean(optax.softmax_cross_entropy(visual_logits.astype(jnp.float32), target))
