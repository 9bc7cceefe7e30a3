"""EDM's stochastic sampler (Algorithm 2) from config.sampling's S_churn, S_min, S_max, S_noise:
S_churn = 0 is the deterministic Heun bit for bit; S_churn > 0 raises sigma by (1 + gamma) with
fresh noise before each step, at the same number of network evaluations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import modes, sampling, sde, train
from tests.tiny import tiny_digits_config

B, STEPS = 8, 4


@pytest.fixture(scope="module")
def teacher():
    c = tiny_digits_config()
    c.sampling.sampler, c.sampling.num_steps = "heun", STEPS
    model = modes.build_model(c, seed=3)
    graphdef, params, others = train.split(model)
    labels = modes.label_draws(c, jax.random.key(5), B)(0)[0]
    return c, model, graphdef, params, others, labels


def draw(teacher, **churn):
    c, _, graphdef, params, others, labels = teacher
    c = c.copy_and_resolve_references()
    c.sampling.update(churn)
    sampler = modes.TeacherSampler(c, graphdef, others, B)
    return sampler, np.asarray(sampler(params, jax.random.key(7), labels))


def direct(teacher, **options):
    """sampling.heun on the teacher's network, outside TeacherSampler."""
    c, model, _, _, _, labels = teacher
    process = sde.sde_from_config(c.process)
    shape = (B, 8, 8, 1)
    fn = jax.jit(lambda k: sampling.heun(lambda x, t, y: model(x, t, y), process, k, shape,
                                         labels, num_steps=STEPS, **options))
    return fn(jax.random.key(7))


def test_zero_churn_is_the_deterministic_heun_bit_for_bit(teacher):
    plain, x = draw(teacher)
    zero, x0 = draw(teacher, S_churn=0.0, S_min=0.3, S_max=5.0, S_noise=1.007)
    assert plain.churn == zero.churn == {}
    np.testing.assert_array_equal(x0, x)
    y, nfe = direct(teacher)
    y0, nfe0 = direct(teacher, S_churn=0.0, S_min=0.3, S_max=5.0, S_noise=1.007)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y))
    np.testing.assert_allclose(x0, np.asarray(y), rtol=1e-5, atol=1e-4)   # another program
    assert zero.nfe == nfe == nfe0 == 2 * STEPS - 1


def test_positive_churn_reaches_the_sampler_at_the_same_nfe(teacher):
    options = dict(S_churn=4.0, S_min=0.05, S_max=50.0, S_noise=1.003)
    churned, x = draw(teacher, **options)
    assert churned.churn == options
    assert churned.nfe == 2 * STEPS - 1
    y, nfe = direct(teacher, **options)
    assert nfe == churned.nfe
    np.testing.assert_allclose(x, np.asarray(y), rtol=1e-5, atol=1e-4)
    _, x_det = draw(teacher)
    assert np.abs(x - x_det).mean() > 1e-2            # the fresh noise changed the samples
    # S_noise is passed on: another value gives other samples from the same draws.
    _, x_noise = draw(teacher, **dict(options, S_noise=0.5))
    assert np.abs(x - x_noise).mean() > 1e-3


def test_churn_outside_s_min_s_max_changes_nothing(teacher):
    """No grid sigma in [S_min, S_max] (the grid ends at sigma_min 0.002): gamma is 0 at every
    step, so the stochastic sampler is the deterministic one (to float tolerance: it is another
    program; the churn in range moves the samples by > 1e-2)."""
    _, x = draw(teacher)
    _, x_low = draw(teacher, S_churn=10.0, S_min=0.0, S_max=1e-3)
    np.testing.assert_allclose(x_low, x, rtol=1e-5, atol=1e-5)
    _, x_high = draw(teacher, S_churn=10.0, S_min=100.0, S_max=math.inf)
    np.testing.assert_allclose(x_high, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("S_churn,S_noise", [(0.2, 1.0), (5.0, 1.0), (0.2, 0.5)])
def test_one_step_churn_matches_the_closed_form(S_churn, S_noise):
    """One step (sigma_max -> 0) on the data N(0, s_d^2) with its exact denoiser
    D(x; sigma) = s_d^2 / (s_d^2 + sigma^2) x: x ~ N(0, sigma_max^2) gets noise of std
    sigma_max sqrt(gamma (2 + gamma)) S_noise, gamma = min(S_churn, sqrt(2) - 1), and is denoised
    at (1 + gamma) sigma_max, so its std is s_d^2 / (s_d^2 + sigma_hat^2) sigma_max
    sqrt(1 + gamma (2 + gamma) S_noise^2)."""
    p, s_d, n = sde.EDM(), 0.5, 20000
    D = lambda x, t, c: x * (s_d ** 2 / (s_d ** 2 + t ** 2))[:, None]
    x, nfe = jax.jit(lambda k: sampling.heun(D, p, k, (n, 2), num_steps=1, S_churn=S_churn,
                                             S_noise=S_noise))(jax.random.key(0))
    assert nfe == 1
    gamma = min(S_churn, math.sqrt(2) - 1)
    s_hat = (1 + gamma) * p.sigma_max
    expected = s_d ** 2 / (s_d ** 2 + s_hat ** 2) * p.sigma_max * math.sqrt(
        1 + gamma * (2 + gamma) * S_noise ** 2)
    deterministic = s_d ** 2 / (s_d ** 2 + p.sigma_max ** 2) * p.sigma_max
    assert abs(expected / deterministic - 1) > 0.05          # the churn is measurable here
    np.testing.assert_allclose(float(jnp.std(x)), expected, rtol=0.015)
