"""Partitioner invariants: indices used once, sizes, label skew shapes, seeding, errors."""

import numpy as np
import pytest

from jaxlab.federated import partition as P

LABELS = np.random.default_rng(0).integers(0, 5, size=1000)


@pytest.mark.parametrize(
    "scheme,options",
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.3}),
        ("shards", {"classes_per_client": 2}),
        ("quantity", {"alpha": 0.5}),
    ],
)
def test_every_index_exactly_once_and_seeded(scheme, options):
    parts = P.partition(scheme, LABELS, 10, seed=3, min_size=5, **options)
    assert len(parts) == 10
    P.validate_partition(parts, len(LABELS), exact=True, min_size=5)
    again = P.partition(scheme, LABELS, 10, seed=3, min_size=5, **options)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = P.partition(scheme, LABELS, 10, seed=4, min_size=5, **options)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_equal():
    sizes = [len(p) for p in P.iid(LABELS, 7)]
    assert max(sizes) - min(sizes) <= 1


def test_one_class_per_client_is_extreme_non_iid():
    parts = P.shards(LABELS, 5, classes_per_client=1)
    hist = P.label_histogram(parts, LABELS, 5)
    assert ((hist > 0).sum(1) == 1).all()
    assert np.array_equal(np.diag(hist), np.bincount(LABELS, minlength=5))


def test_shards_with_unheld_classes_uses_indices_at_most_once():
    parts = P.shards(LABELS, 2, classes_per_client=1)
    P.validate_partition(parts, len(LABELS), exact=False)
    with pytest.raises(ValueError, match="unused"):
        P.validate_partition(parts, len(LABELS), exact=True)


def test_dirichlet_small_alpha_is_skewed():
    skewed = P.label_histogram(P.dirichlet(LABELS, 10, alpha=0.05, seed=1, min_size=1), LABELS)
    flat = P.label_histogram(P.dirichlet(LABELS, 10, alpha=100.0, seed=1), LABELS)
    top_share = lambda h: (h.max(1) / h.sum(1)).mean()
    assert top_share(skewed) > 0.6
    assert top_share(flat) < 0.35


def test_quantity_sizes_vary_labels_iid():
    parts = P.quantity(LABELS, 10, alpha=0.3, seed=0, min_size=3)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 3 and sizes.max() > 3 * sizes.min()


def test_errors_are_clear():
    with pytest.raises(ValueError, match="at least 200"):
        P.iid(LABELS, 10, min_size=200)
    with pytest.raises(ValueError, match="no partition"):
        P.dirichlet(LABELS, 50, alpha=0.01, min_size=15, max_tries=3)
    with pytest.raises(ValueError, match="valid"):
        P.partition("nope", LABELS, 2)
    with pytest.raises(ValueError, match="more than once"):
        P.validate_partition([np.array([0, 1]), np.array([1])], 3, exact=False)
    with pytest.raises(ValueError, match="fewer than"):
        P.validate_partition([np.array([0, 1]), np.array([2])], 3, min_size=2)


def test_histogram_table_and_png(tmp_path):
    parts = P.iid(LABELS, 3)
    hist = P.label_histogram(parts, LABELS)
    assert hist.shape == (3, 5) and hist.sum() == len(LABELS)
    table = P.format_histogram(hist, ["N", "L", "R", "A", "V"])
    assert len(table.splitlines()) == 4 and "total" in table
    path = P.plot_histogram(hist, str(tmp_path / "h.png"))
    with open(path, "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_imbalanced_follows_ratios():
    balanced = np.repeat(np.arange(5), 400)
    parts = P.partition("imbalanced", balanced, 4, seed=0)
    P.validate_partition(parts, len(balanced), exact=False)
    totals = P.label_histogram(parts, balanced, 5).sum(0)
    assert totals[0] == 400  # N is the scarcest relative to its ratio, kept whole
    np.testing.assert_allclose(
        totals / totals[0], np.array(P.MITBIH_CLASS_COUNTS) / 71_732, atol=1 / 400
    )
    with pytest.raises(ValueError, match="positive ratio"):
        P.imbalanced(balanced, 2, ratios=(1.0, 1.0))
