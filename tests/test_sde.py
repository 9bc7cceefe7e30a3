"""Forward processes against their closed forms (Score-SDE App. B, E; EDM Table 1, eq. 5)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from fdistill import sde
from fdistill.models.denoiser import preconditioning

PROCESSES = [sde.VESDE(), sde.VPSDE(), sde.subVPSDE(), sde.EDM()]
IDS = ['ve', 'vp', 'subvp', 'edm']


def _times(p, n=7):
    return jnp.linspace(p.eps, p.T, n)


def test_default_hyperparameters():
    assert (sde.VPSDE().beta_min, sde.VPSDE().beta_max, sde.VPSDE().N) == (0.1, 20., 1000)
    assert (sde.VESDE().sigma_min, sde.VESDE().sigma_max, sde.VESDE().N) == (0.01, 50., 1000)
    e = sde.EDM()
    assert (e.sigma_min, e.sigma_max, e.sigma_data) == (0.002, 80., 0.5)
    assert (e.P_mean, e.P_std, e.rho) == (-1.2, 1.2, 7.)
    assert (e.T, e.eps) == (80., 0.002)


def test_vp_subvp_marginals_closed_form():
    t = np.linspace(1e-3, 1., 9)
    int_beta = 0.1 * t + 0.5 * (20. - 0.1) * t ** 2
    alpha, sigma = sde.VPSDE().marginal_coefs(jnp.asarray(t))
    np.testing.assert_allclose(alpha ** 2, np.exp(-int_beta), rtol=1e-5)
    np.testing.assert_allclose(sigma ** 2, 1 - np.exp(-int_beta), rtol=1e-4)
    alpha, sigma = sde.subVPSDE().marginal_coefs(jnp.asarray(t))
    np.testing.assert_allclose(alpha ** 2, np.exp(-int_beta), rtol=1e-5)
    np.testing.assert_allclose(sigma, 1 - np.exp(-int_beta), rtol=1e-4)


def test_ve_edm_marginals_closed_form():
    t = np.linspace(0., 1., 5)
    alpha, sigma = sde.VESDE().marginal_coefs(jnp.asarray(t))
    np.testing.assert_allclose(alpha, 1.)
    np.testing.assert_allclose(sigma, 0.01 * 5000. ** t, rtol=1e-5)
    alpha, sigma = sde.EDM().marginal_coefs(jnp.asarray([0.5, 3.]))
    np.testing.assert_allclose(alpha, 1.)
    np.testing.assert_allclose(sigma, [0.5, 3.])
    x0 = jnp.ones((2, 3))
    mean, std = sde.VESDE().marginal_prob(x0, jnp.asarray([0., 1.]))
    np.testing.assert_allclose(mean, x0)
    np.testing.assert_allclose(std, [0.01, 50.], rtol=1e-5)


@pytest.mark.parametrize('p', PROCESSES, ids=IDS)
def test_sde_generates_its_marginals(p):
    """A linear SDE dx = f(t) x dt + g dw has d log alpha/dt = f and d sigma^2/dt = 2 f sigma^2 + g^2."""
    t = _times(p)[1:]
    x = jnp.ones((t.shape[0], 1))
    drift, g = p.sde(x, t)
    f = drift[:, 0]
    dlog_alpha = jax.vmap(jax.grad(lambda s: jnp.log(p.marginal_coefs(s[None])[0][0])))(t)
    dvar = jax.vmap(jax.grad(lambda s: p.marginal_coefs(s[None])[1][0] ** 2))(t)
    np.testing.assert_allclose(dlog_alpha, f, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dvar, 2 * f * p.marginal_coefs(t)[1] ** 2 + g ** 2, rtol=2e-3)


@pytest.mark.parametrize('p', PROCESSES, ids=IDS)
def test_prior(p):
    z = p.prior_sampling(jax.random.key(0), (4000, 3))
    std = float(p.marginal_coefs(jnp.asarray([p.T]))[1][0]) if isinstance(p, (sde.VESDE, sde.EDM)) else 1.
    assert abs(float(jnp.std(z)) / std - 1) < 0.03
    expected = stats.norm.logpdf(np.asarray(z[:5]), scale=std).sum(axis=1)
    np.testing.assert_allclose(p.prior_logp(z[:5]), expected, rtol=1e-5)


@pytest.mark.parametrize('p', PROCESSES, ids=IDS)
def test_inverse_scaled_sigma(p):
    t = _times(p)
    np.testing.assert_allclose(p.inverse_scaled_sigma(p.scaled_sigma(t)), t, rtol=2e-3)


def test_vp_discretize_is_ddpm():
    p, N = sde.VPSDE(N=100), 100
    i = np.arange(0, N, 9)
    x = jax.random.normal(jax.random.key(1), (i.shape[0], 4))
    f, G = p.discretize(x, jnp.asarray(i / (N - 1), jnp.float32))
    beta = (0.1 + i / (N - 1) * (20. - 0.1)) / N
    np.testing.assert_allclose(G, np.sqrt(beta), rtol=1e-5)
    np.testing.assert_allclose(x + f, np.sqrt(1 - beta)[:, None] * x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p.langevin_alpha(jnp.asarray(i / (N - 1))), 1 - beta, rtol=1e-6)


def test_ve_discretize_is_smld():
    p, N = sde.VESDE(N=10), 10
    i = np.arange(N)
    x = jnp.ones((N, 2))
    f, G = p.discretize(x, jnp.asarray(i / (N - 1), jnp.float32))
    sig = 0.01 * 5000. ** (i / (N - 1))
    prev = np.concatenate([[0.], sig[:-1]])
    np.testing.assert_allclose(f, 0.)
    np.testing.assert_allclose(G, np.sqrt(sig ** 2 - prev ** 2), rtol=1e-4)
    np.testing.assert_allclose(p.langevin_alpha(jnp.asarray([0.3])), 1.)


def test_subvp_discretize_is_euler_maruyama():
    p = sde.subVPSDE(N=50)
    t = jnp.asarray([0.2, 0.7])
    x = jnp.ones((2, 3))
    f, G = p.discretize(x, t)
    drift, g = p.sde(x, t)
    np.testing.assert_allclose(f, drift / 50, rtol=1e-6)
    np.testing.assert_allclose(G, g / np.sqrt(50), rtol=1e-6)
    beta = 0.1 + np.asarray(t) * 19.9
    discount = 1 - np.exp(-2 * 0.1 * np.asarray(t) - 19.9 * np.asarray(t) ** 2)
    np.testing.assert_allclose(g, np.sqrt(beta * discount), rtol=1e-5)


def test_edm_discretize_steps_along_karras_grid():
    p = sde.EDM(N=12)
    s = np.asarray(p.karras_sigmas(12))
    f, G = p.discretize(jnp.ones((12, 2)), jnp.asarray(s[:-1]))
    np.testing.assert_allclose(f, 0.)
    np.testing.assert_allclose(G ** 2, s[:-1] ** 2 - s[1:] ** 2, rtol=1e-4)


@pytest.mark.parametrize('p', [sde.VESDE(N=1000), sde.VPSDE(N=1000)], ids=['ve', 'vp'])
def test_discrete_index_on_sampling_grid(p):
    """On Score-SDE's grid linspace(T, eps, N) the i-th time must map to discrete step N-1-i."""
    ts = p.sampling_grid(p.N)[:-1]
    np.testing.assert_array_equal(p._index(ts), np.arange(p.N)[::-1])


@pytest.mark.parametrize('p', PROCESSES, ids=IDS)
def test_reverse_sde_and_probability_flow(p):
    x = jax.random.normal(jax.random.key(2), (3, 4))
    t = jnp.asarray([p.eps * 10, 0.3 * p.T, p.T])
    score_fn = lambda x, t: jnp.sin(x) * t[:, None]
    drift, g = p.sde(x, t)
    rdrift, rg = p.reverse(score_fn).sde(x, t)
    np.testing.assert_allclose(rdrift, drift - g[:, None] ** 2 * score_fn(x, t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rg, g)
    pdrift, pg = p.reverse(score_fn, probability_flow=True).sde(x, t)
    np.testing.assert_allclose(pdrift, drift - 0.5 * g[:, None] ** 2 * score_fn(x, t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pg, 0.)
    f, G = p.discretize(x, t)
    rf, rG = p.reverse(score_fn).discretize(x, t)
    np.testing.assert_allclose(rf, f - G[:, None] ** 2 * score_fn(x, t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rG, G)


def test_edm_precond_satisfies_edm_design_criteria():
    """EDM Appendix B.6: unit-variance network input and training target, c_skip minimising c_out."""
    p = sde.EDM()
    sigma = jnp.asarray([0.002, 0.1, 0.5, 2., 80.])
    c_skip, c_out, c_in, c_noise = preconditioning('edm', sigma, sigma, sigma_data=p.sigma_data)
    sd2 = 0.25
    np.testing.assert_allclose(c_in ** 2 * (sigma ** 2 + sd2), 1., rtol=1e-5)
    target_var = ((1 - c_skip) ** 2 * sd2 + c_skip ** 2 * sigma ** 2) / c_out ** 2
    np.testing.assert_allclose(target_var, 1., rtol=1e-5)
    np.testing.assert_allclose(c_skip, sd2 / (sigma ** 2 + sd2), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(np.asarray(sigma)) / 4, rtol=1e-6)
    # The training loss weight makes the effective weight lambda c_out^2 = 1 (EDM eq. 8, Sec. 5).
    np.testing.assert_allclose(p.loss_weight(sigma) * c_out ** 2, 1., rtol=1e-5)


def test_karras_sigmas():
    p = sde.EDM()
    s = np.asarray(p.karras_sigmas(18), np.float64)
    assert s.shape == (19,) and s[-1] == 0.
    np.testing.assert_allclose([s[0], s[17]], [80., 0.002], rtol=1e-7)
    assert np.all(np.diff(s) < 0)
    np.testing.assert_allclose(np.diff(s[:-1] ** (1 / 7)), (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17, rtol=1e-4)
    s3 = np.asarray(p.karras_sigmas(5, rho=3.), np.float64)
    np.testing.assert_allclose(np.diff(s3[:-1] ** (1 / 3)), (0.002 ** (1 / 3) - 80 ** (1 / 3)) / 4, rtol=1e-4)


def test_training_sigma_is_lognormal():
    s = sde.EDM().sample_training_sigma(jax.random.key(3), 20000)
    assert abs(float(jnp.mean(jnp.log(s))) + 1.2) < 0.03
    assert abs(float(jnp.std(jnp.log(s))) - 1.2) < 0.03


def test_sde_from_config():
    c = ml_collections.ConfigDict(dict(name='vpsde', beta_min=0.2, beta_max=10., N=50,
                                       sigma_min=0.002, sigma_max=80., sigma_data=0.5))
    assert sde.sde_from_config(c) == sde.VPSDE(beta_min=0.2, beta_max=10., N=50)
    c.name = 'edm'
    assert sde.sde_from_config(c) == sde.EDM(sigma_min=0.002, sigma_max=80., sigma_data=0.5, N=50)
    c.name = 'vp'
    with pytest.raises(ValueError, match="'edm', 'subvpsde', 'vesde', 'vpsde'"):
        sde.sde_from_config(c)


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match='sigma_min < sigma_max'):
        sde.VESDE(sigma_min=1., sigma_max=0.5)
    with pytest.raises(ValueError, match='N must be a positive int'):
        sde.VPSDE(N=0)
    with pytest.raises(ValueError, match='beta_max / N < 1'):
        sde.VPSDE(N=10)


# Frame-correlated noise (EDM.frame_correlation): per clip and pixel the frames' noise is
# N(0, C), C = (1 - rho) I + rho 1 1^T, with eigenvalue 1 - rho + T rho along the frame mean and
# 1 - rho across it.

def _corr(rho, t):
    return (1 - rho) * np.eye(t) + rho * np.ones((t, t))


def test_frame_correlated_noise_covariance():
    rho, t = 0.6, 4
    z = np.asarray(sde.EDM(frame_correlation=rho).noise(jax.random.key(0), (4000, t, 2, 2, 1)))
    frames = np.moveaxis(z, 1, -1).reshape(-1, t)
    np.testing.assert_allclose(np.cov(frames, rowvar=False), _corr(rho, t), atol=0.03)
    np.testing.assert_allclose(np.corrcoef(z[:, 0, 0, 0, 0], z[:, 0, 1, 0, 0])[0, 1], 0, atol=0.05)
    assert sde.EDM().noise(jax.random.key(0), (3, 4, 2, 2, 1)).shape == (3, 4, 2, 2, 1)
    with pytest.raises(ValueError, match=r'clips \[B, T, H, W, C\]'):
        sde.EDM(frame_correlation=rho).noise(jax.random.key(0), (3, 4))
    with pytest.raises(ValueError, match='frame_correlation < 1'):
        sde.EDM(frame_correlation=1.0)


def test_frame_correlated_prior_logp():
    rho, t, p = 0.3, 4, sde.EDM(frame_correlation=0.3)
    z = np.asarray(p.prior_sampling(jax.random.key(1), (3, t, 2, 1, 1)))
    cov = p.sigma_max ** 2 * _corr(rho, t)
    want = [sum(stats.multivariate_normal(np.zeros(t), cov).logpdf(zi[:, h, w, 0])
                for h in range(2) for w in range(1)) for zi in z]
    np.testing.assert_allclose(np.asarray(p.prior_logp(jnp.asarray(z))), want, rtol=1e-5)


def test_heun_with_frame_correlated_noise_follows_closed_form_flow():
    """Data N(0, s^2 I): the exact denoiser is s^2 (s^2 I + sigma^2 C)^-1 x and the flow scales the
    frame mean by s / sqrt(s^2 + sigma_max^2 lambda) per eigenvalue lambda of C (and so on for
    the rest); Heun from the correlated prior must land there, and the data's variance."""
    from fdistill import sampling
    rho, t, s = 0.7, 4, 0.5
    p = sde.EDM(frame_correlation=rho)
    top, rest = 1 - rho + t * rho, 1 - rho

    def split(x):
        mean = jnp.mean(x, axis=1, keepdims=True)
        return mean, x - mean

    def denoise(x, sigma, labels=None):
        mean, diff = split(x)
        v = sde.bcast(sigma, x) ** 2
        return s ** 2 * (mean / (s ** 2 + v * top) + diff / (s ** 2 + v * rest))

    shape = (2000, t, 2, 2, 1)
    key = jax.random.key(2)
    x, _ = sampling.heun(denoise, p, key, shape, num_steps=256)
    prior = p.prior_sampling(jax.random.split(key)[0], shape)
    mean, diff = split(prior)
    smax2 = p.sigma_max ** 2
    want = s * (mean / np.sqrt(s ** 2 + smax2 * top) + diff / np.sqrt(s ** 2 + smax2 * rest))
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), atol=1e-3)
    frames = np.moveaxis(np.asarray(x), 1, -1).reshape(-1, t)
    np.testing.assert_allclose(np.cov(frames, rowvar=False), s ** 2 * np.eye(t), atol=0.01)


def test_edm_loss_noises_with_frame_correlation():
    from fdistill import losses
    rho, t = 0.5, 4
    seen = []

    def model(x_t, sigma, labels=None, *, key=None):
        seen.append((x_t, sigma))
        return x_t

    x0 = jnp.zeros((3000, t, 2, 2, 1))
    losses.edm_losses(model, sde.EDM(frame_correlation=rho), jax.random.key(4), x0)
    x_t, sigma = seen[0]
    n = np.moveaxis(np.asarray(x_t / sde.bcast(sigma, x_t)), 1, -1).reshape(-1, t)
    np.testing.assert_allclose(np.cov(n, rowvar=False), _corr(rho, t), atol=0.05)


def test_frame_correlation_is_for_video_only():
    """Video distillation takes a frame-correlated teacher (its students draw the same noise,
    tests/test_video_frame_correlation.py); other data have no frames to correlate."""
    import ml_collections
    from configs.distill_toy import get_config as toy_config
    from configs.video_quick import get_config
    from fdistill import validation
    c = get_config()
    c.process.frame_correlation = 0.5
    assert not validation.problems(c, "distill") and not validation.problems(c, "train")
    t = toy_config()
    assert not validation.problems(t, "distill")
    t.process = ml_collections.ConfigDict({"frame_correlation": 0.5})
    assert any("process.frame_correlation" in line for line in validation.problems(t, "distill"))
