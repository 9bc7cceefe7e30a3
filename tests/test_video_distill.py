"""Video teacher loss, forward-KL regulariser, HiAR self-rollout distillation end to end."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.video import get_config
from fdistill import sde
from fdistill.video import distill as VD
from fdistill.video import hiar
from tests.test_video_model import BS, SIZE, T, tiny_denoiser
from tests.tiny import run_on_fake_devices


def tiny_config():
    c = get_config()
    c.data.num_frames, c.data.size, c.data.square = T, SIZE, 3.0
    c.model.dim, c.model.depth, c.model.num_heads, c.model.mlp_ratio = 16, 1, 2, 2
    c.training.batch_size, c.training.num_steps = 8, 12
    c.training.log_every = c.training.ckpt_every = 12
    c.sampling.num_steps = 2
    c.student.num_steps, c.student.block_size, c.student.window = 2, BS, T
    d = c.distill
    d.num_pairs, d.pair_substeps, d.ode_init_steps = 8, 2, 0
    d.batch_size = d.fkl_batch_size = 4
    d.num_iters, d.critic_ratio, d.ema_rate = 4, 2, 0.0
    d.log_every = d.ckpt_every = 4
    return c


class GaussianDenoiser:
    """The exact denoiser of N(0, s^2) pixels: D(x, sigma) = s^2 / (s^2 + sigma^2) x."""
    process = sde.EDM()

    def __call__(self, x, sigma):
        s2 = self.process.sigma_data ** 2
        return (s2 / (s2 + sigma ** 2))[:, :, None, None, None] * x


@pytest.mark.parametrize("mode", ["shared", "per_frame"])
def test_edm_loss_of_the_exact_denoiser_is_one(mode):
    """lambda(sigma) * E||D*(x_t) - x||^2 = 1 for every sigma when the data are N(0, sigma_data^2)."""
    x = 0.5 * jax.random.normal(jax.random.key(0), (256, T, SIZE, SIZE, 1))
    loss, metrics = VD.edm_video_loss(GaussianDenoiser(), jax.random.key(1), {"x": x},
                                      sigma_mode=mode)
    assert abs(float(loss) - 1.0) < 0.02 and metrics["train/edm_loss"] == loss
    with pytest.raises(ValueError, match="valid: shared, per_frame"):
        VD.edm_video_loss(GaussianDenoiser(), jax.random.key(1), {"x": x}, sigma_mode="frame")


def _setup(divergence="reverse_kl", fkl_mask="bidirectional"):
    c = tiny_config()
    c.distill.divergence, c.distill.fkl_mask = divergence, fkl_mask
    teacher, student, fake = tiny_denoiser(0, depth=1), tiny_denoiser(1, depth=1), tiny_denoiser(2, depth=1)
    disc = VD.FrameDiscriminator(teacher.net.dim, rngs=nnx.Rngs(0))
    return c, teacher, student, fake, disc


def test_regulariser_and_student_loss_gradients_reach_only_the_student():
    """The teacher draws its ODE pairs inside the differentiated function; the student loss
    (distribution matching + forward-KL regulariser) must not move teacher, fake score or D."""
    c, teacher, student, fake, disc = _setup()
    distiller = VD.VideoDistiller(c, teacher.process)
    sigmas = VD.student_sigmas_of(c, teacher.process)
    grid, where = hiar.teacher_grid(sigmas, 2)
    z = jax.random.normal(jax.random.key(3), (4, T, SIZE, SIZE, 1))
    graphs = {k: nnx.split(m) for k, m in dict(s=student, t=teacher, f=fake, d=disc).items()}

    def loss(states):
        m = {k: nnx.merge(graphs[k][0], states[k]) for k in states}
        x0, kept = hiar.heun(m["t"], grid[0] * z, grid, record=tuple(where))
        pairs = {"states": jnp.stack(kept), "x0": x0}
        reg = VD.fkl_regulariser(m["s"], pairs, mask="bidirectional")
        total, _ = distiller.student_loss(m["s"], m["t"], m["f"], m["d"], jax.random.key(4),
                                          (T, SIZE, SIZE, 1), 4, pairs)
        return reg + total

    grads = jax.jit(jax.grad(loss))({k: g[1] for k, g in graphs.items()})
    norm = lambda tree: sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(tree))
    assert norm(grads["s"]) > 0
    assert norm(grads["t"]) == 0 and norm(grads["f"]) == 0 and norm(grads["d"]) == 0


def test_regulariser_mask_switch_changes_the_prediction():
    c, teacher, student, *_ = _setup()
    sigmas = VD.student_sigmas_of(c, teacher.process)
    pairs = VD.ode_pairs(teacher, jax.random.key(0), 4, (T, SIZE, SIZE, 1), sigmas, substeps=1,
                         batch_size=4)
    assert pairs["states"].shape == (2, 4, T, SIZE, SIZE, 1)
    np.testing.assert_allclose(pairs["states"][0],
                               80.0 * jax.random.normal(jax.random.fold_in(jax.random.key(0), 0),
                                                        (4, T, SIZE, SIZE, 1)), rtol=1e-6)
    bi = VD.fkl_regulariser(student, pairs, mask="bidirectional")
    bc = VD.fkl_regulariser(student, pairs, mask="block_causal", block_size=BS)
    assert abs(float(bi) - float(bc)) > 1e-4
    with pytest.raises(ValueError, match="valid: bidirectional, block_causal"):
        VD.fkl_regulariser(student, pairs, mask="causal")


def test_discriminator_is_used_only_for_divergences_that_need_r():
    """JS weights by h(r) = r / (r + 1), so it trains D (logistic loss 2 log 2 at the
    zero-initialised head); reverse-KL has h = 1 and trains only the fake score."""
    real = jax.random.normal(jax.random.key(5), (4, T, SIZE, SIZE, 1))
    for name, uses in (("jensen_shannon", True), ("reverse_kl", False)):
        c, teacher, student, fake, disc = _setup(name)
        distiller = VD.VideoDistiller(c, teacher.process)
        assert distiller.use_ratio is uses
        loss, metrics = distiller.critic_loss(fake, disc, student, teacher, jax.random.key(6), real)
        assert ("critic/loss_d" in metrics) is uses
        if uses:
            np.testing.assert_allclose(metrics["critic/loss_d"], 2 * math.log(2), rtol=1e-6)


def test_bad_distillation_configs():
    c, teacher, *_ = _setup()
    for field, value, message in (("divergence", "kl_reverse", "Unknown divergence"),
                                  ("order", "frame_first", "valid: block_first, hierarchical"),
                                  ("fkl_mask", "causal", "valid: bidirectional, block_causal")):
        bad = tiny_config()
        bad.distill[field] = value
        with pytest.raises(ValueError, match=message):
            VD.VideoDistiller(bad, teacher.process)
    bad = tiny_config()
    bad.student.block_size = 3
    with pytest.raises(ValueError, match="not divisible by the block size 3"):
        VD.VideoDistiller(bad, teacher.process)


def test_end_to_end_teacher_then_student_improves_its_losses(tmp_path):
    """Through the command line (--mode=train / sample / distill / sample with a video config):
    the teacher trains and samples, the ODE initialisation and the distillation (FKL weight 1)
    improve their losses, the student's rollout is scored; other modes and a missing teacher fail
    with the fix."""
    from fdistill import main
    c = tiny_config()
    c.eval.num_clips = 4
    teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "cli_student")
    with pytest.raises(ValueError, match="valid modes for video: train, distill, sample"):
        main.run(c, teacher_dir, "likelihood")
    results = main.run(c, teacher_dir, "train")
    assert results["steps"] == 12 and "teacher/speed" in results and "data/speed" in results
    assert os.path.exists(tmp_path / "teacher" / "samples.gif")
    with open(tmp_path / "teacher" / "results.json") as f:
        assert json.load(f)["steps"] == 12
    out = main.run(c, teacher_dir, "sample")
    assert out["sample/nfe"] == 2 * c.sampling.num_steps - 1
    assert 0 <= out["teacher/dynamic"] <= 1 and out["data/speed"] > 0

    # The command line's distillation draws its ODE pairs and initialises the student exactly
    # like this (same seeds), so the test can score the student before and after it.
    teacher = VD.load_video_teacher(c, teacher_dir)
    d = c.distill
    d.update(num_iters=4, log_every=4, ckpt_every=4, ode_init_steps=8, fkl_weight=1.0)
    d.student_optim.lr = 3e-3
    sigmas = VD.student_sigmas_of(c, teacher.process)
    pairs = VD.ode_pairs(teacher, jax.random.key(c.seed + 11), d.num_pairs, (T, SIZE, SIZE, 1),
                         sigmas, substeps=d.pair_substeps)
    student, losses = VD.ode_initialise(VD._copy(teacher), pairs, sigmas, block_size=BS,
                                        num_steps=d.ode_init_steps, batch_size=d.batch_size,
                                        lr=d.student_optim.lr, seed=c.seed)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    before = float(VD.fkl_regulariser(student, pairs))

    d.teacher_workdir = ""
    with pytest.raises(ValueError, match="teacher_workdir is empty"):
        main.run(c, student_dir, "distill")
    d.teacher_workdir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no teacher checkpoint"):
        main.run(c, student_dir, "distill")
    d.teacher_workdir = teacher_dir
    out = main.run(c, student_dir, "distill")
    assert out["order"] == "hierarchical" and np.isfinite(out["final/critic/loss_dsm"])
    assert all(np.isfinite(out[f"student/{k}"]) for k in ("speed", "dynamic", "drift"))
    assert os.path.exists(os.path.join(student_dir, "student_rollout.gif"))
    distilled = VD.load_video_student(c, teacher, student_dir)
    assert float(VD.fkl_regulariser(distilled, pairs)) < before
    again = main.run(c, student_dir, "sample")              # the student, not the teacher
    assert again["student/speed"] == pytest.approx(out["student/speed"])
    assert "teacher/speed" not in again


VIDEO_MULTI_DEVICE = r"""
import json, sys
import jax, numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, '.')
from fdistill.data.video import get_video_dataset
from fdistill.video import distill as VD
from tests.test_video_distill import tiny_config
from tests.test_video_model import tiny_denoiser

assert jax.device_count() == 2
c = tiny_config()
c.distill.fkl_weight = 0.1
teacher = tiny_denoiser(0, depth=1)
ds = get_video_dataset(c.data, global_batch_size=c.distill.batch_size, seed=0)
sigmas = VD.student_sigmas_of(c, teacher.process)
k_z, k_x0 = jax.random.split(jax.random.key(0))   # regulariser pairs: only their shapes matter
z = 80.0 * jax.random.normal(k_z, (8, *ds.shape))
pairs = {"states": jax.numpy.stack([z] * len(sigmas)), "x0": jax.random.normal(k_x0, z.shape)}
out = {}
c.distill.divergence = "js"
for name in ("1", "2"):
    mesh = Mesh(np.asarray(jax.devices()[:int(name)]), ("data",), axis_types=(AxisType.Auto,))
    graphs, state, txs = VD.init_distill_state(c, teacher)
    critic, student = VD.make_distill_steps(c, teacher, graphs, txs, shape=ds.shape, mesh=mesh)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    tp = jax.device_put(VD.train.split(teacher)[1], NamedSharding(mesh, P()))
    hist = []
    for i in range(2):
        x = jax.device_put(ds.batch(i)["x"], NamedSharding(mesh, P("data")))
        state, ms = student(state, tp, x, pairs)
        state, mc = critic(state, tp, x, pairs)
        hist.append({k: float(v) for k, v in {**ms, **mc}.items()})
    out[name] = hist
print("RESULT" + json.dumps(out))
"""


def test_video_distill_steps_match_on_one_and_two_devices():
    """Self-rollout student and critic steps (Jensen-Shannon, so the discriminator too; FKL
    regulariser on) give the same losses with the batches split over 2 fake CPU devices."""
    out = run_on_fake_devices(VIDEO_MULTI_DEVICE)
    for ma, mb in zip(out["1"], out["2"]):
        assert ma.keys() == mb.keys()
        for k in ma:
            np.testing.assert_allclose(ma[k], mb[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert "student/loss_fkl" in out["1"][0] and out["1"][0]["student/loss"] != 0.0
    assert out["1"][0]["critic/loss_dsm"] != out["1"][1]["critic/loss_dsm"]
