"""The distillation loop end to end on a 2-D toy, bad inputs, the NaN guard, and 1 vs 2 devices."""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import distill_toy
from fdistill import checkpoint, data, distill, generate, sharding, train
from tests.tiny import run_on_fake_devices


def toy_config(tmp):
    """A small toy teacher (MLP 64 x 2, modes of std 0.15) and a short forward-KL distillation."""
    c = distill_toy.get_config()
    c.data.std = 0.15
    c.model.hidden = 64
    c.model.depth = 2
    d = c.distill
    d.teacher_workdir = os.path.join(str(tmp), "teacher")
    d.batch_size = 256
    d.num_steps = 800
    d.log_every = 400
    d.ckpt_every = 800
    d.ema_rate = 0.9
    d.num_eval_samples = 2048
    d.eval_batch_size = 2048
    d.student_optim.lr = 1e-3
    return c


def make_teacher(config, workdir, *, steps=1500, batch=256, seed=0):
    """Trains the config's model by regression onto the toy's exact denoiser E[x0 | x_t] (noise
    levels log-uniform on [sigma_min, sigma_max]) and saves it like the teacher loop does."""
    model = train.build_model(config)
    tx_teacher = train.make_optimizer(config.optim)
    graphdef, others, state = train.init_state(model, tx_teacher)
    toy = data.toy.get_toy(config.data)
    p = config.process
    tx = optax.adam(2e-3)

    def loss(params, key):
        k0, k1, k2 = jax.random.split(key, 3)
        x0 = toy.sample(k0, batch)
        sigma = jnp.exp(jax.random.uniform(k1, (batch,), minval=np.log(p.sigma_min),
                                           maxval=np.log(p.sigma_max)))
        x_t = x0 + sigma[:, None] * jax.random.normal(k2, x0.shape)
        target = toy.denoise(x_t, 1.0, sigma)
        w = (sigma**2 + p.sigma_data**2) / (sigma * p.sigma_data) ** 2
        den = train.merge(graphdef, params, others)
        return jnp.mean(w * jnp.sum((den(x_t, sigma) - target) ** 2, -1))

    @jax.jit
    def step(params, opt, key):
        g = jax.grad(loss)(params, key)
        up, opt = tx.update(g, opt)
        return optax.apply_updates(params, up), opt

    params, opt = state["params"], tx.init(state["params"])
    for i in range(steps):
        params, opt = step(params, opt, jax.random.fold_in(jax.random.key(seed), i))
    state = dict(state, params=params, ema=params, step=jnp.asarray(steps, jnp.int32))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    ckpt.save(steps, state)
    ckpt.close()
    return train.merge(graphdef, params, others)


@pytest.fixture(scope="module")
def teacher_config(tmp_path_factory):
    """A toy teacher (ring of 8 modes, std 0.15) trained once for the tests of this file."""
    c = toy_config(tmp_path_factory.mktemp("distill"))
    make_teacher(c, c.distill.teacher_workdir)
    return c


def test_end_to_end_toy_distillation_recovers_all_modes(teacher_config, tmp_path):
    """Forward-KL f-distill turns the teacher-initialised one-step student, which starts collapsed
    (no mode covered), into one that covers all 8 modes with 1 network evaluation per sample."""
    c = teacher_config
    mesh = sharding.make_mesh()
    teacher, _ = distill.load_teacher(c)
    start = distill.Distiller(c, teacher, mesh)
    x0 = distill.draw_student_samples(start, start.initial_state["student"], 2048,
                                      jax.random.key(1), 2048)
    before = generate.toy_metrics(c, x0)
    assert before["recall"] <= 0.25
    results = distill.distill(c, str(tmp_path))
    assert results["nfe"] == 1 and results["steps"] == c.distill.num_steps
    assert results["student/recall"] >= 0.875, results
    assert results["student/precision"] > 0.5, results
    assert results["student/kl_qp"] < before["kl_qp"] / 10
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["student/recall"] == results["student/recall"]
    assert (tmp_path / "student_samples.png").exists()
    sampled = distill.sample(c, str(tmp_path))                # --mode=sample on the student
    assert sampled["sample/nfe"] == 1 and sampled["sample/recall"] >= 0.875


def test_missing_or_mismatched_teacher_fails_before_compiling(teacher_config, tmp_path):
    c = copy.deepcopy(teacher_config)
    c.distill.teacher_workdir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="teacher_workdir"):
        distill.distill(c, str(tmp_path / "out"))
    c.distill.teacher_workdir = ""
    with pytest.raises(ValueError, match="teacher_workdir is empty"):
        distill.distill(c, str(tmp_path / "out"))
    c = copy.deepcopy(teacher_config)
    c.model.hidden = 32                                   # the teacher was trained with 64
    with pytest.raises(ValueError, match="does not match"):
        distill.distill(c, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "checkpoints").exists()
    with pytest.raises(FileNotFoundError, match="no student checkpoint"):
        distill.sample(teacher_config, str(tmp_path / "out"))


def test_bad_distill_settings(teacher_config):
    teacher = train.build_model(teacher_config)
    mesh = sharding.make_mesh()
    c = copy.deepcopy(teacher_config)
    c.distill.divergence = "wasserstein"
    with pytest.raises(ValueError, match="jensen_shannon"):
        distill.Distiller(c, teacher, mesh)
    c = copy.deepcopy(teacher_config)
    c.distill.student_update_every = 1
    with pytest.raises(ValueError, match="student_update_every"):
        distill.Distiller(c, teacher, mesh)
    c = copy.deepcopy(teacher_config)
    c.distill.feature_source = "student"
    with pytest.raises(ValueError, match="fake_score"):
        distill.Distiller(c, teacher, mesh)


def test_nonfinite_loss_skips_the_update_and_stops(teacher_config):
    c = copy.deepcopy(teacher_config)
    c.distill.batch_size = 16
    teacher = train.build_model(c)
    mesh = sharding.make_mesh()
    d = distill.Distiller(c, teacher, mesh)
    ds = data.get_dataset(c.data, global_batch_size=16, seed=0)
    state, _ = d.step(d.initial_state, 0, sharding.global_batch(ds.batch(0), mesh))
    before = jax.tree.map(np.asarray, {k: state[k] for k in ("fake_score", "disc", "student")})
    bad = ds.batch(1)
    bad["x"] = np.full_like(bad["x"], np.nan)
    state, _ = d.step(state, 1, sharding.global_batch(bad, mesh))
    after = jax.tree.map(np.asarray, {k: state[k] for k in ("fake_score", "disc", "student")})
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert int(state["step"]) == 2
    with pytest.raises(train.NonFiniteError, match=r"step 1: .*critic/loss=nan"):
        train.check_finite(state)


MULTI_DEVICE = r"""
import json, sys
import jax, numpy as np
from jax.sharding import AxisType, Mesh
sys.path.insert(0, '.')
from configs import distill_toy
from fdistill import data, distill, sharding, train

assert jax.device_count() == 2
c = distill_toy.get_config()
c.model.hidden, c.model.depth = 128, 1          # 128 x 128 weights are sharded under fsdp
c.distill.batch_size = 8
c.distill.r1_weight = 1.0
teacher = train.build_model(c)
ds = data.get_dataset(c.data, global_batch_size=8, seed=0)
runs = {"1": (1, "replicated", 1, "teacher"), "2": (2, "replicated", 1, "teacher"),
        "1few": (1, "replicated", 2, "fake_score"), "2few": (2, "fsdp", 2, "fake_score")}
out = {}
for name, (n, mode, steps, source) in runs.items():
    c.distill.param_sharding, c.distill.student_steps = mode, steps
    c.distill.feature_source = source
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))
    d = distill.Distiller(c, teacher, mesh)
    state, hist = d.initial_state, []
    for i in range(3):
        state, m = d.step(state, i, sharding.global_batch(ds.batch(i), mesh))
        hist.append({k: float(v) for k, v in m.items()})
    out[name] = hist
print("RESULT" + json.dumps(out))
"""


def test_distill_steps_match_on_one_and_two_devices():
    """Student and critic steps (incl. R1, global h and r-bin means; replicated, and fsdp with a
    2-step student reading fake-score features) give the same losses on 1 and 2 fake CPU devices."""
    out = run_on_fake_devices(MULTI_DEVICE)
    for a, b in (("1", "2"), ("1few", "2few")):
        for ma, mb in zip(out[a], out[b]):
            assert ma.keys() == mb.keys()
            for k in ma:
                np.testing.assert_allclose(ma[k], mb[k], rtol=2e-5, atol=2e-6,
                                           err_msg=f"{a}/{b} {k}")
    first, last = out["1"][0], out["1"][-1]
    assert first["student/loss"] != 0.0 and last["critic/loss"] != 0.0 and "critic/r1" in last
    assert out["1"][1]["critic/loss"] != out["1"][2]["critic/loss"]


def test_student_samples_cycle_through_the_classes_across_batches():
    """Sample j is drawn for class j % num_classes whatever the batch size (what the in-domain
    accuracy compares against)."""
    class Conditional:
        num_classes = 10

        def sample_fn(self, batch_size):
            return lambda params, key, labels: np.asarray(labels).argmax(1)[:, None]

    x = distill.draw_student_samples(Conditional(), None, 12, jax.random.key(0), 5)
    assert x[:, 0].tolist() == [j % 10 for j in range(12)]
