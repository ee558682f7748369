"""jaxlab.losses.softmax_cross_entropy against numpy: log-softmax cross-entropy, and the double-softmax
form of references that apply CrossEntropyLoss to a Softmax output."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.losses import softmax_cross_entropy


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(B, C), (B,) -> (B,): -log softmax(logits)[label]."""
    return -_np_log_softmax(logits)[np.arange(len(labels)), labels]


def _np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_np_log_softmax(x))


LOGITS = np.array([[2.0, -1.0, 0.5, 0.0, 3.0],
                   [0.0, 0.0, 0.0, 0.0, 0.0],
                   [-4.0, 7.0, 1.0, 2.0, -0.5],
                   [1000.0, 990.0, -1000.0, 0.0, 5.0]], np.float32)  # last row: overflows a naive exp
LABELS = np.array([4, 2, 0, 1], np.int32)


def test_cross_entropy_matches_numpy_log_softmax():
    out = softmax_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    assert out.shape == (4,) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), _np_ce(LOGITS, LABELS), rtol=1e-5, atol=1e-5)
    assert float(out[1]) == pytest.approx(np.log(5.0), rel=1e-6)  # uniform logits: log C
    assert float(out[3]) == pytest.approx(10.0, rel=1e-5)  # logsumexp ~ 1000, label logit 990


def test_cross_entropy_of_bfloat16_logits_is_float32():
    logits = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 2, 1, 0], np.int32)
    out = softmax_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert out.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(out), _np_ce(rounded, labels), rtol=1e-5, atol=1e-6)


def test_double_softmax_is_cross_entropy_of_softmax_probabilities():
    """CrossEntropyLoss(Softmax(z)): CE with the probabilities p as logits, log(sum_j exp(p_j)) - p_y, which
    for p on the simplex lies within [log(C - 1 + e) - 1, log(C - 1 + e)] whatever z is."""
    out = softmax_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS), double_softmax=True)
    expected = _np_ce(_np_softmax(LOGITS), LABELS)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
    c = LOGITS.shape[1]
    assert np.all(np.asarray(out) <= np.log(c - 1 + np.e) + 1e-6)
    assert np.all(np.asarray(out) >= np.log(c - 1 + np.e) - 1 - 1e-6)
    assert not np.allclose(np.asarray(out), _np_ce(LOGITS, LABELS), rtol=1e-2)
