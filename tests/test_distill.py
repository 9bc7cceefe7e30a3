"""The distillation loop end to end on a 2-D toy, bad inputs, the NaN guard, and 1 vs 2 devices."""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ml_collections

from configs import distill_toy, toy
from fdistill import checkpoint, data, modes, sharding, train
from fdistill import workdir as workdir_lib
from tests.tiny import run_on_fake_devices


def toy_configs(tmp):
    """A small toy teacher (MLP 64 x 2, modes of std 0.15) and a short forward-KL distillation of
    it: (teacher config, distill config, the distill config resolved against the teacher)."""
    t = toy.get_config()
    t.data.std = 0.15
    t.model.hidden = 64
    t.model.depth = 2
    c = distill_toy.get_config()
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
    d.fake_score_optim.lr = 2e-3
    d.ode_init_steps = 0               # distribution matching alone, from the teacher's weights
    d.gan_weight = 0.1                 # the GAN term sharpens the one-step map between modes
    d.fake_score_weighting = "edm"
    return t, c, modes.resolve_config(c, t)


def make_teacher(config, workdir, *, steps=1500, batch=256, seed=0):
    """Trains the config's model by regression onto the toy's exact denoiser E[x0 | x_t] (noise
    levels log-uniform on [sigma_min, sigma_max]) and saves it like the teacher loop does."""
    model = modes.build_model(config)
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
    workdir_lib.write_config(workdir, config, mode="train")
    return train.merge(graphdef, params, others)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """A toy teacher (ring of 8 modes, std 0.15) trained once for the tests of this file."""
    t, c, resolved = toy_configs(tmp_path_factory.mktemp("distill"))
    make_teacher(t, c.distill.teacher_workdir)
    return t, c, resolved


def test_end_to_end_toy_distillation_recovers_all_modes(configs, tmp_path):
    """Forward-KL f-distill turns the teacher-initialised one-step student, which starts collapsed
    (no mode covered), into one that covers all 8 modes with 1 network evaluation per sample;
    the distill config carries no model: it is read from the teacher's workdir."""
    t, c, resolved = configs
    assert "model" not in c
    teacher, _ = modes.load_teacher(t, c.distill.teacher_workdir)
    start = modes.build_distillation(resolved, teacher, sharding.make_mesh())
    x0 = modes.draw_samples(modes.student_draw(resolved, start, 2048),
                            start.initial_state["student"], resolved, 2048, 2048,
                            jax.random.key(1))
    before = modes.toy_metrics(resolved, x0)
    assert before["recall"] <= 0.25
    results = modes.distill(c, str(tmp_path))
    assert results["nfe"] == 1 and results["steps"] == c.distill.num_steps
    assert results["student/recall"] >= 0.875, results
    assert results["student/precision"] > 0.5, results
    assert results["student/kl_qp"] < before["kl_qp"] / 10
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["student/recall"] == results["student/recall"]
    assert (tmp_path / "student_samples.png").exists()
    assert workdir_lib.read_config(str(tmp_path)).model.hidden == 64    # recorded, resolved
    sampled = modes.sample(toy.get_config(), str(tmp_path))   # --mode=sample with any config
    assert sampled["sample/nfe"] == 1 and sampled["sample/recall"] >= 0.875


def test_regression_term_feeds_the_teachers_pairs_through_the_loop(configs, tmp_path):
    """With distill.regression_weight > 0 and no ODE initialisation, the teacher's pairs are drawn
    into the workdir and each student iteration regresses on a minibatch of them: the logged
    regression loss is the student's, finite, and the pairs are the configured count."""
    _, c, _ = configs
    c = copy.deepcopy(c)
    c.distill.update(num_steps=10, log_every=5, ckpt_every=10, batch_size=32, num_pairs=64,
                     pair_substeps=2, regression_weight=1.0, num_eval_samples=64,
                     eval_batch_size=64)
    results = modes.distill(c, str(tmp_path))
    assert np.isfinite(results["final/student/loss_regression"]) and \
        results["final/student/loss_regression"] > 0
    with np.load(tmp_path / "ode_pairs.npz") as f:
        assert f["x0"].shape == (64, 2) and f["states"].shape == (64, 1, 2)


def test_missing_teacher_or_own_workdir_fails_before_compiling(configs, tmp_path):
    _, c, _ = configs
    c = copy.deepcopy(c)
    teacher_dir = c.distill.teacher_workdir
    c.distill.teacher_workdir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="teacher_workdir.*config.json"):
        modes.distill(c, str(tmp_path / "out"))
    c.distill.teacher_workdir = ""
    with pytest.raises(ValueError, match="teacher_workdir is empty"):
        modes.distill(c, str(tmp_path / "out"))
    c.distill.teacher_workdir = teacher_dir
    with pytest.raises(ValueError, match="teacher's own workdir"):
        modes.distill(c, teacher_dir)
    assert not (tmp_path / "out" / "checkpoints").exists()
    workdir_lib.write_config(str(tmp_path / "out"), c, mode="distill")
    with pytest.raises(FileNotFoundError, match="no student checkpoint"):
        modes.sample(c, str(tmp_path / "out"))


def test_bad_distill_settings(configs):
    t, _, resolved = configs
    teacher = modes.build_model(t)
    mesh = sharding.make_mesh()
    c = copy.deepcopy(resolved)
    c.distill.divergence = "wasserstein"
    with pytest.raises(ValueError, match="jensen_shannon"):
        modes.build_distillation(c, teacher, mesh)
    c = copy.deepcopy(resolved)
    c.distill.student_update_every = 1
    with pytest.raises(ValueError, match="student_update_every"):
        modes.build_distillation(c, teacher, mesh)
    c = copy.deepcopy(resolved)
    c.distill.feature_source = "student"
    with pytest.raises(ValueError, match="fake_score"):
        modes.build_distillation(c, teacher, mesh)


def test_nonfinite_loss_skips_the_update_and_stops(configs):
    t, _, resolved = configs
    c = copy.deepcopy(resolved)
    c.distill.batch_size = 16
    mesh = sharding.make_mesh()
    d = modes.build_distillation(c, modes.build_model(t), mesh)
    ds = data.get_dataset(c.data, global_batch_size=16, seed=0)
    batch = lambda i: modes.with_one_hot_labels(ds.batch(i), 0)
    state, _ = d.step(d.initial_state, 0, sharding.global_batch(batch(0), mesh))
    before = jax.tree.map(np.asarray, {k: state[k] for k in ("fake_score", "disc", "student")})
    bad = batch(1)
    bad["x"] = np.full_like(bad["x"], np.nan)
    state, _ = d.step(state, 1, sharding.global_batch(bad, mesh))
    after = jax.tree.map(np.asarray, {k: state[k] for k in ("fake_score", "disc", "student")})
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert int(state["step"]) == 2
    with pytest.raises(train.NonFiniteError, match=r"step 1: .*critic/loss=nan"):
        train.check_finite(state)


def test_nonfinite_parameters_are_never_kept(configs):
    """A finite loss whose update makes the parameters NaN (a NaN learning rate) is caught by the
    state check: the update is skipped and the record names the state entry."""
    t, _, resolved = configs
    c = copy.deepcopy(resolved)
    c.distill.batch_size = 16
    c.distill.student_optim.lr = float("nan")
    mesh = sharding.make_mesh()
    d = modes.build_distillation(c, modes.build_model(t), mesh)
    ds = data.get_dataset(c.data, global_batch_size=16, seed=0)
    state, _ = d.step(d.initial_state, 0, sharding.global_batch(
        modes.with_one_hot_labels(ds.batch(0), 0), mesh))
    for leaf in jax.tree.leaves(state["student"]) + jax.tree.leaves(state["student_ema"]):
        assert np.all(np.isfinite(np.asarray(leaf)))
    with pytest.raises(train.NonFiniteError, match=r"step 0: .*state/student=nan"):
        train.check_finite(state)


MULTI_DEVICE = r"""
import json, sys
import jax, numpy as np
from jax.sharding import AxisType, Mesh
sys.path.insert(0, '.')
from configs import distill_toy, toy
from fdistill import data, modes, sharding

assert jax.device_count() == 2
t = toy.get_config()
t.model.hidden, t.model.depth = 128, 1          # 128 x 128 weights are sharded under fsdp
c = modes.resolve_config(distill_toy.get_config(), t)
c.distill.batch_size = 8
c.distill.r1_weight = 1.0
teacher = modes.build_model(c)
ds = data.get_dataset(c.data, global_batch_size=8, seed=0)
runs = {"1": (1, "replicated", 1, "teacher"), "2": (2, "replicated", 1, "teacher"),
        "1few": (1, "replicated", 2, "fake_score"), "2few": (2, "fsdp", 2, "fake_score")}
out = {}
for name, (n, mode, steps, source) in runs.items():
    c.distill.param_sharding, c.distill.student_steps = mode, steps
    c.distill.feature_source = source
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))
    d = modes.build_distillation(c, teacher, mesh)
    state, hist = d.initial_state, []
    for i in range(3):
        state, m = d.step(state, i, sharding.global_batch(
            modes.with_one_hot_labels(ds.batch(i), 0), mesh))
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


def test_sampling_labels_are_uniform_random_from_a_seed():
    """Evaluation labels are drawn uniformly at random from a fixed key (EDM's convention): over
    50,000 samples in batches of 250, all 1000 ImageNet classes appear, with counts within
    sampling error of 50 each, and the same key gives the same labels."""
    c = ml_collections.ConfigDict({"data": {"num_classes": 1000}})
    labels = modes.label_draws(c, jax.random.key(0), 250)
    idx = np.concatenate([labels(i)[1] for i in range(200)])
    counts = np.bincount(idx, minlength=1000)
    assert counts.min() > 0 and len(idx) == 50_000
    chi2 = ((counts - 50.0) ** 2 / 50.0).sum()              # ~ chi^2 with 999 dof
    assert abs(chi2 - 999) < 5 * np.sqrt(2 * 999)
    np.testing.assert_array_equal(labels(3)[1], modes.label_draws(c, jax.random.key(0), 250)(3)[1])
    assert labels(0)[0].shape == (250, 1000)
    none = modes.label_draws(ml_collections.ConfigDict({"data": {"num_classes": 0}}),
                             jax.random.key(0), 4)
    assert none(0) == (None, None)


def test_distillation_matches_the_pre_refactor_losses():
    """The shared core gives the image distillation's losses of the code it replaced (golden
    values recorded from it: 7 iterations, student and critic, both feature sources) to 1e-6
    relative, 1e-7 absolute: the critic's logits are ~1e-3, and another CPU's vector width moves
    them by ~1e-8 (an AVX-512 machine here: at most 1.2e-7 absolute on any metric)."""
    with open(os.path.join(os.path.dirname(__file__), "golden", "distill_pin.json")) as f:
        golden = json.load(f)
    t = toy.get_config()
    t.model.hidden, t.model.depth = 32, 2
    for source in ("teacher", "fake_score"):
        c = distill_toy.get_config()
        c.distill.update(divergence="js", feature_source=source, batch_size=32, r1_weight=0.0,
                         ratio_bins=1, ratio_ema_rate=0.5, gan_weight=1e-2,
                         disc_resolutions=(0,), fake_score_weighting="edm")
        c.distill.student_optim.lr = 1e-3             # the toy config's values when recorded
        c.distill.fake_score_optim.lr = 2e-3
        c = modes.resolve_config(c, t)
        mesh = sharding.make_mesh()
        ds = modes.dataset(c, c.distill.batch_size)
        d = modes.build_distillation(c, modes.build_model(c, seed=7), mesh)
        state = d.initial_state
        for i, want in enumerate(golden[source]):
            state, m = d.step(state, i, sharding.global_batch(
                modes.with_one_hot_labels(ds.batch(i), 0), mesh))
            got = {k: float(v) for k, v in sharding.to_host(m).items()}
            for k, v in want.items():
                np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7,
                                           err_msg=f"{source} step {i} {k}")


def test_one_compiled_program_serves_every_seed():
    """The seed's key is an argument of the jitted steps, not a constant folded into them: two
    seeds lower the student, critic and teacher steps to the same program text (one entry in the
    compilation cache), and the seeds still draw different noise."""
    t = toy.get_config()
    t.model.hidden, t.model.depth = 32, 2
    mesh = sharding.make_mesh()
    texts, losses = [], []
    for seed in (0, 1):
        c = distill_toy.get_config()
        c.seed = seed
        c.distill.batch_size = 32
        c = modes.resolve_config(c, t)
        ds = modes.dataset(c, 32)
        batch = sharding.global_batch(modes.with_one_hot_labels(ds.batch(0), 0), mesh)
        d = modes.build_distillation(c, modes.build_model(c, seed=7), mesh)
        args = (d.initial_state, d.teacher_params, batch, d.key)
        tx = train.make_optimizer(t.optim)
        graphdef, others, state = train.init_state(modes.build_model(t, seed=7), tx)
        teacher_step = train.make_teacher_step(
            graphdef, others, lambda m, k, b: (jnp.mean(m(b["x"], jnp.ones(b["x"].shape[:1]))
                                                        * jax.random.normal(k, ())), {}),
            tx, ema_rate=0.9, key=jax.random.key(seed), mesh=mesh,
            state_sharding=train.state_shardings(state, mesh))
        texts.append((d.student_step.lower(*args).as_text(), d.critic_step.lower(*args).as_text(),
                      teacher_step.func.lower(*teacher_step.args, state, batch).as_text()))
        losses.append(float(d.step(jax.tree.map(jnp.copy, d.initial_state), 1, batch)[1]
                            ["critic/loss"]))
    assert texts[0] == texts[1]
    assert losses[0] != losses[1]
