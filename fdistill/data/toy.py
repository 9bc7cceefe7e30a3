"""2-D toy distributions whose density is known exactly: isotropic Gaussian mixtures.

Every toy is a mixture ``p(x) = sum_k w_k N(x; mu_k, std^2 I)`` in 2-D:

- ``ring8``: 8 equal modes on a circle of radius ``radius``;
- ``grid25``: a 5 x 5 grid of equal modes spanning ``[-radius, radius]^2``;
- ``unbalanced``: ``len(weights)`` modes on a circle of radius ``radius`` with unequal weights
  (``config.data.weights``; default halving weights 1/2, 1/4, ... renormalised);
- ``moons``: scikit-learn's two moons (arcs of radius ``radius``, centred at the origin)
  defined as a fine Gaussian-smoothed mixture along the arcs: ``M`` equally spaced arc points per
  moon (midpoints of ``M`` equal angular cells), equal weights, the Gaussian noise ``std`` on each.
  ``M`` is chosen so that neighbouring arc points are at most ``std / 2`` apart, which makes the
  mixture indistinguishable from a uniform density along the arc convolved with ``N(0, std^2 I)``;
  sampling draws exactly from that mixture, so ``log_prob`` is the exact density of the samples.

Because each toy is a Gaussian mixture, its noised marginals ``x_t = alpha x_0 + sigma eps`` are
Gaussian mixtures too (means ``alpha mu_k``, variance ``alpha^2 std^2 + sigma^2``); the class gives
their exact log-density and the exact denoiser ``E[x_0 | x_t]``, an exact teacher for tests.

``ToyDataset`` turns a mixture into the project's random-access dataset: example ``i`` of step
``s`` is drawn with ``fold_in(fold_in(key(seed), s), i)``, so any process can draw exactly its own
slice of the global batch, deterministically in ``(seed, step)``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


class GaussianMixture2D:
    """``p(x) = sum_k w_k N(x; mu_k, std^2 I)`` in 2-D, with exact density and denoiser."""

    def __init__(self, means, weights, std: float, name: str = "mixture"):
        means = np.asarray(means, np.float32)
        weights = np.asarray(weights, np.float64)
        if means.ndim != 2 or means.shape[1] != 2:
            raise ValueError(f"means must have shape [K, 2], got {means.shape}")
        if weights.shape != (means.shape[0],):
            raise ValueError(f"need one weight per mode: {weights.shape[0] if weights.ndim else 0} "
                             f"weights for {means.shape[0]} means")
        if np.any(weights < 0) or not weights.sum() > 0:
            raise ValueError(f"mixture weights must be non-negative with a positive sum, "
                             f"got {weights}")
        if not std > 0:
            raise ValueError(f"the mode std must be positive, got {std}")
        self.name = name
        self.means = means
        self.weights = (weights / weights.sum()).astype(np.float32)
        self.std = float(std)
        self._params = (jnp.asarray(self.means), jnp.log(jnp.asarray(self.weights)),
                        jnp.float32(self.std))

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    def sample_with_modes(self, keys):
        """One draw per key (``keys``: [n] typed keys) -> (x [n, 2] float32, mode [n] int32)."""
        return _draw(keys, *self._params)

    def sample(self, key, n: int):
        """``n`` independent samples ``[n, 2]`` float32."""
        return _draw(jax.random.split(key, n), *self._params)[0]

    def component_log_probs(self, x_t, alpha=1.0, sigma=0.0):
        """``log w_k + log N(x_t; alpha mu_k, (alpha^2 std^2 + sigma^2) I)``: ``[..., K]``.

        ``alpha`` and ``sigma`` broadcast against ``x_t[..., 0]`` (scalars or ``[B]``).
        """
        return _component_log_probs(x_t, alpha, sigma, *self._params)

    def marginal_log_prob(self, x_t, alpha=1.0, sigma=0.0):
        """Exact ``log p_t(x_t)`` of ``x_t = alpha x_0 + sigma eps``, ``x_0 ~ p``: ``[...]``."""
        return _marginal_log_prob(x_t, alpha, sigma, *self._params)

    def log_prob(self, x):
        """Exact ``log p(x)`` for ``x`` of shape ``[..., 2]``."""
        return _marginal_log_prob(x, 1.0, 0.0, *self._params)

    def denoise(self, x_t, alpha, sigma):
        """Exact ``E[x_0 | x_t]`` (the ideal denoiser) for ``x_t = alpha x_0 + sigma eps``.

        Per mode, ``E[x_0 | x_t, k] = mu_k + alpha std^2 / (alpha^2 std^2 + sigma^2)
        (x_t - alpha mu_k)``; the modes are weighted by their posterior responsibilities.
        By Tweedie, ``grad log p_t(x_t) = (alpha E[x_0 | x_t] - x_t) / sigma^2``.
        """
        return _denoise(x_t, alpha, sigma, *self._params)


@jax.jit
def _draw(keys, means, log_weights, std):
    """Per key: mode ``k ~ Categorical(w)``, ``x = mu_k + std * eps``."""
    def one(key):
        k_mode, k_noise = jax.random.split(key)
        k = jax.random.categorical(k_mode, log_weights)
        return means[k] + std * jax.random.normal(k_noise, (2,), jnp.float32), k.astype(jnp.int32)
    return jax.vmap(one)(keys)


def _component_log_probs(x_t, alpha, sigma, means, log_weights, std):
    x_t = jnp.asarray(x_t, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)[..., None]
    var = alpha ** 2 * std ** 2 + jnp.asarray(sigma, jnp.float32)[..., None] ** 2
    d2 = jnp.sum((x_t[..., None, :] - alpha[..., None] * means) ** 2, axis=-1)
    return log_weights - 0.5 * d2 / var - jnp.log(2 * jnp.pi * var)


@jax.jit
def _marginal_log_prob(x_t, alpha, sigma, means, log_weights, std):
    return jax.nn.logsumexp(_component_log_probs(x_t, alpha, sigma, means, log_weights, std), -1)


@jax.jit
def _denoise(x_t, alpha, sigma, means, log_weights, std):
    x_t = jnp.asarray(x_t, jnp.float32)
    resp = jax.nn.softmax(_component_log_probs(x_t, alpha, sigma, means, log_weights, std), -1)
    alpha = jnp.asarray(alpha, jnp.float32)[..., None, None]
    sigma = jnp.asarray(sigma, jnp.float32)[..., None, None]
    post = means + alpha * std ** 2 / (alpha ** 2 * std ** 2 + sigma ** 2) * (
        x_t[..., None, :] - alpha * means)
    return jnp.sum(resp[..., None] * post, axis=-2)


def ring8(*, std: float, radius: float, weights=None) -> GaussianMixture2D:
    """8 modes at angles ``2 pi k / 8`` on a circle of radius ``radius``."""
    return GaussianMixture2D(_circle(8, radius), _weights_or_uniform(weights, 8), std, "ring8")


def grid25(*, std: float, radius: float, weights=None) -> GaussianMixture2D:
    """25 modes on the grid ``linspace(-radius, radius, 5)^2``."""
    ticks = np.linspace(-radius, radius, 5)
    means = np.stack(np.meshgrid(ticks, ticks, indexing="ij"), axis=-1).reshape(-1, 2)
    return GaussianMixture2D(means, _weights_or_uniform(weights, 25), std, "grid25")


def unbalanced(*, std: float, radius: float, weights=None) -> GaussianMixture2D:
    """``len(weights)`` modes on a circle with unequal weights (default ``2^-k``, k = 1..6)."""
    if weights is None or len(weights) == 0:
        weights = 0.5 ** np.arange(1, 7)
    return GaussianMixture2D(_circle(len(weights), radius), weights, std, "unbalanced")


def moons(*, std: float, radius: float, weights=None) -> GaussianMixture2D:
    """Two moons: arcs ``r (cos t, sin t)`` and ``r (1 - cos t, 1/2 - sin t)``, ``t in [0, pi]``,
    centred, each a Gaussian-smoothed mixture of ``M`` arc points (spacing <= std / 2)."""
    if weights is not None and len(weights) > 0:
        raise ValueError("toy 'moons' has equal weights along its arcs; leave data.weights empty")
    m = max(16, math.ceil(2 * math.pi * radius / std))
    t = (np.arange(m) + 0.5) * np.pi / m
    upper = np.stack([np.cos(t), np.sin(t)], axis=-1)
    lower = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], axis=-1)
    means = radius * (np.concatenate([upper, lower]) - np.array([0.5, 0.25]))
    return GaussianMixture2D(means, np.ones(2 * m), std, "moons")


TOYS = {"ring8": ring8, "grid25": grid25, "unbalanced": unbalanced, "moons": moons}


def get_toy(config_data) -> GaussianMixture2D:
    """The toy named ``config_data.toy`` with ``std``, ``radius`` and optional ``weights``."""
    name = config_data.get("toy", "ring8")
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; valid: {', '.join(TOYS)}")
    weights = config_data.get("weights", None)
    weights = None if weights is None or len(weights) == 0 else tuple(weights)
    return TOYS[name](std=float(config_data.get("std", 0.05)),
                      radius=float(config_data.get("radius", 2.0)), weights=weights)


class ToyDataset:
    """Infinite random-access stream of toy points; ``batch(step)`` is this process's slice.

    ``batch(step) = {'x': float32 [B_local, 2], 'label': int32 [B_local]}`` (numpy) where
    ``label`` is the mode each point was drawn from. Example ``i`` of the global batch of step
    ``s`` uses the key ``fold_in(fold_in(key(seed), s), i)``, so batches are deterministic in
    ``(seed, step)`` and the processes' slices concatenate to the single-process batch.
    The true density is exposed as ``log_prob``, ``means``, ``weights``, ``std``, ``sample``.
    """

    shape = (2,)

    def __init__(self, distribution: GaussianMixture2D, *, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1, seed: int = 0,
                 num_classes: int = 0):
        if num_classes not in (0, distribution.num_modes):
            raise ValueError(f"a toy can be conditioned on its mode index only: num_classes must "
                             f"be 0 or {distribution.num_modes}, got {num_classes}")
        self.distribution = distribution
        self.name = "toy"
        self.toy = distribution.name
        self.num_classes = num_classes
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.seed = seed
        offset = process_index * self.local_batch_size
        self._local = np.arange(offset, offset + self.local_batch_size, dtype=np.uint32)

    def batch(self, step: int) -> dict:
        keys = _example_keys(np.uint32(self.seed), np.uint32(step), self._local)
        x, k = self.distribution.sample_with_modes(keys)
        return {"x": np.asarray(x), "label": np.asarray(k)}

    @property
    def means(self):
        return self.distribution.means

    @property
    def weights(self):
        return self.distribution.weights

    @property
    def std(self) -> float:
        return self.distribution.std

    def log_prob(self, x):
        return self.distribution.log_prob(x)

    def sample(self, key, n: int):
        return self.distribution.sample(key, n)


@jax.jit
def _example_keys(seed, step, indices):
    """``fold_in(fold_in(key(seed), step), i)`` for each global example index ``i``."""
    step_key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(indices)


def _circle(k: int, radius: float) -> np.ndarray:
    angles = 2 * np.pi * np.arange(k) / k
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def _weights_or_uniform(weights, k: int) -> np.ndarray:
    return np.ones(k) if weights is None or len(weights) == 0 else np.asarray(weights, np.float64)
