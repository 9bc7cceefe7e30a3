"""Sample-quality metrics on network features: Inception Score, improved precision/recall, KID.

All are numpy functions of feature arrays (float64 inside), independent of the network that made
the features.

* Inception Score (Salimans et al. 2016): IS = exp(E_x KL(p(y|x) || p(y))), averaged over 10
  splits. The 2015-12-05 network has 1008 outputs; every reference implementation takes the
  softmax over all 1008 logits computed *without* the output bias (openai/improved-gan multiplies
  the pool features by ``softmax/logits/MatMul``'s weight; StyleGAN3 / EDM's metric suite passes
  ``no_output_bias=True``; torch-fidelity uses ``logits_unbiased``). None keeps only the first
  1000 classes. ``inception.load`` returns those unbiased logits by default.
* Improved precision and recall (Kynkaanniemi et al. 2019): the manifold of a feature set is the
  union of balls around each feature with radius its distance to the k-th nearest neighbour
  (k = 3); precision = fraction of generated features inside the real manifold, recall = fraction
  of real features inside the generated manifold. Computed on Inception pool features, as ADM's
  evaluator suite does (the paper used VGG-16).
* KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3,
  averaged over random subsets.
"""
from __future__ import annotations

import numpy as np

IS_SPLITS = 10
PR_K = 3


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score(logits, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std over splits) of exp(mean_x KL(p(y|x) || p_split(y))) (Salimans et al. 2016, eq. in
    sec. 4). ``logits``: [N, C], N >= splits; consecutive chunks form the splits."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"inception_score needs logits [N, C] with N >= splits={splits}, got "
                         f"shape {logits.shape}")
    scores = []
    for part in np.array_split(logits, splits):
        log_p = _log_softmax(part)
        p = np.exp(log_p)
        log_py = np.log(p.mean(axis=0))
        kl = (p * (log_p - log_py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _check_features(name: str, x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be a finite [N, D] feature array, got shape {x.shape}")
    return x


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances [len(a), len(b)], clipped at 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def knn_radii(features, k: int = PR_K, block: int = 1024) -> np.ndarray:
    """Distance from each feature to its k-th nearest neighbour in the same set (self excluded)."""
    x = _check_features("features", features)
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} features, got {len(x)}")
    radii = np.empty(len(x))
    for s in range(0, len(x), block):
        d = _sq_dists(x[s:s + block], x)
        radii[s:s + block] = np.sqrt(np.partition(d, k, axis=1)[:, k])
    return radii


def manifold_coverage(manifold, radii, queries, block: int = 1024) -> float:
    """Fraction of ``queries`` inside the union of balls B(manifold_j, radii_j)."""
    m = _check_features("manifold", manifold)
    q = _check_features("queries", queries)
    r2 = np.asarray(radii, np.float64) ** 2
    inside = np.zeros(len(q), bool)
    for s in range(0, len(q), block):
        inside[s:s + block] = (_sq_dists(q[s:s + block], m) <= r2[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real, fake, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eqs. 1-2) with k-NN radii."""
    real = _check_features("real features", real)
    fake = _check_features("generated features", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape}, generated {fake.shape}")
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return precision, recall


def kernel_inception_distance(real, fake, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: (mean, std over subsets) of the unbiased MMD^2 (Binkowski et al. 2018, eq. 3) with the
    cubic polynomial kernel k(x, y) = (x.y / d + 1)^3; each subset draws ``subset_size`` rows
    without replacement from each set (capped at the smaller set's size)."""
    real = _check_features("real features", real)
    fake = _check_features("generated features", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape}, generated {fake.shape}")
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(real)}, {len(fake)}")
    d = real.shape[1]
    rng = np.random.Generator(np.random.PCG64(seed))
    values = []
    for _ in range(subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        off = m * (m - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
                      - 2.0 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))
