"""Multi-exit models of the backdoor method: parameter counts of ResNet-56, VGG-16-BN and MobileNet (with
and without ICs) derived from their layer definitions, IC pooling, MAC counts by hand, and early exit
against a per-example loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models.exits import (
    SDN_MASKS,
    ExitHeads,
    count_macs,
    early_exit,
    exit_costs,
    exit_path_macs,
    placement,
)
from jaxlab.models.mobilenet_cifar import BLOCKS, MobileNetBlocks
from jaxlab.models.resnet_cifar import ResNetCifarBlocks
from jaxlab.models.vgg_cifar import CHANNELS, POOLS, VGG16BN
from jaxlab.train.state import param_count

CLASSES = 10


def linear(n_in, n_out):
    return n_in * n_out + n_out


def resnet_expected(n):
    """conv1 + BN, 3 stages of n option-B blocks (a 1x1 conv + BN shortcut where the shape changes), fc.
    Taps: (size, channels) of every block's output."""
    total, cin, taps = 3 * 9 * 16 + 2 * 16, 16, []
    for stage, (c, size) in enumerate(((16, 32), (32, 16), (64, 8))):
        for i in range(n):
            total += 9 * cin * c + 2 * c + 9 * c * c + 2 * c
            if cin != c:
                total += cin * c + 2 * c
            cin = c
            taps.append((size, c))
    return total + linear(64, CLASSES), taps


def vgg_expected():
    total, cin, size, taps = 0, 3, 32, []
    for c, pool in zip(CHANNELS, POOLS):
        total += 9 * cin * c + c + 2 * c  # conv with bias, BN
        size //= pool
        cin = c
        taps.append((size, c))
    taps.append((None, 512))  # the first FC block's output
    return total + linear(512, 512) + linear(512, 512) + linear(512, CLASSES), taps


def mobilenet_expected():
    total, cin, size, taps = 27 * 32 + 2 * 32, 32, 32, []
    for c, stride in BLOCKS:
        size //= stride
        total += 9 * cin + 2 * cin + cin * c + 2 * c  # depthwise + BN, pointwise + BN, no biases
        cin = c
        taps.append((size, c))
    return total + linear(1024, CLASSES), taps


def ic_expected(size, channels, mix):
    """An IC's parameters: pool to floor(s / floor(s / 4)) when s >= 4 (alpha if mixed), Linear."""
    if size is None:
        return linear(channels, CLASSES)
    if size >= 4:
        out = size // (size // 4)
        return linear(channels * out * out, CLASSES) + (1 if mix else 0)
    return linear(channels * size * size, CLASSES)


MODELS = {
    "resnet56": (lambda: ResNetCifarBlocks(9, CLASSES), lambda: resnet_expected(9), 855_770),
    "vgg16": (lambda: VGG16BN(CLASSES), vgg_expected, 15_253_578),
    "mobilenet": (lambda: MobileNetBlocks(CLASSES), mobilenet_expected, 3_217_226),
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_parameter_counts_with_and_without_ics(arch):
    make, expected, documented = MODELS[arch]
    model, x = make(), jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    _, taps = jax.eval_shape(model.apply, variables, x)
    backbone, tap_dims = expected()
    assert param_count(variables["params"]) == backbone == documented
    got_taps = [(t.shape[1] if t.ndim == 4 else None, t.shape[-1]) for t in taps]
    assert got_taps == tap_dims
    assert len(taps) == {"resnet56": 27, "vgg16": 14, "mobilenet": 13}[arch]
    for kind, pooling in (("dense", "avg"), ("sdn", "mix")):
        where = placement(kind, len(taps), arch)
        if kind == "sdn":
            assert where == tuple(i for i, m in enumerate(SDN_MASKS[arch]) if m)  # SDN: 6, 6, 5 ICs
        heads = ExitHeads(CLASSES, where, pooling)
        ics = jax.eval_shape(heads.init, jax.random.key(1), [jnp.zeros(t.shape) for t in taps])
        assert param_count(ics) == sum(ic_expected(*tap_dims[t], pooling == "mix") for t in where)


def test_ic_pools_to_4x4_and_mixes_max_and_avg():
    """The mixed IC on a 16x16 tap: numpy 4x4 max and avg pools mixed by alpha, flattened, then linear."""
    heads = ExitHeads(3, (0,), "mix")
    tap = jax.random.normal(jax.random.key(0), (2, 16, 16, 5))
    params = heads.init(jax.random.key(1), [tap])["params"]["ic0"]
    blocks = np.asarray(tap).reshape(2, 4, 4, 4, 4, 5)  # (B, 4 rows of blocks, 4, 4 cols, 4, C)
    alpha = float(params["alpha"][0])
    pooled = alpha * blocks.max(axis=(2, 4)) + (1 - alpha) * blocks.mean(axis=(2, 4))
    want = pooled.reshape(2, -1) @ np.asarray(params["linear"]["kernel"]) + np.asarray(params["linear"]["bias"])
    got = heads.apply({"params": {"ic0": params}}, [tap])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sdn_placement_by_cost_matches_sdn_resnet56_mask():
    """The cost rule (taps nearest to 15..90% of the MACs), used for depths SDN has no mask for, picks
    SDN's own ResNet-56 ICs from ResNet-56's cumulative costs (equal per block within a stage)."""
    per_block = [1.0] * 9 + [1.0] * 9 + [1.0] * 9  # every option-B block costs about the same
    cumulative = np.cumsum(per_block)
    assert placement("sdn", 27, "resnet-x", list(cumulative) + [cumulative[-1]]) == placement("sdn", 27, "resnet56")


def test_macs_of_resnet8_by_hand():
    model = ResNetCifarBlocks(1, CLASSES)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)  # costs need shapes only
    hand = [32 * 32 * 16 * 27 + 2 * 32 * 32 * 16 * 9 * 16]  # stem, block 1 (two 3x3 convs, 16 -> 16)
    hand.append(hand[-1] + 16 * 16 * 32 * 9 * 16 + 16 * 16 * 32 * 9 * 32 + 16 * 16 * 32 * 16)  # + 1x1 shortcut
    hand.append(hand[-1] + 8 * 8 * 64 * 9 * 32 + 8 * 8 * 64 * 9 * 64 + 8 * 8 * 64 * 32)
    heads = ExitHeads(CLASSES, (0, 1, 2))
    _, taps = jax.eval_shape(model.apply, variables, x)
    ic_params = jax.eval_shape(heads.init, jax.random.key(1), taps)["params"]
    costs = exit_costs(model, heads, variables, ic_params, (32, 32, 3))
    np.testing.assert_array_equal(costs["tap"], hand)
    assert costs["final"] == hand[-1] + 64 * CLASSES
    np.testing.assert_array_equal(costs["ic"], [16 * 16 * CLASSES, 32 * 16 * CLASSES, 64 * 16 * CLASSES])
    ic = costs["ic"]
    np.testing.assert_array_equal(exit_path_macs(costs, (0, 1, 2), start=1),
                                  [hand[0], hand[1] + ic[1], hand[2] + ic[1] + ic[2], costs["final"] + ic[1] + ic[2]])
    assert count_macs(lambda v, x: model.apply(v, x), variables, jnp.zeros((4, 32, 32, 3))) == 4 * costs["final"]


@pytest.mark.parametrize("tau,start", [(0.5, 0), (0.9, 0), (0.7, 2), (0.99, 3)])
def test_early_exit_matches_a_per_example_loop(tau, start):
    logits = np.asarray(jax.random.normal(jax.random.key(3), (4, 64, 5)) * 2.5)
    exits, preds = early_exit(jnp.asarray(logits), tau, start)
    for b in range(logits.shape[1]):
        for k in range(start, logits.shape[0]):
            p = np.exp(logits[k, b] - logits[k, b].max())
            p /= p.sum()
            if p.max() > tau or k == logits.shape[0] - 1:
                assert (int(exits[b]), int(preds[b])) == (k, int(logits[k, b].argmax()))
                break
    assert 0 < len(set(np.asarray(exits).tolist())) <= 4 - start
