"""Round plumbing: a vmapped, chunked round equals a Python loop over clients running the same client
function (the maths of each algorithm is checked against numpy in test_algorithms_numpy.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from jaxlab.federated import clients as C
from jaxlab.federated.aggregators import coordinate_median, norm_bound
from jaxlab.federated.algorithms import fedavg, plan_round, round_batch, scaffold, server_optimizer
from jaxlab.federated.partition import quantity

NUM_CLIENTS, DIM, CLASSES, SEED = 10, 6, 3, 7


def loss_fn(params, model_state, batch, rng):
    """Softmax regression with an rng-dependent input jitter (so the client RNG matters)."""
    x = batch["x"] * (1.0 + 0.05 * jax.random.normal(rng, batch["x"].shape))
    logits = x @ params["w"] + params["b"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, (model_state, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])})


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


def is_finite(tree):
    return all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(tree))


def loop_round(alg, state, batch, rng):
    """Reference: the jitted client function per sampled client; {client id: (new state, output)} of the
    clients that stay and return finite values."""
    update = jax.jit(alg.client_update)
    message = alg.broadcast(state)
    results = {}
    for cid, stays in zip(np.asarray(batch.client_ids), np.asarray(batch.stays)):
        cid = int(cid)
        new_state, out = update(message, take(state.clients, cid), take(batch.data, cid),
                                jax.random.fold_in(rng, cid))
        if stays and is_finite((out.update, new_state)):
            results[cid] = (new_state, out)
    return results


def np_mean(results, key, uniform=False):
    ws = np.array([1.0 if uniform else float(o.weight) for _, o in results.values()])

    def avg(*leaves):
        return sum(w * np.asarray(v, np.float64) for w, v in zip(ws, leaves)) / ws.sum()

    return jax.tree_util.tree_map(avg, *[o.update[key] for _, o in results.values()])


def plus(tree, delta):
    return jax.tree_util.tree_map(lambda p, d: np.asarray(p, np.float64) + d, tree, delta)


def assert_tree_close(a, b, tol=1e-5):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def run_both(alg, rounds=2, per_round=7, model_state=None, data=DATA, **plan_kw):
    """Runs `rounds` jitted rounds; yields (old state, new state, loop reference, metrics) for each."""
    state = alg.init(PARAMS, model_state or {}, NUM_CLIENTS)
    step = jax.jit(alg.round)
    for r in range(rounds):
        batch = round_batch(data, plan_round(SEED, r, NUM_CLIENTS, per_round, **plan_kw))
        rng = C.round_key(SEED, r)
        ref = loop_round(alg, state, batch, rng)
        new, metrics = step(state, batch, rng)
        yield state, new, ref, metrics
        state = new


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_fedavg_fedprox_round_equals_loop(mu):
    alg = fedavg.build(loss_fn, optax.sgd(0.2), mu=mu, chunk_size=3)
    for old, new, ref, metrics in run_both(alg):
        assert_tree_close(new.params, plus(old.params, np_mean(ref, "params")))
        assert int(metrics["clients_accepted"]) == 7 and int(new.round) == int(old.round) + 1
        for name in ("loss", "accuracy"):  # client metrics: averaged over steps, then over clients
            want = np.mean([float(o.metrics[name]) for _, o in ref.values()])
            np.testing.assert_allclose(metrics[name], want, rtol=1e-5)
        assert bool(metrics["finite"])
    assert not np.allclose(new.params["w"], PARAMS["w"])
    assert all(np.ndim(v) == 0 for v in metrics.values())  # scalars only


def test_scaffold_round_equals_loop_and_controls_persist():
    alg = scaffold.build(loss_fn, lr=0.2, chunk_size=4)
    for old, new, ref, _ in run_both(alg, rounds=3):
        assert_tree_close(new.params, plus(old.params, np_mean(ref, "params", True)))
        frac = len(ref) / NUM_CLIENTS
        dc = np_mean(ref, "control", True)
        assert_tree_close(new.control, jax.tree_util.tree_map(lambda c, d: np.asarray(c) + frac * d, old.control, dc))
        for cid in range(NUM_CLIENTS):  # sampled clients hold their new control, others keep the old one
            want = ref[cid][0] if cid in ref else take(old.clients, cid)
            assert_tree_close(take(new.clients, cid), want)
    assert np.abs(np.asarray(new.control["w"])).sum() > 0


def test_fedadam_server_and_persistent_client_adam():
    server = server_optimizer("fedadam", lr=0.05)
    alg = fedavg.build(loss_fn, optax.adam(0.05), server_tx=server, persist_opt_state=True, chunk_size=5)
    opt_state = server.init(PARAMS)
    for old, new, ref, _ in run_both(alg, rounds=2):
        grad = jax.tree_util.tree_map(lambda d: -jnp.asarray(d, jnp.float32), np_mean(ref, "params"))
        upd, opt_state = server.update(grad, opt_state, old.params)
        assert_tree_close(new.params, optax.apply_updates(old.params, upd))
        for cid in ref:
            assert_tree_close(take(new.clients, cid), ref[cid][0])


def test_dropout_masks_clients_out():
    dropped = [2, 5]
    alg = fedavg.build(loss_fn, optax.sgd(0.2), persist_opt_state=True, chunk_size=4)
    for old, new, ref, metrics in run_both(alg, rounds=1, per_round=NUM_CLIENTS, dropped=dropped):
        assert set(ref) == set(range(NUM_CLIENTS)) - set(dropped)
        assert int(metrics["clients_dropped"]) == 2 and int(metrics["clients_accepted"]) == 8
        assert_tree_close(new.params, plus(old.params, np_mean(ref, "params")))
        for cid in dropped:
            assert_tree_close(take(new.clients, cid), take(old.clients, cid))
    stays = plan_round(SEED, 3, 100, 50, dropout_prob=0.3).stays
    assert 0.5 < stays.mean() < 0.9
    np.testing.assert_array_equal(stays, plan_round(SEED, 3, 100, 50, dropout_prob=0.3).stays)


def test_nonfinite_client_is_rejected_counted_and_logged(caplog):
    bad = DATA._replace(batches={**DATA.batches, "x": DATA.batches["x"].at[3].set(jnp.nan)})
    alg = fedavg.build(loss_fn, optax.sgd(0.2), chunk_size=4)
    state = alg.init(PARAMS, {}, NUM_CLIENTS)
    batch, rng = round_batch(bad, plan_round(SEED, 0, NUM_CLIENTS)), C.round_key(SEED, 0)
    with caplog.at_level("WARNING", logger="jaxlab.federated"):
        new, metrics = jax.jit(alg.round)(state, batch, rng)
        jax.effects_barrier()
    assert "clients [3] returned a non-finite update" in caplog.text
    ref = loop_round(alg, state, batch, rng)
    assert 3 not in ref and len(ref) == NUM_CLIENTS - 1
    assert int(metrics["clients_rejected_nonfinite"]) == 1 and int(metrics["clients_accepted"]) == 9
    assert int(metrics["clients_rejected"]) == 1 and bool(metrics["finite"])
    assert_tree_close(new.params, plus(state.params, np_mean(ref, "params")))
    assert np.isfinite(float(metrics["loss"]))


def test_all_clients_rejected_keeps_params():
    bad = DATA._replace(batches={**DATA.batches, "x": DATA.batches["x"] * jnp.nan})
    alg = fedavg.build(loss_fn, optax.sgd(0.2), server_tx=server_optimizer("fedavgm"), aggregator=coordinate_median)
    state = alg.init(PARAMS, {}, NUM_CLIENTS)
    new, metrics = jax.jit(alg.round)(state, round_batch(bad, plan_round(SEED, 0, NUM_CLIENTS)), C.round_key(SEED, 0))
    assert int(metrics["clients_accepted"]) == 0
    assert_tree_close(new.params, PARAMS, tol=0)
    assert_tree_close(new.opt_state, state.opt_state, tol=0)  # the momentum did not step on a zero update


@pytest.mark.parametrize("mode", ["clip", "reject"])
def test_norm_bound_clips_or_rejects_outliers_and_names_them(mode, caplog):
    """Client 4's inputs are scaled 50x: its update is far above the bound; the others are under it."""
    loud = DATA._replace(batches={**DATA.batches, "x": DATA.batches["x"].at[4].multiply(50.0)})
    free = fedavg.build(loss_fn, optax.sgd(0.2), chunk_size=4)
    state = free.init(PARAMS, {}, NUM_CLIENTS)
    batch, rng = round_batch(loud, plan_round(SEED, 0, NUM_CLIENTS)), C.round_key(SEED, 0)
    ref = loop_round(free, state, batch, rng)
    norms = {cid: np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree_util.tree_leaves(o.update["params"])))
             for cid, (_, o) in ref.items()}
    bound = 2 * max(n for cid, n in norms.items() if cid != 4)
    assert norms[4] > 3 * bound
    alg = fedavg.build(loss_fn, optax.sgd(0.2), chunk_size=4, norm_bound=norm_bound(bound, mode))
    with caplog.at_level("WARNING", logger="jaxlab.federated"):
        new, metrics = jax.jit(alg.round)(state, batch, rng)
        jax.effects_barrier()
    assert f"clients [4] sent an update of norm above {bound:g}" in caplog.text
    if mode == "clip":
        scale = bound / norms[4]
        ref[4] = (ref[4][0], ref[4][1]._replace(update={
            **ref[4][1].update, "params": jax.tree_util.tree_map(lambda d: d * scale, ref[4][1].update["params"])}))
        assert int(metrics["clients_clipped"]) == 1 and int(metrics["clients_accepted"]) == NUM_CLIENTS
    else:
        del ref[4]
        assert int(metrics["clients_rejected_norm"]) == 1 and int(metrics["clients_accepted"]) == NUM_CLIENTS - 1
    assert_tree_close(new.params, plus(state.params, np_mean(ref, "params")))


def test_nonfinite_aggregate_reports_finite_false_and_keeps_the_state():
    """An aggregate that is inf (here from a deliberately broken aggregator) must not reach the state."""
    inf_mean = lambda u, w, m: jax.tree_util.tree_map(lambda x: jnp.full(x.shape[1:], jnp.inf, x.dtype), u)
    for alg in (fedavg.build(loss_fn, optax.adam(0.1), aggregator=inf_mean, persist_opt_state=True,
                             server_tx=server_optimizer("fedadam")),
                scaffold.build(loss_fn, 0.1, aggregator=inf_mean)):
        state = alg.init(PARAMS, {}, NUM_CLIENTS)
        new, metrics = jax.jit(alg.round)(state, round_batch(DATA, plan_round(SEED, 0, NUM_CLIENTS)),
                                          C.round_key(SEED, 0))
        assert not bool(metrics["finite"]) and int(metrics["clients_accepted"]) == NUM_CLIENTS
        assert int(new.round) == int(state.round) + 1
        assert_tree_close(new.replace(round=state.round), state, tol=0)


def test_server_overflow_reports_finite_false():
    """Finite client updates (3e37) that a server step of lr 100 pushes past float32's max: finite False,
    state kept."""
    start = {"w": jnp.full((DIM, CLASSES), 1e36, jnp.float32), "b": jnp.zeros(CLASSES)}

    def push(params, model_state, batch, rng):  # value 0, gradient -3e37: one sgd(1) step adds 3e37
        w = params["w"]
        return -3e37 * jnp.sum(w - jax.lax.stop_gradient(w)), (model_state, {})

    alg = fedavg.build(push, optax.sgd(1.0), server_tx=server_optimizer("sgd", lr=100.0))
    state = alg.init(start, {}, 2)
    data = jax.tree_util.tree_map(lambda x: x[:2], DATA)
    data = data._replace(step_mask=data.step_mask.at[:, 1:].set(False))
    new, metrics = jax.jit(alg.round)(state, round_batch(data, plan_round(SEED, 0, 2)), C.round_key(SEED, 0))
    assert int(metrics["clients_accepted"]) == 2 and not bool(metrics["finite"])
    assert_tree_close(new.params, start, tol=0)


def test_round_is_pure_and_jits_with_donation():
    """jax.jit(alg.round, donate_argnums=0) gives what the un-jitted call gives, for every state part."""
    for build in (lambda: fedavg.build(loss_fn, optax.adam(0.1), mu=0.1, persist_opt_state=True, private={"b"},
                                       server_tx=server_optimizer("fedadam"), chunk_size=4),
                  lambda: scaffold.build(loss_fn, 0.1, chunk_size=4)):
        alg = build()
        batch = round_batch(DATA, plan_round(SEED, 0, NUM_CLIENTS, 6, dropped=[4]))
        rng = C.round_key(SEED, 0)
        eager, eager_metrics = alg.round(alg.init(PARAMS, {}, NUM_CLIENTS), batch, rng)
        state = alg.init(PARAMS, {}, NUM_CLIENTS)
        jitted, jit_metrics = jax.jit(alg.round, donate_argnums=0)(state, batch, rng)
        assert jax.tree_util.tree_leaves(state)[0].is_deleted()
        assert_tree_close(jitted, eager, tol=1e-6)
        assert_tree_close(jit_metrics, eager_metrics, tol=1e-6)
        assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(jitted))
        assert jitted.round.dtype == jnp.int32 and int(jitted.round) == 1


def test_loss_fn_with_the_old_signature_is_a_clear_error():
    alg = fedavg.build(lambda p, s, b, r: loss_fn(p, s, b, r)[0], optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"\(loss, \(model_state, metrics\)\)"):
        alg.round(alg.init(PARAMS, {}, NUM_CLIENTS), round_batch(DATA, plan_round(SEED, 0, NUM_CLIENTS)),
                  C.round_key(SEED, 0))


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

    def counting_loss(params, model_state, batch, rng):
        traces.append(1)
        return loss_fn(params, model_state, batch, rng)

    alg = fedavg.build(counting_loss, optax.sgd(0.1), chunk_size=2)
    state = alg.init(PARAMS, {}, NUM_CLIENTS)
    plans = [plan_round(SEED, r, NUM_CLIENTS, 4) for r in range(3)]
    assert len({tuple(p.client_ids) for p in plans}) > 1
    np.testing.assert_array_equal(plans[1].client_ids, plan_round(SEED, 1, NUM_CLIENTS, 4).client_ids)
    step = jax.jit(alg.round)
    state, _ = step(state, round_batch(DATA, plans[0]), C.round_key(SEED, 0))
    after_first = len(traces)
    for r, p in enumerate(plans[1:], 1):
        state, _ = step(state, round_batch(DATA, p), C.round_key(SEED, r))
    assert after_first > 0 and len(traces) == after_first


def test_client_axis_sharded_over_mesh_matches_unsharded():
    mesh = Mesh(np.array(jax.devices()[:8]), ("clients",))
    plain = fedavg.build(loss_fn, optax.sgd(0.2), chunk_size=8)
    sharded = fedavg.build(loss_fn, optax.sgd(0.2), chunk_size=8, mesh=mesh)
    batch, rng = round_batch(DATA, plan_round(SEED, 0, NUM_CLIENTS)), C.round_key(SEED, 0)
    a, _ = jax.jit(plain.round)(plain.init(PARAMS, {}, NUM_CLIENTS), batch, rng)
    b, _ = jax.jit(sharded.round)(sharded.init(PARAMS, {}, NUM_CLIENTS), batch, rng)
    assert_tree_close(a.params, b.params)
    with pytest.raises(ValueError, match="divide"):
        fedavg.build(loss_fn, optax.sgd(0.2), chunk_size=6, mesh=mesh)


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
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), (new_state, {})


@pytest.mark.parametrize("name", ["fedavg", "scaffold"])
def test_batchnorm_statistics_are_averaged_like_the_loop(name):
    """The new global BN statistics are the (sample- or uniformly-) weighted mean of the accepted
    clients' statistics after local training, exactly as a per-client loop computes them."""
    if name == "fedavg":
        alg, uniform = fedavg.build(bn_loss, optax.sgd(0.2), persist_opt_state=True, chunk_size=3), False
    else:
        alg, uniform = scaffold.build(bn_loss, 0.2, chunk_size=3), True
    stats = {"batch_stats": BN_VARS["batch_stats"]}
    state = alg.init(BN_VARS["params"], stats, NUM_CLIENTS)
    step = jax.jit(alg.round)
    for r in range(2):
        batch, rng = round_batch(DATA, plan_round(SEED, r, NUM_CLIENTS, dropped=[r + 3])), C.round_key(SEED, r)
        ref = loop_round(alg, state, batch, rng)
        new, metrics = step(state, batch, rng)
        assert int(metrics["clients_accepted"]) == len(ref) == NUM_CLIENTS - 1
        client_stats = [plus(state.model_state, o.update["model_state"]) for _, o in ref.values()]
        w = np.array([1.0 if uniform else float(o.weight) for _, o in ref.values()])
        want = jax.tree_util.tree_map(lambda *s: sum(wi * si for wi, si in zip(w / w.sum(), s)), *client_stats)
        assert_tree_close(new.model_state, want)
        assert_tree_close(new.params, plus(state.params, np_mean(ref, "params", uniform)))
        state = new
    mean = np.asarray(state.model_state["batch_stats"]["BatchNorm_0"]["mean"])
    assert np.abs(mean).max() > 0.1  # the statistics moved towards the data's (class-shifted) mean
