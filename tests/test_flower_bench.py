"""The flwr-free pieces of jaxlab.federated.flower_bench: the fit Flower's clients run equals plain SGD
steps on the client's batches, Flower's weighted average of those fits is their sample-weighted mean,
and the bench keeps its BENCHMARKS.md block when flwr is absent. No test imports flwr."""

import jax
import numpy as np

from jaxlab import benchmarking as bm
from jaxlab.federated import bench as FB
from jaxlab.federated import clients as C
from jaxlab.federated import flower_bench as F

SIZES = (64, 32, 96)  # examples per client: 2, 1 and 3 local steps of 32 (padded steps are masked)


def _clients(tmp_path):
    rng = np.random.default_rng(0)
    n = sum(SIZES)
    arrays = {"x": rng.normal(size=(n, 128, 1)).astype(np.float32), "y": rng.integers(0, 5, n)}
    parts = np.split(rng.permutation(n), np.cumsum(SIZES)[:-1])
    data = C.stack_client_data(arrays, parts, FB.BATCH, seed=0)
    path = str(tmp_path / "clients.npz")
    F.save_clients(path, data)
    return data, F.load_runtime(path)


def _sgd_reference(params, grad, data, k):
    """Client k's local epoch as plain SGD steps p - lr * grad over its unpadded batches."""
    p = params
    for s in range(int(np.asarray(data.step_mask[k]).sum())):
        g = grad(p, {name: v[k, s] for name, v in data.batches.items()})
        p = jax.tree_util.tree_map(lambda w, d: w - FB.LR * d, p, g)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(p)]


def test_client_fit_is_sgd_and_flower_average_is_fedavg(tmp_path):
    """Each client's fit (the engine's client_update, what Flower's clients run) equals plain SGD steps on
    its batches (2, 1 and 3 steps: padded steps masked), and Flower's weighted average of the fits is
    the sample-weighted mean of those references (the bench checks it against jaxlab's round itself)."""
    params, loss_fn = FB.model_and_loss(0)
    data, rt = _clients(tmp_path)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
    fits = [F.client_fit(rt, leaves, k, server_round=1) for k in range(len(SIZES))]
    assert [n for _, n in fits] == list(SIZES)
    grad = jax.jit(jax.grad(FB.plain_loss(loss_fn)))
    refs = [_sgd_reference(params, grad, data, k) for k in range(len(SIZES))]
    for (fit, _), ref in zip(fits, refs):
        for a, b in zip(fit, ref):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert max(np.abs(a - b).max() for a, b in zip(fit, leaves)) > 1e-3  # the client did train
    w = np.asarray(SIZES, np.float64) / sum(SIZES)
    for i, avg in enumerate(F.weighted_average(fits)):
        np.testing.assert_allclose(avg, sum(w[k] * refs[k][i] for k in range(len(SIZES))), atol=F.AGREE_ATOL)


def test_block_without_flwr_keeps_the_last_flower_block(tmp_path, monkeypatch, capsys):
    path = tmp_path / "BENCHMARKS.md"
    bm.write_section("federated-cpu", "tables", path)
    F.write_block("old Flower rows", path)  # a Flower-only run puts its block inside the section
    F.write_block("new Flower rows", path)  # and replaces it in place
    text = path.read_text()
    assert "old Flower rows" not in text and text.count("new Flower rows") == 1
    assert text.index("tables") < text.index("new Flower rows") < text.index("<!-- end:federated-cpu")
    monkeypatch.setattr(F, "flower_available", lambda: False)
    monkeypatch.setattr(bm, "BENCHMARKS_FILE", path)
    out = F.block(quick=True)
    assert "pip install" in capsys.readouterr().out
    assert out.startswith(F.INSTALL_HINT) and out.endswith(F.wrapped("new Flower rows"))
