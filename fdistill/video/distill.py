"""Video teacher training and HiAR self-rollout f-distillation (arXiv 2603.08703, Sec. 3-4).

- Teacher: a bidirectional ``VideoDenoiser`` trained with EDM's loss (Karras et al. 2022, eq. 2
  with lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2), one sigma per clip
  (``'shared'``) or per frame (``'per_frame'``); ``train_video_teacher`` runs it through the
  project's generic loop (``fdistill.train.fit``: sharding, orbax checkpoints, NaN guard, logs).
- Student: the teacher's weights used block-causally, optionally first regressed onto the
  teacher's ODE trajectories (CausVid's ODE initialisation): for each block a random student
  level j, input the teacher's ODE state at sigma_j, target the ODE's end point.
- Self-rollout distillation: the student generates whole clips with its own rollout
  (``hiar.rollout``, hierarchical or block-first), stopping at one random step shared by all
  blocks, through which alone the gradient flows. The clip is noised at one sigma from the Karras
  grid and the f-distill gradient (paper Eq. 7, DESIGN.md 2.2)

      g = h(r) (x0_fake - x0_teacher) / mean|x - x0_teacher|

  is applied with the bidirectional teacher and fake score. Reverse-KL (the paper's choice) has
  h = 1: no density ratio is needed. Other divergences read r = exp(logit) off a small
  discriminator on the frozen teacher's per-frame features (logistic loss, real = data clips).
  The critic (fake score, and discriminator if used) is updated every iteration, the student
  every ``critic_ratio``-th (5x as often).
- Forward-KL regulariser (HiAR Sec. 4): the teacher first samples ODE pairs (z, x0) from its own
  trajectories (no real data); the student's one-step prediction from pure noise sigma_max z,
  with attention ``fkl_mask`` over the whole clip ('bidirectional' as in the paper,
  'block_causal' as in its released code), regresses onto x0:  L_FKL = ||G(sigma_max z) - x0||^2,
  added with weight ``fkl_weight`` (0.1).
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fdistill import distill as fdistill_lib
from fdistill import divergences, monitor, sharding, train
from fdistill.data.video import get_video_dataset
from fdistill.models.video import VideoDenoiser, check_attention, check_window, get_video_model
from fdistill.video import hiar

SIGMA_MODES = ("shared", "per_frame")
FKL_MASKS = ("bidirectional", "block_causal")


# ---------------------------------------------------------------------------------------------
# Teacher.

def edm_video_loss(model: VideoDenoiser, key, batch, *, sigma_mode: str = "shared"):
    """EDM loss on clips: E[lambda(sigma) ||D(x + sigma n, sigma) - x||^2], sigma ~ log-normal.

    ``sigma_mode='shared'``: one sigma per clip; ``'per_frame'``: one per frame (diffusion
    forcing style). Returns ``(loss, metrics)`` (the train-loop contract).
    """
    if sigma_mode not in SIGMA_MODES:
        raise ValueError(f"unknown sigma_mode {sigma_mode!r}; valid: {', '.join(SIGMA_MODES)}.")
    x = batch["x"]
    b, t = x.shape[:2]
    process = model.process
    k_sigma, k_noise = jax.random.split(key)
    if sigma_mode == "shared":
        sigma = jnp.broadcast_to(process.sample_training_sigma(k_sigma, b)[:, None], (b, t))
    else:
        sigma = process.sample_training_sigma(k_sigma, b * t).reshape(b, t)
    x_t = x + sigma[:, :, None, None, None] * jax.random.normal(k_noise, x.shape)
    err = jnp.mean((model(x_t, sigma) - x) ** 2, axis=(2, 3, 4))
    loss = jnp.mean(process.loss_weight(sigma) * err)
    return loss, {"train/edm_loss": loss}


def build_teacher(config, *, seed: int | None = None) -> VideoDenoiser:
    return get_video_model(config, rngs=nnx.Rngs(config.seed if seed is None else seed))


def train_video_teacher(config, workdir: str) -> dict:
    """Trains the bidirectional video teacher (``--mode=train`` with a video config).

    Resumes from ``workdir/checkpoints``; writes ``samples.gif`` (teacher clips) and
    ``results.json`` with the teacher's motion statistics against the data's.
    """
    from fdistill.video import metrics
    mesh = sharding.make_mesh()
    t = config.training
    sharding.check_batch_size(t.batch_size, mesh)
    ds = get_video_dataset(config.data, global_batch_size=t.batch_size,
                           process_index=jax.process_index(),
                           process_count=jax.process_count(), seed=config.seed)
    model = build_teacher(config)
    tx = train.make_optimizer(config.optim, num_steps=t.num_steps)
    graphdef, others, state = train.init_state(model, tx)
    shardings = train.state_shardings(state, mesh, t.get("param_sharding", "replicated"))
    state = jax.device_put(state, shardings)
    loss_fn = functools.partial(edm_video_loss, sigma_mode=t.get("sigma_mode", "shared"))
    step = train.make_teacher_step(graphdef, others, loss_fn, tx, ema_rate=t.ema_rate,
                                   key=jax.random.key(config.seed), mesh=mesh,
                                   state_sharding=shardings)
    t0 = time.time()
    state, last = train.fit(
        workdir=workdir, state=state, state_sharding=shardings,
        step_fn=lambda s, i: step(s, sharding.global_batch(ds.batch(i), mesh)),
        loop=train.LoopConfig(num_steps=t.num_steps, log_every=t.log_every,
                              ckpt_every=t.ckpt_every,
                              keep_checkpoints=t.get("keep_checkpoints", 3)))
    params = "ema" if t.get("sample_with_ema", True) else "params"
    teacher = train.merge(graphdef, sharding.to_host(state[params]), others)
    clips = np.asarray(hiar.teacher_sample(teacher, jax.random.key(config.seed + 1),
                                           (16, *ds.shape),
                                           num_steps=config.sampling.num_steps))
    data = get_video_dataset(config.data, global_batch_size=256, seed=config.seed + 7).batch(0)
    results = {"mode": "train", "steps": int(sharding.to_host(state["step"])),
               "train_seconds": time.time() - t0,
               **{f"final/{k}": v for k, v in last.items()},
               **{f"teacher/{k}": v for k, v in metrics.motion_stats(clips).items()},
               **{f"data/{k}": v for k, v in metrics.motion_stats(data["x"]).items()}}
    if jax.process_index() == 0:
        metrics.save_gif(os.path.join(workdir, "samples.gif"), clips)
    monitor.write_results(workdir, results)
    return results


def load_video_teacher(config, workdir: str, *, use_ema: bool | None = None) -> VideoDenoiser:
    """The teacher of ``config`` with the parameters of the newest good checkpoint: the EMA
    unless ``config.training.sample_with_ema`` is False (or ``use_ema`` says otherwise)."""
    if use_ema is None:
        use_ema = config.training.get("sample_with_ema", True)
    from fdistill import checkpoint
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir) or not checkpoint.Checkpointer(ckpt_dir).all_steps():
        raise FileNotFoundError(
            f"no teacher checkpoint in {ckpt_dir}; train one first with `python -m "
            f"fdistill.main --config=configs/video.py --workdir={workdir} --mode=train`.")
    model = build_teacher(config)
    graphdef, others, template = train.init_state(model, train.make_optimizer(config.optim))
    ckpt = checkpoint.Checkpointer(ckpt_dir)
    _, state = ckpt.restore_latest(template)
    ckpt.close()
    return train.merge(graphdef, state["ema" if use_ema else "params"], others)


# ---------------------------------------------------------------------------------------------
# Teacher ODE pairs, ODE-regression initialisation, forward-KL regulariser.

def ode_pairs(teacher: VideoDenoiser, key, num: int, shape, student_sigmas, *,
              substeps: int = 5, batch_size: int = 64) -> dict:
    """The teacher's own PF-ODE trajectories (Heun, ``substeps`` steps per student interval).

    Returns ``{'states': [S, num, T, H, W, C]`` (the ODE state at each student level; states[0]
    = sigma_max z), ``'x0': [num, T, H, W, C]}``. No real data is used.
    """
    grid, where = hiar.teacher_grid(student_sigmas, substeps,
                                    sigma_min=teacher.process.sigma_min)
    graphdef, state = nnx.split(teacher)

    @jax.jit
    def run(st, z):
        x0, kept = hiar.heun(nnx.merge(graphdef, st), grid[0] * z, grid, record=tuple(where))
        return jnp.stack(kept), x0

    states, x0s = [], []
    for i in range(0, num, batch_size):
        z = jax.random.normal(jax.random.fold_in(key, i), (batch_size, *shape))
        s, x0 = run(state, z)
        states.append(s)
        x0s.append(x0)
    return {"states": jnp.concatenate(states, 1)[:, :num], "x0": jnp.concatenate(x0s)[:num]}


def ode_regression_loss(student: VideoDenoiser, key, pairs: dict, student_sigmas, *,
                        block_size: int):
    """CausVid's ODE initialisation: each block at a random student level j on the teacher's
    trajectory, block-causal prediction regressed onto the trajectory's end x0 (MSE)."""
    states, x0 = pairs["states"], pairs["x0"]
    num_steps, b, t = states.shape[:3]
    level = jax.random.randint(key, (b, t // block_size), 0, num_steps)
    level = jnp.repeat(level, block_size, axis=1)                         # [B, T]
    x_in = jnp.take_along_axis(states, level[None, :, :, None, None, None], axis=0)[0]
    sigma = jnp.asarray(student_sigmas[:num_steps], jnp.float32)[level]
    pred = student(x_in, sigma, attention="block_causal", block_size=block_size)
    return jnp.mean((pred - x0) ** 2)


def fkl_regulariser(student: VideoDenoiser, pairs: dict, *, mask: str = "bidirectional",
                    block_size: int | None = None):
    """HiAR's forward-KL regulariser: ||G(sigma_max z; mask) - x0_teacher(z)||^2 (mean).

    ``pairs['states'][0] = sigma_max z`` and ``pairs['x0']`` come from ``ode_pairs``; only the
    student is differentiated (the teacher's targets are data here).
    """
    if mask not in FKL_MASKS:
        raise ValueError(f"unknown regulariser mask {mask!r}; valid: {', '.join(FKL_MASKS)}.")
    x_T = pairs["states"][0]
    sigma = jnp.full(x_T.shape[:2], student.process.sigma_max, jnp.float32)
    pred = student(x_T, sigma, attention=mask, block_size=block_size)
    return jnp.mean((pred - jax.lax.stop_gradient(pairs["x0"])) ** 2)


def _take(pairs: dict, idx) -> dict:
    return {"states": pairs["states"][:, idx], "x0": pairs["x0"][idx]}


def ode_initialise(student: VideoDenoiser, pairs: dict, student_sigmas, *, block_size: int,
                   num_steps: int, batch_size: int, lr: float = 1e-4, seed: int = 0,
                   ) -> tuple[VideoDenoiser, list[float]]:
    """Adam on ``ode_regression_loss``; returns the student and its loss every step."""
    graphdef, params, others = train.split(student)
    tx = optax.adam(lr)
    opt = tx.init(params)
    n = pairs["x0"].shape[0]
    key = jax.random.key(seed)

    @jax.jit
    def step(params, opt, i):
        k_idx, k_lvl = jax.random.split(jax.random.fold_in(key, i))
        batch = _take(pairs, jax.random.randint(k_idx, (batch_size,), 0, n))
        loss, grads = jax.value_and_grad(lambda p: ode_regression_loss(
            train.merge(graphdef, p, others), k_lvl, batch, student_sigmas,
            block_size=block_size))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for i in range(num_steps):
        params, opt, loss = step(params, opt, i)
        losses.append(float(loss))
    return train.merge(graphdef, params, others), losses


# ---------------------------------------------------------------------------------------------
# Discriminator (only for divergences whose weighting needs the density ratio r).

class FrameDiscriminator(nnx.Module):
    """Logit of p_t / q_t from the frozen teacher's per-frame features ``[B, T, D]``:
    a 2-layer MLP per frame, then the mean over frames. Returns ``[B, 1]`` (one head)."""

    def __init__(self, dim: int, hidden: int = 64, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, features):
        return self.fc2(nnx.silu(self.fc1(features))).mean(axis=1)


def needs_ratio(divergence) -> bool:
    """Reverse-KL's h is 1 for every r: no discriminator needed."""
    return divergence.name != "reverse_kl"


# ---------------------------------------------------------------------------------------------
# Self-rollout distillation.

class VideoDistiller:
    """One HiAR iteration's losses over the four networks (teacher frozen).

    ``config.distill`` fields: divergence, order ('hierarchical' | 'block_first'),
    critic_ratio, fkl_weight, fkl_mask, index_range (Karras-grid indices for the DM noise),
    num_noise_steps; ``config.student``: num_steps, sigma_last, block_size, window.
    """

    def __init__(self, config, process, mesh=None):
        d, s = config.distill, config.student
        self.mesh = mesh
        self.divergence = divergences.get(d.divergence)
        hiar.check_order(d.order)
        if d.fkl_mask not in FKL_MASKS:
            raise ValueError(f"unknown config.distill.fkl_mask {d.fkl_mask!r}; valid: "
                             f"{', '.join(FKL_MASKS)}.")
        check_attention("block_causal", config.data.num_frames, s.block_size)
        check_window(s.window, s.block_size)
        self.order, self.fkl_weight, self.fkl_mask = d.order, d.fkl_weight, d.fkl_mask
        self.block_size, self.window = s.block_size, s.window
        self.critic_ratio = d.critic_ratio
        self.sigmas = student_sigmas_of(config, process)
        self.grid = fdistill_lib.noise_grid(process, d.num_noise_steps)
        self.index_range = tuple(d.index_range)
        self.sigma_data = process.sigma_data
        self.process = process
        self.use_ratio = needs_ratio(self.divergence)

    def generate(self, student, key, batch_size: int, shape, *, train: bool):
        """Self-rollout; when ``train``, it exits at one random step shared by all blocks."""
        k_noise, k_exit = jax.random.split(key)
        noise = self.shard(hiar.draw_noise(k_noise, len(self.sigmas) - 1, (batch_size, *shape)),
                           axis=1)
        exit_step = (jax.random.randint(k_exit, (), 0, len(self.sigmas) - 1) if train
                     else None)
        return hiar.rollout(student, noise, self.sigmas, block_size=self.block_size,
                            window=self.window, order=self.order, exit_step=exit_step)

    def shard(self, x, axis: int = 0):
        """``x`` split over the mesh's data axis along its batch dimension ``axis`` (so that
        clips the step draws itself are data parallel like the real batch); as is without a
        mesh."""
        if self.mesh is None:
            return x
        spec = (None,) * axis + (sharding.DATA_AXIS,)
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec)))

    def _noised(self, key, x):
        k_idx, k_eps = jax.random.split(key)
        idx = fdistill_lib.sample_noise_index(k_idx, x.shape[0], self.index_range)
        sigma = jnp.asarray(self.grid)[idx]
        x_t = x + sigma[:, None, None, None, None] * jax.random.normal(k_eps, x.shape)
        return x_t, jnp.broadcast_to(sigma[:, None], x.shape[:2])

    def student_loss(self, student, teacher, fake, disc, key, shape, batch_size, pairs):
        k_gen, k_noise = jax.random.split(key)
        x = self.generate(student, k_gen, batch_size, shape, train=True)
        x_t, sigma = self._noised(k_noise, x)
        x0_teacher, feats = teacher(x_t, sigma, return_features=True)
        x0_fake = fake(x_t, sigma)
        if self.use_ratio:
            r = fdistill_lib.density_ratio(disc(jax.lax.stop_gradient(feats)))
        else:
            r = jnp.ones((batch_size,), jnp.float32)
        h = fdistill_lib.f_weights(self.divergence, r)
        loss_dm = fdistill_lib.distribution_matching_loss(
            x, jax.lax.stop_gradient(x0_teacher), jax.lax.stop_gradient(x0_fake), h).mean()
        loss = loss_dm
        metrics = {"student/loss_dm": loss_dm, "student/r_mean": r.mean()}
        if self.fkl_weight > 0:
            loss_fkl = fkl_regulariser(student, pairs, mask=self.fkl_mask,
                                       block_size=self.block_size)
            loss = loss + self.fkl_weight * loss_fkl
            metrics["student/loss_fkl"] = loss_fkl
        metrics["student/loss"] = loss
        return loss, metrics

    def critic_loss(self, fake, disc, student, teacher, key, real_x):
        k_gen, k_sigma, k_eps, k_fake, k_real = jax.random.split(key, 5)
        b = real_x.shape[0]
        x = jax.lax.stop_gradient(self.generate(student, k_gen, b, real_x.shape[1:], train=True))
        sigma = self.process.sample_training_sigma(k_sigma, b)
        x_t = x + sigma[:, None, None, None, None] * jax.random.normal(k_eps, x.shape)
        sig = jnp.broadcast_to(sigma[:, None], x.shape[:2])
        loss_dsm = fdistill_lib.fake_score_loss(fake(x_t, sig), x, sigma, self.sigma_data).mean()
        metrics = {"critic/loss_dsm": loss_dsm}
        loss = loss_dsm
        if self.use_ratio:
            xf_t, sig_f = self._noised(k_fake, x)
            xr_t, sig_r = self._noised(k_real, real_x)
            feats = lambda a, s: jax.lax.stop_gradient(teacher(a, s, return_features=True)[1])
            logit_fake, logit_real = disc(feats(xf_t, sig_f)), disc(feats(xr_t, sig_r))
            loss_d = fdistill_lib.discriminator_loss(logit_fake, logit_real).mean()
            loss = loss + loss_d
            metrics.update({"critic/loss_d": loss_d, "critic/logit_real": logit_real.mean(),
                            "critic/logit_fake": logit_fake.mean()})
        metrics["critic/loss"] = loss
        return loss, metrics


def init_distill_state(config, teacher: VideoDenoiser, student: VideoDenoiser | None = None):
    """``(graphdefs, state, txs)``: student (from ``student`` or the teacher), fake score (from
    the teacher), discriminator; Adam states; student EMA; the train-loop's NaN record."""
    d = config.distill
    student = student if student is not None else _copy(teacher)
    fake = _copy(teacher)
    disc = FrameDiscriminator(teacher.net.dim, rngs=nnx.Rngs(config.seed + 3))
    g_s, p_s, o_s = train.split(student)
    g_f, p_f, o_f = train.split(fake)
    g_d, p_d, o_d = train.split(disc)
    tx_s = train.make_optimizer(d.student_optim)
    tx_c = train.make_optimizer(d.critic_optim)
    state = {"step": jnp.asarray(0, jnp.int32), "student": p_s,
             "student_ema": jax.tree.map(jnp.copy, p_s), "fake": p_f, "disc": p_d,
             "opt_student": tx_s.init(p_s), "opt_critic": tx_c.init({"fake": p_f, "disc": p_d}),
             "nonfinite": train.nonfinite_record(("student/loss", "critic/loss"))}
    graphs = {"student": (g_s, o_s), "fake": (g_f, o_f), "disc": (g_d, o_d)}
    return graphs, state, {"student": tx_s, "critic": tx_c}


def _copy(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def make_distill_steps(config, teacher: VideoDenoiser, graphs, txs, *, shape, mesh=None):
    """Jitted ``(critic_step, student_step)``, each ``(state, teacher_params, real_x, pairs)
    -> (state, metrics)``; per-step keys are ``fold_in(key, state['step'])``. With a ``mesh``,
    every batch (real, self-rolled-out, regulariser pairs) is split over its data axis and the
    state is replicated: data parallel, the gradients' mean reduced by XLA."""
    distiller = VideoDistiller(config, teacher.process, mesh)
    g_t, _, o_t = train.split(teacher)
    key = jax.random.key(config.seed)
    d = config.distill

    def models(state, teacher_params, **override):
        params = {k: override.get(k, state[k]) for k in ("student", "fake", "disc")}
        built = {k: train.merge(graphs[k][0], params[k], graphs[k][1]) for k in params}
        return built["student"], train.merge(g_t, teacher_params, o_t), built["fake"], built["disc"]

    def critic_step(state, teacher_params, real_x, pairs):
        k = jax.random.fold_in(jax.random.fold_in(key, state["step"]), 0)

        def objective(p):
            student, teacher_m, fake, disc = models(state, teacher_params, **p)
            return distiller.critic_loss(fake, disc, student, teacher_m, k, real_x)

        critic = {"fake": state["fake"], "disc": state["disc"]}
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(critic)
        updates, opt = txs["critic"].update(grads, state["opt_critic"], critic)
        critic = optax.apply_updates(critic, updates)
        new = dict(state, fake=critic["fake"], disc=critic["disc"], opt_critic=opt)
        checked = {"critic/loss": loss, "student/loss": jnp.zeros(())}
        return train.guard_finite(state, new, checked), metrics

    def student_step(state, teacher_params, real_x, pairs):
        k = jax.random.fold_in(jax.random.fold_in(key, state["step"]), 1)
        k_loss, k_pairs = jax.random.split(k)
        batch = _take(pairs, jax.random.randint(k_pairs, (d.fkl_batch_size,), 0,
                                                pairs["x0"].shape[0]))
        batch = {"states": distiller.shard(batch["states"], axis=1),
                 "x0": distiller.shard(batch["x0"])}

        def objective(p):
            student, teacher_m, fake, disc = models(state, teacher_params, student=p)
            return distiller.student_loss(student, teacher_m, fake, disc, k_loss, shape,
                                          real_x.shape[0], batch)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state["student"])
        updates, opt = txs["student"].update(grads, state["opt_student"], state["student"])
        params = optax.apply_updates(state["student"], updates)
        new = dict(state, student=params, opt_student=opt,
                   student_ema=train.ema_update(state["student_ema"], params, d.ema_rate))
        checked = {"critic/loss": jnp.zeros(()), "student/loss": loss}
        guarded = train.guard_finite(state, new, checked)
        return dict(guarded, step=state["step"]), metrics

    return jax.jit(critic_step), jax.jit(student_step)


def distill_video(config, teacher: VideoDenoiser, workdir: str, *, pairs: dict | None = None,
                  student: VideoDenoiser | None = None) -> tuple[VideoDenoiser, dict]:
    """Self-rollout f-distillation of a block-causal student from ``teacher``.

    Iteration i: a student update when ``i % critic_ratio == 0``, then a critic update (the
    critic is updated ``critic_ratio`` times as often). Runs through ``train.fit`` (resume,
    checkpoints, NaN guard, logs in ``workdir``). Returns the student (EMA parameters) and the
    final metrics. ``pairs``: teacher ODE pairs (drawn here if None); ``student``: an
    initialised student (the teacher's weights if None, after the optional ODE initialisation).
    """
    d, s = config.distill, config.student
    mesh = sharding.make_mesh()
    for what, size in (("distill.batch_size", d.batch_size),
                       ("distill.fkl_batch_size", d.fkl_batch_size)):
        try:
            sharding.check_batch_size(size, mesh)
        except ValueError as e:
            raise ValueError(f"config.{what}: {e}") from e
    ds = get_video_dataset(config.data, global_batch_size=d.batch_size,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           seed=config.seed)
    sigmas = student_sigmas_of(config, teacher.process)
    if pairs is None:
        pairs = ode_pairs(teacher, jax.random.key(config.seed + 11), d.num_pairs, ds.shape,
                          sigmas, substeps=d.pair_substeps)
    if student is None and d.ode_init_steps > 0:
        student, _ = ode_initialise(_copy(teacher), pairs, sigmas, block_size=s.block_size,
                                    num_steps=d.ode_init_steps, batch_size=d.batch_size,
                                    lr=d.student_optim.lr, seed=config.seed)
    graphs, state, txs = init_distill_state(config, teacher, student)
    critic_step, student_step = make_distill_steps(config, teacher, graphs, txs, shape=ds.shape,
                                                   mesh=mesh)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    state = jax.device_put(state, shardings)
    teacher_params = jax.device_put(train.split(teacher)[1], sharding.replicated(mesh))
    pairs = jax.device_put(pairs, sharding.replicated(mesh))

    student_metrics = {}

    def step_fn(state, i):
        real_x = sharding.global_batch(ds.batch(i), mesh)["x"]
        if i % d.critic_ratio == 0:
            state, metrics = student_step(state, teacher_params, real_x, pairs)
            student_metrics.update(metrics)
        state, critic_metrics = critic_step(state, teacher_params, real_x, pairs)
        return state, {**student_metrics, **critic_metrics}

    state, last = train.fit(workdir=workdir, state=state, state_sharding=shardings,
                            step_fn=step_fn,
                            loop=train.LoopConfig(num_steps=d.num_iters,
                                                  log_every=d.log_every,
                                                  ckpt_every=d.get("ckpt_every", d.num_iters)))
    g_s, o_s = graphs["student"]
    return train.merge(g_s, state["student_ema"], o_s), last


def load_video_student(config, teacher: VideoDenoiser, workdir: str) -> VideoDenoiser:
    """The distilled student (EMA parameters) of the newest good checkpoint of ``distill_video``."""
    from fdistill import checkpoint
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir) or not checkpoint.Checkpointer(ckpt_dir).all_steps():
        raise FileNotFoundError(f"no distillation checkpoint in {ckpt_dir}; run distill_video "
                                f"(or experiments/video_hiar.py) first.")
    graphs, template, _ = init_distill_state(config, teacher)
    ckpt = checkpoint.Checkpointer(ckpt_dir)
    _, state = ckpt.restore_latest(template)
    ckpt.close()
    g_s, o_s = graphs["student"]
    return train.merge(g_s, state["student_ema"], o_s)


def student_sigmas_of(config, process) -> np.ndarray:
    """The student's step levels from ``config.student`` (S + 1 values ending in 0)."""
    s = config.student
    return hiar.step_sigmas(s.num_steps, sigma_max=process.sigma_max, sigma_last=s.sigma_last,
                            rho=process.rho)


# ---------------------------------------------------------------------------------------------
# Evaluation and the command-line modes (--mode=distill / sample with a video config).

def evaluate_student(student, config, key, order: str, data_speed: float
                     ) -> tuple[dict, np.ndarray]:
    """Motion at the training length and drift over a rollout ``eval.rollout_factor`` times
    longer (sliding KV window): (metrics row, the long clips)."""
    from fdistill.video import metrics
    s = config.student
    sigmas = student_sigmas_of(config, student.process)
    shape = (config.eval.num_clips, config.data.num_frames, config.data.size, config.data.size,
             config.data.get("channels", 1))
    k_short, k_long = jax.random.split(key)
    short = np.asarray(hiar.sample(student, hiar.draw_noise(k_short, s.num_steps, shape), sigmas,
                                   block_size=s.block_size, window=s.window, order=order))
    long_shape = (shape[0], shape[1] * config.eval.rollout_factor, *shape[2:])
    long = np.asarray(hiar.sample(student, hiar.draw_noise(k_long, s.num_steps, long_shape),
                                  sigmas, block_size=s.block_size, window=s.window, order=order))
    row = metrics.motion_stats(short, square=config.data.square)
    row["speed_ratio"] = row["speed"] / data_speed
    row["drift"] = metrics.drift(long, config.data.num_frames, square=config.data.square)["slope"]
    return row, long


def _teacher_of(config) -> VideoDenoiser:
    workdir = config.distill.get("teacher_workdir", "")
    if not workdir:
        raise ValueError("config.distill.teacher_workdir is empty: point it at a trained video "
                         "teacher, e.g. --config.distill.teacher_workdir=runs/video")
    return load_video_teacher(config, workdir)


def _data_speed(config) -> float:
    from fdistill.video import metrics
    clips = get_video_dataset(config.data, global_batch_size=256, seed=config.seed + 7).batch(0)
    return metrics.motion_stats(clips["x"], square=config.data.square)["speed"]


def _write_student_results(config, workdir: str, student, results: dict) -> dict:
    from fdistill.video import metrics
    row, long = evaluate_student(student, config, jax.random.key(config.seed + 3),
                                 config.distill.order, _data_speed(config))
    results.update({f"student/{k}": float(v) for k, v in row.items()})
    if jax.process_index() == 0:
        metrics.save_gif(os.path.join(workdir, "student_rollout.gif"), long[:16])
        shown = "  ".join(f"{k}={v:.4g}" for k, v in row.items())
        print(f"student ({config.student.num_steps} steps, {config.distill.order}): {shown}")
    monitor.write_results(workdir, results)
    return results


def distill(config, workdir: str) -> dict:
    """``--mode=distill`` with a video config: HiAR self-rollout distillation of the teacher in
    ``config.distill.teacher_workdir`` (ODE pairs, ODE-regression initialisation, then
    ``distill_video``), followed by the student's motion and drift (``student_rollout.gif``,
    results.json)."""
    teacher = _teacher_of(config)
    t0 = time.time()
    student, last = distill_video(config, teacher, workdir)
    results = {"mode": "distill", "divergence": config.distill.divergence,
               "order": config.distill.order, "fkl_weight": float(config.distill.fkl_weight),
               "fkl_mask": config.distill.fkl_mask, "distill_seconds": time.time() - t0,
               **{f"final/{k}": float(v) for k, v in last.items()}}
    return _write_student_results(config, workdir, student, results)


def sample(config, workdir: str) -> dict:
    """``--mode=sample`` with a video config: the distilled student's rollout when ``workdir``
    holds a distillation checkpoint (its motion, drift and ``student_rollout.gif``), else the
    teacher's Heun clips (``samples.gif`` and motion against the data's)."""
    from fdistill import checkpoint
    from fdistill.video import metrics
    teacher_dir = config.distill.get("teacher_workdir", "")
    if not teacher_dir or os.path.abspath(teacher_dir) != os.path.abspath(workdir):
        try:
            student = load_video_student(config, build_teacher(config), workdir)
        except (FileNotFoundError, checkpoint.CheckpointError):
            student = None  # no checkpoint, or a teacher's: not the distillation state
        if student is not None:
            return _write_student_results(config, workdir, student, {"mode": "sample"})
    teacher = load_video_teacher(config, workdir)
    shape = (config.eval.num_clips, config.data.num_frames, config.data.size, config.data.size,
             config.data.get("channels", 1))
    clips = np.asarray(hiar.teacher_sample(teacher, jax.random.key(config.seed + 2), shape,
                                           num_steps=config.sampling.num_steps))
    results = {"mode": "sample", "sample/nfe": 2 * int(config.sampling.num_steps) - 1,
               **{f"teacher/{k}": float(v) for k, v in metrics.motion_stats(
                   clips, square=config.data.square).items()},
               "data/speed": _data_speed(config)}
    if jax.process_index() == 0:
        metrics.save_gif(os.path.join(workdir, "samples.gif"), clips[:16])
        print(f"{len(clips)} teacher clips ({results['sample/nfe']} network evaluations each): "
              f"speed {results['teacher/speed']:.3f} px/frame (data {results['data/speed']:.3f})"
              f" -> {os.path.join(workdir, 'samples.gif')}")
    monitor.write_results(workdir, results)
    return results
