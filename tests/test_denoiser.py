"""Denoiser: EDM Table 1 preconditioning in the scaled space x_t / alpha, Tweedie score, get_model."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fdistill import sde
from fdistill.models import MLP, Denoiser, get_model, preconditioning


@dataclasses.dataclass(frozen=True)
class ScaledProcess:
    """Stand-in process with alpha_t = exp(-t), sigma_t = t (tests the scaled-space algebra)."""

    def marginal_coefs(self, t):
        return jnp.exp(-t), t


class ZeroNet(nnx.Module):
    """F = 0, recording nothing: D = c_skip x."""

    feature_channels = {0: 2}

    def __call__(self, x, noise_labels, class_labels=None, *, key=None, return_features=False):
        out = jnp.zeros_like(x)
        return (out, {0: x}) if return_features else out


class ProbeNet(nnx.Module):
    """F(x_in, c_noise) = x_in * c_noise: exposes both network inputs in the output."""

    def __call__(self, x, noise_labels, class_labels=None, *, key=None, return_features=False):
        return x * noise_labels[:, None]


SIGMAS = jnp.array([0.002, 0.1, 0.5, 3., 80.])


def test_edm_preconditioning_is_edm_table_1():
    c_skip, c_out, c_in, c_noise = preconditioning('edm', SIGMAS, SIGMAS, sigma_data=0.5)
    s = np.asarray(SIGMAS, np.float64)
    np.testing.assert_allclose(c_skip, 0.25 / (s ** 2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_out, 0.5 * s / np.sqrt(s ** 2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(s ** 2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)
    # D is the exact denoiser of N(0, sd^2) data when F = 0: c_skip = sd^2 / (sd^2 + sigma^2).
    # Unit variance of the network input and of its target (EDM eqs. 7-8 / Appendix B.6):
    np.testing.assert_allclose(c_in ** 2 * (s ** 2 + 0.25), 1., rtol=1e-6)
    np.testing.assert_allclose(c_skip ** 2 * s ** 2 + (1 - c_skip) ** 2 * 0.25, c_out ** 2, rtol=1e-5)


def test_vp_and_ve_preconditioning():
    t = jnp.array([0.1, 0.5, 1.])
    c_skip, c_out, c_in, c_noise = preconditioning('vp', SIGMAS[:3], t)
    np.testing.assert_allclose(c_skip, 1.)
    np.testing.assert_allclose(c_out, -SIGMAS[:3])
    np.testing.assert_allclose(c_in, 1 / np.sqrt(np.asarray(SIGMAS[:3]) ** 2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_noise, 999 * np.asarray(t), rtol=1e-6)
    c_skip, c_out, c_in, c_noise = preconditioning('ve', SIGMAS, SIGMAS)
    np.testing.assert_allclose(c_skip, 1.)
    np.testing.assert_allclose(c_out, SIGMAS)
    np.testing.assert_allclose(c_in, 1.)
    np.testing.assert_allclose(c_noise, np.log(np.asarray(SIGMAS) / 2), rtol=1e-5)
    with pytest.raises(ValueError, match='valid: edm, vp, ve'):
        preconditioning('eps', SIGMAS, SIGMAS)
    with pytest.raises(ValueError, match='valid: edm, vp, ve'):
        Denoiser(ZeroNet(), sde.EDM(), precond='x0')


def test_zero_net_gives_c_skip_x_for_edm():
    x = jax.random.normal(jax.random.key(0), (5, 2)) * 3
    den = Denoiser(ZeroNet(), sde.EDM(), precond='edm', sigma_data=0.5)
    c_skip = 0.25 / (SIGMAS ** 2 + 0.25)
    np.testing.assert_allclose(den(x, SIGMAS), c_skip[:, None] * x, rtol=1e-6)
    for precond in ('vp', 've'):
        np.testing.assert_allclose(Denoiser(ZeroNet(), sde.EDM(), precond=precond)(x, SIGMAS), x, rtol=1e-6)


@pytest.mark.parametrize('precond', ['edm', 'vp', 've'])
def test_network_sees_preconditioned_input_in_scaled_space(precond):
    # With F(x_in, c_noise) = x_in * c_noise: D = c_skip x + c_out c_in x c_noise, x = x_t / alpha.
    proc = ScaledProcess()
    t = jnp.array([0.2, 0.7, 1.5])
    x_t = jax.random.normal(jax.random.key(1), (3, 2))
    alpha, sigma_t = proc.marginal_coefs(t)
    sigma = sigma_t / alpha
    c_skip, c_out, c_in, c_noise = preconditioning(precond, sigma, t, sigma_data=0.7)
    x = x_t / alpha[:, None]
    expect = c_skip[:, None] * x + (c_out * c_in * c_noise)[:, None] * x
    got = Denoiser(ProbeNet(), proc, precond=precond, sigma_data=0.7)(x_t, t)
    np.testing.assert_allclose(got, expect, rtol=1e-5)


def test_score_is_exact_for_gaussian_data_with_alpha_not_one():
    # x0 ~ N(0, sd^2): E[x0 | x_t] has c_skip form, so F = 0 is exact and the score must equal
    # -x_t / (alpha^2 sd^2 + sigma_t^2), the score of the Gaussian marginal.
    sd = 0.8
    proc = ScaledProcess()
    t = jnp.array([0.05, 0.4, 1., 2.5])
    x_t = jax.random.normal(jax.random.key(2), (4, 3, 3, 1))
    den = Denoiser(ZeroNet(), proc, precond='edm', sigma_data=sd)
    alpha, sigma_t = proc.marginal_coefs(t)
    var = alpha ** 2 * sd ** 2 + sigma_t ** 2
    np.testing.assert_allclose(den.score(x_t, t), -x_t / var[:, None, None, None], rtol=1e-4)  # f32 cancellation at small t
    # Score relation with the denoiser: (alpha D - x_t) / sigma_t^2.
    d = den(x_t, t)
    np.testing.assert_allclose(den.score(x_t, t),
                               (alpha[:, None, None, None] * d - x_t) / sigma_t[:, None, None, None] ** 2,
                               rtol=1e-6)


def test_scalar_time_broadcasts_and_features_pass_through():
    net = MLP(2, hidden=8, depth=1, rngs=nnx.Rngs(0))
    den = Denoiser(net, sde.EDM())
    x = jnp.ones((3, 2))
    out, feats = den(x, 1.5, return_features=True)
    np.testing.assert_allclose(out, den(x, jnp.full((3,), 1.5)), rtol=1e-6)
    assert feats[0].shape == (3, 8) and den.feature_channels == {0: 8}
    _, direct = net(x / jnp.sqrt(1.5 ** 2 + 0.25), jnp.full((3,), jnp.log(1.5) / 4), return_features=True)
    np.testing.assert_allclose(feats[0], direct[0], rtol=1e-5)


def test_get_model_builds_denoiser_from_config():
    c = ml_collections.ConfigDict()
    c.data = dict(dim=2, num_classes=0, image_size=0, num_channels=0)
    c.process = dict(name='vpsde', beta_min=0.1, beta_max=20., N=1000, sigma_data=0.5)
    c.model = dict(name='mlp', precond='vp', hidden=16, depth=2, embedding_type='positional', dropout=0.)
    den = get_model(c, rngs=nnx.Rngs(0))
    assert isinstance(den, Denoiser) and isinstance(den.net, MLP) and isinstance(den.process, sde.VPSDE)
    assert den.precond == 'vp' and den.feature_channels == {0: 16}
    x_t = jnp.ones((4, 2))
    t = jnp.linspace(0.1, 1., 4)
    alpha, sigma = den.process.marginal_coefs(t)
    # At init F ~ 0, so with VP preconditioning D ~ x_t / alpha.
    np.testing.assert_allclose(den(x_t, t), x_t / alpha[:, None], atol=1e-3)
    c.model.name = 'unet'
    with pytest.raises(ValueError, match='ddpmpp, ncsnpp, adm, mlp'):
        get_model(c, rngs=nnx.Rngs(0))
