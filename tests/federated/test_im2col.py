"""layers.Conv: nn.Conv's parameters; impl "im2col" (patches @ kernel) gives lax's values and gradients to
float rounding; every conv model gives the same outputs and parameter trees with either impl."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.models.cnn1d import ECGClient, ECGFLNet, ECGSplitCNN, ECGSplitNNClient, ECGSplitNNServer
from jaxlab.models.layers import CONV_IMPLS, Conv, conv_im2col
from jaxlab.models.mobilenet_cifar import MobileNetCifar, MobileNetClient, MobileNetServer
from jaxlab.models.resnet_cifar import ResNet20Client, ResNet20Server, ResNetCifar


def close(a, b, tol=1e-5):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def rand(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# name: (nn.Conv / layers.Conv keyword arguments, input shape)
CONVS = {
    "1d SAME": (dict(features=3, kernel_size=(3,)), (2, 9, 4)),
    "1d stride 2": (dict(features=3, kernel_size=(3,), strides=2), (2, 9, 4)),
    "1d explicit (3, 3)": (dict(features=5, kernel_size=(7,), padding=[(3, 3)]), (2, 16, 1)),
    "1d explicit (1, 2) VALID-like": (dict(features=4, kernel_size=(5,), padding=[(1, 2)]), (3, 11, 2)),
    "1d VALID": (dict(features=4, kernel_size=(5,), padding="VALID"), (2, 12, 3)),
    "1d groups 2": (dict(features=4, kernel_size=(3,), feature_group_count=2), (2, 9, 4)),
    "2d explicit no bias": (dict(features=5, kernel_size=(3, 3), padding=[(1, 1), (1, 1)], use_bias=False),
                            (2, 9, 7, 4)),
    "2d int padding": (dict(features=5, kernel_size=(3, 3), padding=1), (2, 6, 6, 3)),
    "2d stride 2": (dict(features=6, kernel_size=(3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)]),
                    (2, 9, 7, 4)),
    "2d SAME stride 2 odd": (dict(features=3, kernel_size=(3, 3), strides=2, padding="SAME"), (2, 9, 7, 4)),
    "2d SAME even kernel": (dict(features=3, kernel_size=(2, 4), padding="SAME"), (2, 6, 7, 2)),
    "2d VALID 1x1": (dict(features=7, kernel_size=(1, 1), padding="VALID"), (2, 9, 7, 4)),
    "2d depthwise": (dict(features=4, kernel_size=(3, 3), padding=1, feature_group_count=4), (2, 9, 7, 4)),
    "2d depthwise stride 2": (dict(features=6, kernel_size=(3, 3), strides=2, padding=[(1, 1), (1, 1)],
                                   feature_group_count=6), (2, 8, 8, 6)),
    "2d groups 2 x2 out": (dict(features=8, kernel_size=(3, 2), padding="SAME", feature_group_count=2),
                           (2, 9, 7, 4)),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_has_nn_conv_params_and_values_and_grads(name):
    """Both impls initialise nn.Conv's parameters (same names, shapes, values); "lax" is nn.Conv bit for
    bit, "im2col" equals it to float rounding in values and in gradients for params and inputs."""
    kwargs, shape = CONVS[name]
    x = rand(shape, 2)
    reference, conv = nn.Conv(**kwargs), Conv(**kwargs, impl="im2col")
    params = reference.init(jax.random.key(0), x)
    same_tree(Conv(**kwargs, impl="lax").init(jax.random.key(0), x), params)
    assert jax.eval_shape(conv.init, jax.random.key(0), x) == jax.eval_shape(lambda: params)  # impl-free
    want = reference.apply(params, x)
    np.testing.assert_array_equal(Conv(**kwargs, impl="lax").apply(params, x), want)
    close(conv.apply(params, x), want)

    def grads(module):
        loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    close(grads(conv), grads(reference), 1e-4)


def numpy_conv(x, w, padding, strides, groups):
    """The textbook loop: out[b, i, j, o] = sum over taps and the group's input channels."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), *padding, (0, 0)))
    kh, kw, cig, cout = w.shape
    cog = cout // groups
    oh, ow = (x.shape[1] - kh) // strides[0] + 1, (x.shape[2] - kw) // strides[1] + 1
    out = np.zeros((x.shape[0], oh, ow, cout))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * strides[0]:i * strides[0] + kh, j * strides[1]:j * strides[1] + kw]
            for o in range(cout):
                g = o // cog
                out[:, i, j, o] = np.einsum("bhwc,hwc->b", patch[..., g * cig:(g + 1) * cig], w[..., o])
    return out


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_conv_im2col_equals_a_numpy_loop(groups):
    x, w = rand((2, 7, 6, 6), 3), rand((3, 2, 6 // groups, 6), 4)
    padding, strides = [(1, 2), (0, 1)], (2, 1)
    close(conv_im2col(x, w, padding, strides, groups), numpy_conv(x, np.asarray(w), padding, strides, groups))


def test_conv_batch_dims_like_nn_conv():
    """Several leading batch dims, or none, as nn.Conv allows."""
    kwargs = dict(features=3, kernel_size=(3,), strides=2)
    for shape in ((2, 3, 9, 4), (9, 4)):
        x = rand(shape, 5)
        params = nn.Conv(**kwargs).init(jax.random.key(0), x)
        want = nn.Conv(**kwargs).apply(params, x)
        for impl in CONV_IMPLS:
            out = Conv(**kwargs, impl=impl).apply(params, x)
            assert out.shape == want.shape
            close(out, want)


def test_conv_errors_name_the_problem():
    x = jnp.ones((2, 8, 4))
    with pytest.raises(ValueError, match=r"conv_impl must be one of \('lax', 'im2col'\), got 'fft'"):
        Conv(3, (3,), impl="fft").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="padding 'CIRCULAR' is not supported"):
        Conv(3, (3,), padding="CIRCULAR").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="feature_group_count 3 must divide"):
        Conv(3, (3,), feature_group_count=3).init(jax.random.key(0), x)


# --- models -----------------------------------------------------------------------------------------------

ECG, CUT64, CUT32 = (3, 128, 1), (3, 64, 16), (3, 32, 16)
IMAGE, RESNET_CUT, MOBILE_CUT = (2, 8, 8, 3), (2, 8, 8, 16), (2, 8, 8, 32)  # any spatial size works
MODELS = {
    "ECGSplitCNN 2 convs": (lambda impl: ECGSplitCNN(2, conv_impl=impl), ECG),
    "ECGSplitCNN 4 convs": (lambda impl: ECGSplitCNN(4, conv_impl=impl), ECG),
    "ECGClient 3 convs": (lambda impl: ECGClient(3, conv_impl=impl), ECG),
    "ECGFLNet": (lambda impl: ECGFLNet(conv_impl=impl), ECG),
    "ECGSplitNNClient": (lambda impl: ECGSplitNNClient(conv_impl=impl), ECG),
    "ECGSplitNNServer": (lambda impl: ECGSplitNNServer(conv_impl=impl), CUT64),
    "ResNet-8": (lambda impl: ResNetCifar(blocks_per_stage=1, conv_impl=impl), IMAGE),
    "ResNet20Client": (lambda impl: ResNet20Client(conv_impl=impl), IMAGE),
    "ResNet20Server": (lambda impl: ResNet20Server(blocks_per_stage=1, conv_impl=impl), RESNET_CUT),
    "MobileNetCifar": (lambda impl: MobileNetCifar(conv_impl=impl), IMAGE),
    "MobileNetClient": (lambda impl: MobileNetClient(conv_impl=impl), IMAGE),
    "MobileNetServer": (lambda impl: MobileNetServer(conv_impl=impl), MOBILE_CUT),
}


def fill(abstract, seed=0):
    """Concrete variables for an abstract tree (init's shapes, without init's slow compile): kernels
    normal with std 1 / sqrt(fan in), biases and BN shifts normal * 0.1, BN scales and variances near 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = jax.tree_util.keystr(path)
        if a.ndim > 1:
            return jnp.asarray(rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1])), a.dtype)
        if "'scale'" in name or "'var'" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
        return jnp.asarray(rng.normal(0, 0.1, a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.mark.parametrize("name", list(MODELS))
def test_models_give_the_same_outputs_and_trees_with_both_impls(name):
    """Identical variable trees (names, shapes, dtypes; values: the layer test above) and equal outputs in
    evaluation (BatchNorm on its running statistics)."""
    make, shape = MODELS[name]
    x = rand(shape, 6)
    lax_model, fast_model = make("lax"), make("im2col")
    abstract = jax.eval_shape(lax_model.init, jax.random.key(0), x)
    assert jax.eval_shape(fast_model.init, jax.random.key(0), x) == abstract
    variables = fill(abstract)
    out = {impl: jax.jit(make(impl).apply)(variables, x) for impl in CONV_IMPLS}
    assert float(jnp.abs(out["lax"]).max()) > 0.1  # not vanishing activations
    close(out["im2col"], out["lax"], 1e-4)


def test_unknown_conv_impl_on_a_model_is_an_error():
    for model, shape in ((ECGSplitCNN(conv_impl="fft"), ECG), (ResNet20Client(conv_impl="fft"), IMAGE),
                         (MobileNetServer(conv_impl="fft"), MOBILE_CUT)):
        with pytest.raises(ValueError, match=r"conv_impl must be one of \('lax', 'im2col'\)"):
            jax.eval_shape(model.init, jax.random.key(0), jnp.ones(shape))


def test_vmapped_client_sgd_scans_agree():
    """What im2col is for: 2 clients' local SGD (3 steps in a lax.scan, vmapped over the clients) on the
    ECG CNN give the same parameters with either impl."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((2, 3, 4, 128, 1)), jnp.float32)  # (clients, steps, batch, length, 1)
    y = jnp.asarray(rng.integers(0, 5, (2, 3, 4)), jnp.int32)
    params = ECGSplitCNN().init(jax.random.key(0), x[0, 0])
    tx = optax.sgd(0.1)

    def local_sgd(model):
        def loss(p, xb, yb):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

        def step(p, batch):
            updates, _ = tx.update(jax.grad(loss)(p, *batch), tx.init(p))
            return optax.apply_updates(p, updates), None

        return jax.jit(jax.vmap(lambda xs, ys: jax.lax.scan(step, params, (xs, ys))[0]))

    out = {impl: local_sgd(ECGSplitCNN(conv_impl=impl))(x, y) for impl in CONV_IMPLS}
    close(out["im2col"], out["lax"], 1e-4)
    assert not np.allclose(out["lax"]["params"]["server"]["fc2"]["kernel"][0],
                           params["params"]["server"]["fc2"]["kernel"])  # the clients did train
