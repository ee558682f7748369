"""Step builders over a State of named parts: `step(state, batch, rng) -> (state, metrics)`.

`make_train_step` turns a loss over the parts into a train step:
    loss_fn(params, collections, batch, rng) -> (loss, (collections, metrics))
with params = {part: params} and collections = {part: collections} of every part. Gradients are taken
with respect to the parts named in `trains` only (the others enter the loss as constants and are
returned untouched, so a frozen part, or another trainable part in an alternating scheme, provably does
not change in this step); each trained part is updated by its own optimizer. The builder owns gradient
accumulation over microbatches (gradients averaged), bf16 compute with float32 master params and
non-finite detection (a non-finite step leaves the state untouched and reports finite=False).
`sequential` and `alternate` compose steps (a GAN's discriminator and generator updates in one step or
on alternate steps). `jit_train_step` compiles once with the state donated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlab.train.state import State

LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]]
GradFn = Callable[..., tuple[tuple[jax.Array, tuple[Any, dict]], Any]]
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


def tree_where(cond: jax.Array, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(cond, n, o), new, old)


def make_train_step(
    loss_fn: LossFn,
    txs: Mapping[str, optax.GradientTransformation],
    *,
    trains: Sequence[str] | None = None,
    accum_steps: int = 1,
    dtype=jnp.float32,
    grad_fn: GradFn | None = None,
) -> Callable[[State, Any, jax.Array], tuple[State, dict[str, jax.Array]]]:
    """The un-jitted step (see the module docstring); `trains` defaults to every part in `txs`.

    grad_fn(params, collections, batch, rng) -> ((loss, (collections, metrics)), grads of the trained
    parts) replaces jax.value_and_grad(loss_fn) for methods that compute gradients their own way (split
    learning: vjp at the cut); it must give the gradients of loss_fn.
    """
    trains = tuple(txs if trains is None else trains)
    missing = [name for name in trains if name not in txs]
    if missing:
        raise ValueError(f"parts {missing} are trained but have no optimizer; optimizers: {sorted(txs)}")

    def micro_grads(params, collections, batch, rng):
        """((loss, (collections, metrics)), grads) of one microbatch at compute dtype."""
        trained = {n: params[n] for n in trains}
        fixed = {n: jax.lax.stop_gradient(p) for n, p in params.items() if n not in trains}
        batch = cast_floating(batch, dtype)
        if grad_fn is not None:
            all_params = cast_floating({**fixed, **trained}, dtype)
            (loss, aux), grads = grad_fn(all_params, collections, batch, rng)
            grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, trained)
            return (loss.astype(jnp.float32), aux), grads

        def loss_of_trained(trained):
            all_params = cast_floating({**fixed, **trained}, dtype)
            loss, aux = loss_fn(all_params, collections, batch, rng)
            return loss.astype(jnp.float32), aux

        return jax.value_and_grad(loss_of_trained, has_aux=True)(trained)

    def accumulate(params, collections, batch, rng):
        if accum_steps == 1:
            return micro_grads(params, collections, batch, rng)

        def body(carry, xs):
            grad_sum, collections = carry
            index, micro = xs
            (loss, (collections, metrics)), grads = micro_grads(
                params, collections, micro, jax.random.fold_in(rng, index))
            return (jax.tree_util.tree_map(jnp.add, grad_sum, grads), collections), (loss, metrics)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, {n: params[n] for n in trains})
        xs = (jnp.arange(accum_steps), split_microbatches(batch, accum_steps))
        (grad_sum, collections), (losses, metrics) = jax.lax.scan(body, (zeros, collections), xs)
        grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grad_sum)
        metrics = jax.tree_util.tree_map(lambda m: m.mean(0), metrics)
        return (losses.mean(), (collections, metrics)), grads

    def step(state: State, batch, rng):
        params = state.params
        collections = {n: p.collections for n, p in state.parts.items()}
        (loss, (new_collections, metrics)), grads = accumulate(params, collections, batch, rng)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        parts = dict(state.parts)
        for name in trains:
            part = state.parts[name]
            updates, opt_state = txs[name].update(grads[name], part.opt_state, part.params)
            new = part.replace(params=optax.apply_updates(part.params, updates), opt_state=opt_state)
            parts[name] = tree_where(finite, new, part)
        for name, part in parts.items():
            if name in new_collections:
                parts[name] = part.replace(collections=tree_where(finite, new_collections[name], part.collections))
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}
        return state.replace(step=state.step + 1, parts=parts), metrics

    return step


def sequential(**steps) -> Callable[[State, Any, jax.Array], tuple[State, dict[str, jax.Array]]]:
    """One step running each named step in order on the same batch (a GAN's discriminator then generator
    update); each gets its own key, metrics are prefixed with the step's name, the step counter advances
    once and "finite" is the AND of all."""

    def step(state: State, batch, rng):
        metrics, finite, start = {}, jnp.asarray(True), state.step
        for index, (name, fn) in enumerate(steps.items()):
            state, m = fn(state, batch, jax.random.fold_in(rng, index))
            finite = finite & m.pop("finite", jnp.asarray(True))
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
        return state.replace(step=start + 1), {**metrics, "finite": finite}

    return step


def alternate(*steps) -> Callable[[State, Any, jax.Array], tuple[State, dict[str, jax.Array]]]:
    """Step t runs steps[t % len(steps)] (alternating updates); every branch reports the union of the
    branches' metric names (zeros for the names it does not compute).

    One compiled program holds every branch in a lax.switch. On XLA CPU the convolutions inside a
    conditional (as inside a while loop) run several times slower than at top level: measured on AV-Net
    (av_net's tiny config), a switch of two objectives took 0.56-0.97 s a step against 0.21 s for both
    objectives one after the other. Conv-heavy methods on CPU prefer `sequential` (each step updates
    every part in turn), as av_net and av_inpainting do by default."""

    def step(state: State, batch, rng):
        shapes = [jax.eval_shape(fn, state, batch, rng)[1] for fn in steps]
        names = sorted({k for s in shapes for k in s})
        template = {k: next(s[k] for s in shapes if k in s) for k in names}

        def branch(fn):
            def run(state):
                new, m = fn(state, batch, rng)
                return new, {k: m[k] if k in m else jnp.zeros(t.shape, t.dtype) for k, t in template.items()}
            return run

        return jax.lax.switch(state.step % len(steps), [branch(fn) for fn in steps], state)

    return step


def jit_train_step(step_fn, state_sharding, batch_sharding):
    """Compiles once: state in/out with `state_sharding`, the batch with `batch_sharding`, state donated."""
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding, None),
        out_shardings=(state_sharding, None),
        donate_argnums=0,
    )


def make_masked_eval(eval_step):
    """Jitted `(state, batch, rng) -> {name: masked sum}` plus `count` from a method's eval step
    `(state, batch, rng) -> {name: (B,) values}`; batch['mask'] marks real rows."""

    def masked(state, batch, rng):
        batch = dict(batch)
        mask = batch.pop("mask")
        values = eval_step(state, batch, rng)
        sums = {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in values.items()}
        sums["count"] = mask.sum()
        return sums

    return jax.jit(masked)
