"""HyperFed's federation: the hypernetwork is never aggregated nor sent, the vmapped round equals a
per-client loop with an equal-weight mean, each algorithm's shared and private parts, per-client evaluation."""

import jax
import numpy as np
import pytest

from jaxlab.config import load_config
from jaxlab.federated.algorithms import base as B
from jaxlab.methods.hyperfed import task
from jaxlab.models import hypernet as H
from jaxlab.train.mesh import make_mesh


def tiny_config(algorithm="hyperfed", clients=3):
    c = load_config("hyperfed:tiny")
    c.hyperfed.update(algorithm=algorithm, num_clients=clients, local_steps=2, chunk_size=clients)
    c.model.update(blocks=2, features=2, remat=False)
    c.data.update(image_size=16, view_factor=32, det_factor=16, train_per_client=2, test_per_client=1,
                  batch_size=1, eval_batch_size=3)
    c.train.update(steps=3, eval_every=3, checkpoint_every=3, log_every=1, progress=False, best_metric="")
    return c


@pytest.fixture(scope="module")
def clients():
    return task.make_clients(tiny_config())


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _paths(v, (*prefix, k))]
    return [prefix]


def _method_round(config, clients):
    """(method, its algorithm's twin, initial state, the round-0 batch) of a tiny build."""
    method = task.build(config, clients)
    alg = task.make_algorithm(task.make_model(config, config.hyperfed.algorithm), clients.geometry,
                              config.hyperfed.algorithm, config)
    state = method.init_state(jax.random.key(0), None)
    batch = method.train_batches(make_mesh(1)).batch(0)
    return method, alg, state, batch


def test_clients_have_their_own_scaled_geometries_padded_to_one_stack(clients):
    shapes = [g.sino_shape for g in clients.geometries]
    assert shapes == [(16, 23), (16, 19), (12, 20)]  # views / 32, detectors / 16 of protocols 1-3
    assert clients.geometry.sino_shape == (16, 23) and clients.geometry.angles.shape == (3, 16)
    np.testing.assert_array_equal(clients.geometry.view_mask[2], [1.0] * 12 + [0.0] * 4)
    assert clients.train[2]["sino"].shape == (2, 16, 23) and not clients.train[2]["sino"][:, 12:].any()
    np.testing.assert_allclose(clients.train[0]["f"][0], H.protocol_features(*task.PROTOCOLS[0]))
    assert not np.allclose(clients.train[0]["f"][0], clients.train[1]["f"][0])


def test_hypernetwork_is_never_sent_nor_aggregated_and_the_round_equals_a_client_loop(clients):
    config = tiny_config()
    method, alg, state, data = _method_round(config, clients)
    rng = jax.random.key(5)
    k = len(clients.train)
    new = jax.jit(method.train_step)(state, data, rng)[0].extra
    old = state.extra
    # the server message (down) and every client's update (up) hold no hypernetwork parameter
    message = alg.broadcast(old)
    assert {p[0] for p in _paths(message["params"])} == {"imaging"}
    update = jax.jit(alg.client_update)
    outs = [update(message, B.take(old.clients, c), B.take(data, c), jax.random.fold_in(rng, c)) for c in range(k)]
    for _, out in outs:
        assert {p[0] for p in _paths(out.update["params"])} == {"imaging"}
    # reference: the per-client loop, then the equal-weight mean of the imaging deltas (numpy)
    mean_delta = jax.tree.map(lambda *d: np.mean(np.stack(d), 0), *[o.update["params"] for _, o in outs])
    want = jax.tree.map(lambda w, d: np.asarray(w) + d, old.params, mean_delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new.params, want)
    for c, (client_state, _) in enumerate(outs):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     B.take(new.clients["params"], c), client_state["params"])
    # every client's hypernetwork starts as one copy and stays its own: all different after the round
    before, after = (s.clients["params"]["hypernet"]["linear2"]["kernel"] for s in (old, new))
    np.testing.assert_array_equal(before[0], before[1])
    assert not np.allclose(after[0], after[1]) and not np.allclose(after[1], after[2])
    # evaluation: every client's test scan with its own hypernetwork and geometry, scores per client
    test = {n: np.concatenate([t[n] for t in clients.test]) for n in clients.test[0]}
    test["client"] = np.arange(k, dtype=np.int32)
    values = jax.jit(method.eval_step)(state.replace(extra=new), test, rng)
    scores = method.eval_finish({n: float(np.mean(v)) for n, v in values.items()})
    assert all(np.isfinite(scores[f"psnr_c{c}"]) and f"input_ssim_c{c}" in scores for c in range(k))
    # jaxlab info's groups: one client's hypernetwork and the imaging network
    groups = method.param_groups(state)
    count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t))  # noqa: E731
    assert count(groups["hypernetwork_per_client"]) == H.param_count(2 * 2 + 2)
    assert count(groups["imaging_network"]) == 2 * ((9 * 2 + 2) + (9 * 4 + 2) + (9 * 2 + 1) + 1)


@pytest.mark.parametrize("algorithm, sent, kept", [
    ("hyperfed", {"imaging"}, {"hypernet"}), ("fedavg", {"film", "imaging"}, set()),
    ("fedbn", {"imaging"}, {"film"}), ("local", set(), {"hypernet", "imaging"})])
def test_each_algorithm_sends_its_shared_parts_and_keeps_the_rest(clients, algorithm, sent, kept):
    config = tiny_config(algorithm)
    model = task.make_model(config, algorithm)
    alg = task.make_algorithm(model, clients.geometry, algorithm, config)
    t = clients.train[0]
    geom = task.client_geometry(clients.geometry, 0)

    def init():
        params = model.init(jax.random.key(0), t["x"][:1], t["sino"][:1], geom, t["f"][:1])["params"]
        return alg.init(params, {}, 3, jax.random.key(1))

    state = jax.eval_shape(init)  # shapes only
    assert {p[0] for p in _paths(alg.broadcast(state)["params"])} == sent
    assert {p[0] for p in _paths(state.clients["params"])} == kept
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(state.clients["params"]))
