"""jaxlab.train.optim against hand-computed values: every schedule at chosen steps, the weight-decay mask
(adamw), Adam's L2 weight decay, clipping by global norm, momentum, and errors for unknown names."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.config import ConfigError
from jaxlab.train.optim import decay_mask, default_optimizer_config, make_optimizer, make_schedule


def _cfg(**kwargs):
    cfg = default_optimizer_config()
    cfg.update(**kwargs)
    return cfg


def _values(schedule, steps):
    return [float(schedule(jnp.asarray(t))) for t in steps]


def _step(cfg, params, grads, total_steps=100, steps=1):
    """params after `steps` updates with the same grads."""
    tx = make_optimizer(cfg, total_steps)
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


# --- schedules --------------------------------------------------------------------------------------------


def test_constant_schedule():
    assert _values(make_schedule(_cfg(lr=0.1), 100), [0, 50, 100, 1000]) == pytest.approx([0.1] * 4)


def test_cosine_schedule():
    """lr * ((1 - a) * (1 + cos(pi t / T)) / 2 + a), a = end_lr / lr, held at end_lr after T."""
    s = make_schedule(_cfg(lr=0.1, schedule="cosine", end_lr=0.01), 100)
    expected = [0.1, 0.1 * (0.9 * 0.5 * (1 + math.cos(math.pi / 4)) + 0.1), 0.055, 0.01, 0.01]
    assert _values(s, [0, 25, 50, 100, 200]) == pytest.approx(expected, rel=1e-6)


def test_warmup_cosine_schedule():
    """Linear from 0 to lr over warmup_steps, then cosine from lr to end_lr over the remaining steps."""
    s = make_schedule(_cfg(lr=0.1, schedule="warmup_cosine", warmup_steps=10, end_lr=0.01), 100)
    # t = 32.5: (t - 10) / 90 = 1/4 of the cosine
    expected = [0.0, 0.05, 0.1, 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi / 4)), 0.055, 0.01]
    assert _values(s, [0, 5, 10, 32.5, 55, 100]) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_warmup_poly_schedule():
    """Linear warm-up, then (lr - end) * (1 - (t - w) / (T - w)) ** power + end."""
    s = make_schedule(_cfg(lr=0.1, schedule="warmup_poly", warmup_steps=10, end_lr=0.0, poly_power=2.0), 110)
    expected = [0.0, 0.02, 0.1, 0.1 * 0.5**2, 0.1 * 0.25**2, 0.0, 0.0]
    assert _values(s, [0, 2, 10, 60, 85, 110, 500]) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # without warm-up the polynomial starts at lr on step 0; power 1 with end_lr is a straight line
    s = make_schedule(_cfg(lr=0.1, schedule="warmup_poly", end_lr=0.02), 100)
    assert _values(s, [0, 50, 100]) == pytest.approx([0.1, 0.06, 0.02], rel=1e-6)


def test_piecewise_schedule_drops_by_the_scale_at_each_boundary():
    """lr until the first boundary step, then x boundary_scale at each (the official AV code's x0.1 drops)."""
    s = make_schedule(_cfg(lr=0.1, schedule="piecewise", boundaries=(10, 30), boundary_scale=0.1), 100)
    assert _values(s, [0, 9, 10, 29, 30, 99]) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-6)
    for bad in ((), (30, 10), (0, 5), (5, 5)):
        with pytest.raises(ConfigError, match="increasing positive step numbers"):
            make_schedule(_cfg(schedule="piecewise", boundaries=bad), 100)


# --- weight decay -----------------------------------------------------------------------------------------


def test_decay_mask_is_rank_above_one():
    params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "conv": jnp.ones((3, 1, 2, 4)),
              "scale": jnp.ones(())}
    assert decay_mask(params) == {"dense": {"kernel": True, "bias": False}, "conv": True, "scale": False}


def test_adamw_decays_kernels_by_lr_wd_w_and_leaves_biases():
    """With zero gradients Adam's update is 0, so a step is the decoupled decay alone: kernel
    w - lr * wd * w, bias untouched."""
    lr, wd = 0.1, 0.01
    w = np.array([[1.0, -2.0, 3.0], [0.5, 0.0, -4.0]], np.float32)
    b = np.array([1.0, -1.0, 2.0], np.float32)
    params = {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    out = _step(_cfg(name="adamw", lr=lr, weight_decay=wd), params, zeros)
    np.testing.assert_allclose(out["kernel"], w - lr * wd * w, rtol=1e-6)
    np.testing.assert_array_equal(out["bias"], b)


def test_adam_weight_decay_is_l2_added_to_the_gradient():
    """torch.optim.Adam(weight_decay=wd): g' = g + wd * p on every parameter (biases too); first step
    p - lr * m_hat / (sqrt(v_hat) + eps) with m_hat = g', v_hat = g'^2."""
    lr, wd, eps = 0.01, 0.1, 1e-8
    p = {"kernel": np.array([[1.0, -2.0], [3.0, 0.5]], np.float32), "bias": np.array([2.0, -1.0], np.float32)}
    g = {"kernel": np.array([[-0.05, 0.5], [0.0, -0.01]], np.float32), "bias": np.array([-0.1, 0.0], np.float32)}
    out = _step(_cfg(name="adam", lr=lr, weight_decay=wd, eps=eps), jax.tree_util.tree_map(jnp.asarray, p),
                jax.tree_util.tree_map(jnp.asarray, g))
    for k, p_k in p.items():
        g_l2 = g[k] + wd * p_k  # kernel[0, 0]: -0.05 + 0.1 = +0.05, the decay flips the step's sign
        np.testing.assert_allclose(out[k], p_k - lr * g_l2 / (np.abs(g_l2) + eps), rtol=1e-6)
    no_decay = _step(_cfg(name="adam", lr=lr, eps=eps), jax.tree_util.tree_map(jnp.asarray, p),
                     jax.tree_util.tree_map(jnp.asarray, g))
    assert float(no_decay["kernel"][0, 0]) == pytest.approx(1.0 + lr, rel=1e-6)


# --- clipping and momentum ---------------------------------------------------------------------------------


def test_clip_by_global_norm():
    """Gradients with global norm 5 (3, 4 over two leaves) clipped to norm 1 before SGD at lr 1."""
    params = {"a": jnp.zeros(2), "b": jnp.zeros((1, 2))}
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[0.0, 4.0]])}
    out = _step(_cfg(name="sgd", lr=1.0, grad_clip_norm=1.0), params, grads)
    np.testing.assert_allclose(out["a"], [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [[0.0, -0.8]], rtol=1e-6)
    # under the threshold nothing changes: norm 5 < 10
    out = _step(_cfg(name="sgd", lr=1.0, grad_clip_norm=10.0), params, grads)
    np.testing.assert_allclose(out["a"], [-3.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [[0.0, -4.0]], rtol=1e-6)


def test_momentum_two_steps():
    """Heavy ball: v1 = g, v2 = g + m * v1; p2 = p0 - lr * (v1 + v2)."""
    lr, m = 0.1, 0.9
    out = _step(_cfg(name="momentum", lr=lr, momentum=m), {"w": jnp.array([1.0])}, {"w": jnp.array([2.0])},
                steps=2)
    np.testing.assert_allclose(out["w"], [1.0 - lr * (2.0 + (2.0 + m * 2.0))], rtol=1e-6)


# --- errors -----------------------------------------------------------------------------------------------


def test_unknown_names_raise_config_error():
    with pytest.raises(ConfigError, match=r"optimizer.name='adamx'.*adamw"):
        make_optimizer(_cfg(name="adamx"), 10)
    with pytest.raises(ConfigError, match=r"optimizer.schedule='linear'.*warmup_cosine"):
        make_schedule(_cfg(schedule="linear"), 10)
    with pytest.raises(ConfigError, match=r"optimizer.schedule='linear'"):
        make_optimizer(_cfg(schedule="linear"), 10)
