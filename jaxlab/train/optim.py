"""Optimizers from config: optax chains with schedules, clipping and weight-decay masks."""

from __future__ import annotations

import jax
import optax

from jaxlab.config import Config, ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "warmup_poly")


def default_optimizer_config() -> Config:
    return Config(
        name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.9,
        schedule="constant", warmup_steps=0, end_lr=0.0, poly_power=1.0, grad_clip_norm=0.0,
    )


def make_schedule(cfg: Config, total_steps: int) -> optax.Schedule:
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={cfg.schedule!r} is not one of {SCHEDULES}")
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1), alpha=cfg.end_lr / cfg.lr)
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, cfg.warmup_steps, cfg.warmup_steps + decay_steps, cfg.end_lr
        )
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    poly = optax.polynomial_schedule(cfg.lr, cfg.end_lr, cfg.poly_power, decay_steps)
    return optax.join_schedules([warmup, poly], [cfg.warmup_steps])


def decay_mask(params):
    """Weight decay on matrices/kernels only (not biases, norms, embeddings of rank 1)."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={cfg.name!r} is not one of {OPTIMIZERS}")
    lr = make_schedule(cfg, total_steps)
    if cfg.name == "adam":
        opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        if cfg.weight_decay:  # L2 added to the gradient, as torch.optim.Adam(weight_decay=...) does
            opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    elif cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=decay_mask)
    elif cfg.name == "sgd":
        opt = optax.sgd(lr)
    else:
        opt = optax.sgd(lr, momentum=cfg.momentum)
    if cfg.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
    return opt
