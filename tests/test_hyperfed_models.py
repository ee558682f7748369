"""HyperFed's models: protocol normalisation, hypernetwork, the LEARN network's FiLM slices and bounded
step size, gradients through the unrolled blocks, parameter counts from the spec."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import ct
from jaxlab.methods.hyperfed import film_red
from jaxlab.methods.hyperfed.task import HyperFedModel
from jaxlab.models import hypernet as H
from jaxlab.models import learn as L
from jaxlab.models.red_cnn import RedCNN

GEOM = ct.from_protocol(8, 10, 12, 12, 0.1, 0.15, 5.95, 4.906)  # tiny fan beam, 12x12 image
F1 = np.array([(9 - 5) / 6, (368 / 256) / 4, (0.0133 - 0.004) / 0.009, (0.0257 - 0.0025) / 0.013,
               (5.95 - 1.5) / 4, (4.906 - 1.5) / 4, (np.log10(5e4) - 3.5) / 3], np.float32)


def test_protocol_features_normalise_as_the_released_loader():
    np.testing.assert_allclose(H.protocol_features(512, 368, 0.0133, 0.0257, 5.95, 4.906, 5e4), F1, rtol=1e-6)


def test_step_size_is_bounded_by_the_protocol_and_clamped_at_0_01():
    f = jnp.asarray(np.stack([F1, F1, F1]))
    bound = float(F1 @ np.array([-0.8955, 0, -2.6443, 0.5331, 1.5326, 0, 0]) + 1.0363)
    gamma0 = jnp.array([1.0, 1.0, 1.0])
    beta0 = jnp.array([bound + 0.5, -1.0, 0.05])  # above the bound, below 0.01, inside
    w_fed = jnp.asarray(0.02)
    got, grads = jax.jit(lambda w: (L.step_size(w, gamma0, beta0, f),
                                    jax.jacobian(lambda v: L.step_size(v, gamma0, beta0, f))(w)))(w_fed)
    np.testing.assert_allclose(got, [bound, 0.01, 0.07], rtol=1e-5)
    # the gradient reaches w_fed only through the unclamped image (d lambda / d w_fed = gamma0 there)
    np.testing.assert_allclose(grads, [0.0, 0.0, 1.0], atol=1e-7)


def _mlp_reference(params, f):
    h = f
    for i in range(3):
        layer = params[f"linear{i}"]
        h = np.asarray(h) @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"])
        h = np.maximum(h, 0) if i < 2 else h
    return h


def test_hypernetwork_layers_split_and_dropout():
    k = 6
    net = H.HyperNet(k)
    f = jnp.asarray(np.stack([F1, F1 * 0.5]))
    params = jax.jit(net.init)(jax.random.key(0), f)["params"]
    assert {n: p["kernel"].shape for n, p in params.items()} == {
        "linear0": (7, 256), "linear1": (256, 512), "linear2": (512, 2 * k)}
    gamma, beta = jax.jit(net.apply)({"params": params}, f)
    out = _mlp_reference(params, np.asarray(f))
    np.testing.assert_allclose(gamma, out[:, :k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(beta, out[:, k:], rtol=1e-5, atol=1e-7)
    dropped = jax.jit(lambda p, r: net.apply({"params": p}, f, deterministic=False, rngs={"dropout": r}))(
        params, jax.random.key(1))
    assert not np.allclose(dropped[0], gamma)


def _block_reference(p, x, y, gamma, beta, f, feats):
    """One LEARN iteration written out with lax convolutions and explicit slices of gamma[1:]."""
    def conv(h, layer):
        out = jax.lax.conv_general_dilated(h, layer["kernel"], (1, 1), ((1, 1), (1, 1)),
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out + layer["bias"]

    g, b = gamma[:, 1:], beta[:, 1:]
    weight = p["weight_fed"][0] * gamma[:, 0] + beta[:, 0]
    bound = f @ jnp.array([-0.8955, 0, -2.6443, 0.5331, 1.5326, 0, 0]) + 1.0363
    lam = jnp.maximum(jnp.minimum(weight, bound), 0.01)
    fidelity = x - lam[:, None, None] * ct.backproject(ct.project(x, GEOM) - y, GEOM)
    h = jax.nn.relu(conv(x[..., None], p["conv1"]) * g[:, None, None, 0:feats] + b[:, None, None, 0:feats])
    h = jax.nn.relu(conv(h, p["conv2"]) * g[:, None, None, feats:2 * feats] + b[:, None, None, feats:2 * feats])
    h = conv(h, p["conv3"]) * g[:, None, None, 2 * feats:2 * feats + 1] + b[:, None, None, 2 * feats:2 * feats + 1]
    return jax.nn.relu(fidelity + h[..., 0])


def _random_params(init, *args, scale=0.1, seed=0):
    """Parameters of init's shapes (traced only, no compile) drawn N(0, scale^2)."""
    shapes = jax.eval_shape(init, jax.random.key(0), *args)["params"]
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])


def _inputs(batch=2, feats=3, seed=0):
    k = L.num_modulations(feats)
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.uniform(keys[0], (batch, *GEOM.image_shape))
    y = ct.project(x, GEOM) + 0.01 * jax.random.normal(keys[1], (batch, *GEOM.sino_shape))
    gamma = 1 + 0.3 * jax.random.normal(keys[2], (batch, k))
    beta = 0.05 * jax.random.normal(keys[3], (batch, k))
    f = jnp.asarray(np.stack([F1, F1 * 0.9])[:batch])
    return x, y, gamma, beta, f


def test_learn_equals_a_loop_of_reference_blocks_with_the_spec_film_slices():
    feats, blocks = 3, 2
    x, y, gamma, beta, f = _inputs(feats=feats)
    model = L.Learn(blocks, feats)
    # non-trivial weights so that every FiLM slice matters (steps both clamped and free: w_fed ~ N(0, 0.1^2))
    params = _random_params(model.init, x, y, GEOM, gamma, beta, f)
    got = jax.jit(model.apply)({"params": params}, x, y, GEOM, gamma, beta, f)

    @jax.jit
    def reference(params):
        want = x
        for i in range(blocks):
            block = jax.tree.map(lambda a: a[i], params["blocks"])
            want = _block_reference(block, want, y, gamma, beta, f, feats)
        return want

    np.testing.assert_allclose(got, reference(params), rtol=2e-4, atol=2e-5)
    # a modulation entry past the spec's K is an error, not silently ignored
    with pytest.raises(ValueError, match="K = 2"):
        jax.eval_shape(model.apply, {"params": params}, x, y, GEOM, gamma[:, :-1], beta[:, :-1], f)


def test_gradients_through_the_unrolled_network_match_finite_differences():
    feats = 2
    model = HyperFedModel("learn", "hypernet", blocks=2, features=feats, dropout=0.0)
    x, y, _, _, f = _inputs()
    label = jnp.clip(x + 0.1, 0, 1)[..., None]
    params = _random_params(model.init, x[..., None], y, GEOM, f, seed=2)
    # gamma ~ 1, beta ~ 0.05 and a step size inside (0.01, bound): every parameter gets a gradient
    k = L.num_modulations(feats)
    params["hypernet"] = jax.tree.map(lambda a: 0.1 * a, params["hypernet"])
    params["hypernet"]["linear2"]["bias"] = params["hypernet"]["linear2"]["bias"].at[:k].add(1.0).at[k:].add(0.05)
    params["imaging"]["blocks"]["weight_fed"] = jnp.full((2, 1), 0.05)

    def loss(p):  # rematerialised blocks: their gradients are the ones checked
        out = model.clone(remat=True).apply({"params": p}, x[..., None], y, GEOM, f)
        return jnp.mean((out - label) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    loss = jax.jit(loss)
    for seed in range(2):
        direction = jax.tree.map(lambda a: jax.random.normal(jax.random.key(seed + a.size), a.shape), params)
        eps = 1e-3
        plus = loss(jax.tree.map(lambda a, d: a + eps * d, params, direction))
        minus = loss(jax.tree.map(lambda a, d: a - eps * d, params, direction))
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2)


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_parameter_counts_equal_the_spec():
    # LEARN, 50 blocks: conv 1->64, 64->64, 64->1 (3x3, bias) + w_fed per block; K = 130
    per_block = (9 * 64 + 64) + (9 * 64 * 64 + 64) + (9 * 64 + 1) + 1
    assert L.param_count() == 50 * per_block == 1_907_300
    assert L.num_modulations(64) == 130
    hyper_learn = (7 * 256 + 256) + (256 * 512 + 512) + (512 * 260 + 260)
    assert H.param_count(130) == hyper_learn == 267_012
    assert H.param_count(193) == (7 * 256 + 256) + (256 * 512 + 512) + (512 * 386 + 386)
    model = HyperFedModel("learn", "hypernet")  # the paper's sizes, shapes only
    x = jnp.zeros((1, *GEOM.image_shape, 1))
    y = jnp.zeros((1, *GEOM.sino_shape))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, y, GEOM, jnp.zeros((1, 7))))["params"]
    assert _count(shapes["imaging"]) == 1_907_300 and _count(shapes["hypernet"]) == 267_012
    red = HyperFedModel("red_cnn", "hypernet", features=96)
    x = jnp.zeros((1, 24, 24, 1))
    shapes = jax.eval_shape(lambda: red.init(jax.random.key(0), x, y, GEOM, jnp.zeros((1, 7))))["params"]
    assert _count(shapes["imaging"]) == film_red.param_count(96) == 1_848_865
    assert _count(shapes["hypernet"]) == H.param_count(193)


def test_film_red_cnn_is_red_cnn_at_identity_modulation():
    feats = 4
    x = jax.random.uniform(jax.random.key(0), (2, 22, 22, 1))
    film = film_red.FilmRedCNN(feats)
    k = 2 * feats + 1
    params = jax.jit(film.init)(jax.random.key(1), x, jnp.ones((2, k)), jnp.zeros((2, k)))["params"]
    red = RedCNN(feats)
    red_params = jax.eval_shape(red.init, jax.random.key(1), x)["params"]
    mapped = {"head": {"conv1": params["conv1"]}, "tail": {"tconv5": params["tconv5"]},
              "body": {n: params[n] for n in red_params["body"]}}
    apply = jax.jit(lambda gamma: film.apply({"params": params}, x, gamma, jnp.zeros((2, k))))
    np.testing.assert_allclose(apply(jnp.ones((2, k))), jax.jit(red.apply)({"params": mapped}, x),
                               rtol=1e-5, atol=1e-6)
    # the output slot (index 2F) scales tconv5's output before the global residual
    np.testing.assert_allclose(apply(jnp.ones((2, k)).at[:, 2 * feats].set(0.0)), nn.relu(x), atol=1e-6)
