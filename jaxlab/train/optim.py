"""Optimizers from config: optax chains with schedules, clipping, weight-decay masks and per-parameter
learning-rate rules.

Several parts, several optimizers: `config.optimizer` holds the defaults, and a section named after a
part overrides any of its keys for that part (`--config.optimizer.discriminator.lr=4e-4`);
`part_optimizer(config.optimizer, "discriminator", steps)` builds it.

Per-parameter rules act on the update of each parameter, addressed by its '/'-joined path
("encoder/blocks_3/attn/qkv/kernel"), after the whole chain (so decoupled weight decay is scaled too,
as a per-group lr is in PyTorch):
- lr_rules: ((regex, multiplier), ...): the first rule whose regex `re.search`es the path sets the
  multiplier (0 freezes the parameter, 10 gives a head ten times the lr); unmatched: 1.
- layer_decay (0 = off): layer-wise lr decay (BEiT / VideoMAE fine-tuning): a parameter in block i
  (layer_pattern's first group) gets decay ** (L - i), one in an embedding (embed_pattern) decay ** (L + 1),
  any other (the head, the final norm) 1, where L = the number of blocks.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlab.config import Config, ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "warmup_poly", "piecewise")


def default_optimizer_config() -> Config:
    return Config(
        name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.9,
        schedule="constant", warmup_steps=0, end_lr=0.0, poly_power=1.0, grad_clip_norm=0.0,
        boundaries=(), boundary_scale=0.1,  # schedule="piecewise": lr x boundary_scale at each boundary step
        lr_rules=(), layer_decay=0.0, layer_pattern=r"(?:^|/)blocks?_(\d+)(?:/|$)",
        embed_pattern=r"embed|cls_token|pos_",
    )


def make_schedule(cfg: Config, total_steps: int) -> optax.Schedule:
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={cfg.schedule!r} is not one of {SCHEDULES}")
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "piecewise":  # lr, then x boundary_scale at each boundary step (step-decay recipes)
        boundaries = [int(b) for b in cfg.boundaries]
        if not boundaries or boundaries != sorted(set(boundaries)) or boundaries[0] <= 0:
            raise ConfigError(f"optimizer.boundaries={tuple(cfg.boundaries)!r}: schedule='piecewise' needs "
                              "increasing positive step numbers")
        return optax.piecewise_constant_schedule(cfg.lr, {b: float(cfg.boundary_scale) for b in boundaries})
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
    rules = lr_rules_of(cfg)
    if rules is not None:
        opt = optax.chain(opt, scale_by_path(rules))
    return opt


def part_config(cfg: Config, part: str) -> Config:
    """The optimizer section of `part`: the defaults of cfg with cfg[part]'s keys (if any) on top."""
    out = Config({k: v for k, v in cfg.items() if not isinstance(v, Config)})
    own = cfg.get(part)
    if isinstance(own, Config):
        for key, value in own.items():
            if key not in out:
                raise ConfigError(f"optimizer.{part}.{key} is not an optimizer key; valid: {sorted(out)}")
            out[key] = value
    return out


def part_optimizer(cfg: Config, part: str, total_steps: int) -> optax.GradientTransformation:
    """The optimizer of one part of the state (see the module docstring)."""
    return make_optimizer(part_config(cfg, part), total_steps)


def path_name(path) -> str:
    """'/'-joined names of a tree path: ('encoder', 'blocks_3', 'kernel') -> 'encoder/blocks_3/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def lr_rules_of(cfg: Config):
    """A function path -> multiplier from cfg.lr_rules and cfg.layer_decay, or None if neither is set."""
    rules = [(re.compile(pattern), float(mult)) for pattern, mult in cfg.get("lr_rules", ())]
    decay = float(cfg.get("layer_decay", 0.0))
    if not rules and not decay:
        return None
    if decay and not 0.0 < decay <= 1.0:
        raise ConfigError(f"optimizer.layer_decay={decay} must be in (0, 1] (0 = off)")
    layer_re, embed_re = re.compile(cfg.layer_pattern), re.compile(cfg.embed_pattern)
    return LrRules(tuple(rules), decay, layer_re, embed_re)


class LrRules:
    """path -> learning-rate multiplier (module docstring); num_layers is read off the tree's paths."""

    def __init__(self, rules, decay, layer_re, embed_re):
        self.rules, self.decay, self.layer_re, self.embed_re = rules, decay, layer_re, embed_re

    def multipliers(self, params):
        paths = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        layers = [m for m in (self.layer_re.search(p) for p in paths) if m]
        num_layers = max((int(m.group(1)) for m in layers), default=-1) + 1

        def multiplier(path):
            name = path_name(path)
            for regex, mult in self.rules:
                if regex.search(name):
                    return mult
            if self.decay:
                if m := self.layer_re.search(name):
                    return self.decay ** (num_layers - int(m.group(1)))
                if self.embed_re.search(name):
                    return self.decay ** (num_layers + 1)
            return 1.0

        return jax.tree_util.tree_map_with_path(lambda p, _: multiplier(p), params)


class ScaleByPathState(NamedTuple):
    pass


def scale_by_path(rules: LrRules) -> optax.GradientTransformation:
    """Multiplies each parameter's update by its path's multiplier (LrRules); frozen (0) leaves get
    exact zeros."""

    def init(params):
        del params
        return ScaleByPathState()

    def update(updates, state, params=None):
        mults = rules.multipliers(updates)
        return jax.tree_util.tree_map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults), state

    return optax.GradientTransformation(init, update)
