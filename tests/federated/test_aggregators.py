"""Aggregators against numpy, with NaN in masked-out clients; overflow safety; the norm bound; robust
aggregators refusing settings that do nothing."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.federated import aggregators as A

RNG = np.random.default_rng(0)
X = RNG.normal(size=(9, 3, 4)).astype(np.float32)
W = RNG.uniform(1, 5, size=9).astype(np.float32)
MASK = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
X_NAN = np.where(MASK[:, None, None], X, np.nan)


def _np_trimmed(x, trim):
    s = np.sort(x, axis=0)
    k = int(np.floor(trim * len(x)))
    return s[k : len(x) - k].mean(0)


@pytest.mark.parametrize(
    "name,options,expected",
    [
        ("mean", {}, (X[MASK] * W[MASK, None, None]).sum(0) / W[MASK].sum()),
        ("median", {}, np.median(X[MASK], axis=0)),
        ("trimmed_mean", {"trim": 0.2}, _np_trimmed(X[MASK], 0.2)),
        ("trimmed_mean", {"trim": 0.3}, _np_trimmed(X[MASK], 0.3)),
    ],
)
def test_against_numpy(name, options, expected):
    agg = A.get_aggregator(name, **options)
    out = agg({"a": jnp.asarray(X_NAN)}, jnp.asarray(W), jnp.asarray(MASK))["a"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_median_even_and_odd_counts():
    x = jnp.asarray([[1.0], [5.0], [2.0], [100.0]])
    even = A.coordinate_median(x, jnp.ones(4), jnp.ones(4, bool))
    odd = A.coordinate_median(x, jnp.ones(4), jnp.asarray([1, 1, 1, 0], bool))
    np.testing.assert_allclose(even, [3.5])
    np.testing.assert_allclose(odd, [2.0])


@pytest.mark.parametrize("name", sorted(A.AGGREGATORS))
def test_no_client_gives_zeros(name):
    out = A.AGGREGATORS[name](jnp.asarray(X_NAN), jnp.asarray(W), jnp.zeros(9, bool))
    np.testing.assert_array_equal(out, np.zeros((3, 4)))


@pytest.mark.parametrize("clients", [2, 3, 4, 5])
def test_weighted_mean_of_huge_finite_updates_is_finite_and_exact(clients):
    """Updates around 3e37 (up to float32's max) with sample-count weights: a plain sum of w * x is inf;
    the aggregate equals the float64 weighted mean to 1e-6."""
    rng = np.random.default_rng(clients)
    x = (3e37 * rng.uniform(0.5, 1.5, size=(clients, 5, 3))).astype(np.float32)
    x[0, 0] = 3.3e38  # float32's max is 3.4e38: any sum of two of these overflows
    x[:, 1] *= -1
    x[:, 2] = rng.normal(size=(clients, 3))  # ordinary values next to huge ones
    w = rng.integers(10, 100, size=clients).astype(np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite((w[:, None, None] * x).sum(0)).all()  # the naive way overflows
    out = np.asarray(A.weighted_mean({"a": jnp.asarray(x)}, jnp.asarray(w), jnp.ones(clients, bool))["a"])
    want = (w[:, None, None].astype(np.float64) * x.astype(np.float64)).sum(0) / w.astype(np.float64).sum()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=0)


def test_robust_aggregators_of_huge_updates_are_finite():
    x = np.full((4, 3), 3.3e38, np.float32)
    x[:, 1] = [-3.3e38, -3.0e38, 3.3e38, 3.2e38]
    ones, mask = jnp.ones(4), jnp.ones(4, bool)
    med = np.asarray(A.coordinate_median(jnp.asarray(x), ones, mask))
    trim = np.asarray(A.trimmed_mean(jnp.asarray(x), ones, mask, trim=0.25))
    want = np.median(x.astype(np.float64), axis=0)
    np.testing.assert_allclose(med, want, rtol=1e-6)
    np.testing.assert_allclose(trim, want, rtol=1e-6)  # trimming 1 of 4 at each end = the median here


def test_weights_are_normalised_before_summing():
    """Weights of 1e38 (overflowing when summed) still give the weighted mean."""
    x = jnp.asarray([[1.0], [3.0]])
    out = A.weighted_mean(x, jnp.asarray([3e38, 1e38]), jnp.ones(2, bool))
    np.testing.assert_allclose(out, [1.5], rtol=1e-6)


def test_client_norms_of_huge_updates():
    x = np.zeros((3, 4), np.float32)
    x[0] = [3e37, -3e37, 1.0, 0.0]
    x[1] = [3.3e38, 3.3e38, 0.0, 0.0]  # norm 4.7e38 is above float32's max: inf, honestly
    x[2] = [3.0, 4.0, 0.0, 0.0]
    norms = np.asarray(A.client_norms({"a": jnp.asarray(x[:, :2]), "b": jnp.asarray(x[:, 2:])}))
    want = np.linalg.norm(x.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms[[0, 2]], want[[0, 2]], rtol=1e-6)
    assert norms[1] == np.inf


def test_norm_bound_clip_and_reject():
    x = np.zeros((4, 3), np.float32)
    x[0] = [3e37, -3e37, 0.0]  # far above the bound
    x[1] = [0.3, 0.4, 0.0]  # norm 0.5, under it
    x[2] = [6.0, 8.0, 0.0]  # norm 10, above it but masked out
    x[3] = [0.0, 3.0, 4.0]  # norm 5, above it
    mask = jnp.asarray([1, 1, 0, 1], bool)
    clipped, was_clipped, rejected = A.bound_norms({"u": jnp.asarray(x)}, mask, A.norm_bound(2.0))
    np.testing.assert_array_equal(was_clipped, [1, 0, 0, 1])
    np.testing.assert_array_equal(rejected, [0, 0, 0, 0])
    u = np.asarray(clipped["u"], np.float64)
    np.testing.assert_allclose(u[0], 2.0 * np.array([1, -1, 0]) / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(u[1], x[1], rtol=0)
    np.testing.assert_allclose(u[3], [0.0, 1.2, 1.6], rtol=1e-6)
    same, was_clipped, rejected = A.bound_norms({"u": jnp.asarray(x)}, mask, A.norm_bound(2.0, "reject"))
    np.testing.assert_array_equal(rejected, [1, 0, 0, 1])
    np.testing.assert_array_equal(was_clipped, [0, 0, 0, 0])
    np.testing.assert_array_equal(same["u"], x)
    with pytest.raises(ValueError, match="mode"):
        A.norm_bound(1.0, "drop")
    with pytest.raises(ValueError, match="max_norm"):
        A.norm_bound(0.0)


def test_trimmed_mean_and_median_refuse_settings_that_do_nothing():
    with pytest.raises(ValueError, match=r"trims floor\(0.1 \* 5\) = 0 .* at least 10 clients per round"):
        A.get_aggregator("trimmed_mean", trim=0.1, clients_per_round=5)
    A.get_aggregator("trimmed_mean", trim=0.1, clients_per_round=10)  # trims one at each end: fine
    A.get_aggregator("trimmed_mean", trim=0.2, clients_per_round=5)
    with pytest.raises(ValueError, match="at least 3 clients per round"):
        A.get_aggregator("median", clients_per_round=2)
    with pytest.raises(ValueError, match=r"trim must be in \(0, 0.5\)"):
        A.get_aggregator("trimmed_mean", trim=0.5)
    with pytest.raises(ValueError, match=r"trim must be in \(0, 0.5\)"):
        A.trimmed_mean(jnp.asarray(X), jnp.asarray(W), jnp.asarray(MASK), trim=0.0)
    with pytest.raises(ValueError, match="valid"):
        A.get_aggregator("krum")


def test_trimmed_mean_warns_at_trace_time_when_it_cannot_trim(caplog):
    agg = A.get_aggregator("trimmed_mean", trim=0.1)  # the number of clients is not known here
    with caplog.at_level(logging.WARNING, logger="jaxlab.federated"):
        jax.jit(agg).lower(jnp.zeros((5, 3)), jnp.ones(5), jnp.ones(5, bool))
    assert "trims floor(0.1 * 5) = 0" in caplog.text and "at least 10 clients" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxlab.federated"):
        jax.jit(agg).lower(jnp.zeros((10, 3)), jnp.ones(10), jnp.ones(10, bool))
        agg({}, jnp.ones(5), jnp.ones(5, bool))  # an empty tree (no model state) has nothing to trim
    assert not caplog.text
