"""IS, improved precision/recall and KID against cases with known answers."""
import numpy as np
import pytest

from fdistill.evaluation import metrics


def test_inception_score_confident_uniform_classes_is_num_classes():
    k, n = 8, 800
    logits = np.full((n, 1008), -50.0)
    logits[np.arange(n), np.arange(n) % k] = 50.0  # every split holds each class equally often
    mean, std = metrics.inception_score(logits)
    np.testing.assert_allclose(mean, k, rtol=1e-9)
    assert std < 1e-9


def test_inception_score_identical_predictions_is_one():
    logits = np.tile(np.random.default_rng(0).standard_normal(1008), (50, 1))
    np.testing.assert_allclose(metrics.inception_score(logits)[0], 1.0, rtol=1e-12)


def test_inception_score_closed_form_two_classes():
    """Half the samples predict (q, 1-q), half (1-q, q): p(y) uniform, IS = exp(log 2 - H(q))."""
    q = 0.8
    p = np.tile(np.array([[q, 1 - q], [1 - q, q]]), (10, 1))
    h = -(q * np.log(q) + (1 - q) * np.log(1 - q))
    mean, _ = metrics.inception_score(np.log(p), splits=10)
    np.testing.assert_allclose(mean, np.exp(np.log(2) - h), rtol=1e-12)
    # logits are shift-invariant per row
    np.testing.assert_allclose(metrics.inception_score(np.log(p) + 3.0, splits=10)[0], mean)


def test_inception_score_needs_enough_samples():
    with pytest.raises(ValueError, match="N >= splits=10"):
        metrics.inception_score(np.zeros((5, 1008)))


def test_knn_radii_on_a_line():
    x = np.arange(10.0)[:, None]
    np.testing.assert_allclose(metrics.knn_radii(x, k=3), [3, 2, 2, 2, 2, 2, 2, 2, 2, 3])
    with pytest.raises(ValueError, match="more than 3"):
        metrics.knn_radii(x[:3], k=3)


def test_precision_recall_hand_case():
    real = np.arange(10.0)[:, None]  # radii 3 at the ends, 2 inside
    fake = np.array([[11.5], [13.0], [4.5], [-2.9]])  # in (9 + 3), out, in, in (0 - 3)
    precision, recall = metrics.precision_recall(real, fake, k=3)
    assert precision == 0.75
    # fake radii (k=3, 4 points): each point's farthest other point
    # 11.5 -> 14.4, 13 -> 15.9, 4.5 -> 8.5, -2.9 -> 15.9: ball(4.5, 8.5) covers all real points
    assert recall == 1.0
    # swapping the roles swaps precision and recall
    assert metrics.precision_recall(fake, real, k=3) == (recall, precision)


def test_precision_recall_identical_and_disjoint_sets():
    x = np.random.default_rng(0).standard_normal((200, 16))
    assert metrics.precision_recall(x, x) == (1.0, 1.0)
    assert metrics.precision_recall(x, x + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="feature sizes differ"):
        metrics.precision_recall(x, x[:, :8])


def test_precision_recall_partial_mode_coverage():
    """Fake samples covering one of two well-separated real modes: precision 1, recall ~1/2."""
    rng = np.random.default_rng(1)
    real = np.concatenate([rng.standard_normal((300, 2)), rng.standard_normal((300, 2)) + 50])
    fake = rng.standard_normal((300, 2))
    precision, recall = metrics.precision_recall(real, fake)
    assert precision > 0.95
    assert 0.45 < recall < 0.52


def _kid_by_definition(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3, written as explicit double sums."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_definition_and_detects_a_shift():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.3
    mean, std = metrics.kernel_inception_distance(y, x, subsets=3, subset_size=12)
    np.testing.assert_allclose(mean, _kid_by_definition(x, y), rtol=1e-12)
    assert std < 1e-12  # every subset is the whole set
    a, b, c = (rng.standard_normal((400, 8)) for _ in range(3))
    same = metrics.kernel_inception_distance(a, b, subsets=20, subset_size=200)[0]
    shifted = metrics.kernel_inception_distance(a, c + 1.0, subsets=20, subset_size=200)[0]
    assert abs(same) < 0.02 < shifted
