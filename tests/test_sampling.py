"""Samplers driven by the exact denoiser of Gaussian data reproduce the Gaussian (closed forms)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import sampling, sde
from tests.gaussian import GaussianDenoiser

M = jnp.asarray([0.3, -1.0, 0.5])
S = jnp.asarray([0.5, 0.2, 1.5])
PROCESSES = [sde.EDM(), sde.VESDE(), sde.VPSDE(), sde.subVPSDE()]
IDS = ['edm', 've', 'vp', 'subvp']


def exact_ode_sample(process, key, shape, mean, std):
    """Exact PF-ODE map for N(mean, std^2) data, from the sampler's prior draw to D(x; sigma(eps)).

    In x_hat = x / alpha, sigma_hat = sigma / alpha the ODE dx_hat/dsigma_hat = (x_hat - D) / sigma_hat
    is solved by x_hat - mean = (x_hat_T - mean) sqrt(std^2 + sigma_hat^2) / sqrt(std^2 + sigma_hat_T^2)."""
    lo, hi = process.scaled_sigma(jnp.asarray([process.eps, process.T]))
    x_hat_T = process.prior_sampling(jax.random.split(key)[0], shape) / process.marginal_coefs(jnp.asarray([process.T]))[0][0]
    return mean + (x_hat_T - mean) * std ** 2 / (jnp.sqrt(std ** 2 + lo ** 2) * jnp.sqrt(std ** 2 + hi ** 2))


def _rel_rms(x, ref):
    return float(jnp.max(jnp.sqrt(jnp.mean((x - ref) ** 2, axis=0)) / S))


@pytest.mark.parametrize('p', PROCESSES, ids=IDS)
def test_heun_follows_exact_probability_flow(p):
    key, shape = jax.random.key(0), (64, 3)
    x, nfe = jax.jit(lambda k: sampling.heun(GaussianDenoiser(p, M, S), p, k, shape))(key)
    assert nfe == 35
    assert _rel_rms(x, exact_ode_sample(p, key, shape, M, S)) < 0.15  # 2nd-order error at 18 steps


def test_ode_samplers_converge_at_their_order():
    """Doubling the steps divides the error by ~4 for Heun (2nd order) and ~2 for Euler (1st)."""
    p, key, shape = sde.EDM(), jax.random.key(1), (64, 3)
    ref = exact_ode_sample(p, key, shape, M, S)
    D = GaussianDenoiser(p, M, S)
    err = {}
    for name in ('heun', 'euler_ode'):
        for n in (18, 36):
            sample = sampling.get_sampler(name, num_steps=n)
            err[name, n] = _rel_rms(jax.jit(lambda k: sample(D, p, k, shape)[0])(key), ref)
    assert 3.5 < err['heun', 18] / err['heun', 36] < 5.
    assert 1.7 < err['euler_ode', 18] / err['euler_ode', 36] < 2.3
    assert err['heun', 36] < 0.02


def test_nfe_counts_network_evaluations():
    p, calls = sde.EDM(), []
    D = GaussianDenoiser(p, M, S)

    def counted(x, t, c):
        jax.debug.callback(lambda: calls.append(1))
        return D(x, t, c)

    for name, kw, expected in [('heun', dict(num_steps=18), 35), ('euler_ode', dict(num_steps=5), 5),
                               ('pc', dict(num_steps=6, n_corrector=2), 18),
                               ('euler_maruyama', dict(num_steps=7), 7)]:
        calls.clear()
        x, nfe = sampling.get_sampler(name, **kw)(counted, p, jax.random.key(0), (2, 3))
        jax.block_until_ready(x)
        assert nfe == expected == len(calls), name


@pytest.mark.parametrize('p', [sde.VESDE(), sde.VPSDE()], ids=['ve', 'vp'])
def test_pc_reproduces_gaussian(p):
    """Reverse-diffusion predictor + Langevin corrector; snr 0.16 inflates the std by ~snr^2/2 (1.3%)."""
    s = jnp.full((3,), 0.5)
    D = GaussianDenoiser(p, M, s)
    x, nfe = jax.jit(lambda k: sampling.pc(D, p, k, (10000, 3), num_steps=500, snr=0.16))(jax.random.key(2))
    assert nfe == 1000
    np.testing.assert_allclose(jnp.mean(x, 0), M, atol=0.02)
    ratio = np.asarray(jnp.std(x, 0) / s)
    assert np.all((ratio > 0.985) & (ratio < 1.045)), ratio


def test_langevin_corrector_stationary_variance():
    """Score-SDE's Langevin step on N(0, v I) with the exact score is stationary at v (1 + snr^2):
    eps = 2 snr^2 v^2 / v_st and the ULA stationary variance v / (1 - eps / 2v) solve to it."""
    p, v, snr = sde.VESDE(), 0.25, 0.5
    D = GaussianDenoiser(p, jnp.zeros((4,)), jnp.full((4,), 0.5))
    t = jnp.full((4000,), 0.)  # sigma_t = sigma_min = 0.01: p_t is N(0, 0.25 + 1e-4)
    score_fn = lambda x, t: D.score(x, t)
    x0 = jax.random.normal(jax.random.key(3), (4000, 4)) * 0.5
    x = jax.jit(lambda x: jax.lax.fori_loop(0, 200, lambda i, x: sampling.langevin_step(
        score_fn, p, jax.random.fold_in(jax.random.key(4), i), x, t, snr), x))(x0)
    var_t = v + 0.01 ** 2
    np.testing.assert_allclose(float(jnp.var(x)), var_t * (1 + snr ** 2), rtol=0.03)


@pytest.mark.parametrize('p', [sde.VPSDE(), sde.EDM()], ids=['vp', 'edm'])
def test_euler_maruyama_reproduces_gaussian(p):
    D = GaussianDenoiser(p, M, S)
    x, nfe = jax.jit(lambda k: sampling.euler_maruyama(D, p, k, (10000, 3), num_steps=500))(jax.random.key(5))
    assert nfe == 500
    np.testing.assert_allclose(jnp.mean(x, 0), M, atol=0.04)
    np.testing.assert_allclose(jnp.std(x, 0) / S, 1., atol=0.03)


def test_class_conditional_and_guided_sampling():
    """For class-shifted Gaussians D(x, null) + w (D(x, c) - D(x, null)) is the exact denoiser of the
    Gaussian with mean m + w c @ class_means, so guided Heun follows that Gaussian's flow."""
    p, key, shape = sde.EDM(), jax.random.key(6), (64, 3)
    class_means = jnp.asarray([[1., 0., 0.], [0., 2., -1.]])
    D = GaussianDenoiser(p, M, S, class_means=class_means)
    labels = jax.nn.one_hot(jnp.arange(64) % 2, 2)
    w = 2.5
    x, nfe = jax.jit(lambda k, c: sampling.heun(sampling.guided(D, w), p, k, shape, c))(key, labels)
    assert nfe == 70
    target_mean = M + w * labels @ class_means
    assert _rel_rms(x, exact_ode_sample(p, key, shape, target_mean, S)) < 0.1
    x1, _ = jax.jit(lambda k, c: sampling.heun(D, p, k, shape, c))(key, labels)
    assert _rel_rms(x1, exact_ode_sample(p, key, shape, M + labels @ class_means, S)) < 0.1
    x_w1 = sampling.guided(D, 1.)(x1, jnp.full((64,), 0.3), labels)
    np.testing.assert_allclose(x_w1, D(x1, jnp.full((64,), 0.3), labels), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='needs class_labels'):
        sampling.guided(D, w)(x1, jnp.full((64,), 0.3), None)


def test_edm_stochastic_sampler_reproduces_gaussian():
    """EDM Algorithm 2 (S_churn > 0): the added noise keeps x at its noise level; the samples keep
    the Gaussian's moments up to the discretisation error (~1% at gamma = 20/128)."""
    p = sde.EDM()
    D = GaussianDenoiser(p, M, S)
    sample = sampling.get_sampler('heun', num_steps=128, S_churn=20., S_min=0.05, S_max=50., S_noise=1.)
    x, nfe = jax.jit(lambda k: sample(D, p, k, (10000, 3)))(jax.random.key(8))
    assert nfe == 255
    np.testing.assert_allclose(jnp.mean(x, 0), M, atol=0.04)
    np.testing.assert_allclose(jnp.std(x, 0) / S, 1., atol=0.03)
    x_ode = exact_ode_sample(p, jax.random.key(8), (10000, 3), M, S)
    assert float(jnp.mean(jnp.abs(x - x_ode))) > 0.05  # the churn did add noise


@pytest.mark.parametrize('name', ['heun', 'euler_ode', 'pc', 'euler_maruyama'])
def test_program_size_does_not_grow_with_steps(name):
    """The step loops are lax.fori_loops: the traced program is the same size for 30 or 60 steps."""
    p = sde.VPSDE()
    D = GaussianDenoiser(p, M, S)

    def size(n):
        sample = sampling.get_sampler(name, num_steps=n)
        return len(jax.make_jaxpr(lambda k: sample(D, p, k, (2, 3))[0])(jax.random.key(0)).eqns)

    assert size(30) == size(60)


def test_get_sampler_errors():
    with pytest.raises(ValueError, match="'euler_maruyama', 'euler_ode', 'heun', 'pc'"):
        sampling.get_sampler('ddim')
    with pytest.raises(ValueError, match="no sampler has options \\['n_steps_each'\\]"):
        sampling.get_sampler('pc', n_steps_each=2)
    heun = sampling.get_sampler('heun', num_steps=4, snr=0.16, n_corrector=1)  # other samplers' options
    assert heun.keywords == {'num_steps': 4}
