"""PF-ODE likelihood of Gaussian data against the analytic log-density."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdistill import likelihood, sde
from tests.gaussian import GaussianDenoiser

M = jnp.asarray([0.3, -1.0, 0.5])
S = jnp.asarray([0.5, 0.2, 1.5])


def _analytic(g, p, x, eps):
    return np.asarray(g.marginal_logp(x, jnp.full((x.shape[0],), eps)))


def _with_true_marginal(g, p, logp, z):
    """Swap the prior N(0, sigma_T^2) for the exact p_T(z) (they differ by O(alpha_T)): what is
    left is the ODE's change of variables, exact for a Gaussian."""
    z = jnp.asarray(z, jnp.float32)
    return logp - np.asarray(p.prior_logp(z)) + _analytic(g, p, z, p.T)


@pytest.mark.parametrize('p', [sde.VPSDE(), sde.EDM()], ids=['vp', 'edm'])
@pytest.mark.parametrize('hutchinson', ['rademacher', 'exact'])
def test_pf_ode_likelihood_of_gaussian_is_exact(p, hutchinson):
    """The PF-ODE drift of Gaussian data is linear with a diagonal Jacobian, so both the exact trace
    and the Rademacher estimate v^T J v = tr J are exact: log p_eps(x) must match per example."""
    g = GaussianDenoiser(p, M, S)
    x = g.sample(jax.random.key(0), 16)
    logp, z, nfe = likelihood.log_likelihood(g, p, jax.random.key(1), x, hutchinson=hutchinson)
    eps = likelihood.default_eps(p)
    np.testing.assert_allclose(_with_true_marginal(g, p, logp, z), _analytic(g, p, x, eps), atol=2e-3)
    np.testing.assert_allclose(logp, _analytic(g, p, x, eps), atol=0.05)  # the prior approximation
    assert z.shape == x.shape and nfe > 10
    # z = x(T) follows the exact flow: (z - alpha_T m) / sqrt(v_T) = (x - alpha_eps m) / sqrt(v_eps).
    a_eps, s_eps = (float(c[0]) for c in p.marginal_coefs(jnp.asarray([eps])))
    a_T, s_T = (float(c[0]) for c in p.marginal_coefs(jnp.asarray([p.T])))
    std = lambda a, s: np.sqrt(a ** 2 * np.asarray(S) ** 2 + s ** 2)
    np.testing.assert_allclose((z - a_T * np.asarray(M)) / std(a_T, s_T),
                               (np.asarray(x) - a_eps * np.asarray(M)) / std(a_eps, s_eps), atol=2e-3)


def test_gaussian_hutchinson_is_unbiased():
    p = sde.VESDE()
    g = GaussianDenoiser(p, M, S)
    x = g.sample(jax.random.key(2), 512)
    logp, z, _ = likelihood.log_likelihood(g, p, jax.random.key(3), x, hutchinson='gaussian')
    err = _with_true_marginal(g, p, logp, z) - _analytic(g, p, x, likelihood.default_eps(p))
    assert np.std(err) > 0.1  # a Gaussian probe is noisy per example ...
    assert abs(np.mean(err)) < 4 * np.std(err) / np.sqrt(512)  # ... but unbiased


class GaussianModule(nnx.Module):
    """The exact Gaussian denoiser with its mean as an nnx.Param (exercises the split/merge path)."""

    def __init__(self, process, mean, std):
        self.process = process
        self.mean = nnx.Param(jnp.asarray(mean))
        self.std = std

    def __call__(self, x_t, t, class_labels=None, *, key=None):
        return GaussianDenoiser(self.process, self.mean[...], self.std)(x_t, t)


def test_bits_per_dim_and_nnx_module():
    p = sde.VPSDE()
    g = GaussianDenoiser(p, M, S)
    images = jnp.clip(jnp.round((g.sample(jax.random.key(4), 8) * 0.5 + 1) * 127.5) / 127.5 - 1, -1, 1)
    module = GaussianModule(p, M, S)
    key = jax.random.key(5)
    bpd, _, _ = likelihood.bits_per_dim(module, p, key, images, dequantize=False)
    logp, _, _ = likelihood.log_likelihood(g, p, jax.random.split(key)[1], images)
    np.testing.assert_allclose(bpd, -logp / (3 * np.log(2)) + 7, rtol=1e-5)
    bpd_deq, z, _ = likelihood.bits_per_dim(g, p, key, images)
    x_deq = likelihood.uniform_dequantize(jax.random.split(key)[0], images)
    ref = -_analytic(g, p, x_deq, likelihood.SCORE_SDE_EPS) / (3 * np.log(2)) + 7
    z = jnp.asarray(z, jnp.float32)
    exact_prior = np.asarray(p.prior_logp(z)) - _analytic(g, p, z, p.T)
    np.testing.assert_allclose(bpd_deq + exact_prior / (3 * np.log(2)), ref, atol=1e-3)


def test_uniform_dequantize_stays_in_the_pixel_bin():
    k = jnp.arange(256, dtype=jnp.float32)[:, None].repeat(200, 1)
    x = likelihood.uniform_dequantize(jax.random.key(6), k / 127.5 - 1)
    level = (x + 1) * 128
    np.testing.assert_array_equal(np.floor(level), k)
    assert abs(float(jnp.mean(level - k)) - 0.5) < 0.01
    assert float(jnp.min(x)) >= -1 and float(jnp.max(x)) < 1


def test_bad_input_raises():
    p = sde.VPSDE()
    g = GaussianDenoiser(p, M, S)
    with pytest.raises(ValueError, match=r"valid: \['rademacher', 'gaussian', 'exact'\]"):
        likelihood.log_likelihood(g, p, jax.random.key(0), jnp.zeros((2, 3)), hutchinson='skilling')
    with pytest.raises(ValueError, match=r'bits/dim expects images in \[-1, 1\]'):
        likelihood.bits_per_dim(g, p, jax.random.key(0), jnp.full((2, 3), 255.))


def test_likelihood_fn_traces_once():
    p = sde.EDM()
    g, traces = GaussianDenoiser(p, M, S), []

    def denoise_fn(x_t, t, c):
        traces.append(1)  # runs at trace time only
        return g(x_t, t, c)

    fn = likelihood.get_likelihood_fn(denoise_fn, p, hutchinson='exact')
    x = g.sample(jax.random.key(7), 4)
    lp1, _, nfe1 = fn(jax.random.key(8), x)
    n_traces = len(traces)
    lp2, _, nfe2 = fn(jax.random.key(9), x + 0.1)
    assert len(traces) == n_traces and nfe1 > 10 and nfe2 > 10
    assert not np.allclose(lp1, lp2)
