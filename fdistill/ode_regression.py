"""The teacher's ODE pairs and the ODE-regression initialisation of a student.

A one-step student has to become a map from noise to data that is steep where the teacher's ODE
splits the noise between modes. Distribution matching teaches that steepness slowly (each student
update only moves samples a little towards where the critic says the teacher has more mass);
regressing the student onto the teacher's own PF-ODE map teaches it directly, sample by sample.
DMD (Yin et al. 2024, Sec. 3.3) adds such a regression loss for this reason; CausVid and HiAR
initialise their video students by it. Here it is an initialisation, for images as for video:

- ``teacher_pairs``: the teacher's Heun trajectories from ``sigma_max z`` (z the teacher's process
  noise, ``teacher.process.noise``; no real data), their
  states at the student's levels and their end points x0 (``pair_substeps`` Heun steps per student
  interval, so ``2 pair_substeps - 1`` evaluations per interval).
- ``regression_loss``: each example at a random student level k, ``||G(x_k, sigma_k) - x0||^2``.
- ``initialise``: the pairs (kept in ``<dir>/ode_pairs.npz``) and ``distill.ode_init_steps`` Adam
  steps of the regression through the training loop (checkpointed in ``<dir>/ode_init``), both
  done once: a resumed distillation, or several students of one teacher sharing ``dir``
  (``distill.init_workdir``), reuse them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdistill import sampling, sharding, train
from fdistill.sde import karras_grid


def teacher_grid(student_sigmas, substeps: int, *, sigma_min: float = 0.002,
                 rho: float = 7.0) -> tuple[np.ndarray, list[int]]:
    """A Heun grid through every student level (``student_sigmas``: S + 1 values ending in 0):
    ``substeps`` Karras steps per student interval (the last one ends at ``sigma_min``, then 0).
    Returns the grid and the student levels' indices in it."""
    s = np.asarray(student_sigmas, np.float64)[:-1]
    ends = np.append(s[1:], sigma_min)
    grid, where = [], []
    for hi, lo in zip(s, ends):
        where.append(len(grid))
        grid.extend(np.asarray(karras_grid(lo, hi, substeps + 1, rho))[:substeps])
    grid.extend([sigma_min, 0.0])
    return np.asarray(grid, np.float32), where


def teacher_pairs(teacher, key, num: int, shape, student_sigmas, *, substeps: int,
                  batch_size: int = 256, num_classes: int = 0) -> dict:
    """``num`` PF-ODE trajectories of ``teacher`` (EDM denoiser ``teacher(x, sigma, labels)``).

    Returns ``{'states': [num, S, *shape]`` (the state at each student level; ``states[:, 0] =
    sigma_max z``), ``'x0': [num, *shape]``, and ``'label': [num, num_classes]`` (one-hot, drawn
    uniformly) when the teacher is class-conditional}``.
    """
    grid, where = teacher_grid(student_sigmas, substeps, sigma_min=teacher.process.sigma_min,
                               rho=teacher.process.rho)
    graphdef, state = nnx.split(teacher)

    @jax.jit
    def run(st, z, labels):
        model = nnx.merge(graphdef, st)
        x0, kept = sampling.heun_trajectory(lambda x, s: model(x, s, labels), grid[0] * z, grid,
                                            record=tuple(where))
        return jnp.stack(kept, axis=1), x0

    out = {"states": [], "x0": [], "label": []}
    for i in range(0, num, batch_size):
        k_z, k_y = jax.random.split(jax.random.fold_in(key, i))
        z = teacher.process.noise(k_z, (batch_size, *shape))
        labels = None
        if num_classes:
            labels = jax.nn.one_hot(jax.random.randint(k_y, (batch_size,), 0, num_classes),
                                    num_classes)
            out["label"].append(np.asarray(labels))
        s, x0 = run(state, z, labels)
        out["states"].append(np.asarray(s))
        out["x0"].append(np.asarray(x0))
    return {k: np.concatenate(v)[:num] for k, v in out.items() if v}


def regression_loss(student, key, pairs: dict, student_sigmas, **student_kwargs):
    """Each example at a random student level k: ``mean ||G(x_k, sigma_k) - x0||^2`` (the
    image student's ODE regression; ``student_kwargs`` go to the network)."""
    states, x0 = pairs["states"], pairs["x0"]
    b, num_steps = states.shape[:2]
    level = jax.random.randint(key, (b,), 0, num_steps)
    x_in = jnp.take_along_axis(states, level.reshape((b, 1) + (1,) * (states.ndim - 2)),
                               axis=1)[:, 0]
    sigma = jnp.asarray(student_sigmas[:num_steps], jnp.float32)[level]
    pred = student(x_in, sigma, pairs.get("label"), **student_kwargs)
    loss = jnp.mean((pred - x0) ** 2)
    return loss, {"train/ode_regression": loss}


@dataclasses.dataclass(frozen=True)
class RegressionTerm:
    """DMD's regression loss (Yin et al. 2024, Sec. 3.3, Eq. 7; squared error where DMD uses
    LPIPS) as a term of the student's loss during distribution matching:
    ``weight * regression_loss`` on the teacher's ODE pairs of ``batch['regression']``. It keeps
    the student on the teacher's ODE map where the distribution-matching gradient is weaker than
    the networks' errors."""

    weight: float
    sigmas: tuple[float, ...]
    metric_names: tuple[str, ...] = ("student/loss_regression",)

    def __call__(self, student, key, batch):
        loss, _ = regression_loss(student, key, batch["regression"], self.sigmas)
        return self.weight * loss, {"student/loss_regression": loss}


class PairBatches:
    """Deterministic minibatches of pairs for step i (this process' slice), as datasets give
    real batches: ``batch(i) -> {key: array}``."""

    def __init__(self, pairs: dict, global_batch_size: int, *, seed: int):
        self.pairs, self.global_batch_size, self.seed = pairs, int(global_batch_size), seed
        n = jax.process_count()
        if self.global_batch_size % n:
            raise ValueError(f"the pair batch {global_batch_size} is not divisible by the {n} "
                             f"processes.")
        self.local = self.global_batch_size // n

    def batch(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        idx = rng.integers(0, len(self.pairs["x0"]), self.global_batch_size)
        idx = idx[jax.process_index() * self.local:(jax.process_index() + 1) * self.local]
        return {k: v[idx] for k, v in self.pairs.items()}


def load_or_draw_pairs(path: str, draw: Callable[[], dict], num: int | None = None) -> dict:
    """The pairs in ``path`` (.npz), drawn by ``draw()`` and written there (atomically, by
    process 0) the first time; a file holding other than ``num`` pairs is refused."""
    if os.path.isfile(path):
        with np.load(path) as f:
            pairs = {k: f[k] for k in f.files}
        if num is not None and len(pairs["x0"]) != num:
            raise ValueError(f"{path} holds {len(pairs['x0'])} teacher pairs but "
                             f"distill.num_pairs is {num}: point distill.init_workdir at a new "
                             f"directory (or delete that one) to draw them again.")
        return pairs
    pairs = draw()
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **pairs)
        os.replace(tmp, path)
    return pairs


def check_settings(directory: str, dc) -> None:
    """Records the initialisation's settings in ``<directory>/settings.json`` the first time and
    refuses to resume or reuse it under other settings (its steps, batch or optimiser)."""
    settings = {"ode_init_steps": int(dc.ode_init_steps), "batch_size": int(dc.batch_size),
                "ode_init_optim": {k: float(v) for k, v in dc.ode_init_optim.items()}}
    path = os.path.join(directory, "settings.json")
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
        changed = sorted(k for k in settings if recorded.get(k) != settings[k])
        if changed:
            raise ValueError(f"the ODE-regression initialisation in {directory} was made with "
                             f"other {', '.join(changed)} ({recorded}); point "
                             f"distill.init_workdir at a new directory (or delete that one).")
        return
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as f:
            json.dump(settings, f, indent=1)


def initialise(network, pairs: dict, loss_fn, dc, workdir: str, mesh, *, seed: int):
    """``dc.ode_init_steps`` steps of ``loss_fn(model, key, batch)`` on minibatches of ``pairs``
    from ``network``'s weights (the teacher's), with ``dc.ode_init_optim`` (cosine-decayed to 0 over the steps
    when its ``decay_steps`` is set), through the training loop in ``<workdir>/ode_init``
    (resumed, never redone once complete). Returns the initialised network."""
    check_settings(os.path.join(workdir, "ode_init"), dc)
    tx = train.make_optimizer(dc.ode_init_optim)
    graphdef, others, state = train.init_state(network, tx, ("train/loss", "train/grad_norm"))
    shardings = train.state_shardings(state, mesh)
    state = jax.device_put(jax.tree.map(jnp.copy, state), shardings)   # the step donates it
    step = train.make_teacher_step(graphdef, others, loss_fn, tx, ema_rate=0.0,
                                   key=jax.random.key(seed), mesh=mesh, state_sharding=shardings)
    batches = PairBatches(pairs, dc.batch_size, seed=seed)
    steps = int(dc.ode_init_steps)
    loop = train.LoopConfig(num_steps=steps, log_every=min(int(dc.log_every), steps),
                            ckpt_every=steps, keep_checkpoints=1)
    state, _ = train.fit(workdir=os.path.join(workdir, "ode_init"), state=state,
                         state_sharding=shardings,
                         step_fn=lambda s, i: step(s, sharding.global_batch(batches.batch(i),
                                                                            mesh)),
                         loop=loop,
                         done_message=f"ODE-regression initialisation: reusing the {steps}-step "
                                      f"one in {os.path.join(workdir, 'ode_init')}")
    return train.merge(graphdef, sharding.to_host(state["params"]), others)
