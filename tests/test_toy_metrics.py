"""Toy metrics on cases with known answers: the truth, a collapsed model, closed-form KLs."""
import jax
import numpy as np
import pytest

from fdistill.data import toy
from fdistill.evaluation import toy as metrics


def _gaussian_kl(mu1, s1, mu2, s2):
    """KL(N(mu1, s1^2 I) || N(mu2, s2^2 I)) in 2-D."""
    r = s1 ** 2 / s2 ** 2
    return r - 1 - np.log(r) + np.sum((np.asarray(mu1) - np.asarray(mu2)) ** 2) / (2 * s2 ** 2)


@pytest.mark.parametrize("name", ["ring8", "unbalanced", "moons"])
def test_samples_of_the_truth_score_perfectly(name):
    p = toy.TOYS[name](std=0.1, radius=2.0)
    x = p.sample(jax.random.key(0), 8000)
    m = metrics.toy_metrics(p, x, jax.random.key(1))
    assert m["recall"] == 1.0
    if name == "moons":  # overlapping arc components: also near a neighbour's centre
        assert m["precision"] > 1 - np.exp(-4.5), m
    else:
        assert abs(m["precision"] - (1 - np.exp(-4.5))) < 0.01, m
    assert m["mode_tv"] < (0.06 if name == "moons" else 0.03), m
    assert abs(m["kl_pq"]) < 0.04 and abs(m["kl_qp"]) < 0.04, m


def test_a_single_mode_is_caught():
    p = toy.ring8(std=0.05, radius=2.0)
    x = p.means[3] + 0.05 * np.random.default_rng(0).normal(size=(2000, 2))
    m = metrics.toy_metrics(p, x, jax.random.key(1))
    assert m["recall"] == 1 / 8
    assert m["precision"] > 0.97
    assert abs(m["mode_tv"] - 7 / 8) < 0.01
    assert m["kl_pq"] > 3.0
    assert abs(m["kl_qp"] - np.log(8)) < 0.1, m  # q = one mode of p: KL(q || p) = log 8


def test_outliers_lower_precision_and_raise_kl_qp():
    p = toy.ring8(std=0.05, radius=2.0)
    x = np.array(p.sample(jax.random.key(0), 2000))
    x[:200] = np.random.default_rng(1).uniform(-0.5, 0.5, size=(200, 2))  # 10% in the centre
    m = metrics.toy_metrics(p, x, jax.random.key(1))
    assert abs(m["precision"] - 0.9 * (1 - np.exp(-4.5))) < 0.02
    assert m["recall"] == 1.0 and m["kl_qp"] > 1.0


@pytest.mark.parametrize("mu_q, s_q", [((0.5, 0.0), 0.7), ((0.5, -0.3), 1.3)])
def test_kl_estimators_match_gaussian_closed_form(mu_q, s_q):
    p = toy.GaussianMixture2D([[0.0, 0.0]], [1.0], 1.0)
    q = toy.GaussianMixture2D([mu_q], [1.0], s_q)
    x = q.sample(jax.random.key(0), 8000)
    assert abs(metrics.kl_qp(p, x) - _gaussian_kl(mu_q, s_q, (0, 0), 1.0)) < 0.06
    if s_q > 1:  # p inside q's bulk; with q narrower than p the k-NN balls underestimate it
        kl_pq = metrics.kl_pq(p, x, jax.random.key(1))
        assert abs(kl_pq - _gaussian_kl((0, 0), 1.0, mu_q, s_q)) < 0.06


def test_kl_estimators_match_mixture_weights():
    """Same well-separated modes, other weights: both KLs reduce to KLs of the weight vectors."""
    w = np.array([4.0, 1, 1, 1, 2, 1, 1, 1]) / 12
    p = toy.ring8(std=0.05, radius=2.0)
    q = toy.ring8(std=0.05, radius=2.0, weights=w)
    x = q.sample(jax.random.key(0), 8000)
    m = metrics.toy_metrics(p, x, jax.random.key(1))
    assert abs(m["kl_qp"] - np.sum(w * np.log(8 * w))) < 0.04, m
    assert abs(m["kl_pq"] - np.mean(np.log(1 / (8 * w)))) < 0.04, m
    assert abs(m["mode_tv"] - 0.5 * np.abs(w - 1 / 8).sum()) < 0.025, m
    np.testing.assert_allclose(metrics.mode_mass(p, x), w, atol=0.02)


def test_log_ball_mass_exact():
    p = toy.GaussianMixture2D([[0.0, 0.0], [3.0, 0.0]], [0.25, 0.75], 0.5)
    z = np.array([[0.0, 0.0], [3.0, 0.0], [1.5, 0.2], [40.0, 0.0]])
    rho = np.array([0.5, 0.1, 2.0, 0.01])
    # Monte Carlo ground truth for the first three balls, closed form at a mode's centre.
    y = np.asarray(p.sample(jax.random.key(0), 400_000), np.float64)
    mc = [np.mean(np.linalg.norm(y - zi, axis=1) <= r) for zi, r in zip(z[:3], rho[:3])]
    got = metrics.log_ball_mass(p, z, rho)
    np.testing.assert_allclose(np.exp(got[:3]), mc, rtol=0.02)
    np.testing.assert_allclose(np.exp(got[0]), 0.25 * (1 - np.exp(-0.5)), rtol=1e-6)
    # Far from every mode the mass underflows; the small-ball value stays finite and exact.
    far = float(p.log_prob(z[3:].astype(np.float32))[0]) + np.log(np.pi * rho[3] ** 2)
    assert np.isfinite(got[3]) and abs(got[3] - far) < 1e-3 * abs(far)


def test_bad_samples_are_refused():
    p = toy.ring8(std=0.05, radius=2.0)
    with pytest.raises(ValueError, match="not finite"):
        metrics.precision(p, np.array([[0.0, np.nan], [1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        metrics.precision(p, np.zeros((4, 3)))
