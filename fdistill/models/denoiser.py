"""The teacher interface: a network plus a forward process as a denoiser D(x_t, t) ~ E[x_0 | x_t].

With x_t = alpha_t x_0 + sigma_t eps, work in the scaled space x = x_t / alpha_t, whose noise level
is sigma = sigma_t / alpha_t (EDM, Karras et al. 2022, eq. 4 with s(t) = alpha_t), and apply EDM's
preconditioning (Table 1):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)).

The score follows by Tweedie's formula: grad log p_t(x_t) = (alpha_t D - x_t) / sigma_t^2.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

PRECONDS = ('edm', 'vp', 've')


def preconditioning(precond: str, sigma, t, *, sigma_data: float = 0.5, M: int = 1000):
    """EDM Table 1: (c_skip, c_out, c_in, c_noise) at scaled noise level `sigma` and process time `t`.

    edm: c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
         c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4   (x0-prediction).
    vp:  c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t
         (eps-prediction, DDPM++ / VP-SDE).
    ve:  c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)   (NCSN++ / VE-SDE).
    """
    if precond == 'edm':
        sd2 = sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * sigma_data / jnp.sqrt(sigma ** 2 + sd2)
        c_in = 1. / jnp.sqrt(sigma ** 2 + sd2)
        c_noise = jnp.log(sigma) / 4.
    elif precond == 'vp':
        c_skip = jnp.ones_like(sigma)
        c_out = -sigma
        c_in = 1. / jnp.sqrt(sigma ** 2 + 1.)
        c_noise = (M - 1) * t
    elif precond == 've':
        c_skip = jnp.ones_like(sigma)
        c_out = sigma
        c_in = jnp.ones_like(sigma)
        c_noise = jnp.log(0.5 * sigma)
    else:
        raise ValueError(f'Unknown precond {precond!r}; valid: {", ".join(PRECONDS)}.')
    return c_skip, c_out, c_in, c_noise


def _bcast(v, x):
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class Denoiser(nnx.Module):
    """x0_hat = D(x_t, t): `net` preconditioned for `process` (any process with `marginal_coefs`).

    Call: `denoiser(x_t, t, class_labels=None, *, key=None, return_features=False)` with t [B] (a
    scalar is broadcast) in the process' time (for EDM, t = sigma); returns x0_hat, or
    (x0_hat, features) with the net's encoder features (see the nets' `feature_channels`).
    """

    def __init__(self, net: nnx.Module, process, precond: str = 'edm', sigma_data: float = 0.5,
                 M: int = 1000):
        if precond not in PRECONDS:
            raise ValueError(f'Unknown precond {precond!r}; valid: {", ".join(PRECONDS)}.')
        self.net, self.process = net, process
        self.precond, self.sigma_data, self.M = precond, float(sigma_data), M

    @property
    def feature_channels(self) -> dict[int, int]:
        """Channels of the net's features per resolution (0 for the MLP's hidden state)."""
        return self.net.feature_channels

    def __call__(self, x_t, t, class_labels=None, *, key=None, return_features=False):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
        alpha, sigma_t = self.process.marginal_coefs(t)
        sigma = sigma_t / alpha
        c_skip, c_out, c_in, c_noise = preconditioning(self.precond, sigma, t, sigma_data=self.sigma_data,
                                                       M=self.M)
        x = x_t / _bcast(alpha, x_t)
        out = self.net(_bcast(c_in, x) * x, c_noise, class_labels, key=key, return_features=return_features)
        F, features = out if return_features else (out, None)
        x0_hat = _bcast(c_skip, x) * x + _bcast(c_out, x) * F
        return (x0_hat, features) if return_features else x0_hat

    def score(self, x_t, t, class_labels=None, *, key=None):
        """Tweedie: grad_x log p_t(x_t) = (alpha_t x0_hat - x_t) / sigma_t^2."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
        alpha, sigma_t = self.process.marginal_coefs(t)
        x0_hat = self(x_t, t, class_labels, key=key)
        return (_bcast(alpha, x_t) * x0_hat - x_t) / _bcast(sigma_t, x_t) ** 2
