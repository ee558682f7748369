"""Per-client private parameters: never in a server message or an aggregate, isolated per client, and
FedBN equal to a plain per-client loop written without the engine."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.federated import clients as C
from jaxlab.federated.algorithms import base as B
from jaxlab.federated.algorithms import fedavg, fedbn, plan_round, round_batch

from .test_rounds import BN_VARS, DATA, NUM_CLIENTS, SEED, BNNet, assert_tree_close, bn_loss, take

LR = 0.2


def paths(tree):
    return [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_split_and_merge_trees():
    tree = {"Dense_0": {"kernel": 1.0, "bias": 2.0}, "BatchNorm_0": {"scale": 3.0}, "empty": {}, "t": (4.0, 5.0)}
    shared, private = B.split_tree(tree, fedbn.is_batchnorm)
    assert shared == {"Dense_0": {"kernel": 1.0, "bias": 2.0}, "empty": {}, "t": (4.0, 5.0)}
    assert private == {"BatchNorm_0": {"scale": 3.0}}
    assert B.merge_trees(shared, private) == tree
    shared, private = B.split_tree(tree, lambda p: p[-1] == "bias")  # a leaf-level predicate
    assert private == {"Dense_0": {"bias": 2.0}} and shared["Dense_0"] == {"kernel": 1.0}
    assert B.merge_trees(shared, private) == tree
    assert B.split_tree(tree, B.private_predicate({"t", "empty"}))[1] == {"t": (4.0, 5.0)}
    state = {"batch_stats": {"BatchNorm_0": {"mean": 0.0}, "Other": {"m": 1.0}}}
    assert B.split_state(state, fedbn.is_batchnorm) == (
        {"batch_stats": {"Other": {"m": 1.0}}}, {"batch_stats": {"BatchNorm_0": {"mean": 0.0}}})
    with pytest.raises(TypeError, match="collection of top-level keys"):
        B.private_predicate("hyper")


def fedbn_reference(rounds, per_round, dropped):
    """FedBN without the engine: per client, Dense from the server, BatchNorm params and statistics its
    own; plain SGD steps (jax.grad of the flax loss), then the sample-weighted mean of the Dense deltas."""
    dense = jax.tree_util.tree_map(np.asarray, BN_VARS["params"]["Dense_0"])
    bn_params = [jax.tree_util.tree_map(np.asarray, BN_VARS["params"]["BatchNorm_0"])] * NUM_CLIENTS
    bn_stats = [jax.tree_util.tree_map(np.asarray, BN_VARS["batch_stats"]["BatchNorm_0"])] * NUM_CLIENTS

    @jax.jit
    def sgd_step(params, stats, x, y):
        def loss(p):
            logits, new = BNNet().apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

        grads, stats = jax.grad(loss, has_aux=True)(params)
        return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), stats

    for r in range(rounds):
        plan = plan_round(SEED, r, NUM_CLIENTS, per_round, dropped=dropped)
        deltas, weights = [], []
        for k in [int(c) for c, s in zip(plan.client_ids, plan.stays) if s]:
            params = {"Dense_0": dense, "BatchNorm_0": bn_params[k]}
            stats = {"BatchNorm_0": bn_stats[k]}
            for s in range(int(DATA.step_mask[k].sum())):
                params, stats = sgd_step(params, stats, DATA.batches["x"][k, s], DATA.batches["y"][k, s])
            deltas.append(jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - b, params["Dense_0"], dense))
            weights.append(float(DATA.num_samples[k]))
            bn_params[k], bn_stats[k] = params["BatchNorm_0"], stats["BatchNorm_0"]
        w = np.asarray(weights) / sum(weights)
        dense = jax.tree_util.tree_map(lambda d, *ds: d + sum(wi * di for wi, di in zip(w, ds)), dense, *deltas)
    return dense, bn_params, bn_stats


def test_fedbn_equals_a_plain_per_client_loop():
    alg = fedbn.build(bn_loss, optax.sgd(LR), chunk_size=3)
    state = alg.init(BN_VARS["params"], {"batch_stats": BN_VARS["batch_stats"]}, NUM_CLIENTS)
    step = jax.jit(alg.round)
    for r in range(2):
        state, metrics = step(state, round_batch(DATA, plan_round(SEED, r, NUM_CLIENTS, 6, dropped=[3])),
                              C.round_key(SEED, r))
        assert bool(metrics["finite"])
    dense, bn_params, bn_stats = fedbn_reference(2, 6, [3])
    assert_tree_close(state.params, {"Dense_0": dense})
    for k in range(NUM_CLIENTS):
        params, model_state = alg.client_params(state, k)
        assert_tree_close(params["BatchNorm_0"], bn_params[k])
        assert_tree_close(model_state["batch_stats"]["BatchNorm_0"], bn_stats[k])
        assert_tree_close(params["Dense_0"], dense)
    assert not np.allclose(bn_stats[0]["mean"], bn_stats[1]["mean"])  # clients' statistics went their own ways
    with pytest.raises(ValueError, match="client_params"):
        alg.evaluation_params(state)


def test_private_parts_never_leave_the_client_and_stay_isolated():
    alg = fedbn.build(bn_loss, optax.sgd(LR), chunk_size=4)
    state = alg.init(BN_VARS["params"], {"batch_stats": BN_VARS["batch_stats"]}, NUM_CLIENTS)
    message = alg.broadcast(state)
    assert not any("BatchNorm_0" in p for p in paths(message)) and paths(message)
    _, out = jax.jit(alg.client_update)(message, take(state.clients, 0), take(DATA, 0), jax.random.key(0))
    assert not any("BatchNorm_0" in p for p in paths(out.update)) and paths(out.update["params"])

    batch, rng = round_batch(DATA, plan_round(SEED, 0, NUM_CLIENTS, 6)), C.round_key(SEED, 0)
    sampled = [int(c) for c in batch.client_ids]
    step = jax.jit(alg.round)
    new, _ = step(state, batch, rng)
    j = sampled[0]  # perturb one sampled client's private parameters: no other client's may move
    bumped = jax.tree_util.tree_map(lambda x: x.at[j].add(1.0), state.clients["params"])
    other, _ = step(state.replace(clients={**state.clients, "params": bumped}), batch, rng)
    for k in range(NUM_CLIENTS):
        if k != j:
            jax.tree_util.tree_map(np.testing.assert_array_equal, take(other.clients, k), take(new.clients, k))
        if k not in sampled:
            jax.tree_util.tree_map(np.testing.assert_array_equal, take(new.clients, k), take(state.clients, k))
    assert not np.allclose(take(other.clients, j)["params"]["BatchNorm_0"]["scale"],
                           take(new.clients, j)["params"]["BatchNorm_0"]["scale"])


def hyper_loss(params, model_state, batch, rng):
    """HyperFed-like: a shared linear net whose logits a private per-client vector modulates (FiLM)."""
    logits = batch["x"] @ params["net"]["w"] + params["net"]["b"]
    logits = logits * (1.0 + params["hyper"]["gamma"]) + params["hyper"]["beta"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), (model_state, {})


def init_hyper(rng):
    g, b = jax.random.split(rng)
    return {"hyper": {"gamma": 0.1 * jax.random.normal(g, (3,)), "beta": 0.1 * jax.random.normal(b, (3,))}}


def test_init_private_starts_every_client_differently():
    net = {"w": 0.1 * jax.random.normal(jax.random.key(98), (6, 3)), "b": jnp.zeros(3)}
    params = {"net": net, **init_hyper(jax.random.key(99))}
    alg = fedavg.build(hyper_loss, optax.sgd(LR), private={"hyper"}, init_private=init_hyper, chunk_size=5)
    rng = jax.random.key(5)
    state = alg.init(params, {}, NUM_CLIENTS, rng)
    for k in (0, 7):
        assert_tree_close(take(state.clients["params"], k), init_hyper(jax.random.fold_in(rng, k)), tol=0)
    assert not np.allclose(state.clients["params"]["hyper"]["gamma"][0], state.clients["params"]["hyper"]["gamma"][1])
    assert "hyper" not in state.params and "hyper" not in alg.broadcast(state)["params"]
    new, metrics = jax.jit(alg.round)(state, round_batch(DATA, plan_round(SEED, 0, NUM_CLIENTS)), C.round_key(SEED, 0))
    assert bool(metrics["finite"]) and not np.allclose(new.params["net"]["w"], net["w"])
    moved = np.abs(np.asarray(new.clients["params"]["hyper"]["gamma"] - state.clients["params"]["hyper"]["gamma"]))
    assert (moved.max(axis=1) > 0).all()  # every client trained its own
    params_3, _ = alg.client_params(new, 3)
    assert set(params_3) == {"net", "hyper"}
    with pytest.raises(ValueError, match="pass rng"):
        alg.init(params, {}, NUM_CLIENTS)
    bad = fedavg.build(hyper_loss, optax.sgd(LR), private={"hyper"},
                       init_private=lambda r: {"hyper": {"gamma": jnp.zeros(3)}})
    with pytest.raises(ValueError, match="init_private's private part has structure"):
        bad.init(params, {}, NUM_CLIENTS, rng)
