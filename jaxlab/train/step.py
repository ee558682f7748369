"""Step builders: `step(state, batch, rng) -> (state, metrics)`, jit-compiled once with the state donated.

A method supplies `loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))` and
`eval_fn(params, model_state, batch, rng) -> {name: per-example values (B,)}`; everything else is here:
gradient accumulation over microbatches, bf16 compute with float32 master params, non-finite detection
(a non-finite step leaves the state untouched and reports finite=False), sharding and donation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlab.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]]
EvalFn = Callable[..., dict[str, jax.Array]]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"compute_dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def cast_floating(tree, dtype):
    """Casts floating leaves to dtype; integer leaves (labels, indices) stay as they are."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, tree)


def split_microbatches(batch, accum_steps: int):
    """(B, ...) -> (accum_steps, B // accum_steps, ...), microbatch i = rows i, i+A, i+2A, ...

    The strided split keeps every device's rows on that device when the batch is sharded on axis 0.
    """
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {accum_steps} microbatches")
        return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(split, batch)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    accum_steps: int = 1,
    dtype=jnp.float32,
    grad_fn: Callable[..., Any] | None = None,
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted step; see `jit_train_step` for the compiled, sharded, donated form.

    grad_fn(params, model_state, batch, rng) -> ((loss, (model_state, metrics)), grads) replaces
    jax.value_and_grad(loss_fn) for methods that compute gradients their own way (split learning: vjp
    at the cut); it must give the gradients of loss_fn.
    """

    def micro_loss(params, model_state, batch, rng):
        loss, (model_state, metrics) = loss_fn(
            cast_floating(params, dtype), model_state, cast_floating(batch, dtype), rng
        )
        return loss.astype(jnp.float32), (model_state, metrics)

    if grad_fn is None:
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    else:
        custom = grad_fn

        def grad_fn(params, model_state, batch, rng):
            compute_params = cast_floating(params, dtype)
            (loss, aux), grads = custom(compute_params, model_state, cast_floating(batch, dtype), rng)
            grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
            return (loss.astype(jnp.float32), aux), grads

    def accumulate(params, model_state, batch, rng):
        if accum_steps == 1:
            return grad_fn(params, model_state, batch, rng)

        def body(carry, xs):
            grad_sum, model_state = carry
            index, micro = xs
            (loss, (model_state, metrics)), grads = grad_fn(
                params, model_state, micro, jax.random.fold_in(rng, index)
            )
            grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
            return (grad_sum, model_state), (loss, metrics)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        xs = (jnp.arange(accum_steps), split_microbatches(batch, accum_steps))
        (grad_sum, model_state), (losses, metrics) = jax.lax.scan(body, (zeros, model_state), xs)
        grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grad_sum)
        metrics = jax.tree_util.tree_map(lambda m: m.mean(0), metrics)
        return (losses.mean(), (model_state, metrics)), grads

    def step(state: TrainState, batch, rng):
        (loss, (model_state, metrics)), grads = accumulate(state.params, state.model_state, batch, rng)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            model_state=keep(model_state, state.model_state),
        )
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}
        return new_state, metrics

    return step


def jit_train_step(step_fn, state_sharding, batch_sharding):
    """Compiles once: state in/out with `state_sharding`, batch split on the data axis, state donated."""
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding, None),
        out_shardings=(state_sharding, None),
        donate_argnums=0,
    )


def make_eval_step(eval_fn: EvalFn, *, dtype=jnp.float32):
    """`eval_step(state, batch, rng) -> {name: masked sum}` plus `count`; batch['mask'] marks real rows."""

    def eval_step(state: TrainState, batch, rng):
        batch = dict(batch)
        mask = batch.pop("mask")
        values = eval_fn(cast_floating(state.params, dtype), state.model_state, cast_floating(batch, dtype), rng)
        sums = {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in values.items()}
        sums["count"] = mask.sum()
        return sums

    return jax.jit(eval_step)
