"""The command-line modes: each loads what it needs, runs a loop or a sampler, writes results.

    train       a teacher (images, toys or video), resumed from <workdir>/checkpoints
    sample      samples of the teacher or the student in <workdir>
    likelihood  NLL / bits per dim of the teacher through the probability-flow ODE
    distill     f-distill of the teacher in config.distill.teacher_workdir into a student
    fid_stats   reference statistics of the dataset in config.eval.features
    eval        FID / fd_<dataset> (+ IS, precision/recall) of the teacher or student in <workdir>

Every mode records its config in ``<workdir>/config.json``. The modes that build on a run read
that run's record: a distillation takes the teacher's ``model``, ``process`` and ``data``
sections from ``<teacher_workdir>/config.json`` (its own config carries the ``distill`` section
and the overrides: ``seed``, ``eval``, ``sampling``, ``student``, ``data.data_dir``), and
sample / eval / likelihood take them (and a student's ``distill`` / ``student`` sections) from
the workdir they read. The loops and steps below know no modes; evaluation is handed sampling
functions and never builds models.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fdistill import (checkpoint, data, divergences, losses, models, monitor, sampling, sde,
                      sharding, train)
from fdistill import distill as distill_lib
from fdistill import likelihood as likelihood_lib
from fdistill import objective as objective_lib
from fdistill import ode_regression
from fdistill import student as student_lib
from fdistill import workdir as workdir_lib
from fdistill.models import edm_import
from fdistill.evaluation import fid as fid_lib
from fdistill.evaluation import scoring
from fdistill.evaluation import toy as toy_eval
from fdistill.video import distill as video_distill
from fdistill.video import metrics as video_metrics

TEACHER_SECTIONS = ("model", "process", "data")
STUDENT_SECTIONS = ("distill", "student")


# =================================================================================================
# Configs recorded in workdirs.

def resolve_config(config, recorded, sections=TEACHER_SECTIONS) -> ml_collections.ConfigDict:
    """``config`` with ``sections`` replaced by those of a run's ``recorded`` config (an explicit
    ``data.data_dir`` in ``config`` is kept: data may live elsewhere on this machine)."""
    out = ml_collections.ConfigDict(config.to_dict())
    data_dir = config.get("data", {}).get("data_dir", "") if "data" in config else ""
    for name in sections:
        if name in recorded:
            out[name] = ml_collections.ConfigDict(recorded[name].to_dict())
    if data_dir:
        out.data.data_dir = data_dir
    return out


def recorded_mode(workdir: str) -> str | None:
    """The mode that produced ``workdir`` (from its config.json), or None."""
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("mode")


def is_student_workdir(workdir: str) -> bool:
    return recorded_mode(workdir) == "distill"


def run_config(config, workdir: str) -> ml_collections.ConfigDict:
    """The config to sample / evaluate the run in ``workdir`` with: the run's own networks
    (teacher sections, and the student's sections for a distillation) and ``config``'s
    settings for the rest."""
    if not os.path.isfile(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
        return config
    recorded = workdir_lib.read_config(workdir)
    sections = TEACHER_SECTIONS + (STUDENT_SECTIONS if is_student_workdir(workdir) else ())
    return resolve_config(config, recorded, sections)


@contextlib.contextmanager
def recorded_run(workdir: str, config, mode: str):
    """Records ``config`` in ``<workdir>/config.json`` for the run inside the block. A checkpoint
    there that does not fit the config is reported with the fields that differ from the previous
    record, and the previous record is put back (it still describes the checkpoint)."""
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    previous = None
    if os.path.isfile(path):
        with open(path) as f:
            previous = f.read()
    explanation = workdir_lib.explain_mismatch(workdir, config)
    workdir_lib.write_config(workdir, config, mode=mode)
    try:
        yield
    except checkpoint.CheckpointMismatchError as e:
        if previous is not None and jax.process_index() == 0:
            workdir_lib.write_json(path, json.loads(previous))
        raise checkpoint.CheckpointMismatchError(
            str(e) + explanation, directory=e.directory, step=e.step,
            differences=e.differences) from None


def is_video(config) -> bool:
    return config.data.name == "video"


def sharded_batch_sizes(config, mode: str) -> list[int]:
    """The global batch sizes that ``mode``'s steps split over the devices (each device needs an
    equal share): the teacher's training batch, or the distillation batch and the video
    regulariser's. Sampling and evaluation split a batch only when the devices divide it."""
    if mode in ("train", "quickstart"):
        return [config.training.batch_size]
    dc = config.get("distill")
    if mode != "distill" or dc is None:
        return []
    sizes = [dc.batch_size]
    if config.data.get("name") == "video" and dc.get("fkl_weight", 0.0) > 0:
        sizes.append(dc.fkl_batch_size)
    return sizes


# =================================================================================================
# Building blocks: models, data, samplers, saved samples.

def build_model(config, *, seed: int | None = None) -> nnx.Module:
    return models.get_model(config, rngs=nnx.Rngs(config.seed if seed is None else seed))


def load_teacher(config, workdir: str, *, use_ema: bool | None = None) -> tuple[nnx.Module, int]:
    """The model of ``config`` with the (EMA) parameters of the newest good checkpoint in
    ``workdir`` (the EMA unless ``config.training.sample_with_ema`` is False). Fails before
    compiling anything when there is no checkpoint or its shapes do not match."""
    if use_ema is None:
        use_ema = bool(config.training.get("sample_with_ema", True))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = checkpoint.Checkpointer(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if ckpt is None or not ckpt.all_steps():
        raise FileNotFoundError(
            f"no checkpoint in {ckpt_dir}; train one first with `python -m fdistill.main "
            f"--config=<its config> --workdir={workdir} --mode=train`")
    graphdef, others, template = train.init_state(build_model(config),
                                                  train.make_optimizer(config.optim))
    try:
        step, state = ckpt.restore_latest(template)
    except checkpoint.CheckpointMismatchError as e:
        raise checkpoint.CheckpointMismatchError(
            str(e) + workdir_lib.explain_mismatch(workdir, config), directory=e.directory,
            step=e.step, differences=e.differences) from None
    finally:
        ckpt.close()
    return train.merge(graphdef, state["ema" if use_ema else "params"], others), step


def dataset(config, global_batch_size: int, *, seed: int | None = None):
    return data.get_dataset(config.data, global_batch_size=global_batch_size,
                            process_index=jax.process_index(), process_count=jax.process_count(),
                            seed=config.seed if seed is None else seed)


def with_one_hot_labels(batch: dict, num_classes: int) -> dict:
    """A data batch as the networks take it: ``{'x', 'label'}`` with one-hot labels (None when
    unconditional)."""
    labels = None
    if num_classes:
        labels = np.eye(num_classes, dtype=np.float32)[np.asarray(batch["label"])]
    return {"x": batch["x"], "label": labels}


def label_draws(config, key, batch_size: int):
    """``labels(i) -> (one-hot or None, class indices or None)`` for sample batch i: classes
    drawn uniformly at random from ``key`` (EDM's convention), the same for every call."""
    k = int(config.data.get("num_classes", 0))

    def labels(i):
        one_hot = sampling.random_class_labels(jax.random.fold_in(key, i), batch_size, k)
        return one_hot, (None if one_hot is None else np.asarray(one_hot.argmax(axis=-1)))

    return labels


CHURN_OPTIONS = ("S_churn", "S_min", "S_max", "S_noise")


def churn_options(config) -> dict:
    """EDM's stochastic sampler options (S_churn, S_min, S_max, S_noise) of
    ``config.sampling``; {} when S_churn is 0 (the deterministic Heun)."""
    s = config.sampling
    if not s.get("S_churn", 0.0):
        return {}
    return {"S_churn": float(s.S_churn), "S_min": float(s.get("S_min", 0.0)),
            "S_max": float(s.get("S_max", float("inf"))), "S_noise": float(s.get("S_noise", 1.0))}


def _finite_or_none(v):
    """A recorded value: None for an unbounded (infinite) option, so results.json stays strict
    JSON."""
    return None if v is None or not math.isfinite(v) else v


class TeacherSampler:
    """``sampler(params, key, labels) -> x`` for the teacher with ``config.sampling``'s sampler
    (or ``sampler_name`` / ``num_steps``), jitted over the parameters so that new weights
    (periodic evaluation) reuse the compiled sampler, the batch split over this process' devices
    when it has several (``sharding.SplitBatch``; ``devices`` to choose them). ``nfe``: network
    evaluations per sample. Heun takes ``config.sampling``'s S_churn, S_min, S_max and S_noise
    (``churn``: {} for the deterministic sampler)."""

    def __init__(self, config, graphdef, others, batch_size: int, *,
                 sampler_name: str | None = None, num_steps: int | None = None, devices=None):
        s = config.sampling
        name, steps = sampler_name or s.sampler, num_steps or s.num_steps
        self.churn = churn_options(config) if name == "heun" else {}
        sampler = sampling.get_sampler(name, num_steps=steps, snr=s.snr,
                                       n_corrector=s.n_corrector, **self.churn)
        process = sde.sde_from_config(config.process)
        shape = (batch_size,) + data.example_shape(config.data)
        self.guidance = float(s.guidance) if config.data.get("num_classes", 0) else 1.0
        self.nfe = sampling.sampler_nfe(name, process, num_steps=steps,
                                        n_corrector=s.n_corrector, guidance=self.guidance)
        self.name, self.num_steps = name, steps

        def draw(params, key, labels):
            net = train.merge(graphdef, params, others)
            denoise_fn = lambda x, t, c: net(x, t, c)
            if self.guidance != 1.0:
                denoise_fn = sampling.guided(denoise_fn, self.guidance)
            return sampler(denoise_fn, process, key, shape, labels)[0]

        self._draw = sharding.SplitBatch(draw, batch_size, batch_argnums=(2,), devices=devices)
        self.num_devices = self._draw.num_devices

    def lower(self, params, key, labels):
        return self._draw.lower(params, key, labels)

    def __call__(self, params, key, labels):
        return self._draw(params, key, labels)


def teacher_sampler(config, model, batch_size: int, **options):
    """(sampler, params) for a loaded teacher ``model``."""
    graphdef, params, others = train.split(model)
    return TeacherSampler(config, graphdef, others, batch_size, **options), params


def draw_samples(draw, params, config, n: int, batch_size: int, key) -> np.ndarray:
    """n samples from ``draw(params, key, labels)`` in batches, labels drawn at random."""
    labels = label_draws(config, jax.random.fold_in(key, 1), batch_size)
    out = []
    for i in range(-(-n // batch_size)):
        out.append(np.asarray(draw(params, jax.random.fold_in(key, i), labels(i)[0])))
    return np.concatenate(out)[:n]


def toy_extent(config) -> float:
    return 1.5 * config.data.radius + 4 * config.data.std + 0.5


def toy_metrics(config, x: np.ndarray, seed: int = 0) -> dict:
    """Mode recall / precision, mode weights and KL estimates against the toy's true density."""
    ds = data.get_dataset(config.data, global_batch_size=8, seed=config.seed)
    return {k: float(v) for k, v in toy_eval.toy_metrics(ds, x, jax.random.key(seed)).items()}


def data_clips(config, n: int = 256) -> np.ndarray:
    return dataset(config, n, seed=config.seed + 7).batch(0)["x"]


def save_samples(config, workdir: str, x: np.ndarray, name: str,
                 title: str | None = None) -> str:
    """Writes ``name.npz`` and a picture: a density plot (toys), a GIF (video; ``title`` above
    its frames), an image grid."""
    if jax.process_index() != 0:
        return ""
    np.savez(os.path.join(workdir, f"{name}.npz"), samples=x)
    if is_video(config):
        path = os.path.join(workdir, f"{name}.gif")
        video_metrics.save_gif(path, x[:16], title=title)
    elif config.data.name == "toy":
        path = os.path.join(workdir, f"{name}.png")
        monitor.save_png(path, monitor.density_image(x, extent=toy_extent(config)))
    else:
        path = os.path.join(workdir, f"{name}.png")
        monitor.save_png(path, monitor.image_grid(x[:64]), scale=4 if x.shape[1] <= 16 else 2)
    return path


def sample_preview(config, draw, params_of, *, name: str, n: int = 16):
    """``preview(state) -> {name: image}`` for TensorBoard: ``n`` samples of ``draw(params, key,
    labels)`` from one fixed noise and fixed labels, so successive images differ by the weights
    alone."""
    key = jax.random.key(config.seed + 5)
    labels = label_draws(config, jax.random.fold_in(key, 1), n)(0)[0]
    kind = "toy" if config.data.name == "toy" else "video" if is_video(config) else "image"
    extent = toy_extent(config) if kind == "toy" else 3.0

    def preview(state):
        x = np.asarray(draw(sharding.local_copy(params_of(state)), key, labels))
        return {name: monitor.sample_picture(x, kind=kind, extent=extent)}

    return preview


def sample_report(config, x: np.ndarray, prefix: str) -> dict:
    """What can be measured on samples without a feature network: toy metrics against the true
    density, or video motion against the data's."""
    if config.data.name == "toy":
        return {f"{prefix}/{k}": v for k, v in toy_metrics(config, x).items()}
    if is_video(config):
        square = config.data.get("square", 4.0)
        data = data_clips(config)
        threshold = video_metrics.dynamic_threshold(data, square=square)
        stats = video_metrics.motion_stats(x, square=square, threshold=threshold)
        stats["speed_ratio"] = stats["speed"] / video_metrics.motion_stats(
            data, square=square)["speed"]
        return {f"{prefix}/{k}": float(v) for k, v in stats.items()}
    return {}


def _print(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _print_mesh(mesh, batch_size: int, what: str) -> None:
    n = mesh.devices.size
    _print(f"{what}: batch {batch_size} over {n} {mesh.devices.flat[0].platform} device"
           + (f"s ({batch_size // n} each)" if n > 1 else ""))


# =================================================================================================
# Teacher modes.

def train_teacher(config, workdir: str) -> dict:
    """``--mode=train``: trains the teacher of ``config`` (images, toys or video); returns (and
    writes to results.json) its final metrics. Resumes from ``workdir/checkpoints``."""
    mesh = sharding.make_mesh()
    t = config.training
    sharding.check_batch_size(t.batch_size, mesh)
    _print_mesh(mesh, t.batch_size, "training")
    ds = dataset(config, t.batch_size)
    tx = train.make_optimizer(config.optim)
    graphdef, others, state = train.init_state(build_model(config), tx)
    shardings = train.state_shardings(state, mesh, t.get("param_sharding", "replicated"))
    state = jax.device_put(state, shardings)
    step = train.make_teacher_step(graphdef, others, losses.get_loss_fn(config), tx,
                                   ema_rate=t.ema_rate, key=jax.random.key(config.seed),
                                   mesh=mesh, state_sharding=shardings)

    def step_fn(state, i):
        return step(state, sharding.global_batch(ds.batch(i), mesh))

    sampler: list[TeacherSampler] = []

    def draw_for_state(state, key, batch_size):
        if not sampler:
            sampler.append(TeacherSampler(config, graphdef, others, batch_size))
        params = sharding.local_copy(state["ema"])
        labels = label_draws(config, jax.random.fold_in(key, 1), batch_size)

        def draw_batch(i):
            one_hot, idx = labels(i)
            return sampler[0](params, jax.random.fold_in(key, i), one_hot), idx

        return draw_batch

    on_log = None
    if not is_video(config) and config.data.name != "toy":
        on_log = scoring.periodic_hook(config, workdir, draw_for_state,
                                       every=config.eval.get("every", 0), log_every=t.log_every)
    preview_every = int(t.get("preview_every", 0))
    preview = None
    if preview_every:
        n = 256 if config.data.name == "toy" else 16
        preview = sample_preview(config, TeacherSampler(config, graphdef, others, n),
                                 lambda st: st["ema"], name="samples/teacher_ema", n=n)
    t0, history = time.time(), []
    with recorded_run(workdir, config, "train"):
        state, metrics = train.fit(workdir=workdir, state=state, state_sharding=shardings,
                                   step_fn=step_fn, loop=train.LoopConfig.from_config(t),
                                   history=history, on_log=on_log, preview=preview,
                                   preview_every=preview_every)
    results = {"mode": "train", "steps": int(sharding.to_host(state["step"])),
               "train_seconds": time.time() - t0, **{f"final/{k}": v for k, v in metrics.items()}}
    monitor.write_results(workdir, results)
    if is_video(config):
        results.update(sample(config, workdir))
    return dict(results, history=history, state=state)


def sample_teacher(config, workdir: str) -> dict:
    model, step = load_teacher(config, workdir)
    s = config.sampling
    draw, params = teacher_sampler(config, model, s.batch_size)
    t0 = time.time()
    x = draw_samples(draw, params, config, s.num_samples, s.batch_size,
                     jax.random.key(config.seed + 1))
    seconds = time.time() - t0
    churn = "".join(f", {k} {v:g}" for k, v in draw.churn.items())
    path = save_samples(config, workdir, x, "samples",
                        title=f"teacher, {draw.name}{churn}, {draw.nfe} NFE")
    results = {"sample/sampler": draw.name, "sample/nfe": draw.nfe, "sample/num_samples": len(x),
               **{f"sample/{k}": _finite_or_none(draw.churn.get(k, 0.0 if k == "S_churn" else None))
                  for k in CHURN_OPTIONS},
               "sample/checkpoint_step": step, "sample/seconds_per_sample": seconds / len(x),
               **sample_report(config, x, "sample")}
    monitor.write_results(workdir, results)
    _print(f"{len(x)} samples, {draw.nfe} network evaluations each -> {path}")
    return results


def likelihood(config, workdir: str) -> dict:
    """``--mode=likelihood``: negative log-likelihood through the probability-flow ODE.

    Images: bits/dim of ``config.eval.num_examples`` dataset images with uniform dequantisation
    and a Hutchinson trace. 2-D toys: NLL in nats of points drawn from the true density, with the
    exact trace, next to the true density's own NLL; their difference estimates KL(p || model).
    """
    config = run_config(config, workdir)
    workdir_lib.write_config(os.path.join(workdir, "likelihood"), config, mode="likelihood")
    model, step = load_teacher(config, workdir)
    process = sde.sde_from_config(config.process)
    n = config.eval.num_examples
    key = jax.random.key(config.seed + 2)
    ds = data.get_dataset(config.data, global_batch_size=min(n, config.sampling.batch_size),
                          seed=config.seed)
    t0 = time.time()
    if config.data.name == "toy":
        x = ds.sample(key, n)
        nll, _, nfe = likelihood_lib.log_likelihood(model, process, key, x, hutchinson="exact")
        nll = -nll
        true_nll = -np.asarray(ds.log_prob(x))
        results = {"likelihood/nll_nats": float(nll.mean()),
                   "likelihood/true_nll_nats": float(true_nll.mean()),
                   "likelihood/kl_pq_estimate": float((nll - true_nll).mean())}
    else:
        bpd_fn = likelihood_lib.get_bpd_fn(model, process, hutchinson=config.eval.hutchinson)
        bs, values, nfe = config.sampling.batch_size, [], 0
        k = int(config.data.get("num_classes", 0))
        for i in range(0, min(n, ds.num_examples), bs):
            ex = ds.examples(np.arange(i, min(i + bs, n, ds.num_examples)))
            labels = with_one_hot_labels(ex, k)["label"]
            bpd, _, nfe = bpd_fn(jax.random.fold_in(key, i), ex["x"], labels)
            values.append(np.asarray(bpd))
        values = np.concatenate(values)
        results = {"likelihood/bits_per_dim": float(values.mean()),
                   "likelihood/bits_per_dim_stderr": float(values.std() / np.sqrt(len(values)))}
    results.update({"likelihood/num_examples": n, "likelihood/nfe_last_batch": nfe,
                    "likelihood/checkpoint_step": step, "likelihood/seconds": time.time() - t0})
    monitor.write_results(workdir, results)
    _print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in results.items()))
    return results


# =================================================================================================
# Distillation.

def teacher_of(config) -> tuple[ml_collections.ConfigDict, nnx.Module, int]:
    """(the distillation's resolved config, the frozen teacher, its step) from
    ``config.distill.teacher_workdir``."""
    workdir = config.distill.get("teacher_workdir", "")
    if not workdir:
        raise ValueError("config.distill.teacher_workdir is empty: point it at a trained teacher, "
                         "e.g. --config.distill.teacher_workdir=runs/toy")
    try:
        recorded = workdir_lib.read_config(workdir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.distill.teacher_workdir={workdir!r}: {e}") from e
    resolved = resolve_config(config, recorded)
    resolved.training = ml_collections.ConfigDict(recorded.training.to_dict())
    resolved.optim = ml_collections.ConfigDict(recorded.optim.to_dict())
    if "random_flip" in resolved.data:
        resolved.data.random_flip = bool(config.distill.get("real_data_flip", False))
    try:
        teacher, step = load_teacher(resolved, workdir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.distill.teacher_workdir={workdir!r}: {e}") from e
    return resolved, teacher, step


def build_distillation(config, teacher, mesh, *, student=None) -> distill_lib.Distillation:
    """The f-distill objective and state for ``config`` (a resolved distillation config): an
    image student (one/few steps) or a video student (self-rollout + the motion regulariser)."""
    dc = config.distill
    process = teacher.process
    noise = objective_lib.GridNoise(
        objective_lib.karras_noise_grid(process, dc.num_noise_steps, dc.rho),
        tuple(dc.index_range))
    if is_video(config):
        s = config.student
        constrain = lambda x, axis=0: jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec(*((None,) * axis + (sharding.DATA_AXIS,)))))
        sigmas = tuple(float(v) for v in video_distill.student_sigmas_of(config, process))
        generator = video_distill.SelfRollout(
            sigmas, block_size=int(s.block_size), window=int(s.window), process=process,
            order=dc.order, context=s.get("context", "output"), constrain=constrain)
        extra = ()
        if dc.fkl_weight > 0:
            extra = (video_distill.MotionRegulariser(
                float(dc.fkl_weight), sigmas, num_constrained=int(dc.get("fkl_steps", 1)),
                target=dc.get("fkl_target", "chord"), mask=dc.fkl_mask,
                block_size=int(s.block_size)),)
        noise = video_distill.noise_of(dc, noise)
    else:
        levels = image_student_levels(dc, process)
        generator = student_lib.FewStep(levels[:-1])
        extra = ()
        if dc.get("regression_weight", 0.0) > 0:
            extra = (ode_regression.RegressionTerm(float(dc.regression_weight), levels),)
    objective = objective_lib.FDivergenceObjective(
        divergence=divergences.get(dc.divergence, **dict(dc.get("divergence_params", {}) or {})),
        generator=generator, noise=noise, process=process, feature_source=dc.feature_source, guidance_scale=dc.guidance_scale,
        gan_weight=dc.gan_weight, r1_weight=dc.r1_weight, r1_alpha=dc.r1_alpha,
        r1_perturb=dc.get("r1_perturb", "clean"), logit_clip=dc.logit_clip, r_min=dc.r_min, r_max=dc.r_max, normalize_r=dc.normalize_r,
        ratio_bins=dc.ratio_bins, ratio_ema_rate=dc.ratio_ema_rate, normalize_h=dc.normalize_h,
        normalize_dm=dc.normalize_dm,
        fake_score_weighting=dc.get("fake_score_weighting", "none"), extra_terms=extra)
    disc = models.get_discriminator(teacher, dc.disc_resolutions, rngs=nnx.Rngs(config.seed + 1))
    return distill_lib.Distillation(objective, teacher, disc, dc, mesh, seed=config.seed,
                                    student=student)


def student_draw(config, distillation: distill_lib.Distillation, batch_size: int, *,
                 devices=None) -> sharding.SplitBatch:
    """``draw(params, key, labels) -> x``: the student's inference sampler, jitted, the batch split
    over this process' devices when it has several (``sharding.SplitBatch``; ``devices`` to
    choose them)."""
    shape = (batch_size,) + data.example_shape(config.data)
    generator = distillation.objective.generator

    def draw(params, key, labels):
        return generator.sample(distillation.denoiser(params), key,
                                {"x": jnp.zeros(shape, jnp.float32), "label": labels})

    return sharding.SplitBatch(draw, batch_size, batch_argnums=(2,), devices=devices)


def image_student_levels(dc, process) -> tuple[float, ...]:
    """The image student's noise levels followed by 0 (the levels of its ODE pairs)."""
    return tuple(student_lib.student_sigmas(process, dc.student_steps,
                                            dc.get("student_sigmas"))) + (0.0,)


def image_pairs(config, teacher, workdir: str) -> dict:
    """The teacher's ODE pairs of an image distillation (``distill.num_pairs``, drawn once and
    kept in ``<workdir>/ode_pairs.npz``)."""
    dc = config.distill
    k = int(config.data.get("num_classes", 0))
    return ode_regression.load_or_draw_pairs(
        os.path.join(workdir, "ode_pairs.npz"),
        lambda: ode_regression.teacher_pairs(teacher, jax.random.key(config.seed + 11),
                                             int(dc.num_pairs), data.example_shape(config.data),
                                             image_student_levels(dc, teacher.process),
                                             substeps=int(dc.pair_substeps),
                                             batch_size=min(int(dc.num_pairs), 4096),
                                             num_classes=k), num=int(dc.num_pairs))


def regression_init(config, teacher, workdir: str, mesh, pairs: dict | None = None
                    ) -> nnx.Module:
    """The image student after ``distill.ode_init_steps`` steps of regression onto the
    teacher's PF-ODE (``fdistill.ode_regression``) on ``pairs`` (``image_pairs`` when None);
    pairs and result kept in ``workdir``."""
    dc = config.distill
    sigmas = image_student_levels(dc, teacher.process)
    pairs = image_pairs(config, teacher, workdir) if pairs is None else pairs

    def loss_fn(model, key, batch):
        return ode_regression.regression_loss(model, key, batch, sigmas)

    return ode_regression.initialise(teacher, pairs, loss_fn, dc, workdir, mesh, seed=config.seed)


def regression_init_sampler(config, init_dir: str, batch_size: int):
    """(``draw(params, key, labels)``, params, NFE) of the ODE-regression initialisation in
    ``init_dir`` (computed there if missing) before any distribution matching, for ``config`` (a
    distillation config naming its teacher)."""
    resolved, teacher, _ = teacher_of(config)
    init = regression_init(resolved, teacher, init_dir, sharding.make_mesh())
    graphdef, params, others = train.split(init)
    sigmas = image_student_levels(resolved.distill, teacher.process)[:-1]
    shape = (batch_size,) + data.example_shape(resolved.data)

    def draw(p, key, labels):
        return student_lib.generate(train.merge(graphdef, p, others), key, shape, labels,
                                    sigmas=sigmas)

    return sharding.SplitBatch(draw, batch_size, batch_argnums=(2,)), params, len(sigmas)


def distill(config, workdir: str) -> dict:
    """``--mode=distill``: distils ``config.distill.teacher_workdir``'s teacher into a student in
    ``workdir`` (``config.distill.num_steps`` iterations, resumed from ``workdir/checkpoints``),
    then draws ``config.distill.num_eval_samples`` samples of the EMA student; writes
    results.json and student_samples.(png|gif|npz)."""
    config, teacher, teacher_step = teacher_of(config)
    if os.path.abspath(workdir) == os.path.abspath(config.distill.teacher_workdir):
        raise ValueError(f"--workdir={workdir} is the teacher's own workdir "
                         f"(config.distill.teacher_workdir): distil into a new directory.")
    dc = config.distill
    mesh = sharding.make_mesh()
    try:
        sharding.check_batch_size(dc.batch_size, mesh)
    except ValueError as e:
        raise ValueError(f"config.distill.batch_size: {e}") from e
    _print_mesh(mesh, dc.batch_size, "distillation")
    student, extra_batches, extra_key = None, None, ""
    init_dir = dc.get("init_workdir", "") or workdir
    if is_video(config):
        student, pairs = video_distill.prepare_student(config, teacher, init_dir, mesh)
        if dc.fkl_weight > 0:
            sharding.check_batch_size(dc.fkl_batch_size, mesh)
            extra_batches = video_distill.fkl_batches(pairs, dc.fkl_batch_size, seed=config.seed)
            extra_key = "fkl"
    elif dc.get("ode_init_steps", 0) > 0 or dc.get("regression_weight", 0.0) > 0:
        pairs = image_pairs(config, teacher, init_dir)
        if dc.get("ode_init_steps", 0) > 0:
            student = regression_init(config, teacher, init_dir, mesh, pairs)
        if dc.get("regression_weight", 0.0) > 0:
            extra_batches = ode_regression.PairBatches(pairs, dc.batch_size, seed=config.seed + 1)
            extra_key = "regression"
    distillation = build_distillation(config, teacher, mesh, student=student)
    ds = dataset(config, dc.batch_size)
    k = int(config.data.get("num_classes", 0))

    def step_fn(state, i):
        batch = with_one_hot_labels(ds.batch(i), k)
        if extra_batches is not None:
            batch[extra_key] = extra_batches.batch(i)
        return distillation.step(state, i, sharding.global_batch(batch, mesh))

    draws: dict = {}

    def draw_for_state(state, key, batch_size):
        if batch_size not in draws:
            draws[batch_size] = student_draw(config, distillation, batch_size)
        params = sharding.local_copy(state["student_ema"])
        labels = label_draws(config, jax.random.fold_in(key, 1), batch_size)

        def draw_batch(i):
            one_hot, idx = labels(i)
            return draws[batch_size](params, jax.random.fold_in(key, i), one_hot), idx

        return draw_batch

    on_log = scoring.periodic_hook(config, workdir, draw_for_state,
                                   every=dc.get("eval_every", 0), log_every=dc.log_every)
    preview_every = int(dc.get("preview_every", 0))
    preview = None
    if preview_every:
        n = 256 if config.data.name == "toy" else 16
        preview = sample_preview(config, student_draw(config, distillation, n),
                                 lambda st: st["student_ema"], name="samples/student_ema", n=n)
    t0 = time.time()
    with recorded_run(workdir, config, "distill"):
        state, metrics = train.fit(workdir=workdir, state=distillation.initial_state,
                                   state_sharding=distillation.state_sharding, step_fn=step_fn,
                                   loop=train.LoopConfig.from_config(dc), on_log=on_log,
                                   preview=preview, preview_every=preview_every)
    seconds = time.time() - t0
    results = {"mode": "distill", "divergence": distillation.objective.divergence.name,
               "steps": int(sharding.to_host(state["step"])), "teacher_step": teacher_step,
               "distill_seconds": seconds,
               "nfe": distillation.objective.generator.num_evaluations,
               **{f"final/{k}": v for k, v in metrics.items()}}
    results.update(_student_samples(config, workdir, distillation,
                                    sharding.local_copy(state["student_ema"]), prefix="student"))
    monitor.write_results(workdir, results)
    return results


def _student_samples(config, workdir, distillation, params, *, prefix: str) -> dict:
    """Samples of the student (``distill.num_eval_samples``), saved, with what can be measured
    on them; video: motion and drift over a rollout ``eval.rollout_factor`` times longer."""
    dc = config.distill
    if is_video(config):
        return _video_student_report(config, workdir, distillation, params, prefix)
    n = int(dc.num_eval_samples)
    batch_size = min(n, int(dc.get("eval_batch_size", 1024)))
    x = draw_samples(student_draw(config, distillation, batch_size), params, config, n,
                     batch_size, jax.random.key(config.seed + 1))
    path = save_samples(config, workdir, x, "student_samples")
    _print(f"student ({distillation.objective.generator.num_evaluations} network evaluation(s) "
           f"per sample) -> {path}")
    return sample_report(config, x, prefix)


def _video_student_report(config, workdir, distillation, params, prefix) -> dict:
    return video_student_report(config, workdir, distillation.denoiser(params), prefix=prefix)


def video_student_report(config, workdir: str, student, *, prefix: str,
                         order: str | None = None, name: str = "student_rollout") -> dict:
    """Motion of a video student's clips at the training length (against the data's), and motion
    and drift over a rollout ``eval.rollout_factor`` (>= 4) times longer (sliding KV window), as
    `video.metrics.evaluate_rollout` measures them: ``<prefix>/long/...`` (speed ratio overall
    and per segment, dynamic degree, quality measures) and ``<prefix>/drift...`` (relative
    change of each quality measure over the rollout; ``<prefix>/drift`` their mean magnitude).
    The long rollout is saved as ``<name>.gif``."""
    from fdistill.video import hiar
    s, e = config.student, config.eval
    order = order or config.distill.order
    context = s.get("context", "output")
    sigmas = video_distill.student_sigmas_of(config, student.process)
    shape = (int(e.num_clips),) + data.example_shape(config.data)
    k_short, k_long = jax.random.split(jax.random.key(config.seed + 3))
    run = lambda key, shp: np.asarray(hiar.sample(
        student, hiar.draw_noise(key, s.num_steps, shp, student.process), sigmas,
        block_size=s.block_size, window=s.window, order=order, context=context))
    short = run(k_short, shape)
    long = run(k_long, (shape[0], shape[1] * int(e.rollout_factor), *shape[2:]))
    row = sample_report(config, short, prefix)
    ev = video_metrics.evaluate_rollout(long, data_clips(config), config.data.num_frames,
                                        square=config.data.get("square", 4.0))
    for k, v in ev.items():
        if k.startswith("drift"):
            row[f"{prefix}/{k}"] = v
        elif not k.startswith("data/") and k != "threshold":
            row[f"{prefix}/long/{k}"] = v
    save_samples(config, workdir, long, name,
                 title=f"student, {s.num_steps} steps, {order}\n{long.shape[1]}-frame rollout")
    _print(f"student ({s.num_steps} steps, {order}): " + "  ".join(
        f"{k.split('/', 1)[-1]}={v:.4g}" for k, v in row.items()
        if isinstance(v, float) and "/slope" not in k and "/change" not in k))
    return row


def load_student(config, workdir: str) -> tuple[distill_lib.Distillation, dict]:
    """(Distillation, state) restored from a distillation ``workdir`` (no teacher checkpoint is
    needed: the student's architecture is the teacher's, from the recorded config)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no student checkpoint in {ckpt_dir}; distil one first with "
                                f"`python -m fdistill.main --config=<its config> "
                                f"--workdir={workdir} --mode=distill`")
    distillation = build_distillation(config, build_model(config), sharding.make_mesh())
    ckpt = checkpoint.Checkpointer(ckpt_dir)
    try:
        step, state = ckpt.restore_latest(distillation.initial_state)
    finally:
        ckpt.close()
    if step is None:
        raise FileNotFoundError(f"no student checkpoint in {ckpt_dir}")
    return distillation, state


def sample_student(config, workdir: str) -> dict:
    distillation, state = load_student(config, workdir)
    params = sharding.local_copy(state["student_ema"])
    results = {"sample/nfe": distillation.objective.generator.num_evaluations,
               "sample/checkpoint_step": int(sharding.to_host(state["step"]))}
    if is_video(config):
        results.update(_video_student_report(config, workdir, distillation, params, "sample"))
        monitor.write_results(workdir, results)
        return results
    n, bs = config.sampling.num_samples, min(config.sampling.num_samples,
                                             config.sampling.batch_size)
    draw = student_draw(config, distillation, bs)
    key = jax.random.key(config.seed + 2)
    draw_samples(draw, params, config, bs, bs, key)   # compile
    t0 = time.time()
    x = draw_samples(draw, params, config, n, bs, key)
    results.update({"sample/num_samples": len(x),
                    "sample/seconds_per_sample": (time.time() - t0) / len(x),
                    **sample_report(config, x, "sample")})
    path = save_samples(config, workdir, x, "student_samples")
    monitor.write_results(workdir, results)
    _print(f"{len(x)} student samples, {results['sample/nfe']} network evaluation(s) each "
           f"-> {path}")
    return results


def sample(config, workdir: str) -> dict:
    """``--mode=sample``: samples of the run in ``workdir``, a teacher (``config.sampling``'s
    sampler) or a student (its one/few steps), with toy metrics or video motion when they
    apply."""
    config = run_config(config, workdir)
    if is_student_workdir(workdir):
        return sample_student(config, workdir)
    return sample_teacher(config, workdir)


# =================================================================================================
# Evaluation.

def fid_stats(config, workdir: str) -> dict:
    """``--mode=fid_stats``: (mu, sigma) and up to 10k real features of the dataset
    (``config.data`` with its configured split, train by default) in ``config.eval.features``,
    written to ``config.eval.ref_stats`` (default ``<workdir>/ref_stats.npz``).

    Uses the first ``config.eval.num_samples`` images, or all of them when the split is smaller
    (EDM's CIFAR-10 reference: all 50,000 training images).
    """
    workdir_lib.write_config(workdir, config, mode="fid_stats")
    path = scoring.ref_stats_path(config, workdir)
    net = scoring.feature_network(config, workdir)
    ds = data.get_dataset(config.data, global_batch_size=1, seed=config.seed)
    n = min(int(config.eval.num_samples), int(ds.num_examples))
    t0 = time.time()
    protocol = fid_lib.write_reference_stats(path, ds, net, n, int(config.eval.batch_size),
                                             progress=jax.process_index() == 0)
    protocol.update(path=path, features=config.eval.features,
                    feature_weights=str(getattr(net, "weights_path", "")),
                    split=str(config.data.get("split", "default")),
                    dataset_num_examples=int(ds.num_examples), seconds=time.time() - t0)
    if isinstance(net, scoring.ClassifierFeatures):
        protocol["classifier_test_accuracy"] = net.clf.test_accuracy
    results = {"fid_stats/protocol": protocol}
    monitor.write_results(workdir, results)
    _print(f"reference statistics of {n} {config.data.name} images ({config.eval.features} "
           f"features) -> {path}")
    return results


def evaluate(config, workdir: str) -> dict:
    """``--mode=eval``: scores the teacher or student in ``workdir``.

    ``config.eval.num_samples`` samples (50,000 unless ``config.eval.monitoring``) in batches of
    ``config.eval.batch_size``, class labels drawn uniformly at random from a fixed seed. The
    protocol, reference file (and its dimension), weights and checkpoint are checked before
    anything is sampled.
    """
    config = run_config(config, workdir)
    n, monitoring = int(config.eval.num_samples), bool(config.eval.monitoring)
    fid_lib.metric_suffix(n, monitoring=monitoring)
    ref_path = scoring.ref_stats_path(config, workdir)
    ref = fid_lib.load_stats(ref_path)
    net = scoring.feature_network(config, workdir)
    scoring.check_dimensions(ref, net, ref_path)
    bs = int(config.eval.batch_size)
    key = jax.random.key(config.seed + 3)
    if is_student_workdir(workdir):
        distillation, state = load_student(config, workdir)
        draw, params = student_draw(config, distillation, bs), sharding.local_copy(
            state["student_ema"])
        generator = {"model": "student",
                     "nfe": distillation.objective.generator.num_evaluations,
                     "checkpoint_step": int(sharding.to_host(state["step"]))}
    else:
        model, step = load_teacher(config, workdir)
        draw, params = teacher_sampler(config, model, bs)
        generator = {"model": "teacher", "sampler": draw.name, "sampler_steps": draw.num_steps,
                     **draw.churn, "guidance": draw.guidance, "nfe": draw.nfe,
                     "checkpoint_step": int(step)}
    labels = label_draws(config, jax.random.fold_in(key, 1), bs)

    def draw_batch(i):
        one_hot, idx = labels(i)
        return draw(params, jax.random.fold_in(key, i), one_hot), idx

    t0 = time.time()
    out = scoring.sample_metrics(config, net, ref_path, draw_batch, n, monitoring=monitoring,
                                 progress=jax.process_index() == 0)
    protocol = dict(out.pop("protocol"), **generator, batch_size=bs, seed=int(config.seed),
                    reference=ref_path, labels="uniform random (seed)",
                    seconds=time.time() - t0)
    results = {f"eval/{name}": v for name, v in out.items()}
    results["eval/protocol"] = protocol
    monitor.write_results(workdir, results)
    _print(f"{generator['model']} ({generator['nfe']} nfe), {n} samples: " + "  ".join(
        f"{name}={v:.4g}" for name, v in out.items()))
    return results


def import_edm(config, workdir: str) -> dict:
    """``--mode=import_edm``: writes the EDM snapshot ``config.import_edm.pkl`` as a teacher run
    (``config.json`` and a checkpoint in the teacher loop's layout, parameters and EMA both the
    snapshot's EMA weights), which sample, eval and distill then use without torch."""
    pkl = config.get("import_edm", {}).get("pkl", "") if "import_edm" in config else ""
    if not pkl:
        raise ValueError("config.import_edm.pkl is empty: pass the snapshot, e.g. "
                         "--config.import_edm.pkl=edm-cifar10-32x32-cond-vp.pkl")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; import into an empty "
                              f"workdir.")
    teacher, imported = edm_import.load(pkl)
    workdir_lib.write_config(workdir, imported, mode="import_edm")
    _, _, state = train.init_state(teacher, train.make_optimizer(imported.optim))
    with checkpoint.Checkpointer(ckpt_dir, max_to_keep=1) as ckpt:
        ckpt.save(0, state)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    results = {"mode": "import_edm", "import_edm/pkl": os.path.abspath(pkl),
               "import_edm/model": imported.model.name,
               "import_edm/precond": imported.model.precond,
               "import_edm/num_params": int(num_params)}
    monitor.write_results(workdir, results)
    _print(f"{pkl} -> {workdir}: {imported.model.name} ({num_params:,} parameters), precond "
           f"{imported.model.precond}, process {imported.process.name}")
    return results


def train_mode(config, workdir: str) -> dict:
    """``--mode=train`` (returns the results without the state and history)."""
    out = train_teacher(config, workdir)
    return {k: v for k, v in out.items() if k not in ("state", "history")}
