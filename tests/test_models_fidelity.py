"""Fidelity of the models ported from PyTorch, against numpy written from the PyTorch semantics:
BatchNorm's running statistics (unbiased variance, momentum 0.1), the LeakyReLU between the ECG heads'
Dense layers, and the official CIFAR clients' eval-mode training (fl_vs_splitnn)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models.cnn1d import ECGFLNet, ECGServer, ECGSplitNNServer
from jaxlab.models.layers import BatchNorm, batch_norm_train
from jaxlab.models.mobilenet_cifar import MobileNetCifar
from jaxlab.models.resnet_cifar import ResNet20Client, resnet20
from jaxlab.train.state import param_count

EPS, MOMENTUM = 1e-5, 0.1


def rand(shape, seed=0, loc=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape).astype(np.float32)


def torch_bn_reference(batches, scale, bias):
    """torch.nn.BatchNorm in train mode over `batches` in turn, written out: per batch (its train output,
    running mean and var after it); statistics over every axis but the last."""
    mean, var, out = np.zeros(scale.shape), np.ones(scale.shape), []
    for x in batches:
        axes = tuple(range(x.ndim - 1))
        n = x.size // x.shape[-1]
        bm, bv = x.mean(axes), x.var(axes)  # biased variance normalises the batch
        y = (x - bm) / np.sqrt(bv + EPS) * scale + bias
        mean = (1 - MOMENTUM) * mean + MOMENTUM * bm
        var = (1 - MOMENTUM) * var + MOMENTUM * x.var(axes, ddof=1)  # unbiased: bv * n / (n - 1)
        assert np.allclose(x.var(axes, ddof=1), bv * n / (n - 1))
        out.append((y, mean.copy(), var.copy()))
    return out


@pytest.mark.parametrize("shape", [(None, 3), (None, 2, 3, 5)], ids=["2d (N, C)", "4d NHWC"])
def test_batchnorm_is_pytorch_batchnorm(shape):
    """Two training updates (n = 4 then 7 rows / images), then eval: outputs and running statistics."""
    c = shape[-1]
    batches = [rand((n, *shape[1:]), seed=n, loc=1.5, scale=2.0) for n in (4, 7)]
    scale, bias = rand((c,), 1, 1.0, 0.3), rand((c,), 2)
    bn = BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), batches[0])
    assert jax.tree_util.tree_map(np.shape, variables) == {
        "params": {"scale": (c,), "bias": (c,)}, "batch_stats": {"mean": (c,), "var": (c,)}}
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(c))  # init does not update
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": variables["batch_stats"]}
    for x, (want_y, want_mean, want_var) in zip(batches, torch_bn_reference(batches, scale, bias)):
        y, updates = bn.apply(variables, x, mutable=["batch_stats"])
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(updates["batch_stats"]["mean"], want_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(updates["batch_stats"]["var"], want_var, rtol=1e-6, atol=1e-6)
        variables = {**variables, **updates}
    x = rand((5, *shape[1:]), seed=9)
    y = BatchNorm(use_running_average=True).apply(variables, x)  # eval: the running statistics
    want = (x - want_mean) / np.sqrt(want_var + EPS) * scale + bias
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    flax_var = nn.BatchNorm(use_running_average=False, momentum=0.9).apply(
        variables, batches[0], mutable=["batch_stats"])[1]["batch_stats"]["var"]
    assert not np.allclose(flax_var, (1 - MOMENTUM) * want_var + MOMENTUM * batches[0].var(
        tuple(range(len(shape) - 1)), ddof=1))  # flax's biased update is what this layer fixes


@pytest.mark.parametrize("shape", [(6, 3), (3, 4, 5, 2), (2, 3, 2, 4, 3)], ids=["2d", "4d", "5d"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batchnorm_training_gradients_equal_autodiff_of_the_formula(shape, dtype):
    """The closed-form VJP (batch_norm_train) against jax.grad of the plain training formula, for a
    loss that also reads the batch statistics, through the module in float32 and bfloat16 inputs."""
    c = shape[-1]
    x = jnp.asarray(rand(shape, 3, loc=1.5, scale=2.0), dtype)
    w = jnp.asarray(rand(shape, 4), jnp.float32)
    params = {"scale": jnp.asarray(rand((c,), 1, 1.0, 0.3)), "bias": jnp.asarray(rand((c,), 2))}
    stats = {"mean": jnp.zeros(c), "var": jnp.ones(c)}

    def formula(x, params):
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = xf.mean(axes)
        var = jnp.square(xf - mean).mean(axes)
        y = (xf - mean) / jnp.sqrt(var + EPS) * params["scale"] + params["bias"]
        return jnp.sum(y.astype(x.dtype).astype(jnp.float32) * w)

    def module(x, params):
        y = BatchNorm().apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])[0]
        return jnp.sum(y.astype(jnp.float32) * w)

    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    want, got = (jax.grad(f, argnums=(0, 1))(x, params) for f in (formula, module))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    # the statistics' own cotangents (a loss of the returned mean and variance) are exact too
    stats_loss = lambda f: lambda x: jnp.sum(jnp.stack(f(x)[1:]) ** 2)
    plain = lambda x: (None, x.mean((0, 1, 2)), jnp.square(x - x.mean((0, 1, 2))).mean((0, 1, 2)))
    xs = jnp.asarray(rand((2, 3, 4, 5), 5, loc=1.0), jnp.float32)
    np.testing.assert_allclose(
        jax.grad(stats_loss(lambda x: batch_norm_train(x, jnp.ones(5), jnp.zeros(5), EPS)))(xs),
        jax.grad(stats_loss(plain))(xs), rtol=1e-5, atol=1e-6)


def test_batchnorm_needs_two_values_per_channel_in_training():
    x = jnp.ones((1, 4))
    variables = BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm().apply(variables, x, mutable=["batch_stats"])


def test_cifar_models_use_pytorch_batchnorm_with_unchanged_trees():
    """ResNet-20's stem BN after one training step holds PyTorch's running statistics of the stem conv's
    output; parameter counts and the batch_stats tree (flax's names) are unchanged."""
    x = rand((3, 32, 32, 3))
    for model, count, stats in ((resnet20(), 269_722, 1_376), (MobileNetCifar(), 3_228_170, 2 * 10_944)):
        variables = jax.eval_shape(model.init, jax.random.key(0), x[:1])  # shapes only: fast
        assert param_count(variables["params"]) == count and param_count(variables["batch_stats"]) == stats
        assert {k for bn in jax.tree_util.tree_leaves(variables["batch_stats"], is_leaf=lambda t: "var" in t)
                for k in bn} == {"mean", "var"}
    variables = ResNet20Client().init(jax.random.key(0), x[:1])
    conv = jax.lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (1, 1), [(1, 1), (1, 1)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    _, updates = ResNet20Client().apply(variables, x, train=True, mutable=["batch_stats"])
    conv = np.asarray(conv, np.float64)
    stats = updates["batch_stats"]["bn1"]
    np.testing.assert_allclose(stats["mean"], MOMENTUM * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 1 - MOMENTUM + MOMENTUM * conv.var((0, 1, 2), ddof=1),
                               rtol=1e-4, atol=1e-6)


# --- LeakyReLU between the ECG heads' Dense layers ---------------------------------------------------------


def leaky(x):
    return np.where(x >= 0, x, 0.01 * x)  # torch.nn.LeakyReLU() (negative_slope 0.01)


def numpy_ecg_splitnn_server(p, a):
    """The reference EcgServer in numpy: 3 x [Conv1d(16, 16, 5, padding=2), LeakyReLU], MaxPool1d(2),
    view (B, 16 * 32) channel-major, Linear 512 -> 128, LeakyReLU, Linear 128 -> 5. a (B, 64, 16) NWC."""
    x = a.astype(np.float64)
    for i in (3, 4, 5):
        w, b = np.asarray(p[f"conv{i}"]["kernel"]), np.asarray(p[f"conv{i}"]["bias"])  # (5, 16, 16)
        xp = np.pad(x, ((0, 0), (2, 2), (0, 0)))
        x = leaky(sum(xp[:, t:t + x.shape[1]] @ w[t] for t in range(5)) + b)
    x = np.maximum(x[:, 0::2], x[:, 1::2])  # (B, 32, 16)
    flat = np.swapaxes(x, 1, 2).reshape(len(x), -1)
    h = flat @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])
    return h, np.asarray(p["fc2"]["kernel"]), np.asarray(p["fc2"]["bias"])


def test_splitnn_ecg_server_has_the_reference_leaky_relu():
    """70,197 parameters as before (LeakyReLU has none); logits = the reference's, which differ from a
    server without the activation because some fc1 pre-activations are negative."""
    a = rand((4, 64, 16), seed=3)
    server = ECGSplitNNServer()
    params = server.init(jax.random.key(0), a)["params"]
    assert param_count(params) == 70_197
    h, w2, b2 = numpy_ecg_splitnn_server(params, a)
    assert (h < 0).mean() > 0.2  # the test exercises the negative side
    logits = np.asarray(server.apply({"params": params}, a))
    np.testing.assert_allclose(logits, leaky(h) @ w2 + b2, rtol=1e-4, atol=1e-5)
    assert np.abs(logits - (h @ w2 + b2)).max() > 1e-3


@pytest.mark.parametrize("model, shape", [(ECGFLNet(), (4, 128, 1)), (ECGServer(), (4, 32, 16)),
                                          (ECGSplitNNServer(), (4, 64, 16))],
                         ids=["fl_vs_splitnn FL", "split_ecg server", "fl_vs_splitnn SplitNN server"])
def test_every_ecg_head_has_leaky_relu_between_its_dense_layers(model, shape):
    """The references' Linear -> LeakyReLU -> Linear: logits = leaky(fc1 output) @ fc2 + b, read off
    fc1's captured output."""
    x = rand(shape, seed=4)
    params = model.init(jax.random.key(1), x)["params"]
    logits, state = model.apply({"params": params}, x, capture_intermediates=True)
    h = np.asarray(state["intermediates"]["fc1"]["__call__"][0], np.float64)
    assert (h < 0).any()
    w2, b2 = np.asarray(params["fc2"]["kernel"], np.float64), np.asarray(params["fc2"]["bias"])
    np.testing.assert_allclose(logits, leaky(h) @ w2 + b2, rtol=1e-4, atol=1e-5)


# --- fl_vs_splitnn: the official CIFAR clients train in eval mode (model.eval()) ---------------------------


def fl_vs_splitnn_models(variant, *overrides):
    from jaxlab.config import load_config
    from jaxlab.methods import fl_vs_splitnn as M

    config = load_config(f"fl_vs_splitnn:{variant}", ["model.conv_impl=lax", *overrides])  # compiles faster
    return M, config, M.get_models(config)


def random_variables(M, module, x, seed=0):
    """(params, state) shaped as M.init_variables gives them, filled from numpy without init's slow
    compile: kernels normal with std 1 / sqrt(fan in), vectors normal * 0.2; random running statistics."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: M.init_variables(module, jax.random.key(0), x[:1]))
    fill = lambda a: jnp.asarray(rng.normal(0, 1 / np.sqrt(np.prod(a.shape[:-1])) if a.ndim > 1 else 0.2,
                                            a.shape), a.dtype)
    params, state = jax.tree_util.tree_map(fill, abstract)
    return params, random_running_stats(state, seed)


def random_running_stats(state, seed=0):
    """Running statistics far from init (mean 0, var 1), so using them is visible."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape) if "var" in jax.tree_util.keystr(path)
                                    else rng.normal(0, 0.5, a.shape), a.dtype), state)


def test_config_variants_batch_size_conv_impl_and_flag():
    """Paper-scale CIFAR variants use the reference DataLoaders' batch 4; tiny ones stay at 32; every
    variant runs im2col convs and trains clients in training mode unless asked."""
    from jaxlab.config import load_config

    sizes = {"tiny": 32, "paper": 32, "resnet20": 4, "mobilenet": 4, "resnet20_tiny": 32, "mobilenet_tiny": 32}
    for variant, batch in sizes.items():
        config = load_config(f"fl_vs_splitnn:{variant}")
        assert config.data.batch_size == batch, variant
        assert config.model.conv_impl == "im2col" and config.model.clients_train_in_eval_mode is False
    _, _, models = fl_vs_splitnn_models("resnet20_tiny")
    assert {m.conv_impl for m in models} == {"lax"}
    _, _, models = fl_vs_splitnn_models("mobilenet_tiny", "model.conv_impl=im2col")
    assert {m.conv_impl for m in models} == {"im2col"}


def test_fl_step_in_eval_mode_keeps_and_uses_running_statistics():
    """With clients_train_in_eval_mode the FL loss normalises with the running statistics (its loss is
    the evaluation-mode loss, and differs from the batch-statistics loss) and returns them unchanged;
    without it, a training step updates them. Gradients flow either way."""
    x = rand((4, 8, 8, 3), 7)
    batch = {"x": x, "y": jnp.asarray([0, 1, 2, 3])}
    losses, states = {}, {}
    for flag in (True, False):
        M, _, models = fl_vs_splitnn_models("resnet20_tiny", f"model.clients_train_in_eval_mode={flag}")
        params, state = random_variables(M, models.whole, x)
        loss_fn = jax.jit(jax.value_and_grad(M.fl_loss_fn(models.whole, False), has_aux=True))
        (losses[flag], (states[flag], _)), grads = loss_fn(params, state, batch, jax.random.key(1))
        assert float(optax_norm(grads)) > 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, states[True], state)
    assert not np.allclose(states[False]["batch_stats"]["bn1"]["var"], state["batch_stats"]["bn1"]["var"])
    logits = jax.jit(resnet20().apply)({"params": params, **state}, x)  # evaluation mode
    want = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.arange(4)[:, None], 1))
    np.testing.assert_allclose(losses[True], want, rtol=1e-5)
    assert abs(float(losses[True]) - float(losses[False])) > 1e-3


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(tree)))


def test_splitnn_client_in_eval_mode_numpy_and_server_still_trains():
    """The ResNet-20 client half in eval mode is conv -> (x - running mean) / sqrt(running var + eps) *
    scale + bias -> ReLU, twice (numpy over lax's conv); its state is returned unchanged while the server,
    in training mode as in the reference, updates its statistics."""
    M, _, models = fl_vs_splitnn_models("resnet20_tiny", "model.clients_train_in_eval_mode=True")
    client_apply, server_loss = M.split_fns(models.client, models.server, False)
    x = rand((3, 8, 8, 3), 8)
    cp, cs = random_variables(M, models.client, x, 1)
    cut, new_cs = jax.jit(client_apply)(cp, cs, x, jax.random.key(2))
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_cs, cs)
    h = np.asarray(x, np.float64)
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        h = np.asarray(jax.lax.conv_general_dilated(
            jnp.asarray(h, jnp.float32), cp[conv]["kernel"], (1, 1), [(1, 1), (1, 1)],
            dimension_numbers=("NHWC", "HWIO", "NHWC")), np.float64)
        stats, affine = cs["batch_stats"][bn], cp[bn]
        h = np.maximum((h - stats["mean"]) / np.sqrt(np.asarray(stats["var"]) + EPS) * affine["scale"]
                       + affine["bias"], 0)
    np.testing.assert_allclose(cut, h, rtol=1e-4, atol=1e-5)
    sp, ss = random_variables(M, models.server, cut)
    _, new_ss = jax.jit(server_loss)(sp, ss, cut, jnp.asarray([0, 1, 2]), jax.random.key(3))
    assert not np.allclose(new_ss["batch_stats"]["bn2"]["mean"], ss["batch_stats"]["bn2"]["mean"])


def test_eval_mode_turns_dropout_off_as_model_eval_does():
    """MobileNet's Dropout(0.5): the FL loss depends on the dropout key in training mode, not in eval mode."""
    x = rand((2, 8, 8, 3), 9)
    batch = {"x": x, "y": jnp.asarray([0, 1])}
    for flag in (True, False):
        M, _, models = fl_vs_splitnn_models("mobilenet_tiny", f"model.clients_train_in_eval_mode={flag}")
        params, state = random_variables(M, models.whole, x)
        loss_fn = jax.jit(M.fl_loss_fn(models.whole, False))
        a, b = (float(loss_fn(params, state, batch, jax.random.key(k))[0]) for k in (1, 2))
        assert (a == b) == flag, (flag, a, b)
