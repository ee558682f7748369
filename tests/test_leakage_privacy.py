"""Leakage metrics against direct numpy computations; the Laplace mechanism's scale and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.federated.leakage import distance_correlation, dtw_distance, leakage_report
from jaxlab.federated.privacy import laplace_mechanism, laplace_sensitivity


def dcor_numpy(x, y):
    """The O(n^2) textbook V-statistic, written independently with loops."""
    n = len(x)

    def centred(v):
        d = np.array([[abs(v[i] - v[j]) for j in range(n)] for i in range(n)])
        return d - d.mean(axis=0) - d.mean(axis=1)[:, None] + d.mean()

    a, b = centred(x), centred(y)
    dcov = (a * b).sum() / n**2
    dvx, dvy = (a * a).sum() / n**2, (b * b).sum() / n**2
    return np.sqrt(dcov / np.sqrt(dvx * dvy))


def dtw_numpy(x, y):
    n, m = len(x), len(y)
    d = np.full((n + 1, m + 1), np.inf)
    d[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = (x[i - 1] - y[j - 1]) ** 2 + min(d[i - 1, j], d[i, j - 1], d[i - 1, j - 1])
    return np.sqrt(d[n, m])


def test_distance_correlation_matches_numpy_and_known_cases():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.normal(size=32), rng.normal(size=32)
        np.testing.assert_allclose(distance_correlation(jnp.array(x), jnp.array(y)), dcor_numpy(x, y), rtol=1e-5)
    x = rng.normal(size=32)
    assert float(distance_correlation(jnp.array(x), jnp.array(3 * x - 1))) == pytest.approx(1.0, abs=1e-5)
    y = x**2  # dependent but uncorrelated: dCor sees it
    assert float(distance_correlation(jnp.array(x), jnp.array(y))) > 0.3
    assert float(distance_correlation(jnp.array(x), jnp.zeros(32))) == 0.0


def test_dtw_matches_dynamic_programming():
    rng = np.random.default_rng(1)
    for n, m in ((128, 32), (7, 5), (1, 4), (20, 20)):
        x, y = rng.normal(size=n), rng.normal(size=m)
        np.testing.assert_allclose(dtw_distance(jnp.array(x), jnp.array(y)), dtw_numpy(x, y), rtol=1e-5)
    z = rng.normal(size=16)
    assert float(dtw_distance(jnp.array(z), jnp.array(np.repeat(z, 2)))) == pytest.approx(0.0, abs=1e-6)


def test_leakage_report_shapes_and_values():
    rng = np.random.default_rng(2)
    signals = rng.normal(size=(3, 128)).astype(np.float32)
    acts = rng.normal(size=(3, 32, 4)).astype(np.float32)
    acts[:, :, 0] = signals.reshape(3, 32, 4).mean(-1)  # channel 0 = the pooled input itself
    report = leakage_report(jnp.array(signals), jnp.array(acts))
    assert report["dcor"].shape == (4,) and report["dtw"].shape == (4,)
    assert float(report["dcor"][0]) == pytest.approx(1.0, abs=1e-5)
    assert float(report["dcor"][0]) > float(report["dcor"][1:].max())
    expected = np.mean([dtw_numpy(signals[b], acts[b, :, 2]) for b in range(3)])
    np.testing.assert_allclose(report["dtw"][2], expected, rtol=1e-5)


def test_laplace_mechanism_scale_widening_and_gradient():
    a = jnp.array([[0.0, 1.0, 5.0], [2.0, 1.0, 1.0], [1.0, 1.0, 3.0]])
    np.testing.assert_allclose(laplace_sensitivity(a), [2.0, 1e-5, 4.0], rtol=1e-6)
    big = jnp.tile(a, (4000, 1))
    noisy = laplace_mechanism(big, 2.0, jax.random.PRNGKey(0))
    # Laplace(0, s): mean |noise| = s = D / epsilon
    np.testing.assert_allclose(jnp.abs(noisy - big).mean(0), [1.0, 5e-6, 2.0], rtol=0.06)
    grad = jax.grad(lambda x: laplace_mechanism(x, 1.0, jax.random.PRNGKey(1)).sum())(a)
    np.testing.assert_array_equal(grad, jnp.ones_like(a))
    with pytest.raises(ValueError, match="epsilon"):
        laplace_mechanism(a, 0.0, jax.random.PRNGKey(0))
