"""experiments/toy_diagnostics.py: its exact pieces against closed forms, and one tiny run of the
oracle step and the diagnostics on an untrained distillation."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import distill_toy
from experiments import toy_diagnostics as diag
from fdistill import divergences, modes, sde, sharding
from fdistill import objective as objective_lib
from fdistill.data import toy
from tests.tiny import tiny_toy_config

RING = toy.ring8(std=0.05, radius=2.0)


@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_kde_of_samples_of_p_gives_a_log_ratio_of_zero(sigma):
    """A KDE of bandwidth sigma over samples of p is unbiased for p_t: E[q_hat / p_t] = 1 at every
    point, and log(p_t / q_hat) is ~0 (its Jensen bias is small at 8k reference points)."""
    ref = RING.sample(jax.random.key(0), 8192)
    x0 = RING.sample(jax.random.key(1), 2048)
    x_t = x0 + sigma * jax.random.normal(jax.random.key(2), x0.shape)
    s = jnp.full((len(x_t),), sigma, jnp.float32)
    log_r = np.asarray(diag.true_log_ratio(RING, x_t, s, ref))
    assert abs(np.mean(np.exp(-log_r)) - 1) < 0.03, np.mean(np.exp(-log_r))
    assert abs(np.mean(log_r)) < 0.05 and np.std(log_r) < 0.3, (np.mean(log_r), np.std(log_r))
    # a student on half the modes: log p_t / q_t = log(1/2) on its modes
    half = ref[np.argmin(np.linalg.norm(ref[:, None] - RING.means[None], axis=-1), 1) % 2 == 0]
    on = np.argmin(np.linalg.norm(np.asarray(x0)[:, None] - RING.means[None], axis=-1), 1) % 2 == 0
    log_half = np.asarray(diag.true_log_ratio(RING, x_t, s, half))
    assert abs(np.median(log_half[on]) - np.log(0.5)) < 0.1, np.median(log_half[on])


def test_exact_marginal_equals_a_numeric_convolution():
    """p_t(x_t) = int p(x0) N(x_t; x0, sigma^2 I) dx0, by quadrature on a fine grid near x_t."""
    sigma, x_t = 0.1, np.array([1.5, 1.3])
    h = 0.002
    g = np.arange(-1.0, 1.0, h) + h / 2
    gx, gy = np.meshgrid(x_t[0] + g, x_t[1] + g, indexing="ij")
    x0 = np.stack([gx.ravel(), gy.ravel()], -1)
    p = np.exp(np.asarray(RING.log_prob(x0.astype(np.float32)), np.float64))
    kern = np.exp(-0.5 * np.sum((x0 - x_t) ** 2, -1) / sigma ** 2) / (2 * np.pi * sigma ** 2)
    numeric = np.sum(p * kern) * h * h
    exact = np.exp(float(RING.marginal_log_prob(jnp.asarray(x_t[None], jnp.float32), 1.0,
                                                jnp.asarray([sigma]))[0]))
    assert numeric > 1e-3 and abs(numeric / exact - 1) < 1e-3, (numeric, exact)


def test_kde_posterior_mean_of_samples_of_p_is_the_exact_denoiser():
    sigma = 0.3
    ref = RING.sample(jax.random.key(0), 8192)
    x0 = RING.sample(jax.random.key(1), 1024)
    x_t = x0 + sigma * jax.random.normal(jax.random.key(2), x0.shape)
    s = jnp.full((len(x_t),), sigma, jnp.float32)
    err = np.linalg.norm(diag.kde_posterior_mean(x_t, s, ref) - RING.denoise(x_t, 1.0, s), axis=-1)
    assert np.mean(err) < 0.03, np.mean(err)


def test_weights_follow_the_objective_closed_form():
    """Forward KL: h = r; r is divided by its noise bin's mean, then h by its batch mean."""
    obj = objective_lib.FDivergenceObjective(divergence=divergences.get("fkl"), generator=None,
                                             noise=None, process=sde.EDM())
    sigma = jnp.asarray([1.0, 1.0, 50.0, 50.0])           # bins 0 and 6 of 10 over [0.002, 80]
    h = diag.weights(obj, np.log([2.0, 4.0, 1.0, 3.0]), sigma)
    np.testing.assert_allclose(h, [2 / 3, 4 / 3, 0.5, 1.5], rtol=1e-5)
    np.testing.assert_allclose(diag.weights(obj, np.log([2.0, 4.0, 1.0, 3.0]), sigma,
                                            obj.init_ratio_ema()), h, rtol=1e-5)  # rate 0
    assert diag.ess(np.ones(5)) == pytest.approx(1.0)
    assert diag.ess([1.0, 0, 0, 0]) == pytest.approx(0.25)


@pytest.mark.skipif(os.environ.get("FDISTILL_SLOW_TESTS", "0") != "1",
                    reason="compiles a distillation and the diagnostics (~1 min): run with FDISTILL_SLOW_TESTS=1")
def test_oracle_step_and_diagnostics_run_on_a_tiny_distillation():
    t = tiny_toy_config()
    c = modes.resolve_config(distill_toy.get_config(), t)
    c.distill.batch_size = 16
    c.distill.student_update_every = 2      # student, critic, student: the fake score has moved
    mesh = sharding.make_mesh()
    d = modes.build_distillation(c, modes.build_model(t), mesh)
    diag.use_oracle_ratio(d, RING, num_ref=64)
    ds = modes.dataset(c, 16)
    state = d.initial_state
    before = jax.tree.leaves(sharding.local_copy(state["student"]))
    before = [np.asarray(v).copy() for v in before]
    for i in range(3):
        state, metrics = d.step(state, i, sharding.global_batch(
            modes.with_one_hot_labels(ds.batch(i), 0), mesh))
    after = jax.tree.leaves(sharding.local_copy(state["student"]))
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))
    assert np.isfinite(float(metrics["student/r_mean"])) and float(metrics["student/r_mean"]) > 0
    out = diag.Diagnostics(c, d, RING, num_samples=64, num_ref=128)(
        state, d.teacher_params, jax.random.key(0))
    assert set(out["ratio"]) == {str(s) for s in diag.DIAG_SIGMAS}
    assert all(np.isfinite(v["rmse"]) for v in out["ratio"].values())
    assert sum(out["h"]["share_by_sigma"]) == pytest.approx(1.0, abs=1e-3)
    assert len(out["mode_mass"]) == 8
    assert "step 3" in diag.report(3, out)
