"""What video distillation adds to f-distill (HiAR, arXiv 2603.08703, Sec. 3-4).

Video students are distilled by the shared core (`fdistill.objective`, `fdistill.distill`) with
three pieces injected:

- `SelfRollout`, the generator: the student generates whole clips with its own autoregressive
  rollout (`hiar.rollout`, hierarchical or block-first), stopping at one random step shared by
  all blocks, through which alone the gradient flows (self-rollout training).
- `MotionRegulariser`, an extra student term (HiAR's forward-KL regulariser, Eq. 10): the
  teacher samples ODE trajectories of its own (no real data); at one of the student's first K
  steps k (drawn per iteration), the student's prediction from the trajectory state at sigma_k,
  with attention `mask` over the whole clip ('bidirectional' as in the paper, 'block_causal' as
  in its released code), regresses onto the teacher's chord to the next checkpoint extended to
  sigma = 0 (`fkl.chord_x0`; the ODE end point as an option), weight `fkl_weight` (0.1).
- the teacher's ODE pairs and the ODE-regression initialisation of the student (CausVid): for
  each block a random student level j, input the teacher's ODE state at sigma_j, target the
  ODE's end point.

`prepare_student` runs the last two once per workdir (cached there, so a resumed distillation
does not redo them); `fdistill.modes` wires everything together.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdistill import ode_regression
from fdistill.models.video import check_attention, check_window
from fdistill.video import fkl, hiar

FKL_MASKS = ("bidirectional", "block_causal")
NOISE_SCHEDULES = ("shifted", "karras_grid")


def student_sigmas_of(config, process) -> np.ndarray:
    """The student's step levels from ``config.student`` (S + 1 values ending in 0)."""
    s = config.student
    return hiar.step_sigmas(s.num_steps, sigma_max=process.sigma_max, sigma_last=s.sigma_last,
                            rho=process.rho)


def noise_of(dc, grid_noise):
    """The noise distribution of the distribution-matching loss and of the critic (one object,
    so the critic is trained on the levels the loss queries it on): ``dc.noise_schedule``
    ``'shifted'`` (HiAR / Self-Forcing's timestep shift ``dc.timestep_shift``, `fkl.ShiftedNoise`)
    or ``'karras_grid'`` (``grid_noise``, f-distill's image schedule)."""
    schedule = dc.get("noise_schedule", "karras_grid")
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"unknown config.distill.noise_schedule {schedule!r}; valid: "
                         f"{', '.join(NOISE_SCHEDULES)}.")
    if schedule == "shifted":
        return fkl.ShiftedNoise(float(dc.get("timestep_shift", 5.0)))
    return grid_noise


# ---------------------------------------------------------------------------------------------
# The generator: self-rollout.

@dataclasses.dataclass(frozen=True)
class SelfRollout:
    """The block-causal video student as a `Generator`: a rollout over ``sigmas`` (S + 1 levels
    ending in 0) in ``order`` with the hierarchical order's ``context`` level; training samples
    exit at one random step shared by all blocks. The rollout's noise (initial and re-noising)
    is the teacher's ``process`` noise (`hiar.draw_noise`). ``constrain`` (optional) places
    self-drawn noise like the batch (data parallel)."""

    sigmas: tuple[float, ...]
    block_size: int
    window: int
    process: Any = None
    order: str = "hierarchical"
    context: str = "output"
    constrain: Callable | None = None

    def __post_init__(self):
        if not hasattr(self.process, "noise"):
            raise ValueError("SelfRollout needs the teacher's process (its noise sampler); got "
                             f"{self.process!r}.")
        hiar.check_order(self.order)
        hiar.check_context(self.context)
        check_window(self.window, self.block_size)

    @property
    def num_evaluations(self) -> int:
        return len(self.sigmas) - 1

    def _rollout(self, student, key, batch, *, train: bool):
        k_noise, k_exit = jax.random.split(key)
        shape = batch["x"].shape
        check_attention("block_causal", shape[1], self.block_size)
        noise = hiar.draw_noise(k_noise, len(self.sigmas) - 1, shape, self.process)
        if self.constrain is not None:
            noise = self.constrain(noise, axis=1)
        exit_step = (jax.random.randint(k_exit, (), 0, len(self.sigmas) - 1) if train else None)
        return hiar.rollout(student, noise, np.asarray(self.sigmas, np.float32),
                            block_size=self.block_size, window=self.window, order=self.order,
                            exit_step=exit_step, context=self.context)

    def training_sample(self, student, key, batch):
        return self._rollout(student, key, batch, train=True)

    def sample(self, student, key, batch):
        """The critic trains on what the student is trained to produce: the same random-exit
        rollout (without gradient)."""
        return self._rollout(student, key, batch, train=True)


# ---------------------------------------------------------------------------------------------
# The forward-KL motion regulariser (an extra student term).

@dataclasses.dataclass(frozen=True)
class MotionRegulariser:
    """HiAR's forward-KL regulariser (Sec. 4, Eq. 10) on the teacher's ODE pairs ``batch['fkl']``
    (``{'states': [B, S, T, ...], 'x0': [B, T, ...]}``: the trajectory at the student levels
    ``sigmas[:-1]`` and its end point).

    Per iteration one of the first ``num_constrained`` (K) steps k is drawn uniformly
    (`fkl.choose_constrained_step`); the student's prediction from the trajectory state at
    sigma_k, with attention ``mask`` over the whole clip, regresses onto ``target``:
    ``'chord'`` (the paper's, `fkl.chord_x0`) or ``'end_point'`` (the ODE's x0):
    weight * ||G(x_k, sigma_k; mask) - sg(target_k)||^2.
    """

    weight: float
    sigmas: tuple[float, ...]
    num_constrained: int = 1
    target: str = "chord"
    mask: str = "bidirectional"
    block_size: int | None = None
    metric_names: tuple[str, ...] = ("student/loss_fkl",)

    def __post_init__(self):
        if self.mask not in FKL_MASKS:
            raise ValueError(f"unknown regulariser mask {self.mask!r}; valid: "
                             f"{', '.join(FKL_MASKS)}.")
        if self.target not in fkl.FKL_TARGETS:
            raise ValueError(f"unknown forward-KL target {self.target!r}; valid: "
                             f"{', '.join(fkl.FKL_TARGETS)}.")
        num_steps = len(self.sigmas) - 1
        if not 1 <= self.num_constrained <= num_steps:
            raise ValueError(f"the number of constrained steps K = {self.num_constrained} must "
                             f"lie in [1, {num_steps}] (the student's steps).")

    def __call__(self, student, key, batch):
        pairs = batch["fkl"]
        step = fkl.choose_constrained_step(key, self.num_constrained, len(self.sigmas) - 1)
        x_in, sigma_in, target = fkl.fkl_example(jnp.moveaxis(pairs["states"], 1, 0),
                                                 pairs["x0"], self.sigmas, step,
                                                 target=self.target)
        pred = student(x_in, sigma_in, attention=self.mask, block_size=self.block_size)
        loss = jnp.mean((pred - jax.lax.stop_gradient(target)) ** 2)
        return self.weight * loss, {"student/loss_fkl": loss}


# ---------------------------------------------------------------------------------------------
# Teacher ODE pairs and the ODE-regression initialisation.

def ode_regression_loss(student, key, pairs: dict, student_sigmas, *, block_size: int):
    """CausVid's ODE initialisation: each block at a random student level j on the teacher's
    trajectory, block-causal prediction regressed onto the trajectory's end x0 (MSE)."""
    states, x0 = pairs["states"], pairs["x0"]
    b, num_steps, t = states.shape[:3]
    level = jax.random.randint(key, (b, t // block_size), 0, num_steps)
    level = jnp.repeat(level, block_size, axis=1)                         # [B, T]
    x_in = jnp.take_along_axis(states, level[:, None, :, None, None, None], axis=1)[:, 0]
    sigma = jnp.asarray(student_sigmas[:num_steps], jnp.float32)[level]
    pred = student(x_in, sigma, attention="block_causal", block_size=block_size)
    loss = jnp.mean((pred - x0) ** 2)
    return loss, {"train/ode_regression": loss}


def prepare_student(config, teacher, workdir: str, mesh) -> tuple[nnx.Module, dict]:
    """The ODE pairs and the ODE-initialised student of a video distillation in ``workdir``.

    Pairs are drawn once and kept in ``<workdir>/ode_pairs.npz``; the initialisation runs through
    the training loop in ``<workdir>/ode_init`` (resumed, never redone once complete). Returns
    (student, pairs); the student is the teacher's network with the initialised weights (the
    teacher's own when ``distill.ode_init_steps`` is 0).
    """
    d = config.distill
    sigmas = student_sigmas_of(config, teacher.process)
    shape = (config.data.num_frames, config.data.size, config.data.size,
             config.data.get("channels", 1))
    pairs = ode_regression.load_or_draw_pairs(
        os.path.join(workdir, "ode_pairs.npz"),
        lambda: ode_regression.teacher_pairs(teacher, jax.random.key(config.seed + 11),
                                             int(d.num_pairs), shape, sigmas,
                                             substeps=int(d.pair_substeps), batch_size=64),
        num=int(d.num_pairs))
    if d.ode_init_steps <= 0:
        return teacher, pairs

    def loss_fn(model, key, batch):
        return ode_regression_loss(model, key, batch, sigmas, block_size=config.student.block_size)

    student = ode_regression.initialise(teacher, pairs, loss_fn, d, workdir, mesh,
                                        seed=config.seed)
    return student, pairs


def fkl_batches(pairs: dict, global_batch_size: int, *,
                seed: int) -> ode_regression.PairBatches:
    """Minibatches of the regulariser's pairs ``{'states', 'x0'}`` (the teacher's trajectory at
    the student levels and its end point)."""
    return ode_regression.PairBatches(pairs, global_batch_size, seed=seed + 1)
