"""Gaussian DP-SGD for FL clients (optax-style transformations) and an RDP accountant.

DP-SGD (Abadi et al. 2016) on a batch of B examples: per-example gradients g_i, each clipped to L2 norm
<= C (over the whole parameter tree), summed, Gaussian noise N(0, (sigma C)^2 I) added, divided by B:

    g = (sum_i g_i * min(1, C / ||g_i||) + sigma C z) / B,   z ~ N(0, I)

Pieces:
- `per_example_grads(loss_fn)`: (params, model_state, batch, rng) -> (mean loss, grads with a leading batch
  axis), for loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics)) (the trainer's
  signature; stateless models only: per-example gradients have no place for batch statistics).
- `clip_per_example(C)`: a stateless optax GradientTransformation on per-example grads [B, ...].
- `gaussian_noise_mean(C, sigma, seed)`: sums over the batch axis, adds noise, divides by B; its state
  is a PRNG key (split each update). `dp_aggregate(C, sigma, seed)` = chain of the two; chain it with
  an optimizer: optax.chain(dp_aggregate(1.0, 1.1, 0), optax.sgd(0.1)).
- `dp_grad_fn(loss_fn, C, sigma)`: a grad_fn for fedavg.build(..., grad_fn=...) (or the trainer's
  make_train_step) whose every local step is DP-SGD; noise keys come from the step rng the engine hands
  each step (fold_in of the round, client and step), so no two clients or steps share noise, and the
  vmapped round equals a per-client loop.

Accountant (`rdp_subsampled_gaussian`, `epsilon`): Renyi DP of the sampled Gaussian mechanism (Mironov,
Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3) for
Poisson sampling rate q, noise multiplier sigma and integer orders alpha >= 2:

    A_alpha = sum_{k=0}^{alpha} binom(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))
    RDP(alpha) per step = log(A_alpha) / (alpha - 1),   composed over T steps: T * RDP(alpha)

and (eps, delta) from RDP by eps = min_alpha T RDP(alpha) + log(1/delta) / (alpha - 1) (Mironov 2017,
Prop. 3), the standard conversion (tighter ones exist, e.g. Balle et al. 2020; this one is an upper
bound). q is the probability each example is in a batch; with fixed-size batches drawn by shuffling
(as jaxlab's stack_client_data does) the Poisson analysis is the usual approximation, not a proof.
For FL client-level DP the same formulas apply with q = clients sampled / clients and the update
clipped per client (not implemented here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.special import gammaln, logsumexp

PyTree = Any
DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 64)) + (80, 96, 128, 192, 256, 512, 1024)


def _check_stateless(model_state: PyTree) -> None:
    if jax.tree_util.tree_leaves(model_state):
        raise ValueError("DP-SGD here is for stateless models: per-example gradients have no place for "
                         f"model state (batch statistics); got model state {jax.tree_util.tree_structure(model_state)}")


def per_example_grads(loss_fn: Callable[..., tuple[jax.Array, tuple[PyTree, dict]]]):
    """(params, model_state, batch, rng) -> (mean loss, per-example grads [B, ...]); each example as a
    batch of 1, all with the same rng. loss_fn(params, model_state, batch, rng) -> (loss, (model_state,
    metrics)); model_state must be empty (stateless models)."""

    def one(params, model_state, example, rng):
        batch = jax.tree_util.tree_map(lambda x: x[None], example)
        return jax.value_and_grad(lambda p: loss_fn(p, model_state, batch, rng)[0])(params)

    def fn(params, model_state, batch, rng):
        _check_stateless(model_state)
        losses, grads = jax.vmap(one, in_axes=(None, None, 0, None))(params, model_state, batch, rng)
        return losses.mean(), grads

    return fn


def global_norms(per_example: PyTree) -> jax.Array:
    """[B] L2 norm of each example's gradient over the whole tree."""
    leaves = jax.tree_util.tree_leaves(per_example)
    sq = sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1) for x in leaves)
    return jnp.sqrt(sq)


def clip(per_example: PyTree, l2_norm_clip: float) -> PyTree:
    """Scales each example's gradient to L2 norm <= l2_norm_clip."""
    norms = global_norms(per_example)
    scale = jnp.minimum(1.0, l2_norm_clip / jnp.maximum(norms, 1e-12))
    return jax.tree_util.tree_map(
        lambda x: x * scale.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), per_example
    )


def noisy_mean(clipped: PyTree, key: jax.Array, l2_norm_clip: float, noise_multiplier: float) -> PyTree:
    """(sum over the batch axis + N(0, (sigma C)^2)) / B, independent noise per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(clipped)
    keys = jax.random.split(key, max(len(leaves), 1))
    std = noise_multiplier * l2_norm_clip
    out = [
        (x.sum(0) + std * jax.random.normal(k, x.shape[1:], x.dtype)) / x.shape[0]
        for x, k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def privatize(per_example: PyTree, key: jax.Array, l2_norm_clip: float, noise_multiplier: float) -> PyTree:
    """DP-SGD's gradient: clip each example to C, sum, add N(0, (sigma C)^2), divide by B."""
    return noisy_mean(clip(per_example, l2_norm_clip), key, l2_norm_clip, noise_multiplier)


def clip_per_example(l2_norm_clip: float) -> optax.GradientTransformation:
    """Stateless: per-example grads [B, ...] -> the same, each example's global L2 norm <= C."""
    if l2_norm_clip <= 0:
        raise ValueError(f"l2_norm_clip must be > 0, got {l2_norm_clip}")

    def update(updates, state, params=None):
        del params
        return clip(updates, l2_norm_clip), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class NoiseState(NamedTuple):
    key: jax.Array


def gaussian_noise_mean(
    l2_norm_clip: float, noise_multiplier: float, seed: int = 0
) -> optax.GradientTransformation:
    """Per-example grads [B, ...] -> (sum + N(0, (sigma C)^2)) / B; state: a key, split every update."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")

    def init(params):
        del params
        return NoiseState(jax.random.key(seed))

    def update(updates, state, params=None):
        del params
        key, sub = jax.random.split(state.key)
        return noisy_mean(updates, sub, l2_norm_clip, noise_multiplier), NoiseState(key)

    return optax.GradientTransformation(init, update)


def dp_aggregate(l2_norm_clip: float, noise_multiplier: float, seed: int = 0) -> optax.GradientTransformation:
    """clip_per_example then gaussian_noise_mean: per-example grads in, a DP-SGD gradient out."""
    return optax.chain(
        clip_per_example(l2_norm_clip), gaussian_noise_mean(l2_norm_clip, noise_multiplier, seed)
    )


def dp_grad_fn(loss_fn, l2_norm_clip: float, noise_multiplier: float):
    """grad_fn(params, model_state, batch, rng) -> ((mean loss, (model_state, {})), DP-SGD gradient):
    per-example gradients clipped to l2_norm_clip, summed, N(0, (sigma C)^2) added, divided by B; noise
    keyed by the step rng. For fedavg.build(loss_fn, client_tx, grad_fn=dp_grad_fn(loss_fn, C, sigma))."""
    if l2_norm_clip <= 0:
        raise ValueError(f"l2_norm_clip must be > 0, got {l2_norm_clip}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    pe = per_example_grads(loss_fn)

    def grad_fn(params, model_state, batch, rng):
        data_rng, noise_rng = jax.random.split(rng)
        loss, grads = pe(params, model_state, batch, data_rng)
        return (loss, (model_state, {})), privatize(grads, noise_rng, l2_norm_clip, noise_multiplier)

    return grad_fn


def rdp_subsampled_gaussian(q: float, noise_multiplier: float, orders: Sequence[int] = DEFAULT_ORDERS) -> np.ndarray:
    """Per-step RDP epsilon(alpha) of the Poisson-subsampled Gaussian mechanism at integer orders."""
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate q must be in [0, 1], got {q}")
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    out = []
    for a in orders:
        a = int(a)
        if a < 2:
            raise ValueError(f"orders must be integers >= 2, got {a}")
        if q == 0:
            out.append(0.0)
            continue
        if q == 1:
            out.append(a / (2 * noise_multiplier**2))
            continue
        k = np.arange(a + 1)
        log_binom = gammaln(a + 1) - gammaln(k + 1) - gammaln(a - k + 1)
        terms = log_binom + (a - k) * np.log1p(-q) + k * np.log(q) + (k * k - k) / (2 * noise_multiplier**2)
        out.append(float(logsumexp(terms)) / (a - 1))
    return np.asarray(out)


def epsilon(
    q: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> tuple[float, int]:
    """(epsilon, best order) after `steps` compositions at (q, sigma), for the given delta."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    rdp = steps * rdp_subsampled_gaussian(q, noise_multiplier, orders)
    orders_arr = np.asarray(orders, dtype=np.float64)
    eps = rdp + np.log(1 / delta) / (orders_arr - 1)
    i = int(np.argmin(eps))
    return float(eps[i]), int(orders_arr[i])
