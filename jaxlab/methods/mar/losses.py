"""MAR / VideoMAE losses and batch mixing: normalised-pixel targets, masked MSE, soft-target CE,
mixup / cutmix soft targets with label smoothing (timm's Mixup in 'batch' mode, as the official
configs use it: MIXUP.ALPHA 0.8, CUTMIX.ALPHA 1.0, PROB 1.0, SWITCH_PROB 0.5, LABEL_SMOOTHING 0.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlab.models.vit_video import VideoGeometry


def patchify(video: jax.Array, geometry: VideoGeometry) -> jax.Array:
    """[B, T, H, W, C] -> [B, N, tubelet * patch * patch, C], tokens in (time, row, column) order and
    a token's pixels in (frame, row, column) order ('b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c')."""
    g = geometry
    b = video.shape[0]
    tt, hh, ww = g.grid
    x = video.reshape(b, tt, g.tubelet_size, hh, g.patch_size, ww, g.patch_size, video.shape[-1])
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, tt * hh * ww, g.tubelet_size * g.patch_size ** 2, video.shape[-1])


def pixel_targets(video: jax.Array, geometry: VideoGeometry, mean, std, normalize: bool = True) -> jax.Array:
    """Reconstruction targets [B, N, patch_dim] from normalised frames [B, T, H, W, C].

    Frames are de-normalised (x * std + mean); with `normalize`, each patch's pixels are standardised
    per channel: (x - mean) / (sqrt(unbiased var) + 1e-6); values are laid out (pixel, channel)."""
    video = video.astype(jnp.float32) * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
    patches = patchify(video, geometry)
    if normalize:
        centred = patches - patches.mean(axis=-2, keepdims=True)
        var = jnp.sum(centred ** 2, axis=-2, keepdims=True) / (patches.shape[-2] - 1)
        patches = centred / (jnp.sqrt(var) + 1e-6)
    return patches.reshape(*patches.shape[:2], -1)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error over the masked tokens' values: pred, target [B, N, P], mask bool [B, N]."""
    err = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    weights = mask.astype(jnp.float32)
    return jnp.sum(err * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example sum_c -target_c * log_softmax(logits)_c in float32: [B, C], [B, C] -> [B]."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """timm's one_hot(on = 1 - s + s / C, off = s / C): [B] -> [B, C] float32."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mix_batch(rng: jax.Array, video: jax.Array, labels: jax.Array, num_classes: int, *,
              mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
              switch_prob: float = 0.5, smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """One (lambda, mixup-or-cutmix) draw for the whole batch, mixing each clip with the batch reversed.

    video [B, T, H, W, C], labels [B] -> (mixed video, soft targets [B, C]). Cutmix pastes the same
    box into every frame and corrects lambda to the pasted area; with probability 1 - prob nothing is
    mixed (targets are only smoothed)."""
    y1 = smoothed_one_hot(labels, num_classes, smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return video, y1
    k_switch, k_mix, k_cut, k_apply, k_y, k_x = jax.random.split(rng, 6)
    height, width = video.shape[2], video.shape[3]
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
    lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
    cut_rat = jnp.sqrt(1.0 - lam_cut)
    cut_h, cut_w = (height * cut_rat).astype(jnp.int32), (width * cut_rat).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    y0, y1_ = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1_ = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height), jnp.arange(width)
    box = ((rows >= y0) & (rows < y1_))[:, None] & ((cols >= x0) & (cols < x1_))[None, :]
    lam_box = 1.0 - ((y1_ - y0) * (x1_ - x0)).astype(jnp.float32) / (height * width)
    flipped = video[::-1]
    mixed = jnp.where(use_cutmix, jnp.where(box[None, None, :, :, None], flipped, video),
                      video * lam_mix.astype(video.dtype) + flipped * (1 - lam_mix).astype(video.dtype))
    lam = jnp.where(use_cutmix, lam_box, lam_mix)
    apply = jax.random.uniform(k_apply) < prob
    lam = jnp.where(apply, lam, 1.0)
    mixed = jnp.where(apply, mixed, video)
    return mixed, lam * y1 + (1.0 - lam) * y1[::-1]
