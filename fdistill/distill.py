"""Distillation state and steps: one state pytree, jitted donated sharded student and critic steps.

`Distillation` holds the four networks of f-distill (student, its EMA, fake score, discriminator;
the frozen teacher's parameters are an argument of the steps, never a compile-time constant and
never donated) and the steps of the update schedule: iteration i updates the student when
i % student_update_every == 0 and the critic (fake score + discriminator) otherwise. The student
EMA is updated at every iteration, critic iterations included (the student is unchanged there, so
its EMA keeps moving towards it). The objective (`fdistill.objective.FDivergenceObjective`)
decides what is computed; this module only updates parameters. Images and video use it alike;
the loop around it is `fdistill.train.fit`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fdistill import sharding, train
from fdistill.objective import FDivergenceObjective

NETWORK_KEYS = ("student", "student_ema", "fake_score", "disc")
OPT_KEYS = ("opt_student", "opt_fake_score", "opt_disc")
GUARDED = ("student/loss", "student/grad_norm", "critic/loss", "critic/grad_norm")


class Distillation:
    """f-distill of one teacher: the state pytree and the jitted student and critic steps.

    State (donated; parameter-shaped entries sharded per `param_sharding`, the rest replicated):
    `{'step', 'student', 'student_ema', 'fake_score', 'disc', 'opt_student', 'opt_fake_score',
    'opt_disc', 'ratio_ema', 'metrics', 'nonfinite'}`. Student and fake score start from the
    teacher's weights (the student from `student` when given, e.g. after an initialisation).
    `dc` is `config.distill` (optimisers, `student_update_every`, `ema_rate`, `param_sharding`).
    Batches are `{'x': real data, 'label': one-hot or None, ...}` (extra entries are read by
    the objective's extra terms).
    """

    def __init__(self, objective: FDivergenceObjective, teacher: nnx.Module,
                 discriminator: nnx.Module, dc, mesh, *, seed: int,
                 student: nnx.Module | None = None):
        self.objective, self.mesh = objective, mesh
        self.every = int(dc.student_update_every)
        if self.every < 2:
            raise ValueError(f"config.distill.student_update_every must be >= 2 (one student step "
                             f"per `every` iterations, the others train the critic); got "
                             f"{self.every}.")
        self.graphdef, teacher_params, self.others = train.split(teacher)
        student_params = teacher_params if student is None else train.split(student)[1]
        self.disc_graphdef, disc_params, self.disc_others = train.split(discriminator)
        self.tx = {k: train.make_optimizer(dc[f"{k}_optim"])
                   for k in ("student", "fake_score", "disc")}
        copy = lambda t: jax.tree.map(jnp.copy, t)
        state = {
            "step": jnp.asarray(0, jnp.int32),
            "student": copy(student_params), "student_ema": copy(student_params),
            "fake_score": copy(teacher_params), "disc": disc_params,
            "opt_student": self.tx["student"].init(student_params),
            "opt_fake_score": self.tx["fake_score"].init(teacher_params),
            "opt_disc": self.tx["disc"].init(disc_params),
            "ratio_ema": objective.init_ratio_ema(),
            "metrics": {k: jnp.asarray(0.0, jnp.float32) for k in objective.metric_names()},
            "nonfinite": train.nonfinite_record(GUARDED, NETWORK_KEYS + OPT_KEYS + ("ratio_ema",)),
        }
        mode = dc.get("param_sharding", "replicated")
        self.state_sharding = {
            k: (sharding.param_shardings(v, mesh, mode) if k in NETWORK_KEYS + OPT_KEYS
                else jax.tree.map(lambda _: sharding.replicated(mesh), v))
            for k, v in state.items()}
        self.teacher_sharding = sharding.param_shardings(teacher_params, mesh, mode)
        self.initial_state = jax.device_put(state, self.state_sharding)
        self.teacher_params = jax.device_put(teacher_params, self.teacher_sharding)
        self.key = jax.random.key(seed)
        self.ema_rate = float(dc.ema_rate)
        jit = lambda fn: jax.jit(
            fn, donate_argnums=0,
            in_shardings=(self.state_sharding, self.teacher_sharding,
                          sharding.batch_sharding(mesh), sharding.replicated(mesh)),
            out_shardings=(self.state_sharding, sharding.replicated(mesh)))
        self.student_step = jit(self._student_step)
        self.critic_step = jit(self._critic_step)

    # --- modules from parameters -------------------------------------------------------------
    def denoiser(self, params) -> nnx.Module:
        return train.merge(self.graphdef, params, self.others)

    def discriminator(self, params) -> nnx.Module:
        return train.merge(self.disc_graphdef, params, self.disc_others)

    def _finish(self, old, new, metrics, guarded):
        new = dict(new, metrics=dict(old["metrics"], **metrics),
                   student_ema=train.ema_update(old["student_ema"], new["student"],
                                                self.ema_rate))
        values = {k: guarded.get(k, jnp.asarray(0.0, jnp.float32)) for k in GUARDED}
        new = train.guard_finite(old, new, values)
        return new, new["metrics"]

    # --- the two steps -----------------------------------------------------------------------
    def _student_step(self, state, teacher_params, batch, key):
        key = jax.random.fold_in(key, state["step"])
        teacher = self.denoiser(teacher_params)
        fake = self.denoiser(state["fake_score"])
        disc = self.discriminator(state["disc"])

        def loss_fn(params):
            return self.objective.student_loss(self.denoiser(params), teacher, fake, disc, key,
                                               batch, state["ratio_ema"])

        return self.student_update(state, loss_fn)

    def student_update(self, state, loss_fn):
        """The student's optimiser step on ``loss_fn(params) -> (loss, (metrics, ratio_ema))``,
        then the EMA and the finite guard (traced inside a jitted step)."""
        (loss, (metrics, ratio_ema)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["student"])
        updates, opt = self.tx["student"].update(grads, state["opt_student"], state["student"])
        params = optax.apply_updates(state["student"], updates)
        grad_norm = optax.tree.norm(grads)
        metrics = dict(metrics, **{"student/grad_norm": grad_norm})
        new = dict(state, student=params, opt_student=opt, ratio_ema=ratio_ema)
        return self._finish(state, new, metrics,
                            {"student/loss": loss, "student/grad_norm": grad_norm})

    def _critic_step(self, state, teacher_params, batch, key):
        key = jax.random.fold_in(key, state["step"])
        teacher = self.denoiser(teacher_params)
        student = self.denoiser(state["student"])

        def loss_fn(params):
            fake_params, disc_params = params
            return self.objective.critic_loss(self.denoiser(fake_params),
                                              self.discriminator(disc_params), student, teacher,
                                              key, batch)

        params = (state["fake_score"], state["disc"])
        (loss, metrics), (g_fake, g_disc) = jax.value_and_grad(loss_fn, has_aux=True)(params)
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

    def is_student_iteration(self, i: int) -> bool:
        return i % self.every == 0

    def step(self, state, i: int, batch):
        """Iteration i: the student step if i % student_update_every == 0, else the critic step.
        Both are jitted ``(state, teacher_params, batch, key) -> (state, metrics)``; the seed's
        key is an argument, not a constant, so one compiled program serves every seed."""
        fn = self.student_step if self.is_student_iteration(i) else self.critic_step
        return fn(state, self.teacher_params, batch, self.key)

    # --- sampling ----------------------------------------------------------------------------
    def sample_fn(self):
        """`draw(params, key, batch) -> x`: the student's inference sampler, jitted (the batch
        gives the shape and the labels)."""

        @jax.jit
        def draw(params, key, batch):
            return self.objective.generator.sample(self.denoiser(params), key, batch)

        return draw
