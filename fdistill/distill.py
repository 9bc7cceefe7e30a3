"""f-distill: one-step (and few-step) students by f-divergence distribution matching.

"One-step Diffusion Models with f-Divergence Distribution Matching" (arXiv 2502.15681). A student
G_theta maps noise to data; its samples, noised by the teacher's forward process at a level sigma,
have marginal q_theta,t, the teacher's have p_t. With r = p_t / q_theta,t (paper Eq. 7):

    grad_theta D_f(p_t || q_theta,t) = -E[ h(r) (s_p(x_t) - s_q(x_t)) dx_t/dtheta ],  h = f'' r^2.

s_p is the frozen teacher's score, s_q the "fake score" network trained online on student samples,
and r is read off a discriminator trained with the logistic loss (at its optimum logit = log r).
Everything is written for EDM-parametrised denoisers (alpha = 1, t = sigma), so with
x0-predictions s_p - s_q = (x0_teacher - x0_fake) / sigma^2 (DESIGN.md 2.2-2.4).

The module is in three layers:
* pure maths on arrays (noise grid, density ratio and its normalisations, the f-weighted
  distribution-matching loss, the GAN and critic losses) that tests check against closed forms;
* `FDistill`, which composes them with the networks (student, teacher, fake score, discriminator,
  all called through the `Denoiser` / `Discriminator` interfaces of CONTRACTS.md) into the student
  loss and the critic loss of one iteration;
* `Distiller` (state pytree, jitted donated sharded steps) and the loops `distill(config, workdir)`
  (`--mode=distill`) and `sample(config, workdir)` (`--mode=sample` for a student), built on the
  teacher loop's machinery in `fdistill.train`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fdistill import divergences as divergences_lib
from fdistill import generate as generate_lib
from fdistill import checkpoint, models, monitor, sharding, train

Array = jax.Array
FEATURE_SOURCES = ("teacher", "fake_score")


# =================================================================================================
# Noise levels.

def noise_grid(process, num_steps: int = 1000, rho: float = 7.0) -> np.ndarray:
    """The rho = 7 Karras grid of `num_steps` sigmas, decreasing from sigma_max to sigma_min.

    Index i of the grid is the paper's discrete time step (training uses indices 2..998 of 1000).
    """
    if not hasattr(process, "karras_sigmas"):
        raise ValueError(
            f"f-distill noises student samples on EDM's sigma grid, but the teacher's process "
            f"{type(process).__name__} has no Karras grid; distill a teacher trained with "
            f"config.process.name='edm'.")
    return np.asarray(process.karras_sigmas(num_steps, rho=rho), np.float32)[:num_steps]


def sample_noise_index(key: Array, batch_size: int, index_range: tuple[int, int]) -> Array:
    """Grid indices uniform on [lo, hi] (inclusive), int32 [B]."""
    lo, hi = index_range
    return jax.random.randint(key, (batch_size,), lo, hi + 1, dtype=jnp.int32)


def _expand(v: Array, x: Array) -> Array:
    """Per-sample [B] values broadcast against x [B, ...]."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


# =================================================================================================
# The density ratio r = p_t / q_theta,t and its normalisations (DESIGN.md 2.3).

def density_ratio(logits: Array, *, logit_clip: float = 10.0, r_min: float = 0.1,
                  r_max: float = 20.0) -> Array:
    """r = exp(mean over heads of the clamped logits), clipped to [r_min, r_max]; no gradient.

    At the optimum of the logistic loss a discriminator's logit is log p_t/q_t, so exp gives r.
    `logits`: [B, n_heads] (teacher samples labelled real). Returns r: [B].
    """
    logit = jnp.clip(logits, -logit_clip, logit_clip).mean(axis=-1)
    return jax.lax.stop_gradient(jnp.clip(jnp.exp(logit), r_min, r_max))


def noise_bin(index: Array, index_range: tuple[int, int], num_bins: int) -> Array:
    """The equal-width bin (of `num_bins` over the grid index range) of each sample: int32 [B]."""
    lo, hi = index_range
    width = (hi - lo + 1) / num_bins
    return jnp.clip(jnp.floor((index - lo) / width), 0, num_bins - 1).astype(jnp.int32)


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
# Losses (DESIGN.md 2.4).

def distribution_matching_loss(x: Array, x0_teacher: Array, x0_fake: Array, weights: Array, *,
                               normalize: bool = True) -> Array:
    """Per-sample f-distill generator loss, [B] (paper Eq. 9 in DMD's surrogate form).

    g = h (x0_fake - x0_teacher) / mean|x - x0_teacher| (per sample; DMD's normalisation, off with
    `normalize=False`) and loss = 0.5 ||x - sg(x - g)||^2 / dim, so d loss / dx = g / dim:
    descending it moves x along h (s_p - s_q) sigma^2, the f-divergence's gradient up to positive
    factors.
    """
    axes = tuple(range(1, x.ndim))
    g = (x0_fake - x0_teacher) * _expand(weights, x)
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
    """Finite-difference R1: (D(x) - D(x + alpha n))^2 ~ alpha^2 ||grad_x D||^2, head mean: [B].

    The f-distill implementation's R1 (as in adversarial post-training); it avoids
    differentiating through the feature network.
    """
    return jnp.mean((logits_real - logits_perturbed) ** 2, axis=-1)


def edm_weight(sigma: Array, sigma_data: float) -> Array:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def fake_score_loss(x0_pred: Array, x: Array, sigma: Array, sigma_data: float) -> Array:
    """EDM-weighted x0 regression (denoising score matching) of the fake score: [B]."""
    axes = tuple(range(1, x.ndim))
    return edm_weight(sigma, sigma_data) * jnp.mean((x0_pred - x) ** 2, axis=axes)


# =================================================================================================
# The student: one step from sigma_max noise, or a few steps with re-noising (DESIGN.md 2.4).

def student_sigmas(process, num_steps: int, sigmas=None) -> tuple[float, ...]:
    """Noise levels the student is evaluated at: (sigma_max,) for one step; otherwise the first
    `num_steps` of a Karras grid of num_steps + 1 levels unless given explicitly."""
    if sigmas:
        sigmas = tuple(float(s) for s in sigmas)
        if len(sigmas) != num_steps or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(
                f"student sigmas {sigmas} must be {num_steps} strictly decreasing noise levels "
                f"(config.distill.student_steps = {num_steps}).")
        return sigmas
    if num_steps < 1:
        raise ValueError(f"config.distill.student_steps must be >= 1, got {num_steps}.")
    if num_steps == 1:
        return (float(process.sigma_max),)
    return tuple(float(s) for s in noise_grid(process, num_steps + 1)[:num_steps])


def generate(student: Callable, key: Array, shape: tuple[int, ...], class_labels=None, *,
             sigmas: tuple[float, ...]) -> Array:
    """Student sampling: x = G(sigma_0 z); then for each further level x = G(x + sigma_k eps).

    `student(x_t, sigma, class_labels)` is an EDM denoiser; `len(sigmas)` network evaluations.
    """
    keys = jax.random.split(key, len(sigmas))
    x = jnp.zeros(shape, jnp.float32)
    for k, s in zip(keys, sigmas):
        x_t = x + s * jax.random.normal(k, shape, jnp.float32)
        x = student(x_t, jnp.full((shape[0],), s, jnp.float32), class_labels)
    return x


def generate_for_training(student: Callable, key: Array, shape: tuple[int, ...], class_labels=None,
                          *, sigmas: tuple[float, ...]) -> Array:
    """A student sample carrying gradient through exactly one student evaluation.

    One step: G(sigma_max z). Few steps (DMD2's backward simulation): the chain runs without
    gradient, each sample picks a step k uniformly and the gradient flows through G at step k only,
    from the re-noised output of the (detached) step k - 1.
    """
    if len(sigmas) == 1:
        return generate(student, key, shape, class_labels, sigmas=sigmas)
    key_chain, key_pick = jax.random.split(key)
    keys = jax.random.split(key_chain, len(sigmas))
    n = shape[0]
    x = jnp.zeros(shape, jnp.float32)
    inputs = []
    for i, (k, s) in enumerate(zip(keys, sigmas)):
        x_t = x + s * jax.random.normal(k, shape, jnp.float32)
        inputs.append(x_t)
        if i + 1 < len(sigmas):
            x = jax.lax.stop_gradient(student(x_t, jnp.full((n,), s, jnp.float32), class_labels))
    pick = jax.random.randint(key_pick, (n,), 0, len(sigmas))
    x_in = jnp.take_along_axis(jnp.stack(inputs), _expand(pick, inputs[0])[None], axis=0)[0]
    sigma = jnp.asarray(sigmas, jnp.float32)[pick]
    return student(x_in, sigma, class_labels)


# =================================================================================================
# One iteration's losses over the networks.

@dataclasses.dataclass(frozen=True, eq=False)
class FDistill:
    """The f-distill objective: student loss and critic loss of one iteration.

    Networks are called through the contract interfaces: a denoiser
    `den(x_t, sigma, class_labels, return_features=False)` and a discriminator
    `disc(features) -> [B, n_heads]` logits, features from the teacher or the fake score
    (`feature_source`).
    """

    divergence: divergences_lib.Divergence
    sigmas: np.ndarray                      # Karras grid of noise levels, decreasing
    index_range: tuple[int, int] = (2, 998)
    student_sigmas: tuple[float, ...] = (80.0,)
    sigma_data: float = 0.5
    feature_source: str = "teacher"
    guidance_scale: float = 1.0             # classifier-free guidance on the teacher (1: none)
    gan_weight: float = 1e-3
    r1_weight: float = 0.0
    r1_alpha: float = 0.1
    logit_clip: float = 10.0
    r_min: float = 0.1
    r_max: float = 20.0
    normalize_r: bool = True                # r / EMA of its noise-level bin's mean
    ratio_bins: int = 10
    ratio_ema_rate: float = 0.5             # 0: the batch mean alone (paper: 0.5 on ImageNet-64)
    normalize_h: bool = True
    normalize_dm: bool = True

    def __post_init__(self):
        if self.feature_source not in FEATURE_SOURCES:
            raise ValueError(f"unknown feature_source {self.feature_source!r}; valid: "
                             f"{', '.join(FEATURE_SOURCES)}.")
        lo, hi = self.index_range
        if not 0 <= lo <= hi < len(self.sigmas):
            raise ValueError(f"index_range {self.index_range} must satisfy 0 <= lo <= hi < "
                             f"{len(self.sigmas)} (the number of grid steps).")

    @classmethod
    def from_config(cls, dc, process) -> "FDistill":
        """From `config.distill` and the teacher's process (an EDM process)."""
        params = dict(dc.get("divergence_params", {}) or {})
        return cls(
            divergence=divergences_lib.get(dc.divergence, **params),
            sigmas=noise_grid(process, dc.num_noise_steps, dc.rho),
            index_range=tuple(dc.index_range),
            student_sigmas=student_sigmas(process, dc.student_steps, dc.get("student_sigmas")),
            sigma_data=float(process.sigma_data),
            feature_source=dc.feature_source, guidance_scale=dc.guidance_scale,
            gan_weight=dc.gan_weight, r1_weight=dc.r1_weight, r1_alpha=dc.r1_alpha,
            logit_clip=dc.logit_clip, r_min=dc.r_min, r_max=dc.r_max,
            normalize_r=dc.normalize_r, ratio_bins=dc.ratio_bins,
            ratio_ema_rate=dc.ratio_ema_rate,
            normalize_h=dc.normalize_h, normalize_dm=dc.normalize_dm)

    def init_ratio_ema(self) -> Array:
        return jnp.ones((self.ratio_bins,), jnp.float32)

    # --- helpers -----------------------------------------------------------------------------
    def noise(self, key: Array, x: Array) -> tuple[Array, Array, Array]:
        """(x_t, sigma, index): x noised at grid levels drawn uniformly from `index_range`."""
        k_idx, k_eps = jax.random.split(key)
        index = sample_noise_index(k_idx, x.shape[0], self.index_range)
        sigma = jnp.asarray(self.sigmas)[index]
        x_t = x + _expand(sigma, x) * jax.random.normal(k_eps, x.shape, x.dtype)
        return x_t, sigma, index

    def teacher_x0(self, teacher, x_t, sigma, labels, *, return_features=False):
        """The teacher's x0, with classifier-free guidance x0_u + w (x0_c - x0_u) if w != 1."""
        out = teacher(x_t, sigma, labels, return_features=return_features)
        if self.guidance_scale == 1.0 or labels is None:
            return out
        x0_c, feats = out if return_features else (out, None)
        x0_u = teacher(x_t, sigma, jnp.zeros_like(labels))
        x0 = x0_u + self.guidance_scale * (x0_c - x0_u)
        return (x0, feats) if return_features else x0

    # --- the student iteration ---------------------------------------------------------------
    def student_loss(self, student, teacher, fake_score, discriminator, key: Array, batch: dict,
                     ratio_ema: Array) -> tuple[Array, tuple[dict, Array]]:
        """Generator loss: mean_B [DM(h) + gan_weight softplus(-logit)] (DESIGN.md 2.4).

        Returns (loss, (metrics, new_ratio_ema)). `batch['label']` (one-hot) conditions the
        student; only its size and labels are used (no real data in the student step).
        """
        k_gen, k_noise = jax.random.split(key)
        labels = batch.get("label")
        shape = batch["x"].shape
        x = generate_for_training(student, k_gen, shape, labels, sigmas=self.student_sigmas)
        x_t, sigma, index = self.noise(k_noise, x)
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
            bins = noise_bin(index, self.index_range, self.ratio_bins)
            new_ema = update_ratio_ema(ratio_ema, r, bins, self.ratio_ema_rate)
            r = normalize_ratio(r, bins, new_ema)
        h = f_weights(self.divergence, r, normalize=self.normalize_h)
        loss_dm = distribution_matching_loss(
            x, jax.lax.stop_gradient(x0_teacher), jax.lax.stop_gradient(x0_fake), h,
            normalize=self.normalize_dm).mean()
        loss_gan = gan_generator_loss(logits).mean()
        loss = loss_dm + self.gan_weight * loss_gan
        metrics = {"student/loss": loss, "student/loss_dm": loss_dm, "student/loss_gan": loss_gan,
                   "student/r_mean": r_raw.mean(), "student/h_max": h.max(),
                   "student/h_min": h.min()}
        return loss, (metrics, new_ema)

    # --- the critic iteration ----------------------------------------------------------------
    def critic_loss(self, fake_score, discriminator, student, teacher, key: Array,
                    batch: dict) -> tuple[Array, dict]:
        """Fake-score DSM on detached student samples + discriminator logistic loss (+ R1).

        Real data are noised at their own grid level. With `feature_source='fake_score'` the
        discriminator's loss also trains the fake score's encoder (DMD2); with the teacher, the
        features are frozen.
        """
        k_gen, k_fake, k_real, k_r1 = jax.random.split(key, 4)
        labels = batch.get("label")
        x_real = batch["x"]
        x = jax.lax.stop_gradient(
            generate(student, k_gen, x_real.shape, labels, sigmas=self.student_sigmas))
        x_t, sigma, _ = self.noise(k_fake, x)
        x_t_real, sigma_real, _ = self.noise(k_real, x_real)

        def feats(x_in, s):
            if self.feature_source == "teacher":
                return jax.lax.stop_gradient(teacher(x_in, s, labels, return_features=True)[1])
            return fake_score(x_in, s, labels, return_features=True)[1]

        if self.feature_source == "fake_score":
            x0_fake, feats_fake = fake_score(x_t, sigma, labels, return_features=True)
        else:
            x0_fake = fake_score(x_t, sigma, labels)
            feats_fake = feats(x_t, sigma)
        loss_dsm = fake_score_loss(x0_fake, x, sigma, self.sigma_data).mean()
        logits_fake = discriminator(feats_fake)
        logits_real = discriminator(feats(x_t_real, sigma_real))
        loss_d = discriminator_loss(logits_fake, logits_real).mean()
        loss = loss_dsm + loss_d
        metrics = {"critic/loss_dsm": loss_dsm, "critic/loss_d": loss_d,
                   "critic/logit_real": logits_real.mean(), "critic/logit_fake": logits_fake.mean()}
        if self.r1_weight > 0:
            x_pert = x_t_real + self.r1_alpha * jax.random.normal(k_r1, x_t_real.shape)
            r1 = approximate_r1(logits_real, discriminator(feats(x_pert, sigma_real))).mean()
            loss = loss + self.r1_weight * r1
            metrics["critic/r1"] = r1
        metrics["critic/loss"] = loss
        return loss, metrics


# =================================================================================================
# The training state, the jitted steps and the loop (reusing the teacher loop's machinery).

NETWORK_KEYS = ("student", "student_ema", "fake_score", "disc")
OPT_KEYS = ("opt_student", "opt_fake_score", "opt_disc")
GUARDED = ("student/loss", "student/grad_norm", "critic/loss", "critic/grad_norm")


def _one_hot_labels(batch: dict, num_classes: int) -> dict:
    """{'x', 'label'} with int labels made the one-hot labels the denoisers take (or None)."""
    labels = jax.nn.one_hot(batch["label"], num_classes) if num_classes else None
    return {"x": batch["x"], "label": labels}


class Distiller:
    """f-distill of one teacher: the state pytree, the jitted student and critic steps, sampling.

    State (donated, sharded like the teacher's: parameter-shaped entries per
    `config.distill.param_sharding`, the rest replicated):
    `{'step', 'student', 'student_ema', 'fake_score', 'disc', 'opt_student', 'opt_fake_score',
    'opt_disc', 'ratio_ema', 'metrics', 'nonfinite'}`. Student and fake score start from the
    teacher's weights. Iteration i updates the student when i % student_update_every == 0 and the
    fake score and discriminator otherwise (DESIGN.md 2.4). The teacher's parameters are an
    argument of the steps (never a compile-time constant, never donated).
    """

    def __init__(self, config, teacher, mesh):
        dc = config.distill
        self.config, self.mesh = config, mesh
        self.num_classes = config.data.get("num_classes", 0)
        self.objective = FDistill.from_config(dc, teacher.process)
        self.every = int(dc.student_update_every)
        if self.every < 2:
            raise ValueError(f"config.distill.student_update_every must be >= 2 (one student step "
                             f"per `every` iterations, the others train the critic); got "
                             f"{self.every}.")
        self.graphdef, teacher_params, self.others = train.split(teacher)
        disc = models.Discriminator(models.feature_channels(teacher), tuple(dc.disc_resolutions),
                                    rngs=nnx.Rngs(config.seed + 1))
        self.disc_graphdef, disc_params, self.disc_others = train.split(disc)
        self.tx = {k: train.make_optimizer(dc[f"{k}_optim"])
                   for k in ("student", "fake_score", "disc")}
        copy = lambda t: jax.tree.map(jnp.copy, t)
        metric_names = sorted(set(self._student_metric_names() + self._critic_metric_names()))
        state = {
            "step": jnp.asarray(0, jnp.int32),
            "student": copy(teacher_params), "student_ema": copy(teacher_params),
            "fake_score": copy(teacher_params), "disc": disc_params,
            "opt_student": self.tx["student"].init(teacher_params),
            "opt_fake_score": self.tx["fake_score"].init(teacher_params),
            "opt_disc": self.tx["disc"].init(disc_params),
            "ratio_ema": self.objective.init_ratio_ema(),
            "metrics": {k: jnp.asarray(0.0, jnp.float32) for k in metric_names},
            "nonfinite": train.nonfinite_record(GUARDED),
        }
        mode = dc.get("param_sharding", "replicated")
        self.state_sharding = {
            k: (sharding.param_shardings(v, mesh, mode) if k in NETWORK_KEYS + OPT_KEYS
                else jax.tree.map(lambda _: sharding.replicated(mesh), v))
            for k, v in state.items()}
        self.teacher_sharding = sharding.param_shardings(teacher_params, mesh, mode)
        self.initial_state = jax.device_put(state, self.state_sharding)
        self.teacher_params = jax.device_put(teacher_params, self.teacher_sharding)
        self.key = jax.random.key(config.seed)
        self.ema_rate = float(dc.ema_rate)
        jit = lambda fn: jax.jit(
            fn, donate_argnums=0,
            in_shardings=(self.state_sharding, self.teacher_sharding,
                          sharding.batch_sharding(mesh)),
            out_shardings=(self.state_sharding, sharding.replicated(mesh)))
        self.student_step = jit(self._student_step)
        self.critic_step = jit(self._critic_step)

    # --- modules from parameters -------------------------------------------------------------
    def denoiser(self, params):
        return train.merge(self.graphdef, params, self.others)

    def discriminator(self, params):
        return train.merge(self.disc_graphdef, params, self.disc_others)

    def _student_metric_names(self):
        return ["student/loss", "student/loss_dm", "student/loss_gan", "student/r_mean",
                "student/h_max", "student/h_min", "student/grad_norm"]

    def _critic_metric_names(self):
        names = ["critic/loss", "critic/loss_dsm", "critic/loss_d", "critic/logit_real",
                 "critic/logit_fake", "critic/grad_norm", "critic/disc_grad_norm"]
        return names + (["critic/r1"] if self.objective.r1_weight > 0 else [])

    def _finish(self, old, new, metrics, guarded):
        new = dict(new, metrics=dict(old["metrics"], **metrics))
        values = {k: guarded.get(k, jnp.asarray(0.0, jnp.float32)) for k in GUARDED}
        new = train.guard_finite(old, new, values)
        return new, new["metrics"]

    # --- the two steps -----------------------------------------------------------------------
    def _student_step(self, state, teacher_params, batch):
        key = jax.random.fold_in(self.key, state["step"])
        batch = _one_hot_labels(batch, self.num_classes)
        teacher = self.denoiser(teacher_params)
        fake = self.denoiser(state["fake_score"])
        disc = self.discriminator(state["disc"])

        def objective(params):
            return self.objective.student_loss(self.denoiser(params), teacher, fake, disc, key,
                                               batch, state["ratio_ema"])

        (loss, (metrics, ratio_ema)), grads = jax.value_and_grad(objective, has_aux=True)(
            state["student"])
        updates, opt = self.tx["student"].update(grads, state["opt_student"], state["student"])
        params = optax.apply_updates(state["student"], updates)
        grad_norm = optax.tree.norm(grads)
        metrics = dict(metrics, **{"student/grad_norm": grad_norm})
        new = dict(state, student=params, opt_student=opt, ratio_ema=ratio_ema,
                   student_ema=train.ema_update(state["student_ema"], params, self.ema_rate))
        return self._finish(state, new, metrics,
                            {"student/loss": loss, "student/grad_norm": grad_norm})

    def _critic_step(self, state, teacher_params, batch):
        key = jax.random.fold_in(self.key, state["step"])
        batch = _one_hot_labels(batch, self.num_classes)
        teacher = self.denoiser(teacher_params)
        student = self.denoiser(state["student"])

        def objective(params):
            fake_params, disc_params = params
            return self.objective.critic_loss(self.denoiser(fake_params),
                                              self.discriminator(disc_params), student, teacher,
                                              key, batch)

        params = (state["fake_score"], state["disc"])
        (loss, metrics), (g_fake, g_disc) = jax.value_and_grad(objective, has_aux=True)(params)
        up_f, opt_f = self.tx["fake_score"].update(g_fake, state["opt_fake_score"],
                                                   state["fake_score"])
        up_d, opt_d = self.tx["disc"].update(g_disc, state["opt_disc"], state["disc"])
        grad_norm = optax.tree.norm(g_fake)
        metrics = dict(metrics, **{"critic/grad_norm": grad_norm,
                                   "critic/disc_grad_norm": optax.tree.norm(g_disc)})
        new = dict(state, fake_score=optax.apply_updates(state["fake_score"], up_f),
                   disc=optax.apply_updates(state["disc"], up_d),
                   opt_fake_score=opt_f, opt_disc=opt_d)
        return self._finish(state, new, metrics,
                            {"critic/loss": loss, "critic/grad_norm": grad_norm})

    def step(self, state, i: int, batch):
        """Iteration i: the student step if i % student_update_every == 0, else the critic step."""
        fn = self.student_step if i % self.every == 0 else self.critic_step
        return fn(state, self.teacher_params, batch)

    # --- sampling ----------------------------------------------------------------------------
    def sample_fn(self, batch_size: int):
        """`draw(params, key, labels) -> x` for the one-/few-step student, jitted."""
        shape = (batch_size,) + tuple(generate_lib.example_shape(self.config))
        sigmas = self.objective.student_sigmas

        @jax.jit
        def draw(params, key, labels):
            student = self.denoiser(params)
            return generate(lambda x, s, c: student(x, s, c), key, shape, labels, sigmas=sigmas)

        return draw


def load_teacher(config):
    """The frozen teacher (EMA weights) from `config.distill.teacher_workdir`.

    The distill config's model / process / data / optim sections must be the teacher's own (the
    distill configs build on the teacher configs for that reason). Fails before compiling
    anything when the workdir has no checkpoint or its shapes do not match.
    """
    workdir = config.distill.get("teacher_workdir", "")
    if not workdir:
        raise ValueError("config.distill.teacher_workdir is empty: point it at a trained teacher, "
                         "e.g. --config.distill.teacher_workdir=runs/toy")
    try:
        return train.load_model(config, workdir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.distill.teacher_workdir={workdir!r}: {e}") from e
    except ValueError as e:
        raise ValueError(f"config.distill.teacher_workdir={workdir!r}: the teacher checkpoint does "
                         f"not match this config's model ({e})") from e


def draw_student_samples(distiller: Distiller, params, n: int, key, batch_size: int) -> np.ndarray:
    """n student samples; sample j has class j % num_classes when conditional (the cycle runs
    on across batches)."""
    draw = distiller.sample_fn(batch_size)
    k = distiller.num_classes
    out = []
    for i in range(-(-n // batch_size)):
        labels = jax.nn.one_hot((i * batch_size + jnp.arange(batch_size)) % k, k) if k else None
        out.append(np.asarray(draw(params, jax.random.fold_in(key, i), labels)))
    return np.concatenate(out)[:n]


def distill(config, workdir: str) -> dict:
    """Distils `config.distill.teacher_workdir`'s teacher into a student in `workdir`.

    Runs `config.distill.num_steps` iterations (resuming from `workdir/checkpoints`), then draws
    `config.distill.num_eval_samples` student samples: toy metrics against the true density for
    2-D toys, an image grid otherwise; writes results.json and student_samples.png/.npz.
    """
    from fdistill import data
    dc = config.distill
    teacher, teacher_step = load_teacher(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(dc.batch_size, mesh)
    ds = data.get_dataset(config.data, global_batch_size=dc.batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          seed=config.seed)
    distiller = Distiller(config, teacher, mesh)

    def step_fn(state, i):
        return distiller.step(state, i, sharding.global_batch(ds.batch(i), mesh))

    loop = train.LoopConfig(num_steps=dc.num_steps, log_every=dc.log_every,
                            ckpt_every=dc.ckpt_every,
                            keep_checkpoints=dc.get("keep_checkpoints", 3))
    from fdistill import evaluate
    on_log = evaluate.student_hook(config, workdir, distiller, log_every=dc.log_every)
    t0 = time.time()
    state, metrics = train.fit(workdir=workdir, state=distiller.initial_state,
                               state_sharding=distiller.state_sharding, step_fn=step_fn, loop=loop,
                               on_log=on_log)
    seconds = time.time() - t0
    n = dc.num_eval_samples
    x = draw_student_samples(distiller, state["student_ema"], n, jax.random.key(config.seed + 1),
                             min(n, dc.get("eval_batch_size", 1024)))
    png = generate_lib.save_samples(config, workdir, x, "student_samples")
    results = {"mode": "distill", "divergence": distiller.objective.divergence.name,
               "steps": int(sharding.to_host(state["step"])), "teacher_step": teacher_step,
               "distill_seconds": seconds, "nfe": len(distiller.objective.student_sigmas),
               **{f"final/{k}": v for k, v in metrics.items()}}
    if config.data.name == "toy":
        results.update({f"student/{k}": v for k, v in generate_lib.toy_metrics(config, x).items()})
    monitor.write_results(workdir, results)
    if jax.process_index() == 0:
        print(f"student ({results['nfe']} network evaluation(s) per sample) -> {png}")
    return results


def load_student(config, workdir: str):
    """(Distiller, state) restored from a distillation `workdir` (no teacher checkpoint needed).

    Fails before compiling when `workdir` has no restorable checkpoint for this config.
    """
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no student checkpoint in {ckpt_dir}; distil one first with "
                                f"`python -m fdistill.main --config=<its config> "
                                f"--workdir={workdir} --mode=distill`")
    distiller = Distiller(config, train.build_model(config), sharding.make_mesh())
    ckpt = checkpoint.Checkpointer(ckpt_dir)
    try:
        step, state = ckpt.restore_latest(distiller.initial_state)
    finally:
        ckpt.close()
    if step is None:
        raise FileNotFoundError(f"no student checkpoint in {ckpt_dir}")
    return distiller, state


def sample(config, workdir: str) -> dict:
    """`--mode=sample` for a student: one network evaluation per sample (`student_steps` in
    general) from the EMA student; writes student_samples.png/.npz and results.json."""
    distiller, state = load_student(config, workdir)
    n = config.sampling.num_samples
    key = jax.random.key(config.seed + 2)
    batch = min(n, config.sampling.batch_size)
    draw_student_samples(distiller, state["student_ema"], batch, key, batch)   # compile
    t0 = time.time()
    x = draw_student_samples(distiller, state["student_ema"], n, key, batch)
    seconds = time.time() - t0
    png = generate_lib.save_samples(config, workdir, x, "student_samples")
    results = {"sample/nfe": len(distiller.objective.student_sigmas), "sample/num_samples": len(x),
               "sample/checkpoint_step": int(sharding.to_host(state["step"])),
               "sample/seconds_per_sample": seconds / len(x)}
    if config.data.name == "toy":
        results.update({f"sample/{k}": v for k, v in generate_lib.toy_metrics(config, x).items()})
    monitor.write_results(workdir, results)
    if jax.process_index() == 0:
        print(f"{len(x)} student samples, {results['sample/nfe']} network evaluation(s) each "
              f"-> {png}")
    return results
