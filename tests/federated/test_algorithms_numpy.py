"""Each algorithm's client and server update against an independent numpy computation.

Model: linear regression, loss 0.5 mean((x w + b - y)^2), with its gradient written by hand in numpy.
The test_rounds tests compare a round with a loop over the same client function (plumbing); these
check the maths, so a flipped sign in FedProx's proximal term or SCAFFOLD's correction fails here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.federated import clients as C
from jaxlab.federated.algorithms import fedavg, plan_round, round_batch, scaffold, server_optimizer

K, DIM, BATCH, SEED = 4, 3, 4, 0
SIZES = (12, 20, 8, 16)  # 3, 5, 2, 4 local steps
LR = 0.05


def linreg_loss(params, model_state, batch, rng):
    err = batch["x"] @ params["w"] + params["b"] - batch["y"]
    return 0.5 * jnp.mean(err**2), (model_state, {})


def np_grad(w, b, x, y):
    """d/d(w, b) of 0.5 mean((x w + b - y)^2)."""
    err = x @ w + b - y
    return x.T @ err / len(y), err.mean()


def make_data():
    rng = np.random.default_rng(3)
    n = sum(SIZES)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=n)).astype(np.float32)
    # client k's features are shifted by k: heterogeneous clients, so SCAFFOLD's controls matter
    parts = np.split(np.arange(n), np.cumsum(SIZES)[:-1])
    for k, p in enumerate(parts):
        x[p] += 0.5 * k
    return C.stack_client_data({"x": x, "y": y}, parts, BATCH, seed=1)


DATA = make_data()
PARAMS = {"w": jnp.asarray([0.2, 0.1, -0.3], jnp.float32), "b": jnp.asarray(0.05, jnp.float32)}


def client_batches(k):
    """Client k's (x, y) batches in order, float64, as the engine feeds them (its unmasked steps)."""
    steps = int(np.asarray(DATA.step_mask[k]).sum())
    xs, ys = np.asarray(DATA.batches["x"][k], np.float64), np.asarray(DATA.batches["y"][k], np.float64)
    return [(xs[s], ys[s]) for s in range(steps)]


def np_fedprox_client(w_g, b_g, k, mu):
    """w <- w - lr (grad + mu (w - w_g)) over client k's batches; returns the deltas."""
    w, b = w_g.copy(), b_g
    for x, y in client_batches(k):
        gw, gb = np_grad(w, b, x, y)
        w, b = w - LR * (gw + mu * (w - w_g)), b - LR * (gb + mu * (b - b_g))
    return w - w_g, b - b_g


def as_np(params):
    return np.asarray(params["w"], np.float64), float(params["b"])


def rounds(alg, num_rounds, per_round, dropped=()):
    """The algorithm's jitted rounds; yields (state before, state after, sampled & staying ids)."""
    state = alg.init(PARAMS, {}, K)
    step = jax.jit(alg.round)
    for r in range(num_rounds):
        plan = plan_round(SEED, r, K, per_round, dropped=dropped)
        new, metrics = step(state, round_batch(DATA, plan), C.round_key(SEED, r))
        assert int(metrics["clients_accepted"]) == int(plan.stays.sum())
        yield state, new, [int(c) for c, s in zip(plan.client_ids, plan.stays) if s]
        state = new


def assert_close(got, want, tol=2e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("mu", [0.0, 0.7])
def test_fedavg_fedprox_client_update_matches_numpy(mu):
    alg = fedavg.build(linreg_loss, optax.sgd(LR), mu=mu)
    state = alg.init(PARAMS, {}, K)
    w_g, b_g = as_np(PARAMS)
    for k in range(K):
        data = jax.tree_util.tree_map(lambda v, k=k: v[k], DATA)
        _, out = jax.jit(alg.client_update)(alg.broadcast(state), {"params": {}, "model_state": {}}, data,
                                            jax.random.key(0))
        dw, db = np_fedprox_client(w_g, b_g, k, mu)
        assert_close(out.update["params"]["w"], dw)
        assert_close(out.update["params"]["b"], db)
        assert float(out.weight) == SIZES[k]


@pytest.mark.parametrize("mu", [0.0, 0.7])
def test_fedavg_fedprox_rounds_match_numpy(mu):
    """Server: w_g += sum_k n_k dw_k / sum_k n_k over the accepted clients (sgd(1) server)."""
    alg = fedavg.build(linreg_loss, optax.sgd(LR), mu=mu)
    w_g, b_g = as_np(PARAMS)
    for _, new, ids in rounds(alg, 3, per_round=3, dropped=[2]):
        deltas = [np_fedprox_client(w_g, b_g, k, mu) for k in ids]
        n = np.array([SIZES[k] for k in ids], np.float64)
        w_g = w_g + sum(ni * d[0] for ni, d in zip(n, deltas)) / n.sum()
        b_g = b_g + sum(ni * d[1] for ni, d in zip(n, deltas)) / n.sum()
        assert_close(new.params["w"], w_g)
        assert_close(new.params["b"], b_g)


def np_fedavg_deltas(w_g, b_g, ids):
    deltas = [np_fedprox_client(w_g, b_g, k, 0.0) for k in ids]
    n = np.array([SIZES[k] for k in ids], np.float64)
    return (sum(ni * d[0] for ni, d in zip(n, deltas)) / n.sum(),
            sum(ni * d[1] for ni, d in zip(n, deltas)) / n.sum())


def test_fedavgm_server_matches_numpy():
    """FedAvgM: m <- beta m + (-delta); w <- w - lr_s m (optax's sgd momentum, pseudo-gradient -delta)."""
    lr_s, beta = 0.7, 0.9
    alg = fedavg.build(linreg_loss, optax.sgd(LR), server_tx=server_optimizer("fedavgm", lr=lr_s, momentum=beta))
    w_g, b_g = as_np(PARAMS)
    m_w, m_b = np.zeros(DIM), 0.0
    for _, new, ids in rounds(alg, 3, per_round=3):
        dw, db = np_fedavg_deltas(w_g, b_g, ids)
        m_w, m_b = beta * m_w - dw, beta * m_b - db
        w_g, b_g = w_g - lr_s * m_w, b_g - lr_s * m_b
        assert_close(new.params["w"], w_g)
        assert_close(new.params["b"], b_g)


def test_fedadam_server_matches_numpy():
    """FedAdam (Reddi et al.): m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, w -= lr m_hat / (sqrt(v_hat) + tau)
    with g = -delta and bias-corrected m_hat, v_hat (optax's adam)."""
    lr_s, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    alg = fedavg.build(linreg_loss, optax.sgd(LR), server_tx=server_optimizer("fedadam", lr=lr_s, b1=b1, b2=b2, eps=tau))
    w_g, b_g = as_np(PARAMS)
    m, v = np.zeros(DIM + 1), np.zeros(DIM + 1)
    for t, (_, new, ids) in enumerate(rounds(alg, 3, per_round=4), start=1):
        dw, db = np_fedavg_deltas(w_g, b_g, ids)
        g = -np.append(dw, db)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        step = lr_s * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + tau)
        w_g, b_g = w_g - step[:DIM], b_g - step[DIM]
        assert_close(new.params["w"], w_g, tol=1e-4)
        assert_close(new.params["b"], b_g, tol=1e-4)


def np_scaffold_client(x_w, x_b, c, c_i, k):
    """Option II: y <- y - lr (g(y) - c_i + c); c_i+ = c_i - c + (x - y) / (steps lr).
    c, c_i: (DIM + 1,) vectors (w then b). Returns (dy, c_i+)."""
    y_w, y_b = x_w.copy(), x_b
    batches = client_batches(k)
    for x, y in batches:
        gw, gb = np_grad(y_w, y_b, x, y)
        corr = np.append(gw, gb) - c_i + c
        y_w, y_b = y_w - LR * corr[:DIM], y_b - LR * corr[DIM]
    dy = np.append(y_w - x_w, y_b - x_b)
    return dy, c_i - c - dy / (len(batches) * LR)


def test_scaffold_client_and_server_match_numpy():
    """Server: x += lr_g mean_S(dy); c += |S|/N mean_S(dc), uniform means; controls persist per client."""
    lr_g = 0.8
    alg = scaffold.build(linreg_loss, LR, server_lr=lr_g)
    x = np.append(*as_np(PARAMS))
    c, c_i = np.zeros(DIM + 1), np.zeros((K, DIM + 1))
    for old, new, ids in rounds(alg, 4, per_round=3, dropped=[1]):
        results = {k: np_scaffold_client(x[:DIM], x[DIM], c, c_i[k], k) for k in ids}
        dy = np.mean([results[k][0] for k in ids], axis=0)
        dc = np.mean([results[k][1] - c_i[k] for k in ids], axis=0)
        x, c = x + lr_g * dy, c + len(ids) / K * dc
        for k in ids:
            c_i[k] = results[k][1]
        assert_close(new.params["w"], x[:DIM])
        assert_close(new.params["b"], x[DIM])
        assert_close(new.control["w"], c[:DIM])
        assert_close(new.control["b"], c[DIM])
        assert_close(new.clients["control"]["w"], c_i[:, :DIM])
        assert_close(new.clients["control"]["b"], c_i[:, DIM])
    assert np.abs(c).sum() > 1e-3 and np.abs(c_i).sum() > 1e-3  # the controls are not trivially zero
