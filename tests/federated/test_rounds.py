"""A vmapped, chunked round equals a Python loop over clients running the same client function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from jaxlab.federated import algorithms as F
from jaxlab.federated import clients as C
from jaxlab.federated.aggregators import coordinate_median
from jaxlab.federated.partition import quantity

NUM_CLIENTS, DIM, CLASSES, SEED = 10, 6, 3, 7


def loss_fn(params, batch, rng):
    """Softmax regression with an rng-dependent input jitter (so the client RNG matters)."""
    x = batch["x"] * (1.0 + 0.05 * jax.random.normal(rng, batch["x"].shape))
    logits = x @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n).astype(np.int32)
    x = (rng.normal(size=(n, DIM)) + y[:, None]).astype(np.float32)
    parts = quantity(y, NUM_CLIENTS, alpha=0.5, seed=seed, min_size=4)
    return C.stack_client_data({"x": x, "y": y}, parts, batch_size=8, seed=seed)


DATA = make_data()
PARAMS = {
    "w": jnp.asarray(np.random.default_rng(1).normal(size=(DIM, CLASSES)) * 0.1, jnp.float32),
    "b": jnp.zeros(CLASSES),
}


def take(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def loop_round(alg, state, data, plan, round_index):
    """Reference: jitted client function per client, then numpy aggregation; returns outputs by client id."""
    update = jax.jit(alg.client_update)
    results = {}
    for cid, stays in zip(plan.client_ids, plan.stays):
        rng = C.client_rng(SEED, round_index, int(cid))
        new_state, out = update(
            alg.broadcast(state), take(state.client_states, cid), take(data, cid), rng
        )
        finite = all(
            np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(out.update)
        )
        if stays and finite:
            results[int(cid)] = (new_state, out)
    return results


def np_mean(results, key, uniform=False):
    ws = np.array([1.0 if uniform else float(o.weight) for _, o in results.values()])

    def avg(*leaves):
        return sum(w * np.asarray(v) for w, v in zip(ws, leaves)) / ws.sum()

    return jax.tree_util.tree_map(avg, *[o.update[key] for _, o in results.values()])


def assert_tree_close(a, b, tol=1e-5):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def run_both(alg, rounds=2, per_round=7, **plan_kw):
    """Runs `rounds` vmapped rounds; before each, checks the loop reference against it. Returns final state."""
    state = alg.init(PARAMS, NUM_CLIENTS)
    for r in range(rounds):
        plan = F.plan_round(SEED, r, NUM_CLIENTS, per_round, **plan_kw)
        ref = loop_round(alg, state, DATA, plan, r)
        new, metrics = alg.apply(state, DATA, plan)
        yield state, new, ref, metrics, plan
        state = new


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_fedavg_fedprox_round_equals_loop(mu):
    alg = F.fedavg(loss_fn, optax.sgd(0.2), mu=mu, chunk_size=3)
    for old, new, ref, metrics, _ in run_both(alg):
        expected = jax.tree_util.tree_map(
            lambda p, d: np.asarray(p) + d, old.params, np_mean(ref, "params")
        )
        assert_tree_close(new.params, expected)
        assert int(metrics["clients_accepted"]) == 7
    assert not np.allclose(new.params["w"], PARAMS["w"])


def test_fedprox_term_changes_the_result():
    run = lambda mu: (
        list(run_both(F.fedavg(loss_fn, optax.sgd(0.5), mu=mu), rounds=1))[-1][1].params
    )
    assert not np.allclose(run(0.0)["w"], run(5.0)["w"], atol=1e-4)


def test_scaffold_round_equals_loop_and_controls_persist():
    alg = F.scaffold(loss_fn, lr=0.2, chunk_size=4)
    for old, new, ref, _, plan in run_both(alg, rounds=3):
        expected = jax.tree_util.tree_map(
            lambda p, d: np.asarray(p) + d, old.params, np_mean(ref, "params", True)
        )
        assert_tree_close(new.params, expected)
        frac = len(ref) / NUM_CLIENTS
        expected_c = jax.tree_util.tree_map(
            lambda c, d, f=frac: np.asarray(c) + f * d, old.control, np_mean(ref, "control", True)
        )
        assert_tree_close(new.control, expected_c)
        for cid in range(
            NUM_CLIENTS
        ):  # sampled clients hold their new control, others keep the old one
            want = ref[cid][0] if cid in ref else take(old.client_states, cid)
            assert_tree_close(take(new.client_states, cid), want)
    assert np.abs(np.asarray(new.control["w"])).sum() > 0


def test_fedadam_server_and_persistent_client_adam():
    server = F.server_optimizer("fedadam", lr=0.05)
    alg = F.fedavg(
        loss_fn, optax.adam(0.05), server_tx=server, persist_opt_state=True, chunk_size=5
    )
    opt_state = server.init(PARAMS)
    for old, new, ref, _, plan in run_both(alg, rounds=2):
        grad = jax.tree_util.tree_map(np.negative, np_mean(ref, "params"))
        upd, opt_state = server.update(grad, opt_state, old.params)
        assert_tree_close(new.params, optax.apply_updates(old.params, upd))
        for cid in ref:
            assert_tree_close(take(new.client_states, cid), ref[cid][0])


def test_dropout_masks_clients_out():
    dropped = [2, 5]
    alg = F.fedavg(loss_fn, optax.sgd(0.2), persist_opt_state=True, chunk_size=4)
    for old, new, ref, metrics, plan in run_both(
        alg, rounds=1, per_round=NUM_CLIENTS, dropped=dropped
    ):
        assert set(ref) == set(range(NUM_CLIENTS)) - set(dropped)
        assert int(metrics["clients_dropped"]) == 2 and int(metrics["clients_accepted"]) == 8
        expected = jax.tree_util.tree_map(
            lambda p, d: np.asarray(p) + d, old.params, np_mean(ref, "params")
        )
        assert_tree_close(new.params, expected)
        for cid in dropped:
            assert_tree_close(take(new.client_states, cid), take(old.client_states, cid))
    stays = F.plan_round(SEED, 3, 100, 50, dropout_prob=0.3).stays
    assert 0.5 < stays.mean() < 0.9
    np.testing.assert_array_equal(stays, F.plan_round(SEED, 3, 100, 50, dropout_prob=0.3).stays)


def test_nonfinite_client_is_rejected_counted_and_logged(caplog):
    bad = DATA._replace(batches={**DATA.batches, "x": DATA.batches["x"].at[3].set(jnp.nan)})
    alg = F.fedavg(loss_fn, optax.sgd(0.2), chunk_size=4)
    state = alg.init(PARAMS, NUM_CLIENTS)
    plan = F.plan_round(SEED, 0, NUM_CLIENTS)
    with caplog.at_level("WARNING", logger="jaxlab.federated"):
        new, metrics = alg.apply(state, bad, plan)
        jax.effects_barrier()
    assert "clients [3] returned a non-finite update" in caplog.text
    ref = loop_round(alg, state, bad, plan, 0)
    assert 3 not in ref and len(ref) == NUM_CLIENTS - 1
    assert int(metrics["clients_rejected_nonfinite"]) == 1 and int(metrics["clients_accepted"]) == 9
    expected = jax.tree_util.tree_map(
        lambda p, d: np.asarray(p) + d, state.params, np_mean(ref, "params")
    )
    assert_tree_close(new.params, expected)
    assert np.isfinite(float(metrics["loss"]))


def test_all_clients_rejected_keeps_params():
    bad = DATA._replace(batches={**DATA.batches, "x": DATA.batches["x"] * jnp.nan})
    alg = F.fedavg(
        loss_fn,
        optax.sgd(0.2),
        server_tx=F.server_optimizer("fedavgm"),
        aggregator=coordinate_median,
    )
    state = alg.init(PARAMS, NUM_CLIENTS)
    new, metrics = alg.apply(state, bad, F.plan_round(SEED, 0, NUM_CLIENTS))
    assert int(metrics["clients_accepted"]) == 0
    assert_tree_close(new.params, PARAMS, tol=0)


def test_masked_steps_leave_state_unchanged():
    step = lambda s, b, r: (s + b.sum() + jax.random.uniform(r), {"v": b.sum()})
    batches = jnp.arange(12.0).reshape(4, 3)
    rng = jax.random.key(0)
    padded, m = C.local_train(step, jnp.zeros(()), batches, jnp.asarray([1, 1, 0, 0], bool), rng)
    short, m2 = C.local_train(step, jnp.zeros(()), batches[:2], jnp.ones(2, bool), rng)
    np.testing.assert_allclose(padded, short, rtol=1e-6)
    np.testing.assert_allclose(m["v"], m2["v"])


def test_stack_client_data_unequal_sizes():
    assert DATA.batches["x"].shape[:3] == (NUM_CLIENTS, DATA.step_mask.shape[1], 8)
    steps = np.asarray(DATA.step_mask.sum(1))
    np.testing.assert_array_equal(steps, -(-np.asarray(DATA.num_samples) // 8))
    assert steps.min() < steps.max()
    with pytest.raises(ValueError, match="at least one example"):
        C.stack_client_data({"x": np.zeros(4)}, [np.arange(4), np.zeros(0, int)], 2)


def test_sampling_reproducible_and_no_recompilation():
    traces = []

    def counting_loss(params, batch, rng):
        traces.append(1)
        return loss_fn(params, batch, rng)

    alg = F.fedavg(counting_loss, optax.sgd(0.1), chunk_size=2)
    state = alg.init(PARAMS, NUM_CLIENTS)
    plans = [F.plan_round(SEED, r, NUM_CLIENTS, 4) for r in range(3)]
    assert len({tuple(p.client_ids) for p in plans}) > 1
    np.testing.assert_array_equal(
        plans[1].client_ids, F.plan_round(SEED, 1, NUM_CLIENTS, 4).client_ids
    )
    state, _ = alg.apply(state, DATA, plans[0])
    after_first = len(traces)
    for p in plans[1:]:
        state, _ = alg.apply(state, DATA, p)
    assert after_first > 0 and len(traces) == after_first


def test_client_axis_sharded_over_mesh_matches_unsharded():
    mesh = Mesh(np.array(jax.devices()[:8]), ("clients",))
    plain = F.fedavg(loss_fn, optax.sgd(0.2), chunk_size=8)
    sharded = F.fedavg(loss_fn, optax.sgd(0.2), chunk_size=8, mesh=mesh)
    plan = F.plan_round(SEED, 0, NUM_CLIENTS)
    a, _ = plain.apply(plain.init(PARAMS, NUM_CLIENTS), DATA, plan)
    b, _ = sharded.apply(sharded.init(PARAMS, NUM_CLIENTS), DATA, plan)
    assert_tree_close(a.params, b.params)
    with pytest.raises(ValueError, match="divide"):
        F.fedavg(loss_fn, optax.sgd(0.2), chunk_size=6, mesh=mesh)


class BNNet(nn.Module):
    """BatchNorm then a linear layer: running statistics are model state that FedAvg must average."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(CLASSES)(x)


BN_VARS = BNNet().init(jax.random.key(0), DATA.batches["x"][0, 0], train=False)


def bn_loss(params, model_state, batch, rng):
    logits, new_state = BNNet().apply(
        {"params": params, **model_state}, batch["x"], train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), new_state


def test_fedavg_averages_batchnorm_statistics_like_the_loop():
    """Stateful FedAvg: the new global BN statistics are the sample-weighted mean of the accepted
    clients' statistics after local training, exactly as a per-client loop computes them."""
    alg = F.fedavg(bn_loss, optax.sgd(0.2), stateful=True, persist_opt_state=True, chunk_size=3)
    stats = {"batch_stats": BN_VARS["batch_stats"]}
    state = alg.init(BN_VARS["params"], NUM_CLIENTS, model_state=stats)
    for r in range(2):
        plan = F.plan_round(SEED, r, NUM_CLIENTS, dropped=[r + 3])
        ref = loop_round(alg, state, DATA, plan, r)
        new, metrics = alg.apply(state, DATA, plan)
        assert int(metrics["clients_accepted"]) == len(ref) == NUM_CLIENTS - 1
        client_stats = [
            jax.tree_util.tree_map(np.add, state.model_state, o.update["model_state"])
            for _, o in ref.values()
        ]
        w = np.array([float(o.weight) for _, o in ref.values()])
        want = jax.tree_util.tree_map(
            lambda *s: sum(wi * si for wi, si in zip(w / w.sum(), s)), *client_stats
        )
        assert_tree_close(new.model_state, want)
        want_params = jax.tree_util.tree_map(
            lambda p, d: np.asarray(p) + d, state.params, np_mean(ref, "params")
        )
        assert_tree_close(new.params, want_params)
        state = new
    mean = np.asarray(state.model_state["batch_stats"]["BatchNorm_0"]["mean"])
    assert np.abs(mean).max() > 0.1  # the statistics moved towards the data's (class-shifted) mean


def test_scaffold_refuses_model_state():
    alg = F.scaffold(loss_fn, lr=0.1)
    with pytest.raises(ValueError, match="model_state"):
        alg.init(PARAMS, NUM_CLIENTS, model_state={"batch_stats": {"m": jnp.zeros(3)}})
