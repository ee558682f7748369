"""Aggregators against numpy, with NaN in masked-out clients."""

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
        ("trimmed_mean", {"trim": 0.0}, X[MASK].mean(0)),
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


def test_errors():
    with pytest.raises(ValueError, match="valid"):
        A.get_aggregator("krum")
    with pytest.raises(ValueError, match="trim"):
        A.trimmed_mean(jnp.asarray(X), jnp.asarray(W), jnp.asarray(MASK), trim=0.5)
