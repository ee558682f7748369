"""Split learning: cut gradients equal joint gradients, SplitNN epoch and SplitFed V1 vs loops, byte counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.federated import clients as C
from jaxlab.federated import split as S
from jaxlab.federated.algorithms import plan_round, round_batch
from jaxlab.models.cnn1d import ECGClient, ECGServer, ECGSplitCNN
from jaxlab.train.state import param_count

from .test_rounds import assert_tree_close, take

K, PER_CLIENT, BATCH, SEED = 3, 16, 8, 0
CLIENT, SERVER = ECGClient(), ECGServer()


def client_apply(params, x, rng):
    return CLIENT.apply({"params": params}, x)


def server_loss(params, activation, y, rng):
    logits = SERVER.apply({"params": params}, activation)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def client_apply_s(params, state, x, rng):  # the engine's form: with (empty) model state
    return client_apply(params, x, rng), state


def server_loss_s(params, state, activation, y, rng):
    return server_loss(params, activation, y, rng), state


def ecg_data(sizes=(PER_CLIENT,) * K):
    rng = np.random.default_rng(0)
    n = sum(sizes)
    x = rng.uniform(size=(n, 128, 1)).astype(np.float32)
    y = rng.integers(0, 5, n).astype(np.int32)
    parts = np.split(np.arange(n), np.cumsum(sizes)[:-1])
    return C.stack_client_data({"x": x, "y": y}, parts, BATCH, seed=1)


def init_params():
    x = jnp.zeros((1, 128, 1))
    params = ECGSplitCNN().init(jax.random.key(0), x)["params"]
    return params["client"], params["server"]


def test_split_grads_equal_joint_grads():
    cp, sp = init_params()
    data = ecg_data()
    x, y = data.batches["x"][0, 0], data.batches["y"][0, 0]
    g = S.split_grads(client_apply, server_loss, cp, sp, x, y, jax.random.key(1))

    def joint(params):
        logits = ECGSplitCNN().apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(joint)({"client": cp, "server": sp})
    np.testing.assert_allclose(g.loss, loss, rtol=1e-6)
    assert_tree_close({"client": g.client, "server": g.server}, grads, tol=1e-6)
    assert g.activation.shape == (BATCH, 32, 16) == g.activation_grad.shape


@pytest.mark.parametrize("relay", [True, False])
def test_splitnn_epoch_equals_loop_and_bytes_match_formula(relay):
    """relay=True: vanilla SplitNN; relay=False: SplitFed V2 (shared server in turn, client halves averaged)."""
    cp0, sp = init_params()
    ctx, stx = optax.adam(1e-3), optax.adam(1e-3)
    sizes = (16, 8, 24)
    data = ecg_data(sizes)
    state = S.init_splitnn(cp0, sp, ctx, stx, K)
    epoch = jax.jit(S.make_splitnn_epoch(client_apply_s, server_loss_s, ctx, stx, relay=relay), donate_argnums=0)
    new, metrics = epoch(S.init_splitnn(cp0, sp, ctx, stx, K), data, jax.random.key(3))
    assert int(new.round) == 1

    @jax.jit
    def step(cp, sp, co, so, x, y, rng):
        g = S.split_grads(client_apply, server_loss, cp, sp, x, y, rng)
        cu, co = ctx.update(g.client, co, cp)
        su, so = stx.update(g.server, so, sp)
        return optax.apply_updates(cp, cu), optax.apply_updates(sp, su), co, so

    so, cp, halves = stx.init(sp), cp0, []
    for k in range(K):  # clients in turn, one server
        co, cp = take(state.client_opt, k), (cp if relay else cp0)
        for s in range(int(data.step_mask[k].sum())):
            rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), k), s)
            cp, sp, co, so = step(
                cp, sp, co, so, data.batches["x"][k, s], data.batches["y"][k, s], rng
            )
        assert_tree_close(take(new.client_opt, k), co, tol=1e-5)
        halves.append(cp)
    if not relay:
        w = np.array(sizes) / sum(sizes)
        cp = jax.tree_util.tree_map(
            lambda *h: sum(wi * np.asarray(hi) for wi, hi in zip(w, h)), *halves
        )
    assert_tree_close(new.client_params, cp, tol=1e-5)
    assert_tree_close(new.server_params, sp, tol=1e-5)

    expected = S.splitnn_epoch_bytes(sizes, 512, param_count(cp))
    for kind in ("activations", "labels", "gradients", "weights"):
        assert int(metrics[kind]) == expected[kind], kind
    assert (
        expected["total"] == sum(sizes) * (2 * 512 * 4 + 8) + 2 * K * 1424 * 4
    )  # |W_c| = 128 + 1,296


def test_splitfed_v1_round_equals_loop():
    cp, sp = init_params()
    params = {"client": cp, "server": sp}
    data = ecg_data(sizes=(16, 8, 24))
    alg = S.splitfed_v1(client_apply_s, server_loss_s, optax.sgd(0.1), chunk_size=2)
    state = alg.init(params, {}, K)
    rng = C.round_key(SEED, 0)
    new, metrics = jax.jit(alg.round)(state, round_batch(data, plan_round(SEED, 0, K)), rng)
    deltas, weights = [], []
    for cid in range(K):  # the split gradients written out: a loop of split_grads SGD steps per client
        p = params
        client_rng = jax.random.fold_in(rng, cid)
        for s in range(int(data.step_mask[cid].sum())):
            g = S.split_grads(client_apply, server_loss, p["client"], p["server"], data.batches["x"][cid, s],
                              data.batches["y"][cid, s], jax.random.fold_in(client_rng, s))
            p = jax.tree_util.tree_map(lambda w, d: w - 0.1 * d, p, {"client": g.client, "server": g.server})
        deltas.append(jax.tree_util.tree_map(jnp.subtract, p, params))
        weights.append(float(data.num_samples[cid]))
    w = np.array(weights) / sum(weights)
    expected = jax.tree_util.tree_map(
        lambda p, *d: np.asarray(p) + sum(wi * di for wi, di in zip(w, d)), params, *deltas
    )
    assert_tree_close(new.params, expected, tol=1e-5)
    assert int(metrics["clients_accepted"]) == K
    assert not np.allclose(new.params["server"]["fc1"]["kernel"], sp["fc1"]["kernel"])


def test_fl_bytes_formula():
    cp, sp = init_params()
    w = param_count({"client": cp, "server": sp})
    assert w == 67_733
    out = S.fl_round_bytes(2, w)
    assert out["total"] == 2 * 2 * w * 4 and out["weights_up"] == out["weights_down"] == 2 * w * 4
