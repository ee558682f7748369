"""The single-model supervised path as a small helper on the method contract.

    return supervised(config, name="ecg_cnn", init=init, loss_fn=loss_fn, eval_fn=eval_fn,
                      apply_fn=apply_fn, train_source=..., eval_source=..., transform=...)

init(rng, example_batch) -> flax variables; loss_fn(params, model_state, batch, rng) ->
(loss, (model_state, metrics)); eval_fn(params, model_state, batch, rng) -> {name: (B,) values};
apply_fn(variables, batch) -> outputs. The state holds one part, "model", trained by the optimizer of
config.optimizer, with config.train's gradient accumulation and compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxlab.train.method import Method
from jaxlab.train.optim import part_optimizer
from jaxlab.train.state import Part, State, split_variables
from jaxlab.train.step import cast_floating, compute_dtype, make_train_step

MODEL = "model"


def supervised(
    config,
    *,
    name: str,
    init: Callable[[jax.Array, dict], dict],
    loss_fn: Callable[..., Any],
    eval_fn: Callable[..., dict],
    apply_fn: Callable[..., Any],
    train_source,
    eval_source=None,
    transform=None,
    grad_fn: Callable[..., Any] | None = None,
) -> Method:
    """A Method with one part "model" (see the module docstring). grad_fn(params, model_state, batch,
    rng) -> ((loss, (model_state, metrics)), grads) replaces value_and_grad(loss_fn) (split learning)."""
    tx = part_optimizer(config.optimizer, MODEL, config.train.steps)
    dtype = compute_dtype(config.train.compute_dtype)

    def init_state(rng, batch):
        params, model_state = split_variables(init(rng, batch))
        return State.create({MODEL: Part.create(params, tx, model_state)})

    def parts_loss(params, collections, batch, rng):
        loss, (model_state, metrics) = loss_fn(params[MODEL], collections[MODEL], batch, rng)
        return loss, ({MODEL: model_state}, metrics)

    parts_grad = None
    if grad_fn is not None:
        def parts_grad(params, collections, batch, rng):
            (loss, (model_state, metrics)), grads = grad_fn(params[MODEL], collections[MODEL], batch, rng)
            return (loss, ({MODEL: model_state}, metrics)), {MODEL: grads}

    train_step = make_train_step(parts_loss, {MODEL: tx}, accum_steps=config.train.accum_steps,
                                 dtype=dtype, grad_fn=parts_grad)

    def eval_step(state, batch, rng):
        model = state.parts[MODEL]
        return eval_fn(cast_floating(model.params, dtype), model.collections, cast_floating(batch, dtype), rng)

    def state_apply(state, batch):
        model = state.parts[MODEL]
        return apply_fn({"params": model.params, **model.collections}, batch)

    return Method(
        name=name, init_state=init_state, train_step=train_step, train_source=train_source,
        eval_source=eval_source, eval_step=eval_step, transform=transform, apply_fn=state_apply,
        param_groups=lambda state: dict(state.parts[MODEL].params),
    )
