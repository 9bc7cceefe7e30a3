"""The image student: one step from sigma_max noise, or a few steps with re-noising.

A student is an EDM denoiser G (initialised from the teacher) evaluated at a few fixed levels
sigma_0 = sigma_max > sigma_1 > ...: x = G(sigma_0 z), then x = G(x + sigma_k eps) for each further
level (DMD2's multi-step generator). `FewStep` is the `Generator` of `fdistill.objective` for
image students.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fdistill.sde import bcast, karras_grid

Array = jax.Array


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
    grid = karras_grid(process.sigma_min, process.sigma_max, num_steps + 1, process.rho)
    return tuple(float(s) for s in grid[:num_steps])


def generate(student, key: Array, shape: tuple[int, ...], class_labels=None, *,
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


def generate_for_training(student, key: Array, shape: tuple[int, ...], class_labels=None, *,
                          sigmas: tuple[float, ...]) -> Array:
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
    x_in = jnp.take_along_axis(jnp.stack(inputs), bcast(pick, inputs[0])[None], axis=0)[0]
    sigma = jnp.asarray(sigmas, jnp.float32)[pick]
    return student(x_in, sigma, class_labels)


@dataclasses.dataclass(frozen=True)
class FewStep:
    """The one- or few-step image student as a `Generator` (shape and labels from the batch)."""

    sigmas: tuple[float, ...]

    @property
    def num_evaluations(self) -> int:
        return len(self.sigmas)

    def training_sample(self, student, key: Array, batch: dict) -> Array:
        return generate_for_training(student, key, batch["x"].shape, batch.get("label"),
                                     sigmas=self.sigmas)

    def sample(self, student, key: Array, batch: dict) -> Array:
        return generate(student, key, batch["x"].shape, batch.get("label"), sigmas=self.sigmas)
