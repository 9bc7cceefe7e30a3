"""Teacher losses with the exact Gaussian denoiser: closed-form expectations, Score-SDE's formula,
label dropout and the dropout key."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from configs.default import get_default_config
from fdistill import losses, sde
from tests.gaussian import GaussianDenoiser

M = jnp.asarray([0.3, -1.0, 0.5, 0.])
S = jnp.asarray([0.5, 0.2, 1.5, 0.5])


def _data(process, n, key=0, std=S):
    g = GaussianDenoiser(process, M, std)
    return g, g.sample(jax.random.key(key), n)


def test_edm_loss_is_one_per_dim_when_data_std_is_sigma_data():
    """E||D*(x+n) - x||^2 = s^2 sigma^2/(s^2 + sigma^2) per dim, so lambda(sigma) times it is exactly 1
    for every sigma when s = sigma_data: EDM's weighting equalises the optimal loss."""
    p = sde.EDM()
    g, x = _data(p, 8192, std=jnp.full((4,), 0.5))
    l, sigma = losses.edm_losses(g, p, jax.random.key(1), x)
    assert abs(float(jnp.mean(l)) - 1.) < 0.04
    big = sigma > 1.
    assert abs(float(jnp.mean(jnp.where(big, l, 0.)) / jnp.mean(big)) - 1.) < 0.1


def test_edm_loss_expectation_closed_form_and_wrong_denoiser():
    p = sde.EDM()
    g, x = _data(p, 8192)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    sig = np.exp(-1.2 + 1.2 * nodes)[:, None]
    s2, sd2 = np.asarray(S)[None] ** 2, 0.25
    per_dim = (sig ** 2 + sd2) * s2 / (sd2 * (s2 + sig ** 2))
    expected = float(np.sum(weights[:, None] * per_dim) / np.sqrt(2 * np.pi) / 4)
    l, _ = losses.edm_losses(g, p, jax.random.key(2), x)
    assert abs(float(jnp.mean(l)) / expected - 1) < 0.05
    # A denoiser of the wrong mean m + delta is off by delta sigma^2 / (s^2 + sigma^2): the excess
    # loss is E lambda (delta sigma^2 / (s^2 + sigma^2))^2 (the cross term has mean zero).
    delta = 0.3
    excess = (sig ** 2 + sd2) / (sig * 0.5) ** 2 * (delta * sig ** 2 / (s2 + sig ** 2)) ** 2
    excess = float(np.sum(weights[:, None] * excess) / np.sqrt(2 * np.pi) / 4)
    l_wrong, _ = losses.edm_losses(GaussianDenoiser(p, M + delta, S), p, jax.random.key(2), x)
    assert abs(float(jnp.mean(l_wrong - l)) / excess - 1) < 0.1
    l_sum, _ = losses.edm_losses(g, p, jax.random.key(2), x, reduce_mean=False)
    np.testing.assert_allclose(l_sum, 4 * l, rtol=1e-5)


@pytest.mark.parametrize('p', [sde.VPSDE(), sde.VESDE()], ids=['vp', 've'])
def test_dsm_loss_at_its_minimum_matches_closed_form(p):
    """With lambda = sigma^2 the optimum is E_t alpha^2 Var[x_0 | x_t] / sigma^2
    = E_t alpha^2 s^2 / (alpha^2 s^2 + sigma^2) per dim."""
    g, x = _data(p, 8192)

    def expectation(per_dim):  # E_{t ~ U(eps, T)} mean_d per_dim(alpha_t, sigma_t, s_d^2)
        def integrand(t):
            alpha, sigma = (float(v[0]) for v in p.marginal_coefs(jnp.asarray([t])))
            return float(np.mean(per_dim(alpha, sigma, np.asarray(S) ** 2)))
        return integrate.quad(integrand, losses.DSM_EPS, p.T, limit=200)[0] / (p.T - losses.DSM_EPS)

    expected = expectation(lambda a, sig, s2: a ** 2 * s2 / (a ** 2 * s2 + sig ** 2))
    l, _ = losses.dsm_losses(g, p, jax.random.key(3), x)
    assert abs(float(jnp.mean(l)) / expected - 1) < 0.04
    # Mean off by delta: the denoiser is off by delta sigma^2 / v, v = alpha^2 s^2 + sigma^2.
    delta = 0.3
    excess = expectation(
        lambda a, sig, s2: a ** 2 / sig ** 2 * (delta * sig ** 2 / (a ** 2 * s2 + sig ** 2)) ** 2)
    l_wrong, _ = losses.dsm_losses(GaussianDenoiser(p, M + delta, S), p, jax.random.key(3), x)
    assert abs(float(jnp.mean(l_wrong - l)) / excess - 1) < 0.1


@pytest.mark.parametrize('likelihood_weighting', [False, True])
@pytest.mark.parametrize('reduce_mean', [True, False])
def test_dsm_equals_score_sde_formula(likelihood_weighting, reduce_mean):
    """lambda(t) ||s(x_t) + z / sigma||^2 (Score-SDE eq. 7, its reduce op) with the analytic score."""
    p = sde.subVPSDE()
    g, x = _data(p, 16)
    seen = {}

    def model(x_t, t, labels, key=None):
        seen.update(x_t=x_t, t=t)
        return g(x_t, t, labels)

    l, _ = losses.dsm_losses(model, p, jax.random.key(4), x, likelihood_weighting=likelihood_weighting,
                             reduce_mean=reduce_mean)
    x_t, t = seen['x_t'], seen['t']
    alpha, sigma = p.marginal_coefs(t)
    z = (x_t - alpha[:, None] * x) / sigma[:, None]
    sq = (g.score(x_t, t) + z / sigma[:, None]) ** 2
    lam = p.sde(x, t)[1] ** 2 if likelihood_weighting else sigma ** 2
    ref = lam * (jnp.mean(sq, -1) if reduce_mean else 0.5 * jnp.sum(sq, -1))
    np.testing.assert_allclose(l, ref, rtol=2e-3)
    assert float(jnp.min(t)) >= losses.DSM_EPS and float(jnp.max(t)) <= p.T


def _config(loss='edm', process='edm', num_classes=0, label_dropout=0., dropout=0.):
    c = get_default_config()
    c.training.loss = loss
    c.process.name = process
    c.data.num_classes = num_classes
    c.model.label_dropout = label_dropout
    c.model.dropout = dropout
    return c


class Recorder:
    """Gaussian denoiser that records the labels and dropout key it was called with."""

    def __init__(self, process):
        self.g = GaussianDenoiser(process, M, S)
        self.calls = []

    def __call__(self, x_t, t, labels=None, *, key=None):
        self.calls.append((labels, key))
        return self.g(x_t, t)


@pytest.mark.parametrize('p_drop', [0., 0.3, 1.])
def test_label_dropout_replaces_labels_by_null(p_drop):
    model = Recorder(sde.EDM())
    loss_fn = losses.get_loss_fn(_config(num_classes=10, label_dropout=p_drop))
    label = jnp.arange(4000, dtype=jnp.int32) % 10
    loss_fn(model, jax.random.key(5), {'x': jnp.zeros((4000, 4)), 'label': label})
    labels, key = model.calls[-1]
    assert key is None
    onehot = jax.nn.one_hot(label, 10)
    dropped = jnp.all(labels == 0, axis=-1)
    np.testing.assert_array_equal(labels[~dropped], onehot[~dropped])
    assert abs(float(jnp.mean(dropped)) - p_drop) < 0.03


def test_unconditional_and_dropout_key():
    model = Recorder(sde.VPSDE())
    loss_fn = losses.get_loss_fn(_config(loss='dsm', process='vpsde', dropout=0.1, label_dropout=0.1))
    batch = {'x': jnp.zeros((8, 4)), 'label': jnp.zeros((8,), jnp.int32)}
    loss, metrics = loss_fn(model, jax.random.key(6), batch)
    labels, key = model.calls[-1]
    assert labels is None and key is not None and key.shape == ()
    bins = [v for k, v in metrics.items() if k.startswith('train/loss_sigma_')]
    assert len(bins) == 4
    np.testing.assert_allclose(sum(bins), metrics['train/loss'], rtol=1e-5)
    assert metrics['train/loss'] == loss


def test_loss_fn_is_jittable_and_matches_edm_losses():
    p = sde.EDM()
    g, x = _data(p, 32)
    loss_fn = losses.get_loss_fn(_config())
    batch = {'x': x, 'label': jnp.zeros((32,), jnp.int32)}
    loss, _ = jax.jit(lambda k, b: loss_fn(g, k, b))(jax.random.key(7), batch)
    k_noise = jax.random.split(jax.random.key(7), 3)[0]
    np.testing.assert_allclose(loss, jnp.mean(losses.edm_losses(g, p, k_noise, x)[0]), rtol=1e-5)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match=r"valid names: \['dsm', 'edm'\]"):
        losses.get_loss_fn(_config(loss='sm'))
    with pytest.raises(ValueError, match="needs config.process.name='edm'"):
        losses.get_loss_fn(_config(loss='edm', process='vpsde'))
    with pytest.raises(ValueError, match='label_dropout is a probability'):
        losses.get_loss_fn(_config(num_classes=10, label_dropout=1.5))
