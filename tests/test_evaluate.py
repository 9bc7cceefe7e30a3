"""--mode=fid_stats and --mode=eval end to end: a tiny teacher on tfds mock CIFAR-10 scored with
random-weight Inception (pipeline only, never a reported number), the in-domain digits path with
class accuracy, periodic evaluation with the best checkpoint, and bad input."""
import json
import os

import jax
import numpy as np
import pytest

from configs import cifar10_edm_ddpmpp, digits, distill_digits
from fdistill import checkpoint, data, modes, train
from fdistill import workdir as workdir_lib
from fdistill.evaluation import classifier, fid, inception, scoring
from tests.test_teacher_e2e import _tiny_unet, mock_cifar10  # noqa: F401 (fixture)


def _data_draw(ds, batch_size, *, labels=True, shuffle_labels=False):
    """draw_batch over the dataset's own images (with their labels): a perfect generator."""
    rng = np.random.default_rng(0)

    def draw_batch(i):
        ex = ds.examples(np.arange(i * batch_size, (i + 1) * batch_size) % ds.num_examples)
        lab = rng.permutation(ex["label"]) if shuffle_labels else ex["label"]
        return ex["x"], (lab if labels else None)
    return draw_batch


def _results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def _frechet_psd(mu1, sigma1, mu2, sigma2) -> float:
    """Heusel et al. eq. 6 for PSD covariances by symmetric eigendecompositions:
    Tr (S1 S2)^{1/2} = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})). Equal to fid.frechet_distance (checked
    on the digits statistics below) but seconds instead of minutes for rank-3 2048-d covariances
    on a shared CPU (scipy's sqrtm, then its eps retry)."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ sigma2 @ root)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def _save_untrained_teacher(config, workdir, step=2):
    """The checkpoint and config record --mode=train would write, with the initial weights (no
    training compile)."""
    graphdef, others, state = train.init_state(modes.build_model(config),
                                               train.make_optimizer(config.optim))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    ckpt.save(step, state)
    ckpt.close()
    workdir_lib.write_config(workdir, config, mode="train")
    return state


def _teacher_draw_for_state(config, model):
    """``draw_for_state(state, key, batch_size) -> draw_batch`` sampling ``model``'s network with
    the EMA parameters of a training state, labels drawn as the modes draw them."""
    graphdef, _, others = train.split(model)
    samplers = {}

    def draw_for_state(state, key, batch_size):
        if batch_size not in samplers:
            samplers[batch_size] = modes.TeacherSampler(config, graphdef, others, batch_size)
        return _draw_batches(samplers[batch_size], state["ema"], config, key, batch_size)

    return draw_for_state


def _draw_batches(draw, params, config, key, batch_size):
    """draw_batch(i) -> (samples, class indices) with noise fold_in(key, i) and the labels of
    modes.label_draws(fold_in(key, 1))."""
    labels = modes.label_draws(config, jax.random.fold_in(key, 1), batch_size)

    def draw_batch(i):
        one_hot, idx = labels(i)
        return draw(params, jax.random.fold_in(key, i), one_hot), idx

    return draw_batch


# ---------------------------------------------------------------------------------------------
# Inception path on mock CIFAR-10.

def test_cifar10_fid_stats_then_eval_with_random_inception(tmp_path, mock_cifar10,  # noqa: F811
                                                           monkeypatch):
    monkeypatch.setattr(fid, "frechet_distance", _frechet_psd)
    weights = str(tmp_path / "random_inception.npz")
    np.savez(weights, **inception.random_state_dict(0))
    config = _tiny_unet(cifar10_edm_ddpmpp.get_config(), mock_cifar10)
    config.eval.update(features="inception", inception_weights=weights, num_samples=4,
                       monitoring=True, batch_size=4)
    workdir = str(tmp_path / "run")
    _save_untrained_teacher(config, workdir)

    stats = modes.fid_stats(config, workdir)["fid_stats/protocol"]
    ref_path = os.path.join(workdir, "ref_stats.npz")
    sha = inception.file_sha256(weights)
    assert stats["path"] == ref_path and stats["num_samples"] == 4  # the first 4 of 8
    assert stats["inception_weights_sha256"] == sha and stats["features"] == "inception"
    ref = fid.load_stats(ref_path)
    assert ref["mu"].shape == (2048,) and ref["features"].shape == (4, 2048)
    assert _results(workdir)["fid_stats/protocol"]["dataset_num_examples"] == 8

    # The dataset against its own statistics: FID ~0 (float32 features) and perfect precision and
    # recall.
    net = scoring.feature_network(config, workdir)
    ds = data.get_dataset(config.data, global_batch_size=1)
    own = scoring.sample_metrics(config, net, ref_path, _data_draw(ds, 4, labels=False), 4,
                                 monitoring=True, progress=False)
    assert abs(own["fid_4"]) < 1e-4, own
    assert own["precision_4"] == 1.0 and own["recall_4"] == 1.0

    out = modes.evaluate(config, workdir)
    assert set(out) == {"eval/fid_4", "eval/is_4", "eval/is_4_std", "eval/precision_4",
                        "eval/recall_4", "eval/protocol"}
    # Samples of a 2-step network are noise, far from the data in any features.
    assert out["eval/fid_4"] > 100 * max(abs(own["fid_4"]), 1e-3), (out, own)
    # IS over 4 samples uses 4 splits of one sample: each split's marginal p(y) is that sample's
    # p(y|x), so KL = 0 and IS = exp(0) = 1 exactly, with no spread across splits.
    assert out["eval/is_4"] == pytest.approx(1.0, abs=1e-9)
    assert out["eval/is_4_std"] == pytest.approx(0.0, abs=1e-9)
    p = _results(workdir)["eval/protocol"]
    assert p["num_samples"] == 4 and p["monitoring"] is True and p["is_splits"] == 4
    assert p["reference_stats"] == ref_path
    assert p["reference_stats_sha256"] == inception.file_sha256(ref_path)
    assert p["inception_weights"] == os.path.abspath(weights)
    assert p["inception_weights_sha256"] == sha
    assert (p["model"], p["sampler"], p["sampler_steps"], p["nfe"]) == ("teacher", "heun", 2, 3)
    assert p["checkpoint_step"] == 2 and p["features"] == "inception"

    # The reported protocol refuses 4 samples before anything is drawn.
    config.eval.monitoring = False
    with pytest.raises(ValueError, match="50,000"):
        modes.evaluate(config, workdir)


# ---------------------------------------------------------------------------------------------
# In-domain path on digits.

def _digits_config():
    c = digits.get_config()
    c.model.update(model_channels=16, channel_mult=(1,), num_blocks=1, attn_resolutions=())
    c.training.update(batch_size=16, num_steps=2, log_every=1, ckpt_every=1000)
    c.optim.warmup = 0
    c.sampling.update(num_steps=2, batch_size=20)
    c.eval.update(features="classifier", num_samples=90, monitoring=True, batch_size=40,
                  periodic_num_samples=40)
    return c


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """An untrained digits teacher checkpoint, a quickly trained cached classifier, and fd
    reference statistics."""
    workdir = str(tmp_path_factory.mktemp("digits"))
    config = _digits_config()
    state = _save_untrained_teacher(config, workdir)
    classifier.get_classifier("digits", workdir, image_size=8, steps=150, verbose=False)
    stats = modes.fid_stats(config, workdir)["fid_stats/protocol"]
    return config, workdir, stats, state


def test_digits_in_domain_stats_and_eval(digits_run):
    config, workdir, stats, _ = digits_run
    clf_path = classifier.cache_path(workdir, "digits", (8, 8, 1))
    # num_samples=90 < 1,797 images: the first 90; the cached classifier was reused
    assert stats["num_samples"] == 90 and stats["dataset_num_examples"] == 1797
    assert stats["features"] == "classifier"
    assert stats["inception_weights_sha256"] == inception.file_sha256(clf_path)
    assert stats["classifier_test_accuracy"] > 0.8
    ref = fid.load_stats(os.path.join(workdir, "ref_stats.npz"))
    assert ref["mu"].shape == (classifier.NUM_FEATURES,)

    # Real digits with their labels: fd ~0 against their own statistics; accuracy equals the
    # classifier's on the same (uint8-quantised) images; shuffled labels drop it to ~chance.
    net = scoring.feature_network(config, workdir)
    ds = data.get_dataset(config.data, global_batch_size=1)
    real = scoring.sample_metrics(config, net, os.path.join(workdir, "ref_stats.npz"),
                                  _data_draw(ds, 40), 90, monitoring=True, progress=False)
    ex = ds.examples(np.arange(90))
    x = inception.to_uint8(ex["x"]).astype(np.float32) / 127.5 - 1.0
    expected = float((net.clf.predict(x) == ex["label"]).mean())
    assert real["accuracy_digits_90"] == pytest.approx(expected) and expected > 0.7
    assert abs(real["fd_digits_90"]) < 1e-3 and real["recall_digits_90"] == 1.0
    shuffled = scoring.sample_metrics(config, net, os.path.join(workdir, "ref_stats.npz"),
                                      _data_draw(ds, 40, shuffle_labels=True), 90,
                                      monitoring=True, progress=False)
    assert shuffled["accuracy_digits_90"] < 0.4
    gen = np.concatenate([_data_draw(ds, 40)(i)[0] for i in range(2)])[:80]
    feats = net(inception.to_uint8(gen))[0]
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert _frechet_psd(mu, sigma, ref["mu"], ref["sigma"]) == pytest.approx(
        fid.frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), rel=1e-5)  # its eps retry

    out = modes.evaluate(config, workdir)
    assert set(out) == {"eval/fd_digits_90", "eval/precision_digits_90", "eval/recall_digits_90",
                        "eval/accuracy_digits_90", "eval/protocol"}  # no FID, no IS
    assert out["eval/fd_digits_90"] > 100 * max(abs(real["fd_digits_90"]), 1e-3)
    p = _results(workdir)["eval/protocol"]
    assert p["features"] == "classifier" and p["inception_weights"] == clf_path
    assert (p["model"], p["nfe"], p["num_samples"]) == ("teacher", 3, 90)
    assert "is_splits" not in p and p["classifier_test_accuracy"] == stats[
        "classifier_test_accuracy"]


def test_periodic_eval_and_best_checkpoint(digits_run, tmp_path):
    config, workdir, _, state = digits_run
    model, _ = modes.load_teacher(config, workdir)
    evaluator = scoring.PeriodicEval(config, workdir)
    assert evaluator.metric == "eval/fd_digits_40"
    bs = evaluator.batch_size

    def teacher_draw(model):
        draw, params = modes.teacher_sampler(config, model, bs)
        return _draw_batches(draw, params, config, evaluator.key, bs)

    first = evaluator(teacher_draw(model))
    assert set(first) == {"eval/fd_digits_40", "eval/precision_digits_40",
                          "eval/recall_digits_40", "eval/accuracy_digits_40"}
    assert evaluator(teacher_draw(model)) == first  # same noise, same weights: same numbers
    worse = modes.build_model(config, seed=5)  # other weights: another value
    assert evaluator(teacher_draw(worse))["eval/fd_digits_40"] != first["eval/fd_digits_40"]

    run = str(tmp_path)
    best = scoring.BestCheckpoint(run, evaluator.metric)
    assert best.lower
    value = first["eval/fd_digits_40"]
    assert best.update(2, first, state)
    assert not best.update(4, {evaluator.metric: value + 1.0}, state)
    assert not best.update(5, {evaluator.metric: float("nan")}, state)
    assert best.update(6, {evaluator.metric: value - 1.0}, state)
    assert checkpoint.Checkpointer(os.path.join(run, "best")).all_steps() == [6]
    again = scoring.BestCheckpoint(run, evaluator.metric)  # a resumed run reads the record
    assert again.best == {"metric": evaluator.metric, "value": value - 1.0, "step": 6}
    assert not again.update(8, {evaluator.metric: value}, state)
    step, restored = checkpoint.Checkpointer(os.path.join(run, "best")).restore_latest(state)
    assert step == 6
    jax.tree.map(np.testing.assert_array_equal, restored["ema"], state["ema"])
    assert not scoring.BestCheckpoint(run, "eval/is_10k").lower
    with pytest.raises(KeyError, match="fd_digits_40"):
        best.update(9, {"eval/fid_10k": 1.0}, state)

    # The hook for train.fit(on_log=...): only at multiples of eval.every.
    draw_for_state = _teacher_draw_for_state(config, model)
    assert config.eval.every == 0
    assert scoring.periodic_hook(config, workdir, draw_for_state, every=0) is None
    config = config.copy_and_resolve_references()
    config.eval.every = 2
    hook = scoring.periodic_hook(config, workdir, draw_for_state, every=2)
    assert hook(1, state) == {}
    assert hook(2, state) == first
    with open(os.path.join(workdir, "best.json")) as f:
        assert json.load(f) == {"metric": evaluator.metric, "value": value, "step": 2}

    # ... wired into the teacher loop: --mode=train scores the EMA teacher and keeps the best.
    config.eval.ref_stats = os.path.join(workdir, "ref_stats.npz")
    trained = str(tmp_path / "trained")
    out = modes.train_teacher(config, trained)
    with open(os.path.join(trained, "best.json")) as f:
        record = json.load(f)
    assert record["step"] == 2 and out[f"final/{evaluator.metric}"] == record["value"]
    assert checkpoint.Checkpointer(os.path.join(trained, "best")).all_steps() == [2]


@pytest.mark.skipif(os.environ.get("FDISTILL_SLOW_TESTS", "0") != "1",
                    reason="compiles a DDPM++ distillation step (minutes of XLA:CPU compile on a "
                           "cold cache): run with FDISTILL_SLOW_TESTS=1")
def test_student_periodic_eval_keeps_the_best_state(digits_run, tmp_path):
    """The distill loop scores its EMA student every distill.eval_every iterations with the
    one-step sampler and keeps the best state; the value is the student's, not the teacher's."""
    config, teacher_dir, _, _ = digits_run
    c = distill_digits.get_config()
    c.sampling, c.eval = config.sampling, config.eval
    c.eval.ref_stats = os.path.join(teacher_dir, "ref_stats.npz")
    c.distill.update(teacher_workdir=teacher_dir, batch_size=8, num_steps=2, log_every=1,
                     ckpt_every=1000, eval_every=2, num_eval_samples=8, eval_batch_size=8,
                     student_update_every=2, disc_resolutions=(8,), ode_init_steps=0)
    run = str(tmp_path)
    out = modes.distill(c, run)
    metric = "eval/fd_digits_40"
    with open(os.path.join(run, "best.json")) as f:
        record = json.load(f)
    assert record["metric"] == metric and record["step"] == 2
    assert out[f"final/{metric}"] == pytest.approx(record["value"])

    c = modes.run_config(c, run)  # the teacher's networks, recorded by the distillation
    assert c.model.to_dict() == config.model.to_dict()
    distillation, state = modes.load_student(c, run)
    best_step, best = checkpoint.Checkpointer(os.path.join(run, "best")).restore_latest(state)
    assert best_step == 2
    evaluator = scoring.PeriodicEval(c, run)
    bs = evaluator.batch_size
    student = evaluator(_draw_batches(modes.student_draw(c, distillation, bs),
                                      best["student_ema"], c, evaluator.key, bs))
    assert student[metric] == pytest.approx(record["value"], rel=1e-4)
    draw, params = modes.teacher_sampler(config, modes.load_teacher(config, teacher_dir)[0], bs)
    teacher = evaluator(_draw_batches(draw, params, config, evaluator.key, bs))
    assert teacher[metric] != pytest.approx(record["value"], rel=1e-2)


# ---------------------------------------------------------------------------------------------
# Bad input.

def test_bad_input_names_the_problem_and_the_fix(tmp_path):
    config = _digits_config()
    workdir = str(tmp_path)
    config.eval.features = "fid"
    with pytest.raises(ValueError, match="inception, classifier"):
        modes.fid_stats(config, workdir)
    cifar = cifar10_edm_ddpmpp.get_config()
    cifar.eval.features = "classifier"
    with pytest.raises(ValueError, match="features='inception'"):
        modes.fid_stats(cifar, workdir)
    cifar.eval.features = "inception"
    with pytest.raises(FileNotFoundError, match="inception_weights is empty.*pytorch-fid"):
        modes.fid_stats(cifar, workdir)
    cifar.eval.inception_weights = str(tmp_path / "pt_inception.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception.pth.*convert_inception"):
        modes.fid_stats(cifar, workdir)

    # eval checks the protocol, then the reference file, before any checkpoint or model
    config.eval.features = "classifier"
    config.eval.monitoring = False
    with pytest.raises(ValueError, match="50,000"):
        modes.evaluate(config, workdir)
    config.eval.monitoring = True
    with pytest.raises(FileNotFoundError, match="ref_stats.npz.*--mode=fid_stats"):
        modes.evaluate(config, workdir)
    with pytest.raises(FileNotFoundError, match="ref_stats.npz.*--mode=fid_stats"):
        scoring.PeriodicEval(config, workdir)
    with pytest.raises(FileNotFoundError, match="ref_stats.npz.*--mode=fid_stats"):
        scoring.periodic_hook(config, workdir, lambda *a: None, every=2)
    with pytest.raises(ValueError, match="every=300 steps must be a multiple of the log interval "
                                         "200"):
        scoring.periodic_hook(config, workdir, lambda *a: None, every=300, log_every=200)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
