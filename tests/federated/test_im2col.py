"""im2col convs: same params and (to float rounding) same values/grads as flax's conv; rounds agree."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.federated import algorithms as F
from jaxlab.federated import clients as C
from jaxlab.federated.im2col import conv1d_im2col, im2col_convs, with_conv_impl
from jaxlab.models.cnn1d import ECGSplitCNN

X = jnp.asarray(np.random.default_rng(0).random((6, 128, 1)), jnp.float32)
Y = jnp.asarray([0, 1, 2, 3, 4, 0], jnp.int32)


def close(a, b, tol=1e-5):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("padding", [(0, 0), (3, 3), (1, 2)])
def test_conv1d_im2col_equals_lax(padding):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 20, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 4, 7)), jnp.float32)
    want = jax.lax.conv_general_dilated(x, w, (1,), [padding], dimension_numbers=("NWC", "WIO", "NWC"))
    close(conv1d_im2col(x, w, padding), want)


@pytest.mark.parametrize("n_convs", [2, 4])
def test_ecg_cnn_values_and_grads_match(n_convs):
    model = ECGSplitCNN(n_convs=n_convs)
    params = model.init(jax.random.key(0), X)
    fast_params = im2col_convs(model.init)(jax.random.key(0), X)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(fast_params)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, X), Y).mean()

    close(jax.jit(im2col_convs(model.apply))(params, X), model.apply(params, X))
    close(jax.jit(jax.grad(im2col_convs(loss)))(params), jax.grad(loss)(params))


CONVS = {
    "1d stride 2": nn.Conv(3, (3,), strides=2),
    "1d groups 2": nn.Conv(4, (3,), feature_group_count=2),
    "2d explicit": nn.Conv(5, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False),
    "2d stride 2": nn.Conv(6, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)]),
    "2d SAME stride 2 odd": nn.Conv(3, (3, 3), strides=2, padding="SAME"),
    "2d VALID 1x1": nn.Conv(7, (1, 1), padding="VALID"),
    "2d depthwise": nn.Conv(4, (3, 3), padding=1, feature_group_count=4),
    "2d groups 2 x2 out": nn.Conv(8, (3, 2), padding="SAME", feature_group_count=2),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_strided_grouped_and_2d_convs_match_flax(name):
    conv = CONVS[name]
    shape = (2, 9, 4) if len(conv.kernel_size) == 1 else (2, 9, 7, 4)
    x = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
    p = conv.init(jax.random.key(0), x)
    close(im2col_convs(conv.apply)(p, x), conv.apply(p, x))
    loss = lambda p, x: jnp.sum(jnp.sin(conv.apply(p, x)))
    close(jax.grad(im2col_convs(loss), argnums=(0, 1))(p, x), jax.grad(loss, argnums=(0, 1))(p, x), 1e-4)


def test_unsupported_convs_fall_back_to_flax():
    for conv in (nn.Conv(3, (3,), kernel_dilation=2), nn.Conv(3, (2, 2, 2))):
        x = jnp.ones((2, 8, 4)) if len(conv.kernel_size) == 1 else jnp.ones((2, 6, 6, 6, 4))
        p = conv.init(jax.random.key(0), x)
        np.testing.assert_array_equal(im2col_convs(conv.apply)(p, x), conv.apply(p, x))


def test_unknown_conv_impl_is_an_error():
    with pytest.raises(ValueError, match="conv_impl"):
        with_conv_impl(lambda: None, "fft")


def test_ecg_fedavg_round_im2col_equals_lax_and_loop():
    model = ECGSplitCNN()
    rng = np.random.default_rng(0)
    x = rng.random((48, 128, 1)).astype(np.float32)
    y = rng.integers(0, 5, 48).astype(np.int32)
    parts = [np.arange(0, 16), np.arange(16, 24), np.arange(24, 48)]
    data = C.stack_client_data({"x": x, "y": y}, parts, batch_size=8)
    params = model.init(jax.random.key(0), X)

    def loss_fn(p, batch, _):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, batch["x"]), batch["y"]).mean()

    plan = F.plan_round(0, 0, 3)
    out = {}
    for impl in ("im2col", "lax"):
        alg = F.fedavg(loss_fn, optax.sgd(0.1), chunk_size=2, conv_impl=impl)
        out[impl] = alg.apply(alg.init(params, 3), data, plan)[0].params
    close(out["im2col"], out["lax"], 1e-4)
    alg = F.fedavg(loss_fn, optax.sgd(0.1), chunk_size=2)
    update = jax.jit(alg.client_update)
    state = alg.init(params, 3)
    deltas = [
        update(alg.broadcast(state), {}, jax.tree_util.tree_map(lambda a, k=k: a[k], data),
               C.client_rng(0, 0, k))[1].update["params"]
        for k in range(3)
    ]
    w = np.array([16.0, 8.0, 24.0]) / 48.0
    want = jax.tree_util.tree_map(lambda p, *d: p + sum(wi * di for wi, di in zip(w, d)), params, *deltas)
    close(out["im2col"], want, 1e-5)
