"""DP-SGD transformations (clipping bounds each example, noise scale) and the RDP accountant."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp

from jaxlab.federated import clients as C
from jaxlab.federated import dp
from jaxlab.federated.algorithms import fedavg, plan_round, round_batch

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 5)), jnp.float32)
Y = jnp.asarray(RNG.integers(0, 3, 16), jnp.int32)
PARAMS = {"w": jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}


def loss_fn(p, model_state, batch, _rng):
    logits = batch["x"] @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), (model_state, {})


def plain_loss(p, batch):
    return loss_fn(p, {}, batch, None)[0]


def test_per_example_grads_match_single_example_grads():
    loss, g = dp.per_example_grads(loss_fn)(PARAMS, {}, {"x": X, "y": Y}, None)
    for i in (0, 7):
        gi = jax.grad(plain_loss)(PARAMS, {"x": X[i : i + 1], "y": Y[i : i + 1]})
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a[i], b, atol=1e-6), g, gi)
    np.testing.assert_allclose(loss, plain_loss(PARAMS, {"x": X, "y": Y}), rtol=1e-6)
    with pytest.raises(ValueError, match="stateless"):
        dp.per_example_grads(loss_fn)(PARAMS, {"batch_stats": {"m": jnp.zeros(3)}}, {"x": X, "y": Y}, None)


def test_clipping_bounds_each_examples_contribution():
    c = 0.5
    x = X.at[3].mul(1e4)  # one example with a huge gradient
    _, g = dp.per_example_grads(loss_fn)(PARAMS, {}, {"x": x, "y": Y}, None)
    assert float(dp.global_norms(g)[3]) > 10 * c
    clipped, _ = dp.clip_per_example(c).update(g, optax.EmptyState())
    assert np.all(np.asarray(dp.global_norms(clipped)) <= c * (1 + 1e-5))
    small = np.asarray(dp.global_norms(g)) < c  # examples under the bound are untouched
    np.testing.assert_allclose(np.asarray(clipped["w"])[small], np.asarray(g["w"])[small])
    # with no noise, removing any one example moves the summed gradient by at most C
    tx = dp.dp_aggregate(c, 0.0)
    total = lambda pe: jax.tree_util.tree_map(lambda v: v * pe["w"].shape[0], tx.update(pe, tx.init(None))[0])
    full = total(g)
    for i in range(16):
        rest = total(jax.tree_util.tree_map(lambda v, i=i: jnp.delete(v, i, axis=0), g))
        diff = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(full),
                                                                      jax.tree_util.tree_leaves(rest))))
        assert float(diff) <= c * (1 + 1e-5)


def test_noise_has_std_sigma_c_over_b():
    c, sigma, b = 2.0, 1.5, 8
    zeros = {"w": jnp.zeros((b, 200, 50))}
    tx = dp.gaussian_noise_mean(c, sigma, seed=3)
    state = tx.init(None)
    out1, state = tx.update(zeros, state)
    out2, _ = tx.update(zeros, state)
    np.testing.assert_allclose(np.std(out1["w"]), sigma * c / b, rtol=0.03)
    assert not np.allclose(out1["w"], out2["w"])  # the key advances


def test_dp_fedavg_round_equals_loop_and_dp_sgd_steps():
    """The round equals a per-client loop of the client function, and one client's local steps equal
    DP-SGD written out: clip each example to C, sum, add sigma C z (z from the engine's step key), / B."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = rng.integers(0, 3, 60).astype(np.int32)
    parts = [np.arange(0, 20), np.arange(20, 32), np.arange(32, 60)]
    data = C.stack_client_data({"x": x, "y": y}, parts, batch_size=8)
    clip_c, sigma, lr = 1.0, 1.0, 0.1
    alg = fedavg.build(loss_fn, optax.sgd(lr), grad_fn=dp.dp_grad_fn(loss_fn, clip_c, sigma), chunk_size=2)
    state = alg.init(PARAMS, {}, 3)
    round_rng = C.round_key(5, 0)
    new, _ = jax.jit(alg.round)(state, round_batch(data, plan_round(5, 0, 3)), round_rng)
    step = jax.jit(alg.client_update)
    empty = {"params": {}, "model_state": {}}
    outs = [step(alg.broadcast(state), empty, jax.tree_util.tree_map(lambda a, k=k: a[k], data),
                 jax.random.fold_in(round_rng, k))[1] for k in range(3)]
    w = np.array([20.0, 12.0, 28.0]) / 60.0
    want = jax.tree_util.tree_map(lambda p, *d: p + sum(wi * di for wi, di in zip(w, d)),
                                  PARAMS, *[o.update["params"] for o in outs])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), new.params, want)
    # client 1 (12 examples: 2 steps of 8) by hand
    p = jax.tree_util.tree_map(np.asarray, PARAMS)
    client_rng = jax.random.fold_in(round_rng, 1)
    for s in range(2):
        batch = {"x": data.batches["x"][1, s], "y": data.batches["y"][1, s]}
        _, noise_key = jax.random.split(jax.random.fold_in(client_rng, s))
        per = [jax.grad(plain_loss)(p, {"x": batch["x"][i : i + 1], "y": batch["y"][i : i + 1]}) for i in range(8)]
        norms = [np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree_util.tree_leaves(g))) for g in per]
        total = jax.tree_util.tree_map(
            lambda *gs: sum(np.asarray(g) * min(1.0, clip_c / n) for g, n in zip(gs, norms)), *per)
        leaves, treedef = jax.tree_util.tree_flatten(total)
        keys = jax.random.split(noise_key, len(leaves))
        noisy = [(t + sigma * clip_c * np.asarray(jax.random.normal(k, t.shape))) / 8 for t, k in zip(leaves, keys)]
        p = jax.tree_util.tree_map(lambda a, g: a - lr * g, p, jax.tree_util.tree_unflatten(treedef, noisy))
    delta = jax.tree_util.tree_map(lambda a, b: a - np.asarray(b), p, PARAMS)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), outs[1].update["params"], delta)


def direct_rdp(q, sigma, alpha):
    """log E_{z~N(0,s^2)}[((1-q) + q exp((2z-1)/(2 s^2)))^alpha] / (alpha-1): the definition of the
    Renyi divergence of the sampled Gaussian, integrated on a fine grid in log space (trapezoid rule,
    spectrally accurate for this smooth, fast-decaying integrand)."""
    z = np.linspace(-60 * sigma, alpha + 60 * sigma, 2_000_001)
    log_ratio = np.logaddexp(np.log1p(-q), np.log(q) + (2 * z - 1) / (2 * sigma**2))
    log_f = -(z**2) / (2 * sigma**2) - 0.5 * np.log(2 * np.pi * sigma**2) + alpha * log_ratio
    return (logsumexp(log_f) + np.log(z[1] - z[0])) / (alpha - 1)


@pytest.mark.parametrize("q,sigma", [(0.01, 1.1), (0.1, 2.0), (0.5, 0.8), (0.004, 4.0)])
def test_rdp_matches_direct_numeric_integration(q, sigma):
    orders = [2, 3, 5, 8, 16, 32]
    got = dp.rdp_subsampled_gaussian(q, sigma, orders)
    want = [direct_rdp(q, sigma, a) for a in orders]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)  # the integral is ~1: 1e-11 abs


def test_rdp_closed_forms_and_epsilon_behaviour():
    np.testing.assert_allclose(dp.rdp_subsampled_gaussian(1.0, 2.0, [2, 10]), [2 / 8, 10 / 8])
    np.testing.assert_allclose(dp.rdp_subsampled_gaussian(0.0, 2.0, [2, 10]), [0.0, 0.0])
    # q = 1: epsilon equals the analytic optimum over real alpha of T a/(2 s^2) + log(1/d)/(a-1), up to the grid
    t, s, d = 10, 5.0, 1e-5
    eps, order = dp.epsilon(1.0, s, t, d, orders=range(2, 2000))
    best = min(t * a / (2 * s * s) + np.log(1 / d) / (a - 1) for a in np.linspace(1.01, 2000, 200001))
    assert best <= eps <= best + 1e-2
    base = dp.epsilon(0.01, 1.1, 1000, 1e-5)[0]
    assert dp.epsilon(0.01, 1.1, 2000, 1e-5)[0] > base  # more steps, more epsilon
    assert dp.epsilon(0.01, 2.0, 1000, 1e-5)[0] < base  # more noise, less
    assert dp.epsilon(0.02, 1.1, 1000, 1e-5)[0] > base  # larger sampling rate, more
    assert 0.5 < base < 3.0  # the usual DP-SGD regime (MNIST-like: q=0.01, sigma=1.1)
    with pytest.raises(ValueError):
        dp.epsilon(0.01, 1.1, 10, 0.0)
