"""The f-distill objective: one set of losses for image and video students.

"One-step Diffusion Models with f-Divergence Distribution Matching" (arXiv 2502.15681). A student
G_theta maps noise to data; its samples, noised at level sigma, have marginal q_theta,t, the
teacher's have p_t. With r = p_t / q_theta,t (paper Eq. 7):

    grad_theta D_f(p_t || q_theta,t) = -E[ h(r) (s_p(x_t) - s_q(x_t)) dx_t/dtheta ],  h = f'' r^2.

s_p is the frozen teacher's score, s_q the "fake score" network trained online on student
samples, and r is read off a discriminator trained with the logistic loss (at its optimum
logit = log r). Everything is in EDM's parametrisation (alpha = 1, t = sigma), so with
x0-predictions s_p - s_q = C^-1 (x0_teacher - x0_fake) / sigma^2, where C is the covariance of
the process' unit noise (`process.noise` / `process.noise_precision`): the identity, or a clip's
frames correlated by rho for a teacher trained with `process.frame_correlation` = rho. Every
noise draw here goes through `process.noise`.

The module has two layers:
* pure functions of arrays (the density ratio and its two normalisations, the f-weighted
  distribution-matching loss, the GAN, discriminator, R1 and fake-score losses);
* `FDivergenceObjective`, which composes them with the networks into the student loss and the
  critic loss of one iteration. What differs between students is injected: a `generator` (how the
  student makes training samples: one/few-step images, self-rollout video), a `noise` (the
  distribution of the noise level sigma) and `extra_terms` (e.g. video's forward-KL motion
  regulariser). Networks are called as `net(x_t, sigma, labels, return_features=...)` (a
  `Denoiser` or `VideoDenoiser`) and `disc(features) -> [B, heads]`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import divergences as divergences_lib
from fdistill.sde import bcast

Array = jax.Array
FEATURE_SOURCES = ("teacher", "fake_score")
FAKE_SCORE_WEIGHTINGS = ("none", "edm")
R1_PERTURBATIONS = ("clean", "noised")


# Whether the critic iteration runs the frozen teacher once over its fake, real (and R1) inputs
# stacked along the batch instead of once per input: the same features to float tolerance, fewer
# and larger operations. Off until a measurement shows it faster (experiments/bench_distill.py
# --distill --variants current,teacher_batched).
BATCH_TEACHER_FEATURES = False


def _teacher_features_batched(teacher, inputs, labels) -> list:
    """The teacher's (stop-gradient) features of each (x, sigma) in `inputs`, from one call on
    their concatenation along the batch axis; `labels` are shared by every input."""
    sizes = [x.shape[0] for x, _ in inputs]
    x_all = jnp.concatenate([x for x, _ in inputs])
    s_all = jnp.concatenate([s for _, s in inputs])
    l_all = (None if labels is None
             else jax.tree.map(lambda l: jnp.concatenate([l] * len(inputs)), labels))
    feats = jax.lax.stop_gradient(teacher(x_all, s_all, l_all, return_features=True)[1])
    leaves, treedef = jax.tree.flatten(feats)
    split = [jnp.split(leaf, np.cumsum(sizes)[:-1]) for leaf in leaves]
    return [treedef.unflatten([parts[i] for parts in split]) for i in range(len(inputs))]


# =================================================================================================
# Noise levels.

def karras_noise_grid(process, num_steps: int = 1000, rho: float = 7.0) -> np.ndarray:
    """The rho-Karras grid of `num_steps` sigmas from sigma_max down to sigma_min (EDM eq. 5).

    Index i of the grid is the paper's discrete time step (training uses indices 2..998 of 1000).
    """
    if not hasattr(process, "karras_sigmas"):
        raise ValueError(
            f"f-distill noises student samples on EDM's sigma grid, but the teacher's process "
            f"{type(process).__name__} has no Karras grid; distill a teacher trained with "
            f"config.process.name='edm'.")
    return np.asarray(process.karras_sigmas(num_steps, rho=rho), np.float32)[:num_steps]


@dataclasses.dataclass(frozen=True)
class GridNoise:
    """sigma drawn uniformly over the indices `index_range` (inclusive) of a decreasing grid."""

    sigmas: np.ndarray
    index_range: tuple[int, int] = (2, 998)

    def __post_init__(self):
        lo, hi = self.index_range
        if not 0 <= lo <= hi < len(self.sigmas):
            raise ValueError(f"index_range {self.index_range} must satisfy 0 <= lo <= hi < "
                             f"{len(self.sigmas)} (the number of grid steps).")

    def __call__(self, key: Array, n: int) -> Array:
        lo, hi = self.index_range
        index = jax.random.randint(key, (n,), lo, hi + 1, dtype=jnp.int32)
        return jnp.asarray(self.sigmas)[index]


def add_noise(key: Array, x: Array, sigma: Array, process) -> Array:
    """x_t = x + sigma eps with one sigma per sample ([B], broadcast over the rest of x) and eps
    the teacher's process noise (``process.noise``: standard normal, or correlated across a
    clip's frames when the teacher was trained so)."""
    return x + bcast(sigma, x) * process.noise(key, x.shape).astype(x.dtype)


# =================================================================================================
# The density ratio r = p_t / q_theta,t and its normalisations.

def density_ratio(logits: Array, *, logit_clip: float = 10.0, r_min: float = 0.1,
                  r_max: float = 20.0) -> Array:
    """r = exp(the mean over heads of the logits, clamped to [-logit_clip, logit_clip]), clipped
    to [r_min, r_max]; no gradient.

    At the optimum of the logistic loss a discriminator's logit is log p_t/q_t, so exp gives r.
    `logits`: [B, n_heads] (teacher samples labelled real). Returns r: [B].
    """
    logit = jnp.clip(logits.mean(axis=-1), -logit_clip, logit_clip)
    return jax.lax.stop_gradient(jnp.clip(jnp.exp(logit), r_min, r_max))


def noise_bin(sigma: Array, sigma_range: tuple[float, float], num_bins: int) -> Array:
    """The bin of each sample's sigma among `num_bins` bins of equal width in sigma over
    `sigma_range` = (sigma_min, sigma_max) (the reference implementation's bins): int32 [B]."""
    lo, hi = sigma_range
    width = (hi - lo) / num_bins
    return jnp.clip(jnp.floor((sigma - lo) / width), 0, num_bins - 1).astype(jnp.int32)


def update_ratio_ema(ema: Array, r: Array, bins: Array, rate: float) -> Array:
    """EMA of the mean of r in each noise-level bin: ema_b <- rate ema_b + (1 - rate) mean_b(r).

    Bins without a sample in the batch keep their value. `ema`: [num_bins]; the means are over the
    global batch (under jit a sum over a sharded batch is already global; no collective needed).
    """
    onehot = jax.nn.one_hot(bins, ema.shape[0], dtype=r.dtype)
    count = onehot.sum(axis=0)
    mean = (onehot * r[:, None]).sum(axis=0) / jnp.maximum(count, 1.0)
    return jnp.where(count > 0, rate * ema + (1.0 - rate) * mean, ema)


def normalize_ratio(r: Array, bins: Array, ema: Array) -> Array:
    """r divided by the (EMA) mean ratio of its noise-level bin, so that E[r] = 1 within a bin,
    as it is for the true ratio: E_q[p/q] = 1."""
    return r / ema[bins]


def f_weights(divergence: divergences_lib.Divergence, r: Array, *, normalize: bool = True) -> Array:
    """Per-sample weights h(r) = f''(r) r^2 (paper Eq. 7), over their batch mean if `normalize`.

    The mean is over the global batch: under jit a mean over an array sharded along the batch
    axis is computed across all devices (and hosts) by XLA, exactly like on one device.
    """
    h = jax.lax.stop_gradient(divergence.h(r))
    return h / jnp.mean(h) if normalize else h


# =================================================================================================
# Losses.

def distribution_matching_loss(x: Array, x0_teacher: Array, x0_fake: Array, weights: Array, *,
                               normalize: bool = True, precision=None) -> Array:
    """Per-sample f-distill generator loss, [B] (paper Eq. 9 in DMD's surrogate form).

    g = h C^-1 (x0_fake - x0_teacher) / mean|x - x0_teacher| (per sample; DMD's normalisation,
    off with `normalize=False`) and loss = 0.5 ||x - sg(x - g)||^2 / dim, so d loss / dx = g / dim:
    descending it moves x along h (s_p - s_q) sigma^2, the f-divergence's gradient up to positive
    factors. ``precision`` applies C^-1, the inverse covariance of the noise x_t was drawn with
    (`process.noise_precision`); None: C = I.
    """
    axes = tuple(range(1, x.ndim))
    diff = x0_fake - x0_teacher
    g = (diff if precision is None else precision(diff)) * bcast(weights, x)
    if normalize:
        g = g / jnp.mean(jnp.abs(x - x0_teacher), axis=axes, keepdims=True)
    target = jax.lax.stop_gradient(x - g)
    return 0.5 * jnp.mean((x - target) ** 2, axis=axes)


def gan_generator_loss(logits: Array) -> Array:
    """Non-saturating generator loss softplus(-logit), mean over heads: [B]."""
    return jnp.mean(jax.nn.softplus(-logits), axis=-1)


def discriminator_loss(logits_fake: Array, logits_real: Array) -> Array:
    """Logistic loss softplus(logit_fake) + softplus(-logit_real), mean over heads: [B].

    Its minimiser is logit = log p_t/q_t (teacher's noised data over the student's).
    """
    return (jnp.mean(jax.nn.softplus(logits_fake), axis=-1)
            + jnp.mean(jax.nn.softplus(-logits_real), axis=-1))


def approximate_r1(logits_real: Array, logits_perturbed: Array) -> Array:
    """Approximate R1 (adversarial post-training): (D(x) - D(x'))^2 with x' a small perturbation,
    mean over heads: [B]. It avoids differentiating through the feature network.
    """
    return jnp.mean((logits_real - logits_perturbed) ** 2, axis=-1)


def fake_score_loss(x0_pred: Array, x: Array, weight: Array) -> Array:
    """Denoising score matching of the fake score as x0 regression, weight * mean (x0_pred - x)^2
    per sample: [B]."""
    axes = tuple(range(1, x.ndim))
    return weight * jnp.mean((x0_pred - x) ** 2, axis=axes)


# =================================================================================================
# What varies between students.

class Generator(Protocol):
    """How a student makes samples (`student(x_t, sigma, labels)` is a denoiser)."""

    num_evaluations: int

    def training_sample(self, student, key: Array, batch: dict) -> Array:
        """Samples shaped like `batch['x']` with gradient through one student evaluation."""

    def sample(self, student, key: Array, batch: dict) -> Array:
        """Samples as at inference (no gradient needed)."""


ExtraTerm = Callable[[Any, Array, dict], tuple[Array, dict]]
"""`term(student, key, batch) -> (weighted loss, metrics)`, added to the student loss."""


# =================================================================================================
# One iteration's losses over the networks.

@dataclasses.dataclass(frozen=True, eq=False)
class FDivergenceObjective:
    """The f-distill student loss and critic loss of one iteration.

    Student: x = generator(student); x_t = x + sigma eps, sigma ~ `noise`, eps ~ `process.noise`;
        loss = DM(x; h(r)) + gan_weight softplus(-logit(x_t)) + extra terms.
    Critic: fake score regressed onto detached student samples noised the same way, and the
        discriminator's logistic loss against real data noised at an independent level (+ R1).
    """

    divergence: divergences_lib.Divergence
    generator: Generator
    noise: Callable[[Array, int], Array]
    process: Any                            # the teacher's EDM process (sigma range, lambda)
    feature_source: str = "teacher"
    guidance_scale: float = 1.0             # classifier-free guidance on the teacher (1: none)
    gan_weight: float = 1e-3
    r1_weight: float = 0.0
    r1_alpha: float = 0.1
    r1_perturb: str = "clean"               # x0 + alpha n at the real level | x_t + alpha n
    logit_clip: float = 10.0
    r_min: float = 0.1
    r_max: float = 20.0
    normalize_r: bool = True                # r / EMA of its noise-level bin's mean
    ratio_bins: int = 10
    ratio_ema_rate: float = 0.0             # 0: the batch's own bin means
    normalize_h: bool = True
    normalize_dm: bool = True
    fake_score_weighting: str = "none"      # none: x0 MSE | edm: EDM's lambda(sigma)
    extra_terms: tuple = ()

    def __post_init__(self):
        if self.feature_source not in FEATURE_SOURCES:
            raise ValueError(f"unknown feature_source {self.feature_source!r}; valid: "
                             f"{', '.join(FEATURE_SOURCES)}.")
        if self.r1_perturb not in R1_PERTURBATIONS:
            raise ValueError(f"unknown r1_perturb {self.r1_perturb!r}; valid: "
                             f"{', '.join(R1_PERTURBATIONS)}.")
        if self.fake_score_weighting not in FAKE_SCORE_WEIGHTINGS:
            raise ValueError(f"unknown fake_score_weighting {self.fake_score_weighting!r}; valid: "
                             f"{', '.join(FAKE_SCORE_WEIGHTINGS)}.")

    def init_ratio_ema(self) -> Array:
        return jnp.ones((self.ratio_bins,), jnp.float32)

    # --- pieces ------------------------------------------------------------------------------
    def teacher_x0(self, teacher, x_t, sigma, labels, *, return_features=False):
        """The teacher's x0, with classifier-free guidance x0_u + w (x0_c - x0_u) if w != 1."""
        out = teacher(x_t, sigma, labels, return_features=return_features)
        if self.guidance_scale == 1.0 or labels is None:
            return out
        x0_c, feats = out if return_features else (out, None)
        x0_u = teacher(x_t, sigma, jnp.zeros_like(labels))
        x0 = x0_u + self.guidance_scale * (x0_c - x0_u)
        return (x0, feats) if return_features else x0

    def fake_score_weight(self, sigma: Array) -> Array:
        """1 (plain x0 regression) or EDM's lambda(sigma) (`fake_score_weighting='edm'`)."""
        if self.fake_score_weighting == "edm":
            return self.process.loss_weight(sigma)
        return jnp.ones_like(sigma)

    # --- the student iteration ---------------------------------------------------------------
    def student_loss(self, student, teacher, fake_score, discriminator, key: Array, batch: dict,
                     ratio_ema: Array) -> tuple[Array, tuple[dict, Array]]:
        """Generator loss: mean_B [DM(h) + gan_weight softplus(-logit)] + extra terms.

        Returns (loss, (metrics, new_ratio_ema)). `batch['label']` (one-hot or None) conditions
        the student; the real data in `batch['x']` give only the shape.
        """
        k_gen, k_noise = jax.random.split(key)
        k_sigma, k_eps = jax.random.split(k_noise)
        k_extra = jax.random.fold_in(key, 1)
        labels = batch.get("label")
        x = self.generator.training_sample(student, k_gen, batch)
        sigma = self.noise(k_sigma, x.shape[0])
        x_t = add_noise(k_eps, x, sigma, self.process)
        if self.feature_source == "teacher":
            x0_teacher, feats = self.teacher_x0(teacher, x_t, sigma, labels, return_features=True)
            x0_fake = fake_score(x_t, sigma, labels)
        else:
            x0_teacher = self.teacher_x0(teacher, x_t, sigma, labels)
            x0_fake, feats = fake_score(x_t, sigma, labels, return_features=True)
        logits = discriminator(feats)
        r = density_ratio(logits, logit_clip=self.logit_clip, r_min=self.r_min, r_max=self.r_max)
        r_raw = r
        new_ema = ratio_ema
        if self.normalize_r:
            bins = noise_bin(sigma, (self.process.sigma_min, self.process.sigma_max),
                             self.ratio_bins)
            new_ema = update_ratio_ema(ratio_ema, r, bins, self.ratio_ema_rate)
            r = normalize_ratio(r, bins, new_ema)
        h = f_weights(self.divergence, r, normalize=self.normalize_h)
        loss_dm = distribution_matching_loss(
            x, jax.lax.stop_gradient(x0_teacher), jax.lax.stop_gradient(x0_fake), h,
            normalize=self.normalize_dm, precision=self.process.noise_precision).mean()
        loss_gan = gan_generator_loss(logits).mean()
        loss = loss_dm + self.gan_weight * loss_gan
        metrics = {"student/loss_dm": loss_dm, "student/loss_gan": loss_gan,
                   "student/r_mean": r_raw.mean(), "student/h_max": h.max(),
                   "student/h_min": h.min()}
        for i, term in enumerate(self.extra_terms):
            extra, extra_metrics = term(student, jax.random.fold_in(k_extra, i), batch)
            loss = loss + extra
            metrics.update(extra_metrics)
        metrics["student/loss"] = loss
        return loss, (metrics, new_ema)

    # --- the critic iteration ----------------------------------------------------------------
    def critic_loss(self, fake_score, discriminator, student, teacher, key: Array,
                    batch: dict) -> tuple[Array, dict]:
        """Fake-score regression on detached student samples + discriminator logistic loss (+ R1).

        Real data are noised at their own level. R1 compares the discriminator on the noised real
        data x_t with x' = x + alpha n, the clean data perturbed (`r1_perturb='clean'`, the
        reference implementation's), or x' = x_t + alpha n ('noised'). With `feature_source='fake_score'` the
        discriminator's loss also trains the fake score's encoder (DMD2); with the teacher, the
        features are frozen.
        """
        k_gen, k_fake, k_real, k_r1 = jax.random.split(key, 4)
        k_sigma, k_eps = jax.random.split(k_fake)
        k_sigma_real, k_eps_real = jax.random.split(k_real)
        labels = batch.get("label")
        x_real = batch["x"]
        x = jax.lax.stop_gradient(self.generator.sample(student, k_gen, batch))
        sigma = self.noise(k_sigma, x.shape[0])
        x_t = add_noise(k_eps, x, sigma, self.process)
        sigma_real = self.noise(k_sigma_real, x_real.shape[0])
        x_t_real = add_noise(k_eps_real, x_real, sigma_real, self.process)

        def feats(x_in, s):
            if self.feature_source == "teacher":
                return jax.lax.stop_gradient(teacher(x_in, s, labels, return_features=True)[1])
            return fake_score(x_in, s, labels, return_features=True)[1]

        x_pert = None
        if self.r1_weight > 0:
            base = x_real if self.r1_perturb == "clean" else x_t_real
            x_pert = base + self.r1_alpha * self.process.noise(k_r1, base.shape)
        if self.feature_source == "fake_score":
            x0_fake, feats_fake = fake_score(x_t, sigma, labels, return_features=True)
            feats_real = feats(x_t_real, sigma_real)
            feats_pert = None if x_pert is None else feats(x_pert, sigma_real)
        else:
            x0_fake = fake_score(x_t, sigma, labels)
            inputs = [(x_t, sigma), (x_t_real, sigma_real)]
            inputs += [] if x_pert is None else [(x_pert, sigma_real)]
            if BATCH_TEACHER_FEATURES:   # one teacher pass over fake, real (and R1) inputs
                feats_fake, feats_real, *rest = _teacher_features_batched(
                    teacher, inputs, labels)
            else:
                feats_fake, feats_real, *rest = [feats(x_in, s) for x_in, s in inputs]
            feats_pert = rest[0] if rest else None
        loss_dsm = fake_score_loss(x0_fake, x, self.fake_score_weight(sigma)).mean()
        logits_fake = discriminator(feats_fake)
        logits_real = discriminator(feats_real)
        loss_d = discriminator_loss(logits_fake, logits_real).mean()
        loss = loss_dsm + loss_d
        metrics = {"critic/loss_dsm": loss_dsm, "critic/loss_d": loss_d,
                   "critic/logit_real": logits_real.mean(), "critic/logit_fake": logits_fake.mean()}
        if self.r1_weight > 0:
            r1 = approximate_r1(logits_real, discriminator(feats_pert)).mean()
            loss = loss + self.r1_weight * r1
            metrics["critic/r1"] = r1
        metrics["critic/loss"] = loss
        return loss, metrics

    def metric_names(self) -> list[str]:
        """Every metric the two losses and the steps report (the state keeps the latest of each)."""
        names = ["student/loss", "student/loss_dm", "student/loss_gan", "student/r_mean",
                 "student/h_max", "student/h_min", "student/grad_norm",
                 "critic/loss", "critic/loss_dsm", "critic/loss_d", "critic/logit_real",
                 "critic/logit_fake", "critic/grad_norm", "critic/disc_grad_norm"]
        names += ["critic/r1"] if self.r1_weight > 0 else []
        for term in self.extra_terms:
            names += list(getattr(term, "metric_names", ()))
        return sorted(names)
