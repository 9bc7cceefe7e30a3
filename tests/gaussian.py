"""Exact denoiser of Gaussian data, a stand-in for a trained teacher in tests.

Data x_0 ~ N(m, diag(s^2)) (m, s of the per-example shape; with one-hot class labels c the mean is
m + c @ class_means). Under any process x_t = alpha x_0 + sigma eps the marginal is
N(alpha m, alpha^2 s^2 + sigma^2), so the denoiser, the score and the density are closed forms:

    E[x_0 | x_t] = m + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha m),
    grad log p_t(x_t) = -(x_t - alpha m) / (alpha^2 s^2 + sigma^2).
"""
import jax
import jax.numpy as jnp

from fdistill.sde import SDE, bcast, sum_except_batch


class GaussianDenoiser:
    """Follows the Denoiser interface: `__call__(x_t, t, class_labels=None, *, key=None)` -> x0_hat
    and `score(x_t, t, class_labels=None)`; `key` (dropout) is accepted and unused."""

    def __init__(self, process: SDE, mean, std, class_means=None):
        self.process = process
        self.mean = jnp.asarray(mean, jnp.float32)
        self.std = jnp.broadcast_to(jnp.asarray(std, jnp.float32), self.mean.shape)
        self.class_means = None if class_means is None else jnp.asarray(class_means, jnp.float32)

    def data_mean(self, class_labels, batch: int):
        m = jnp.broadcast_to(self.mean, (batch,) + self.mean.shape)
        if class_labels is not None and self.class_means is not None:
            m = m + jnp.tensordot(class_labels, self.class_means, axes=1)
        return m

    def _moments(self, x_t, t, class_labels):
        alpha, sigma = self.process.marginal_coefs(t)
        a, s2 = bcast(alpha, x_t), bcast(sigma, x_t) ** 2
        m = self.data_mean(class_labels, x_t.shape[0])
        return a, m, a ** 2 * self.std ** 2 + s2

    def __call__(self, x_t, t, class_labels=None, *, key=None):
        a, m, var = self._moments(x_t, t, class_labels)
        return m + a * self.std ** 2 / var * (x_t - a * m)

    def score(self, x_t, t, class_labels=None):
        a, m, var = self._moments(x_t, t, class_labels)
        return -(x_t - a * m) / var

    def marginal_logp(self, x_t, t, class_labels=None):
        """log p_t(x_t) per example [B]."""
        a, m, var = self._moments(x_t, t, class_labels)
        return -0.5 * sum_except_batch(jnp.log(2 * jnp.pi * var) + (x_t - a * m) ** 2 / var)

    def posterior_var(self, t):
        """Var[x_0 | x_t] per dimension, [B, *shape]: s^2 sigma^2 / (alpha^2 s^2 + sigma^2)."""
        alpha, sigma = self.process.marginal_coefs(t)
        x = jnp.zeros((t.shape[0],) + self.mean.shape)
        a, s2 = bcast(alpha, x), bcast(sigma, x) ** 2
        return self.std ** 2 * s2 / (a ** 2 * self.std ** 2 + s2)

    def sample(self, key, n: int, class_labels=None):
        z = jax.random.normal(key, (n,) + self.mean.shape)
        return self.data_mean(class_labels, n) + self.std * z
