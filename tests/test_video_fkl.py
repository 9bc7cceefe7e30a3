"""HiAR's forward-KL targets, constrained-step choice and timestep-shifted sigmas against closed
forms: exactly linear ODEs, Gaussian-data ODEs solved analytically, and the shifted
distribution's analytic quantiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill.video import fkl

SIGMAS = np.array([80.0, 10.0, 2.0, 0.5, 0.0], np.float32)     # 4 student levels, then 0


def _linear_ode(key, shape, sigmas):
    """Dirac data at a: D(x, sigma) = a, so the PF-ODE path is x(sigma) = a + sigma z."""
    k_a, k_z = jax.random.split(key)
    a = jax.random.normal(k_a, shape)
    z = jax.random.normal(k_z, shape)
    states = jnp.stack([a + s * z for s in sigmas[:-1]])
    return states, a


def _gaussian_ode(key, shape, sigmas, mu=0.3, s=0.5):
    """N(mu, s^2) data: x(sigma) = mu + sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2)) (x_T - mu)."""
    x_T = sigmas[0] * jax.random.normal(key, shape)
    c = lambda sig: np.sqrt((s ** 2 + sig ** 2) / (s ** 2 + sigmas[0] ** 2))
    states = jnp.stack([mu + c(sig) * (x_T - mu) for sig in sigmas[:-1]])
    return states, mu + c(0.0) * (x_T - mu)


def test_chord_target_of_a_linear_ode_is_its_end_point():
    states, x0 = _linear_ode(jax.random.key(0), (3, 4, 8, 8, 1), SIGMAS)
    for target in fkl.FKL_TARGETS:
        np.testing.assert_allclose(fkl.fkl_targets(states, x0, SIGMAS, target=target),
                                   np.broadcast_to(x0, states.shape), atol=2e-4)


def test_chord_target_is_the_line_through_two_ode_states_at_sigma_zero():
    states, x0 = _gaussian_ode(jax.random.key(1), (2, 4, 4, 4, 1), SIGMAS)
    targets = np.asarray(fkl.fkl_targets(states, x0, SIGMAS))
    path = np.concatenate([np.asarray(states), np.asarray(x0)[None]]).reshape(len(SIGMAS), -1)
    for k in range(len(SIGMAS) - 1):
        # independent reference: fit the straight line through the two points, evaluate at 0
        ref = [np.polyval(np.polyfit(SIGMAS[k:k + 2].astype(np.float64), path[k:k + 2, i]
                                     .astype(np.float64), 1), 0.0) for i in range(path.shape[1])]
        np.testing.assert_allclose(targets[k].reshape(-1), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(targets[-1], x0, atol=1e-5)     # last step: chord to sigma = 0
    # Eq. 10 at k = 0 in HiAR's form, and a Gaussian's chord is not its end point
    np.testing.assert_allclose(targets[0], states[0] - SIGMAS[0] * (states[1] - states[0])
                               / (SIGMAS[1] - SIGMAS[0]), rtol=1e-5, atol=1e-5)
    assert np.abs(targets[0] - np.asarray(x0)).max() > 1e-2


def test_chord_of_a_gaussian_ode_matches_its_closed_form():
    mu, s = 0.3, 0.5
    states, x0 = _gaussian_ode(jax.random.key(2), (64,), SIGMAS, mu=mu, s=s)
    x_T = np.asarray(states[0], np.float64)
    c = lambda sig: np.sqrt((s ** 2 + sig ** 2) / (s ** 2 + SIGMAS[0].astype(np.float64) ** 2))
    for k in range(3):
        a, b = float(SIGMAS[k]), float(SIGMAS[k + 1])
        coef = c(a) - a * (c(b) - c(a)) / (b - a)
        np.testing.assert_allclose(fkl.fkl_targets(states, x0, SIGMAS)[k],
                                   mu + coef * (x_T - mu), rtol=1e-4, atol=1e-4)


def test_fkl_example_picks_state_level_and_target_of_a_traced_step():
    states, x0 = _gaussian_ode(jax.random.key(3), (2, 4, 4, 4, 1), SIGMAS)
    targets = fkl.fkl_targets(states, x0, SIGMAS)
    pick = jax.jit(lambda k: fkl.fkl_example(states, x0, SIGMAS, k))
    for k in range(4):
        x_in, sigma_in, target = pick(jnp.asarray(k))
        np.testing.assert_array_equal(x_in, states[k])
        np.testing.assert_array_equal(target, targets[k])
        assert sigma_in.shape == (2, 4) and np.all(sigma_in == SIGMAS[k])
    _, _, end = fkl.fkl_example(states, x0, SIGMAS, 1, target="end_point")
    np.testing.assert_array_equal(end, x0)


def test_fkl_input_checks():
    states, x0 = _linear_ode(jax.random.key(4), (2, 4, 4, 4, 1), SIGMAS)
    with pytest.raises(ValueError, match="unknown forward-KL target 'ode'; valid: chord"):
        fkl.fkl_targets(states, x0, SIGMAS, target="ode")
    with pytest.raises(ValueError, match="states hold 4 student levels"):
        fkl.fkl_targets(states, x0, SIGMAS[1:])
    with pytest.raises(ValueError, match="decrease strictly to 0"):
        fkl.fkl_targets(states, x0, SIGMAS[::-1])
    with pytest.raises(ValueError, match="x0 must have the shape of one state"):
        fkl.fkl_targets(states, x0[:1], SIGMAS)


def test_constrained_step_is_uniform_over_the_first_k():
    keys = jax.random.split(jax.random.key(5), 4000)
    for k in (1, 2, 4):
        steps = np.asarray(jax.vmap(lambda kk: fkl.choose_constrained_step(kk, k, 4))(keys))
        counts = np.bincount(steps, minlength=4)
        assert counts[k:].sum() == 0
        np.testing.assert_allclose(counts[:k] / len(steps), 1.0 / k, atol=0.03)
    with pytest.raises(ValueError, match=r"K = 5 must lie in \[1, 4\]"):
        fkl.choose_constrained_step(keys[0], 5, 4)


def test_shifted_sigmas_match_their_analytic_distribution():
    sig = np.asarray(fkl.shifted_sigmas(jax.random.key(6), (200_000,), shift=5.0))
    lo, hi = 0.02 / 0.98, 0.98 / 0.02
    assert sig.min() >= lo * (1 - 1e-5) and sig.max() <= hi * (1 + 1e-5)
    # sigma = shift u / (1 - u): the q-quantile is shift q / (1 - q); median 5, upper quartile 15
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        np.testing.assert_allclose(np.quantile(sig, q), 5.0 * q / (1 - q), rtol=0.02)
    # the clamp's point mass at the top: P(u > 0.98 / (5 - 4 * 0.98))
    np.testing.assert_allclose(np.mean(sig >= hi * (1 - 1e-5)), 1 - 0.98 / (5 - 3.92),
                               atol=0.003)
    grid = np.array([0.01, 0.5, 2.0, 5.0, 15.0, 48.0, 60.0])
    np.testing.assert_allclose([np.mean(sig <= g) for g in grid],
                               fkl.shifted_sigma_cdf(grid, shift=5.0), atol=0.004)
    # shift 1 is uniform flow time: sigma / (1 + sigma) ~ U on the clamped range
    s1 = np.asarray(fkl.shifted_sigmas(jax.random.key(7), (100_000,), shift=1.0))
    np.testing.assert_allclose(np.median(s1 / (1 + s1)), 0.5, atol=0.01)
    with pytest.raises(ValueError, match="timestep shift must be positive"):
        fkl.shifted_sigmas(jax.random.key(0), (2,), shift=0.0)
    with pytest.raises(ValueError, match="0 < lo < hi < 1"):
        fkl.shifted_sigmas(jax.random.key(0), (2,), time_range=(0.5, 0.2))
