"""Video through the shared core: the teacher loss with per-frame sigma, the self-rollout student,
the forward-KL regulariser, the command line end to end, and 1 vs 2 devices."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.video import get_config
from fdistill import losses, main, modes, ode_regression, sde, sharding, train
from fdistill import workdir as workdir_lib
from fdistill.video import distill as VD
from tests.test_video_model import BS, SIZE, T, tiny_denoiser
from tests.tiny import run_on_fake_devices


def tiny_config():
    c = get_config()
    c.data.num_frames, c.data.size, c.data.square = T, SIZE, 3.0
    c.model.dim, c.model.depth, c.model.num_heads, c.model.mlp_ratio = 16, 1, 2, 2
    c.training.batch_size, c.training.num_steps = 8, 12
    c.training.log_every = c.training.ckpt_every = 12
    c.sampling.num_steps = 2
    c.sampling.num_samples = c.sampling.batch_size = 4
    c.student.num_steps, c.student.block_size, c.student.window = 2, BS, T
    d = c.distill
    d.num_pairs, d.pair_substeps, d.ode_init_steps = 8, 2, 0
    d.batch_size = d.fkl_batch_size = 4
    d.num_steps, d.student_update_every, d.ema_rate = 4, 2, 0.0
    d.log_every = d.ckpt_every = 4
    c.eval.num_clips = 4
    return c


class GaussianDenoiser:
    """The exact denoiser of N(0, s^2) pixels: D(x, sigma) = s^2 / (s^2 + sigma^2) x, for sigma
    per clip [B] or per frame [B, T]."""
    process = sde.EDM()

    def __call__(self, x, sigma, labels=None, key=None):
        s2 = self.process.sigma_data ** 2
        return sde.bcast(s2 / (s2 + sigma ** 2), x) * x


@pytest.mark.parametrize("mode", ["shared", "per_frame"])
def test_edm_loss_of_the_exact_denoiser_is_one(mode):
    """lambda(sigma) * E||D*(x_t) - x||^2 = 1 for every sigma when the data are N(0, sigma_data^2):
    the teacher loss accepts one sigma per clip or per frame."""
    c = tiny_config()
    c.training.sigma_mode = mode
    x = 0.5 * jax.random.normal(jax.random.key(0), (256, T, SIZE, SIZE, 1))
    loss, _ = losses.get_loss_fn(c)(GaussianDenoiser(), jax.random.key(1), {"x": x})
    assert abs(float(loss) - 1.0) < 0.02
    per, sigma = losses.edm_losses(GaussianDenoiser(), sde.EDM(), jax.random.key(1), x,
                                   per_frame=mode == "per_frame")
    assert per.shape == sigma.shape == ((256, T) if mode == "per_frame" else (256,))
    c.training.sigma_mode = "frame"
    with pytest.raises(ValueError, match="valid: \\['shared', 'per_frame'\\]"):
        losses.get_loss_fn(c)


def _distillation(c, teacher, mesh=None):
    return modes.build_distillation(c, teacher, mesh or sharding.make_mesh())


def _batch(c, pairs=None, seed=5):
    real = jax.random.normal(jax.random.key(seed), (4, T, SIZE, SIZE, 1))
    batch = {"x": real, "label": None}
    if pairs is not None:
        batch["fkl"] = {"states": pairs["states"][:4], "x0": pairs["x0"][:4]}
    return batch


def test_losses_differentiate_only_what_they_train():
    """The student loss (self-rollout distribution matching with r from the discriminator, FKL
    regulariser) moves only the student; the critic loss trains the fake score and the
    discriminator (whose logistic loss reads the teacher's per-frame features) and never the
    teacher or the student. (With the GAN term the teacher's features carry the gradient to the
    student's samples; the steps differentiate their own parameters only.)"""
    c = tiny_config()
    c.student.num_steps = 1
    c.distill.update(divergence="jensen_shannon", gan_weight=0.0, fkl_weight=1.0)
    teacher = tiny_denoiser(0, depth=1)
    d = _distillation(c, teacher)
    sigmas = VD.student_sigmas_of(c, teacher.process)
    pairs = ode_regression.teacher_pairs(teacher, jax.random.key(0), 4, (T, SIZE, SIZE, 1),
                                         sigmas, substeps=1, batch_size=4)
    st = d.initial_state
    nets = lambda tp, fp, dp, sp: (d.denoiser(tp), d.denoiser(fp), d.discriminator(dp),
                                   d.denoiser(sp))

    def student_loss(*params):
        teacher_, fake, disc, student = nets(*params)
        return d.objective.student_loss(student, teacher_, fake, disc, jax.random.key(4),
                                        _batch(c, pairs), st["ratio_ema"])[0]

    def critic_loss(*params):
        teacher_, fake, disc, student = nets(*params)
        return d.objective.critic_loss(fake, disc, student, teacher_, jax.random.key(6),
                                       _batch(c))

    params = (d.teacher_params, st["fake_score"], st["disc"], st["student"])
    norm = lambda tree: sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(tree))
    grads = jax.jit(jax.grad(student_loss, argnums=(0, 1, 2, 3)))(*params)
    assert norm(grads[3]) > 0
    assert norm(grads[0]) == 0 and norm(grads[1]) == 0 and norm(grads[2]) == 0
    (_, metrics), grads = jax.jit(jax.value_and_grad(critic_loss, argnums=(0, 1, 2, 3),
                                                     has_aux=True))(*params)
    assert float(metrics["critic/loss_d"]) > 0 and np.isfinite(float(metrics["critic/loss_dsm"]))
    assert norm(grads[1]) > 0 and norm(grads[2]) > 0
    assert norm(grads[0]) == 0 and norm(grads[3]) == 0


def test_regulariser_pairs_and_mask_switch():
    """ODE pairs start at sigma_max z and hold one state per student level; the regulariser's
    prediction differs between the bidirectional and block-causal masks."""
    c = tiny_config()
    teacher, student = tiny_denoiser(0, depth=1), tiny_denoiser(1, depth=1)
    sigmas = VD.student_sigmas_of(c, teacher.process)
    pairs = ode_regression.teacher_pairs(teacher, jax.random.key(0), 4, (T, SIZE, SIZE, 1),
                                         sigmas, substeps=1, batch_size=4)
    assert pairs["states"].shape == (4, 2, T, SIZE, SIZE, 1)
    k_z = jax.random.split(jax.random.fold_in(jax.random.key(0), 0))[0]
    np.testing.assert_allclose(pairs["states"][:, 0],
                               80.0 * jax.random.normal(k_z, (4, T, SIZE, SIZE, 1)), rtol=1e-6)
    batch = _batch(c, pairs)
    key = jax.random.key(0)
    sig = tuple(float(v) for v in sigmas)
    bi = VD.MotionRegulariser(1.0, sig, mask="bidirectional")(student, key, batch)[0]
    bc = VD.MotionRegulariser(1.0, sig, mask="block_causal", block_size=BS)(student, key, batch)[0]
    assert abs(float(bi) - float(bc)) > 1e-4
    with pytest.raises(ValueError, match="valid: bidirectional, block_causal"):
        VD.MotionRegulariser(1.0, sig, mask="causal")
    with pytest.raises(ValueError, match="valid: chord, end_point"):
        VD.MotionRegulariser(1.0, sig, target="x0")
    with pytest.raises(ValueError, match=r"K = 3 must lie in \[1, 2\]"):
        VD.MotionRegulariser(1.0, sig, num_constrained=3)


class RecordingStudent:
    """Returns zeros and records what the regulariser asks of the student."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, *, attention, block_size):
        self.calls.append((np.asarray(x), np.asarray(sigma), attention, block_size))
        return jnp.zeros_like(x)


def test_regulariser_regresses_onto_the_chord_of_a_constrained_step():
    """Paper Eq. 10 on a trajectory with known states: with a zero prediction the loss is the
    mean square of the target, the line through (sigma_k, x_k) and (sigma_{k+1}, x_{k+1}) at
    sigma = 0 (x_k - sigma_k (x_{k+1} - x_k) / (sigma_{k+1} - sigma_k)), or the end point;
    K = 1 always constrains step 0 from the pure-noise state, K = 2 steps 0 and 1 equally often,
    and the mask reaches the student."""
    sig = (80.0, 10.0, 2.0, 0.0)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(3, T, SIZE, SIZE, 1)).astype(np.float32)
    z = rng.normal(size=x0.shape).astype(np.float32)
    # a curved path: x(sigma) = x0 + sigma z + 0.01 sigma^2 z^2 (not a straight line in sigma)
    states = np.stack([x0 + s * z + 0.01 * s ** 2 * z ** 2 for s in sig[:-1]], axis=1)
    batch = {"fkl": {"states": states, "x0": x0}}
    chord = lambda k: states[:, k] - sig[k] * ((states[:, k + 1] if k + 1 < 3 else x0)
                                              - states[:, k]) / (sig[k + 1] - sig[k])
    for target, expected in (("chord", chord(0)), ("end_point", x0)):
        student = RecordingStudent()
        reg = VD.MotionRegulariser(0.1, sig, target=target, mask="block_causal", block_size=BS)
        loss, m = reg(student, jax.random.key(1), batch)
        np.testing.assert_allclose(float(m["student/loss_fkl"]), np.mean(expected ** 2),
                                   rtol=1e-5)
        np.testing.assert_allclose(float(loss), 0.1 * np.mean(expected ** 2), rtol=1e-5)
        x, sigma, attention, block_size = student.calls[0]
        np.testing.assert_array_equal(x, states[:, 0])
        assert np.all(sigma == 80.0) and sigma.shape == (3, T)
        assert (attention, block_size) == ("block_causal", BS)
    student = RecordingStudent()
    reg = VD.MotionRegulariser(1.0, sig, num_constrained=2)
    seen = {80.0: 0, 10.0: 0}
    for i in range(40):
        loss, _ = reg(student, jax.random.key(i), batch)
        level = float(student.calls[-1][1][0, 0])
        seen[level] += 1
        k = 0 if level == 80.0 else 1
        np.testing.assert_allclose(float(loss), np.mean(chord(k) ** 2), rtol=1e-5)
    assert set(seen) == {80.0, 10.0} and min(seen.values()) >= 10


def test_critic_and_distribution_matching_share_the_noise_distribution():
    """The fake score is trained on the sigma distribution the distribution-matching loss
    queries it with: both losses draw from the objective's one noise object (HiAR's shifted
    distribution by default for video, the Karras grid as an option)."""
    import dataclasses
    from fdistill.video import fkl
    c = tiny_config()
    c.student.num_steps = 1
    c.distill.fkl_weight = 0.0
    teacher = tiny_denoiser(0, depth=1)
    d = _distillation(c, teacher)
    assert d.objective.noise == fkl.ShiftedNoise(5.0)
    c.distill.noise_schedule = "karras_grid"
    from fdistill import objective as objective_lib
    assert isinstance(_distillation(c, teacher).objective.noise, objective_lib.GridNoise)
    drawn = []

    def noise(key, n):
        drawn.append(n)
        return jnp.full((n,), 7.0)

    obj = dataclasses.replace(d.objective, noise=noise)
    st = d.initial_state
    net = d.denoiser(st["student"])
    obj.student_loss(net, net, net, d.discriminator(st["disc"]), jax.random.key(0), _batch(c),
                     st["ratio_ema"])
    assert drawn == [4]
    obj.critic_loss(net, d.discriminator(st["disc"]), net, net, jax.random.key(1), _batch(c))
    assert drawn == [4, 4, 4]        # student samples for the fake score, real data for D
    c.distill.noise_schedule = "lognormal"
    with pytest.raises(ValueError, match="valid: shifted, karras_grid"):
        _distillation(c, teacher)


def test_bad_distillation_configs():
    teacher = tiny_denoiser(0, depth=1)
    for field, value, message in (("divergence", "kl_reverse", "Unknown divergence"),
                                  ("order", "frame_first", "valid: block_first, hierarchical"),
                                  ("fkl_mask", "causal", "valid: bidirectional, block_causal")):
        bad = tiny_config()
        bad.distill[field] = value
        with pytest.raises(ValueError, match=message):
            _distillation(bad, teacher)
    bad = tiny_config()
    bad.student.window = 1
    with pytest.raises(ValueError, match="window"):
        _distillation(bad, teacher)


def _fkl(student, pairs, sigmas):
    return float(VD.MotionRegulariser(1.0, tuple(float(v) for v in sigmas))(
        student, jax.random.key(0), {"fkl": pairs})[0])


def test_end_to_end_through_the_command_line(tmp_path):
    """--mode=train / sample / distill / sample with a video config: the teacher trains and
    samples (motion against the data's), the ODE initialisation lowers the regression loss, the
    distillation (FKL weight 1) lowers the regulariser, the student's long rollout is scored, a
    resumed distillation reuses its ODE pairs and initialisation, and a missing teacher fails
    with the fix."""
    c = tiny_config()
    teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
    results = main.run(c, teacher_dir, "train")
    assert results["steps"] == 12 and "sample/speed_ratio" in results
    assert os.path.exists(tmp_path / "teacher" / "samples.gif")
    assert results["sample/S_churn"] == c.sampling.S_churn > 0    # the video configs' churn
    out = main.run(c, teacher_dir, "sample")
    assert out["sample/nfe"] == 2 * c.sampling.num_steps - 1
    c.sampling.S_churn = 0.0                  # the deterministic Heun: no stale churn recorded
    main.run(c, teacher_dir, "sample")
    with open(os.path.join(teacher_dir, "results.json")) as f:
        recorded = json.load(f)
    assert recorded["sample/S_churn"] == 0.0 and recorded["sample/S_max"] is None
    c.sampling.S_churn = 16.6

    d = c.distill
    d.update(ode_init_steps=8, fkl_weight=1.0)
    d.student_optim.lr = 3e-3
    d.teacher_workdir = ""
    with pytest.raises(ValueError, match="teacher_workdir is empty"):
        main.run(c, student_dir, "distill")
    d.teacher_workdir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        main.run(c, student_dir, "distill")
    d.teacher_workdir = teacher_dir
    out = main.run(c, student_dir, "distill")
    assert out["steps"] == 4 and np.isfinite(out["final/critic/loss_dsm"])
    assert all(np.isfinite(out[f"student/{k}"]) for k in (
        "speed", "dynamic", "drift", "long/speed_ratio", "long/dynamic",
        "drift/shape_error/relative", "drift/sharpness/relative", "drift/intensity/relative"))
    assert len(out["student/long/speed_ratio_per_segment"]) == c.eval.rollout_factor
    assert os.path.exists(os.path.join(student_dir, "student_rollout.gif"))

    teacher, _ = modes.load_teacher(c, teacher_dir)
    with np.load(os.path.join(student_dir, "ode_pairs.npz")) as f:
        pairs = {k: f[k] for k in ("states", "x0")}
    sigmas = VD.student_sigmas_of(c, teacher.process)
    graphdef, others, template = train.init_state(teacher, train.make_optimizer(d.student_optim))
    from fdistill import checkpoint
    with checkpoint.Checkpointer(os.path.join(student_dir, "ode_init", "checkpoints")) as ckpt:
        init_step, init_state = ckpt.restore_latest(template)
    initialised = train.merge(graphdef, init_state["params"], others)
    regression = lambda m: float(VD.ode_regression_loss(m, jax.random.key(0), pairs, sigmas,
                                                        block_size=BS)[0])
    assert init_step == 8 and regression(initialised) < regression(teacher)
    distillation, state = modes.load_student(workdir_lib.read_config(student_dir), student_dir)
    assert (_fkl(distillation.denoiser(state["student_ema"]), pairs, sigmas)
            < _fkl(initialised, pairs, sigmas))

    again = main.run(c, student_dir, "sample")               # the student, not the teacher
    assert again["sample/speed"] == pytest.approx(out["student/speed"])
    stamp = os.path.getmtime(os.path.join(student_dir, "ode_pairs.npz"))
    d.update(num_steps=6, ckpt_every=6, log_every=2)
    main.run(c, student_dir, "distill")                       # resumes at 4, reuses pairs and init
    assert os.path.getmtime(os.path.join(student_dir, "ode_pairs.npz")) == stamp
    with checkpoint.Checkpointer(os.path.join(student_dir, "ode_init", "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [8]
    with open(os.path.join(student_dir, "results.json")) as f:
        assert json.load(f)["steps"] == 6


VIDEO_MULTI_DEVICE = r"""
import json, sys
import jax, numpy as np
from jax.sharding import AxisType, Mesh
sys.path.insert(0, '.')
from fdistill import modes, sharding
from fdistill.data.video import get_video_dataset
from tests.test_video_distill import tiny_config
from tests.test_video_model import tiny_denoiser

assert jax.device_count() == 2
teacher = tiny_denoiser(0, depth=1)
k_z, k_x0 = jax.random.split(jax.random.key(0))   # regulariser pairs: only their shapes matter
out = {}
for run, settings in {"js": dict(divergence="jensen_shannon", gan_weight=0.1, normalize_r=True),
                      "alpha": dict(divergence="alpha", divergence_params={"alpha": 0.5})}.items():
    c = tiny_config()
    c.student.num_steps = 1
    c.distill.update(fkl_weight=0.1, **settings)
    ds = get_video_dataset(c.data, global_batch_size=c.distill.batch_size, seed=0)
    z = 80.0 * jax.random.normal(k_z, (4, 1, *ds.shape))
    pairs = {"states": np.asarray(z), "x0": np.asarray(jax.random.normal(k_x0, z[:, 0].shape))}
    for n in (1, 2):
        mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))
        d = modes.build_distillation(c, teacher, mesh)
        state, hist = d.initial_state, []
        for i in range(2 if run == "js" else 1):          # alpha: its student step only
            batch = {"x": ds.batch(i)["x"], "label": None, "fkl": pairs}
            state, m = d.step(state, i, sharding.global_batch(batch, mesh))
            hist.append({k: float(v) for k, v in m.items()})
        out[f"{run}{n}"] = hist
print("RESULT" + json.dumps(out))
"""


def test_video_distillation_matches_on_one_and_two_devices():
    """Through the shared core, a self-rollout student with Jensen-Shannon, the GAN term and
    ratio normalisation, and an alpha-divergence student (FKL regulariser on) give the same
    student and critic losses with the batches split over 2 fake CPU devices."""
    out = run_on_fake_devices(VIDEO_MULTI_DEVICE)
    for run in ("js", "alpha"):
        for ma, mb in zip(out[f"{run}1"], out[f"{run}2"]):
            assert ma.keys() == mb.keys()
            for k in ma:
                np.testing.assert_allclose(ma[k], mb[k], rtol=2e-5, atol=2e-6, err_msg=f"{run} {k}")
        first = out[f"{run}1"][0]
        assert first["student/loss_fkl"] > 0 and first["student/loss"] != 0.0
        assert first["student/h_max"] > first["student/h_min"] > 0       # r-dependent weights
    last = out["js1"][-1]
    assert last["critic/loss_d"] > 0 and last["critic/loss_dsm"] != 0.0
    assert out["js1"][0]["student/loss_gan"] > 0


def test_video_configs_rows_and_their_validation():
    """The ablation's rows set what they name; the evaluated student is the trained one (its
    EMA horizon 1 / (1 - rate) is well under the run's iterations); bad regulariser values are
    reported by field before anything compiles."""
    from configs import video, video_quick
    from fdistill import validation
    for module in (video, video_quick):
        c = module.get_config()
        d = c.distill
        assert (d.fkl_target, d.fkl_steps, d.noise_schedule, d.timestep_shift) == (
            "chord", 1, "shifted", 5.0)
        assert 1.0 / (1.0 - d.ema_rate) <= d.num_steps / 10, module.__name__
        assert validation.problems(c, "distill") == []
    rows = {name: video.get_config(name) for name in video.VARIANTS}
    assert rows["hiar_k4"].distill.fkl_steps == 4 and rows["hiar_k2"].distill.fkl_steps == 2
    assert rows["hiar_context_tj"].student.context == "input"
    assert rows["hiar"].student.context == "output"
    assert rows["self_forcing"].distill.order == "block_first"
    assert rows["hiar_causal_mask"].distill.fkl_mask == "block_causal"
    assert rows["hierarchical"].distill.fkl_weight == 0.0 < rows["hiar_js"].distill.fkl_weight
    bad = video.get_config()
    bad.distill.fkl_steps, bad.distill.timestep_shift = 5, 0.0
    found = validation.problems(bad, "distill")
    assert any("distill.fkl_steps = 5: must be <= config.student.num_steps = 4" in p
               for p in found), found
    assert any("distill.timestep_shift = 0.0" in p for p in found), found
