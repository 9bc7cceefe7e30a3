"""Metrics on 2-D toys: the true density ``p`` is known, the model ``q`` is given by samples.

``dataset`` is anything with the toy interface of ``fdistill.data.toy`` (``means`` [K, 2],
``weights`` [K], ``std``, ``log_prob(x)``, ``sample(key, n)``): a ``ToyDataset`` or a
``GaussianMixture2D``. With ``r = k_std * std`` (default ``k_std = 3``):

- ``recall``: fraction of modes ``k`` that hold at least ``min_fraction`` of their expected
  count ``n w_k (1 - exp(-k_std^2 / 2))`` of samples within ``r`` of ``mu_k``.
- ``precision``: fraction of samples within ``r`` of some mode. Samples of ``p`` itself score
  ``1 - exp(-k_std^2 / 2)`` (0.989 at ``k_std = 3``) in expectation.
- ``mode_tv``: total variation ``1/2 sum_k |mean_i r_k(x_i) - w_k|`` between the mass the samples
  put on each mode, with soft assignments ``r_k(x) = w_k N(x; mu_k, std^2 I) / p(x)`` (the true
  posterior responsibilities), and the true weights. ``E_p[r_k] = w_k`` exactly, so samples of
  ``p`` score 0 up to sampling noise even where modes overlap (``moons``).
- ``kl_qp = E_q[log q - log p]`` and ``kl_pq = E_p[log p - log q]`` by a k-nearest-neighbour
  estimator that uses the known ``p`` exactly. Around a point ``z`` take the ball ``B`` reaching
  to the k-th nearest sample of ``q`` (not counting ``z`` itself when it is one of them). Whatever
  ``q`` is, its mass ``Q(B)`` is Beta(k, n + 1 - k)-distributed (Beta(k, n - k) around a sample),
  so ``E[log Q(B)] = psi(k) - psi(n + 1)`` (resp. ``psi(k) - psi(n)``); ``P(B)`` is computed
  exactly (for a Gaussian mixture, a sum of non-central chi-square(2) CDFs). Then
  ``kl_qp = mean_{z ~ q} [psi(k) - psi(n) - log P(B_z)]`` and
  ``kl_pq = mean_{z ~ p} [log P(B_z) - psi(k) + psi(n + 1)]``, with ``len(samples)`` fresh samples
  of ``p`` drawn with ``key``. This is the KL between ``p`` and ``q`` seen at the resolution of
  the k-NN balls: it is exactly unbiased when ``q = p``, and converges to the KL as the balls
  shrink (``n -> inf``). Where ``p`` has mass on which ``q`` has few samples (e.g. ``q``
  narrower than ``p``), the balls are large and ``kl_pq`` is underestimated. A kernel density
  estimate with one global bandwidth would smear narrow modes instead (a rule of thumb gives ~0.3
  on a ring of radius 2, six times a mode's std). Where ``P(B)`` underflows (a sample far from
  every mode) it is replaced by its small-ball value ``p(z) pi rho^2``, computed in log space.
  (The k-NN divergence estimators of Wang, Kulkarni & Verdu 2009 estimate ``P(B)`` from samples
  of ``p`` too; knowing ``p`` we compute it.)
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import chndtr, digamma, logsumexp

_CHUNK = 4096


def _points(samples) -> np.ndarray:
    x = np.asarray(samples, np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"toy samples must have shape [n, 2], got {x.shape}")
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x).all(axis=1)))
        raise ValueError(f"{bad} of {len(x)} samples are not finite")
    return x


def _log_p(dataset, x: np.ndarray) -> np.ndarray:
    """``dataset.log_prob`` in chunks of one fixed shape (one compilation)."""
    padded = np.zeros((-(-len(x) // _CHUNK) * _CHUNK, 2), np.float32)
    padded[:len(x)] = x
    return np.concatenate([np.asarray(dataset.log_prob(padded[i:i + _CHUNK]), np.float64)
                           for i in range(0, len(padded), _CHUNK)])[:len(x)]


def mode_recall(dataset, samples, *, k_std: float = 3.0, min_fraction: float = 0.1) -> float:
    """Fraction of modes with >= ``min_fraction`` of their expected count within ``k_std`` std."""
    x = _points(samples)
    counts = cKDTree(x).query_ball_point(np.asarray(dataset.means, np.float64),
                                         r=k_std * dataset.std, return_length=True)
    expected = len(x) * np.asarray(dataset.weights, np.float64) * (1 - np.exp(-k_std ** 2 / 2))
    return float(np.mean(counts >= min_fraction * expected))


def precision(dataset, samples, *, k_std: float = 3.0) -> float:
    """Fraction of samples within ``k_std * std`` of their nearest mode."""
    x = _points(samples)
    dist, _ = cKDTree(np.asarray(dataset.means, np.float64)).query(x)
    return float(np.mean(dist <= k_std * dataset.std))


def mode_mass(dataset, samples) -> np.ndarray:
    """Mass the samples put on each mode, ``mean_i r_k(x_i)`` with true responsibilities: [K]."""
    x = _points(samples)
    means = np.asarray(dataset.means, np.float64)
    log_w = np.log(np.asarray(dataset.weights, np.float64))
    mass = np.zeros(len(means))
    for i in range(0, len(x), _CHUNK):
        d2 = np.sum((x[i:i + _CHUNK, None, :] - means) ** 2, axis=-1)
        logits = log_w - d2 / (2 * dataset.std ** 2)
        mass += np.exp(logits - logsumexp(logits, axis=-1, keepdims=True)).sum(axis=0)
    return mass / len(x)


def mode_tv(dataset, samples) -> float:
    """Total variation between ``mode_mass`` and the true weights."""
    return float(0.5 * np.abs(mode_mass(dataset, samples) - np.asarray(dataset.weights)).sum())


def log_ball_mass(dataset, centres, radii) -> np.ndarray:
    """``log P(|X - z| <= rho)`` for ``X ~ p``, at ``z = centres[i]``, ``rho = radii[i]``: [n].

    Exact for the Gaussian mixture: ``sum_k w_k F(rho^2 / std^2; df=2, nc=|mu_k - z|^2 / std^2)``
    (non-central chi-square CDF), over the modes within ``rho + 9 std`` of ``z`` (the others
    add less than ``exp(-40)`` each).
    """
    z, rho = _points(centres), np.asarray(radii, np.float64)
    means = np.asarray(dataset.means, np.float64)
    w, s = np.asarray(dataset.weights, np.float64), dataset.std
    near = cKDTree(means).query_ball_point(z, rho + 9 * s)
    rows = np.repeat(np.arange(len(z)), [len(n) for n in near])
    cols = np.concatenate([np.asarray(n, np.int64) for n in near])
    nc = np.sum((z[rows] - means[cols]) ** 2, axis=-1) / s ** 2
    mass = np.bincount(rows, w[cols] * chndtr(rho[rows] ** 2 / s ** 2, 2, nc), minlength=len(z))
    small_ball = _log_p(dataset, z) + np.log(np.pi * rho ** 2)
    with np.errstate(divide="ignore"):
        return np.where(mass > 1e-300, np.log(mass), small_ball)


def _knn_radius(samples: np.ndarray, centres: np.ndarray, k: int, floor: float) -> np.ndarray:
    if len(samples) <= k:
        raise ValueError(f"need more than k={k} samples, got {len(samples)}")
    rho, _ = cKDTree(samples).query(centres, k=[k])
    return np.maximum(rho[:, 0], floor)


def kl_qp(dataset, samples, *, k: int = 3) -> float:
    """``KL(q || p) = E_q[log q - log p]`` from the samples of ``q`` (k-NN ball estimator)."""
    x = _points(samples)
    rho = _knn_radius(x, x, k + 1, 1e-6 * dataset.std)  # the nearest is the sample itself
    return float(np.mean(digamma(k) - digamma(len(x)) - log_ball_mass(dataset, x, rho)))


def kl_pq(dataset, samples, key, *, k: int = 3) -> float:
    """``KL(p || q) = E_p[log p - log q]`` over ``len(samples)`` fresh samples of ``p``."""
    x = _points(samples)
    y = _points(dataset.sample(key, len(x)))
    rho = _knn_radius(x, y, k, 1e-6 * dataset.std)
    return float(np.mean(log_ball_mass(dataset, y, rho) - digamma(k) + digamma(len(x) + 1)))


def toy_metrics(dataset, samples, key, *, k_std: float = 3.0, min_fraction: float = 0.1,
                k: int = 3) -> dict:
    """``{'recall', 'precision', 'mode_tv', 'kl_pq', 'kl_qp'}`` (floats) for samples of ``q``."""
    return {"recall": mode_recall(dataset, samples, k_std=k_std, min_fraction=min_fraction),
            "precision": precision(dataset, samples, k_std=k_std),
            "mode_tv": mode_tv(dataset, samples),
            "kl_pq": kl_pq(dataset, samples, key, k=k),
            "kl_qp": kl_qp(dataset, samples, k=k)}
