"""FID (Heusel et al. 2017) with an honest protocol: 50,000 samples, recorded reference and weights.

    FID = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2})

the Frechet distance between Gaussians fitted to Inception pool features (Heusel et al. 2017,
eq. 6). ``frechet_distance`` follows pytorch-fid's ``calculate_frechet_distance`` (matrix square
root by ``scipy.linalg.sqrtm``, ``eps * I`` added to both covariances when the product's root is
not finite, imaginary parts tolerated only when the diagonal's are below 1e-3).

Reference statistics are ``.npz`` files with keys ``mu`` [2048] and ``sigma`` [2048, 2048], the
format of EDM's reference files (https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz,
.../imagenet-64x64.npz), which load as they are. Files this project writes add ``features`` (a
subset of real pool features for precision/recall and KID), ``num_samples``, ``dataset`` and
``inception_weights_sha256``.

A reported FID (metric ``fid``) needs 50,000 generated samples, as in EDM and the f-distill
paper. Fewer samples are for monitoring only and must be asked for (``monitoring=True``); the
metric is then named by its count (``fid_10k``), because FID is biased upwards at small N.

Multi-host: with P JAX processes, ``evaluate_samples`` deals the sample batches out (process p
draws and featurises batches p, p + P, ...) and merges the Inception statistics (count, sum and
sum of outer products, in float64), the logits and the kept features across processes, so every
process returns what one process featurising all batches would, in 1/P of the time.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Callable

import jax
import numpy as np
import scipy.linalg
from jax.experimental import multihost_utils

from fdistill.evaluation import inception as inception_lib
from fdistill.evaluation import metrics

REPORTED_NUM_SAMPLES = 50_000
EDM_REFERENCE_URLS = {
    "cifar10": "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz",
    "imagenet64": "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz",
}
HOW_TO_MAKE_STATS = (
    "Make it with `python -m fdistill.main --config=<dataset config> --workdir=<dir> "
    "--mode=fid_stats`, or use EDM's reference statistics ("
    + ", ".join(f"{k}: {v}" for k, v in EDM_REFERENCE_URLS.items()) + ").")


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6)."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # handled just below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        warnings.warn(f"sigma1 @ sigma2 has no finite square root (singular product); adding "
                      f"{eps} to the covariances' diagonals, as pytorch-fid does")
        offset = eps * np.eye(d)
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(f"the square root of sigma1 @ sigma2 has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}: the covariances are not valid "
                             "(not symmetric positive semi-definite) or far too few samples.")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FeatureStats:
    """Streaming mean and covariance of feature batches (Chan et al.'s pairwise update, float64).

    ``sigma`` is the unbiased sample covariance (divides by N - 1), as ``np.cov`` in pytorch-fid
    and EDM's running sums.
    """

    def __init__(self, dim: int):
        self.dim, self.n = dim, 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros((dim, dim))

    def update(self, features) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or inf")
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(axis=0)
        centred = x - mb
        delta = mb - self.mean
        n = self.n + nb
        self.m2 += centred.T @ centred + np.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 features, got {self.n}")
        return self.mean.copy(), self.m2 / (self.n - 1)

    def sums(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(N, sum of x, sum of x x^T): additive over disjoint sets of features."""
        s1 = self.n * self.mean
        return self.n, s1, self.m2 + np.outer(s1, self.mean)

    @classmethod
    def from_sums(cls, n: int, s1, s2) -> "FeatureStats":
        """The statistics of features whose count, sum and sum of outer products are given."""
        stats = cls(len(s1))
        if n:
            stats.n, stats.mean = int(n), np.asarray(s1, np.float64) / n
            stats.m2 = np.asarray(s2, np.float64) - np.outer(s1, stats.mean)
        return stats


def metric_suffix(num_samples: int, *, monitoring: bool) -> str:
    """'' for a reported metric (needs 50,000 samples), '_10k'-style for monitoring runs."""
    if monitoring:
        k, r = divmod(num_samples, 1000)
        return f"_{k}k" if r == 0 else f"_{num_samples}"
    if num_samples < REPORTED_NUM_SAMPLES:
        raise ValueError(
            f"a reported FID needs {REPORTED_NUM_SAMPLES:,} generated samples (the protocol of EDM "
            f"and the f-distill paper), got num_samples={num_samples:,}. Use "
            f"{REPORTED_NUM_SAMPLES:,}, or ask for a monitoring metric (monitoring=True), which is "
            f"labelled by its count, e.g. 'fid{metric_suffix(num_samples, monitoring=True)}'.")
    return ""


def save_stats(path: str, mu, sigma, **extra) -> None:
    """Writes EDM-compatible statistics (``mu``, ``sigma``) plus optional extra arrays."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             **{k: np.asarray(v) for k, v in extra.items()})


def load_stats(path: str) -> dict:
    """Reads a reference statistics ``.npz`` (EDM's or this project's) into a dict of arrays."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference statistics not found at {path!r}. "
                                + HOW_TO_MAKE_STATS)
    with np.load(path) as f:
        stats = {k: f[k] for k in f.files}
    missing = [k for k in ("mu", "sigma") if k not in stats]
    if missing:
        raise ValueError(f"{path} has no {missing} (keys: {sorted(stats)}); FID reference files "
                         f"hold 'mu' and 'sigma'. " + HOW_TO_MAKE_STATS)
    d = stats["mu"].shape[0]
    if stats["mu"].shape != (d,) or stats["sigma"].shape != (d, d):
        raise ValueError(f"{path}: mu {stats['mu'].shape} and sigma {stats['sigma'].shape} are not "
                         "[D] and [D, D]")
    return stats


def _stream(batches, inception_fn, num_samples: int, *, keep_features: int, progress: bool,
            what: str):
    """Runs uint8 image batches through a feature network (the Inception callable or any with its
    interface): (FeatureStats, logits, kept features)."""
    stats = None
    logits, kept = [], []
    n_kept = done = 0
    t0 = last = time.time()
    for images in batches:
        images = images[:num_samples - done]
        pool, lg = inception_fn(images)
        if stats is None:
            stats = FeatureStats(np.shape(pool)[1])
        stats.update(pool)
        logits.append(np.asarray(lg, np.float32))
        if n_kept < keep_features:
            kept.append(np.asarray(pool[:keep_features - n_kept], np.float32))
            n_kept += len(kept[-1])
        done += len(images)
        if progress and (time.time() - last > 10 or done >= num_samples):
            last = time.time()
            print(f"{what}: {done}/{num_samples} images  {done / (last - t0):.1f} img/s",
                  flush=True)
        if done >= num_samples:
            break
    if done < num_samples:
        raise ValueError(f"{what}: the source ran out after {done} of {num_samples} images")
    return (stats, np.concatenate(logits),
            np.concatenate(kept) if kept else np.zeros((0, stats.dim), np.float32))


def _dataset_batches(dataset, num_samples: int, batch_size: int):
    for start in range(0, num_samples, batch_size):
        idx = np.arange(start, min(start + batch_size, num_samples))
        yield inception_lib.to_uint8(dataset.examples(idx)["x"])


def _check_dataset_size(dataset, num_samples: int | None) -> int:
    available = int(dataset.num_examples)
    n = available if num_samples is None else int(num_samples)
    if n > available or n < 2:
        raise ValueError(f"reference statistics over {n} images requested, but dataset "
                         f"{getattr(dataset, 'name', '')!r} has {available}; use 2..{available}")
    return n


def compute_reference_stats(dataset, inception_fn, num_samples: int | None = None,
                            batch_size: int = 250, *, progress: bool = True
                            ) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of Inception pool features over the first ``num_samples`` dataset images (all
    when None). ``dataset``: ``num_examples`` and ``examples(indices) -> {'x': [-1, 1] NHWC}``."""
    n = _check_dataset_size(dataset, num_samples)
    stats, _, _ = _stream(_dataset_batches(dataset, n, batch_size), inception_fn, n,
                          keep_features=0, progress=progress, what="reference statistics")
    return stats.mu_sigma()


def write_reference_stats(path: str, dataset, inception_fn, num_samples: int | None = None,
                          batch_size: int = 250, *, keep_features: int = 10_000,
                          progress: bool = True) -> dict:
    """``--mode=fid_stats``: writes mu, sigma and the first ``keep_features`` pool features (for
    precision/recall and KID) with the protocol; returns the protocol."""
    n = _check_dataset_size(dataset, num_samples)
    stats, _, kept = _stream(_dataset_batches(dataset, n, batch_size), inception_fn, n,
                             keep_features=keep_features, progress=progress,
                             what="reference statistics")
    mu, sigma = stats.mu_sigma()
    protocol = {"num_samples": n, "dataset": str(getattr(dataset, "name", "")),
                "inception_weights_sha256": str(getattr(inception_fn, "weights_sha256", ""))}
    save_stats(path, mu, sigma, features=kept, **protocol)
    return protocol


def _allgather(x: np.ndarray) -> np.ndarray:
    """[P, ...]: ``x`` (same shape and dtype on every process) from each process, bit-exact (sent
    as int32 words, so float64 survives JAX's default 32-bit mode)."""
    x = np.ascontiguousarray(x)
    words = x.reshape(-1).view(np.uint8)
    words = np.pad(words, (0, -len(words) % 4)).view(np.int32)
    out = np.asarray(multihost_utils.process_allgather(words))
    return out.view(np.uint8)[:, :x.nbytes].copy().view(x.dtype).reshape((-1,) + x.shape)


def _allgather_rows(x: np.ndarray) -> list[np.ndarray]:
    """Each process's ``x`` [n_p, ...] (row counts may differ between processes)."""
    counts = _allgather(np.asarray([len(x)], np.int64))[:, 0]
    if counts.max() == 0:
        return [x for _ in counts]
    padded = np.zeros((int(counts.max()),) + x.shape[1:], x.dtype)
    padded[:len(x)] = x
    return [rows[:c] for rows, c in zip(_allgather(padded), counts)]


def _stream_dealt(sample_fn, inception_fn, num_samples: int, *, keep_features: int,
                  rank: int, world: int, progress: bool):
    """The multi-process ``_stream``: process ``rank`` of ``world`` draws and featurises batches
    rank, rank + world, ...; the statistics are summed and the logits and kept features (the first
    ``keep_features`` samples) gathered in sample order across processes. All batches but the
    last must have the same size (the first one's). Returns (FeatureStats, logits, kept features,
    images featurised by this process)."""
    first = _as_uint8(sample_fn(rank))
    size = len(first)
    sizes = _allgather(np.asarray([size], np.int64))[:, 0]
    if size == 0 or np.any(sizes != size):
        raise ValueError(f"every process must draw batches of one size to share the work; got "
                         f"first batches of sizes {sizes.tolist()}")
    num_batches = -(-num_samples // size)
    stats, logits, kept, index, done = None, [], [], [], 0
    t0 = last = time.time()
    for i in range(rank, num_batches, world):
        images = (first if i == rank else _as_uint8(sample_fn(i)))[:num_samples - i * size]
        pool, lg = inception_fn(images)
        if stats is None:
            stats = FeatureStats(np.shape(pool)[1])
        stats.update(pool)
        logits.append(np.asarray(lg, np.float32))
        kept.append(np.asarray(pool[:max(0, keep_features - i * size)], np.float32))
        index.append(i * size + np.arange(len(images)))
        done += len(images)
        if progress and time.time() - last > 10:
            last = time.time()
            print(f"generated samples: {done * world} (about) of {num_samples} images  "
                  f"{done * world / (last - t0):.1f} img/s", flush=True)
    widths = _allgather(np.asarray([stats.dim if stats else 0, logits[0].shape[1] if logits else 0],
                                   np.int64)).max(axis=0)
    dim, classes = int(widths[0]), int(widths[1])
    stats = stats or FeatureStats(dim)
    n, s1, s2 = stats.sums()
    merged = FeatureStats.from_sums(int(_allgather(np.asarray([n], np.int64)).sum()),
                                    _allgather(s1).sum(axis=0), _allgather(s2).sum(axis=0))
    empty = lambda *shape: np.zeros((0,) + shape, np.float32)
    local_index = np.concatenate(index) if index else np.zeros(0, np.int64)
    kept_index = (np.concatenate([ix[:len(k)] for ix, k in zip(index, kept)]) if kept
                  else np.zeros(0, np.int64))
    order = np.argsort(np.concatenate(_allgather_rows(local_index)), kind="stable")
    all_logits = np.concatenate(_allgather_rows(
        np.concatenate(logits) if logits else empty(classes)))[order]
    kept_order = np.argsort(np.concatenate(_allgather_rows(kept_index)), kind="stable")
    all_kept = np.concatenate(_allgather_rows(
        np.concatenate(kept) if kept else empty(dim)))[kept_order]
    if progress:
        print(f"generated samples: {merged.n}/{num_samples} images in {time.time() - t0:.0f} s "
              f"over {world} processes", flush=True)
    return merged, all_logits, all_kept, done


def _as_uint8(images) -> np.ndarray:
    images = np.asarray(images)
    return images if images.dtype == np.uint8 else inception_lib.to_uint8(images)


def evaluate_samples(sample_fn: Callable[[int], np.ndarray], inception_fn, ref_stats,
                     num_samples: int = REPORTED_NUM_SAMPLES, *, monitoring: bool = False,
                     is_splits: int = metrics.IS_SPLITS, pr_k: int = metrics.PR_K,
                     pr_num_samples: int = 10_000, kid: bool = False, kid_subsets: int = 100,
                     kid_subset_size: int = 1000, progress: bool = True,
                     process_index: int | None = None, process_count: int | None = None) -> dict:
    """``--mode=eval``: FID, IS and (when the reference file has features) precision/recall and
    KID of ``num_samples`` generated images, with the protocol.

    ``sample_fn(i)`` returns the i-th batch of generated NHWC images, float in [-1, 1] or uint8
    (float images become uint8 by EDM's rule, as saved PNGs would). ``ref_stats``: a path (EDM's
    or ours) or a dict with 'mu', 'sigma' [, 'features']. Metric names carry the count suffix for
    monitoring runs (``fid_10k``, ``is_10k``, ...); nothing is sampled before the count is checked.

    With several JAX processes (``process_count``, default ``jax.process_count()``), every process
    must call this together: process ``process_index`` calls ``sample_fn`` only for its share of
    the batch indices (all batches but the last of one size), and all return the same metrics.
    """
    suffix = metric_suffix(num_samples, monitoring=monitoring)
    ref_path = ref_stats if isinstance(ref_stats, str) else None
    ref = load_stats(ref_stats) if ref_path else dict(ref_stats)
    weights_sha = str(getattr(inception_fn, "weights_sha256", ""))
    ref_sha = str(ref.get("inception_weights_sha256", ""))
    if ref_sha and weights_sha and ref_sha != weights_sha:
        raise ValueError(f"reference statistics {ref_path or ''} were made with Inception weights "
                         f"{ref_sha}, but these are {weights_sha}; recompute them "
                         "(--mode=fid_stats) with the same weights.")
    ref_features = ref.get("features")
    has_features = ref_features is not None and len(ref_features) > pr_k
    if kid and not has_features:
        raise ValueError(f"KID needs real features, but the reference statistics "
                         f"{ref_path or ''} hold none (EDM's files have only mu, sigma); write "
                         "them with --mode=fid_stats (write_reference_stats keeps features).")
    keep = pr_num_samples if has_features else 0

    def batches():
        i = 0
        while True:
            images = _as_uint8(sample_fn(i))
            if len(images) == 0:
                raise ValueError(f"sample_fn({i}) returned no images")
            yield images
            i += 1

    rank = jax.process_index() if process_index is None else int(process_index)
    world = jax.process_count() if process_count is None else int(process_count)
    if world > 1:
        stats, logits, fake, featurised = _stream_dealt(
            sample_fn, inception_fn, num_samples, keep_features=keep, rank=rank, world=world,
            progress=progress)
    else:
        stats, logits, fake = _stream(batches(), inception_fn, num_samples, keep_features=keep,
                                      progress=progress, what="generated samples")
        featurised = num_samples
    mu, sigma = stats.mu_sigma()
    out = {f"fid{suffix}": frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    out[f"is{suffix}"], out[f"is{suffix}_std"] = metrics.inception_score(logits, is_splits)
    protocol = {
        "num_samples": int(num_samples),
        "monitoring": bool(monitoring),
        "reference_stats": os.path.abspath(ref_path) if ref_path else "in-memory",
        "reference_stats_sha256": inception_lib.file_sha256(ref_path) if ref_path else "",
        "reference_num_samples": int(ref["num_samples"]) if "num_samples" in ref else None,
        "inception_weights": str(getattr(inception_fn, "weights_path", "")),
        "inception_weights_sha256": weights_sha,
        "is_splits": is_splits,
        "is_logits": "unbiased (no output bias), all 1008 classes",
        "processes": world,
        "featurised_by_this_process": int(featurised),
    }
    if has_features:
        n_pr = min(len(fake), len(ref_features))
        real = np.asarray(ref_features[:n_pr])
        out[f"precision{suffix}"], out[f"recall{suffix}"] = metrics.precision_recall(
            real, fake[:n_pr], pr_k)
        protocol.update(pr_k=pr_k, pr_num_samples=n_pr)
        if kid:
            out[f"kid{suffix}"], out[f"kid{suffix}_std"] = metrics.kernel_inception_distance(
                real, fake[:n_pr], subsets=kid_subsets, subset_size=kid_subset_size)
            protocol.update(kid_subsets=kid_subsets, kid_subset_size=min(kid_subset_size, n_pr))
    else:
        protocol["precision_recall"] = ("skipped: the reference file has no 'features' "
                                        "(EDM's files hold only mu, sigma)")
    out["protocol"] = protocol
    return out
