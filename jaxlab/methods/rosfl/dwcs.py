"""Dynamic weight correction strategy (DWCS, rosfl.md; DC-SFL main.py `DWCS`), after aggregation.

At round t >= 1 (rounds counted from 0, as the released code's `com_iter`), for each corrected part
with aggregated weights w_t and stored weights w_prev:
    temp = w_t - step of the persistent optimizer on grad (mu / 2) ||temp - w_prev||^2 = mu (w_t - w_prev)
    alpha = min(1 - 1 / t, 0.99);  w = (1 - alpha) w_t + alpha temp;  w_prev <- w.
Round 0 applies nothing and leaves w_prev at the initial weights (the released code's `pre_*` models are
copies of the initial models until the first DWCS). The optimizer is torch-style Adam (L2 weight decay
added to the gradient), lr 1e-4, wd 1e-8, one state per part that persists over rounds.

Released-code flag: DC-SFL's head and tail compare a model with itself, so their correction gradient
is zero and only the body is corrected (`parts=("body",)`); the default corrects all three parts. A part
left out keeps w_t and still stores it as w_prev (the released `Change_premodels` copies every part).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
PART_NAMES = ("head", "body", "tail")


def torch_adam(lr: float = 1e-4, weight_decay: float = 1e-8) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, weight_decay): L2 decay added to the gradient, then Adam."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))


class DWCSState(NamedTuple):
    """previous: w_{t-1} per part; opt_state: the correction optimizer's state per part."""

    previous: list
    opt_state: list


def init(params: Sequence[PyTree], tx: optax.GradientTransformation) -> DWCSState:
    return DWCSState(list(params), [tx.init(p) for p in params])


def alpha(t: jax.Array) -> jax.Array:
    """min(1 - 1/t, 0.99) for round t >= 1."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.minimum(1.0 - 1.0 / jnp.maximum(t, 1.0), 0.99)


def correct_part(w: PyTree, previous: PyTree, opt_state: PyTree, t: jax.Array, tx: optax.GradientTransformation,
                 mu: float) -> tuple[PyTree, PyTree]:
    """(corrected weights, new optimizer state) of one part; see the module docstring."""
    grad = jax.tree.map(lambda a, b: mu * (a - b), w, previous)
    updates, opt_state = tx.update(grad, opt_state, w)
    temp = optax.apply_updates(w, updates)
    a = alpha(t)
    return jax.tree.map(lambda x, y: (1 - a) * x + a * y, w, temp), opt_state


def apply(params: Sequence[PyTree], state: DWCSState, t: jax.Array, tx: optax.GradientTransformation, *,
          mu: float = 1e-4, parts: Sequence[str] = PART_NAMES,
          names: Sequence[str] = PART_NAMES) -> tuple[list, DWCSState]:
    """DWCS on every part named in `parts` when t >= 1; identity (state unchanged) at t = 0."""
    unknown = set(parts) - set(names)
    if unknown:
        raise ValueError(f"DWCS parts {sorted(unknown)} are not among the model's parts {list(names)}")

    def corrected(_):
        new_params, new_opt = [], []
        for name, w, prev, opt in zip(names, params, state.previous, state.opt_state):
            if name in parts:
                w, opt = correct_part(w, prev, opt, t, tx, mu)
            new_params.append(w)
            new_opt.append(opt)
        return new_params, DWCSState(new_params, new_opt)

    def skipped(_):
        return list(params), state

    return jax.lax.cond(jnp.asarray(t) >= 1, corrected, skipped, None)
