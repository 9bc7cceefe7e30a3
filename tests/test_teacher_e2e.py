"""Teachers end to end through the real loop: a toy teacher learns its modes; the CIFAR-10 tfds
pipeline (on tfds' mock data) trains and samples with the EDM, VP and VE configs shrunk."""
import json
import os

import jax
import numpy as np
import pytest

from configs import cifar10_edm_ddpmpp, cifar10_ve_ncsnpp, cifar10_vp_ddpmpp
from fdistill import modes
from tests.test_data import _write_prepared_metadata
from tests.tiny import tiny_toy_config


def _toy_config():
    config = tiny_toy_config(num_steps=400, log_every=5, ema_rate=0.95, batch_size=1024)
    config.data.std = 0.2
    config.model.hidden = 64
    config.optim.update(lr=1e-2, warmup=20)
    config.sampling.num_samples = 1024
    config.sampling.batch_size = 1024
    config.sampling.num_steps = 18
    return config


def _heun_metrics(config, model):
    s = config.sampling
    draw, params = modes.teacher_sampler(config, model, s.batch_size)
    x = modes.draw_samples(draw, params, config, s.num_samples, s.batch_size, jax.random.key(7))
    return modes.toy_metrics(config, x), draw.nfe


def test_toy_teacher_learns_the_modes(tmp_path):
    """Loss falls, and Heun samples of the trained EMA model sit on the 8 modes (3 std balls)
    where the untrained model (D = c_skip x: samples of N(0, sigma_data^2)) does not."""
    config = _toy_config()
    out = modes.train_teacher(config, str(tmp_path))
    losses = np.array([m["train/loss"] for _, m in out["history"]])
    assert len(losses) == 80 and np.all(np.isfinite(losses))
    # The EDM loss has a floor (the posterior variance of x0 given x_t), so it falls by ~25%.
    early, late = losses[:6].mean(), losses[-20:].mean()
    assert late < 0.85 * early, (early, late)
    assert json.load(open(tmp_path / "results.json"))["steps"] == 400

    model, step = modes.load_teacher(config, str(tmp_path))
    assert step == 400
    trained, nfe = _heun_metrics(config, model)
    untrained, _ = _heun_metrics(config, modes.build_model(config))
    assert nfe == 35
    # True samples score precision 0.989 and recall 1 (fdistill.evaluation.toy).
    assert trained["recall"] == 1.0 and trained["precision"] > 0.85, trained
    assert untrained["precision"] < 0.5, untrained
    # k-NN estimates of KL(q || p): ~0.07 trained, ~10 for the untrained Gaussian.
    assert trained["kl_qp"] < 0.4 and untrained["kl_qp"] > 3.0, (trained, untrained)


def _tiny_unet(config, data_dir, *, name=None):
    """A config shrunk to a 1-level, 16-channel U-Net on 32x32 mock CIFAR-10, 2 steps of batch 4."""
    config.data.data_dir = str(data_dir)
    if name:
        config.model.name = name
    config.model.update(model_channels=16, channel_mult=(1,), num_blocks=1, attn_resolutions=())
    config.training.update(batch_size=4, num_steps=2, log_every=1, ckpt_every=1000)
    config.optim.warmup = 0
    config.sampling.update(num_samples=4, batch_size=4, num_steps=2)
    return config


@pytest.fixture(scope="module")
def mock_cifar10(tmp_path_factory):
    import tensorflow_datasets as tfds
    data_dir = tmp_path_factory.mktemp("tfds")
    _write_prepared_metadata(data_dir, "cifar10", {"train": 8, "test": 4})
    with tfds.testing.mock_data(num_examples=8, data_dir=str(data_dir)):
        yield data_dir


def _check_trained(workdir, out):
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["steps"] == 2 and np.isfinite(results["final/train/loss"])
    assert [s for s, _ in out["history"]] == [1, 2]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


def _edm_heun_gain(sigmas, sigma_data):
    """x_N / x_0 of EDM's Heun sampler (Algorithm 1, Euler on the last step to sigma = 0) for the
    denoiser D(x; sigma) = c_skip(sigma) x, whose ODE slope is (x - D) / sigma = x sigma /
    (sigma^2 + sigma_data^2): a product of per-step linear gains."""
    slope = lambda s: s / (s ** 2 + sigma_data ** 2)
    gain = 1.0
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        euler = 1.0 + (s1 - s0) * slope(s0)
        gain *= euler if s1 == 0 else 1.0 + (s1 - s0) * (slope(s0) + euler * slope(s1)) / 2
    return gain


def test_cifar10_edm_ddpmpp_trains_and_samples_on_mock_tfds(tmp_path, mock_cifar10):
    """The network's output layer starts at 1e-5 scale (EDM's init), so the first loss is that of
    D = c_skip x: per example, given sigma and the image's mean square v, the expected EDM loss
    lambda(sigma) E||(c_skip - 1) x0 + c_skip n||^2 / dim = (sigma^2 v + sd^4) / (sd^2 (sigma^2
    + sd^2)), between 1 and v / sd^2 whatever sigma is drawn (+- ~1.3% noise over 4 x 3072
    values). The sampled EMA network has moved from that start by (1 - 0.9993) x two Adam
    steps, so Heun's samples are x_T = sigma_max z times the closed-form gain of its steps on
    D = c_skip x."""
    config = _tiny_unet(cifar10_edm_ddpmpp.get_config(), mock_cifar10)
    workdir = str(tmp_path)
    out = modes.train_teacher(config, workdir)
    _check_trained(workdir, out)
    x0 = np.asarray(modes.dataset(config, 4).batch(0)["x"], np.float64)  # step 0's batch
    assert x0.min() >= -1 and x0.max() <= 1  # uint8 images scaled to [-1, 1] exactly
    np.testing.assert_allclose((x0 + 1) * 127.5, np.round((x0 + 1) * 127.5), atol=1e-3)
    ratio = (x0 ** 2).reshape(4, -1).mean(axis=1) / config.process.sigma_data ** 2
    first = out["history"][0][1]["train/loss"]
    assert min(1.0, ratio.min()) - 0.08 < first < max(1.0, ratio.max()) + 0.08, (first, ratio)

    results = modes.sample(config, workdir)
    assert results["sample/nfe"] == 3 and results["sample/num_samples"] == 4
    samples = np.load(os.path.join(workdir, "samples.npz"))["samples"]
    assert samples.shape == (4, 32, 32, 3) and np.all(np.isfinite(samples))
    p = config.process
    sigmas = [p.sigma_max, p.sigma_min, 0.0]  # EDM eq. 5 with 2 steps: the ends, then 0
    expected_std = p.sigma_max * _edm_heun_gain(sigmas, p.sigma_data)
    assert abs(samples.std() / expected_std - 1) < 0.05, (samples.std(), expected_std)
    assert abs(samples.mean()) < 0.05 * expected_std
    with open(os.path.join(workdir, "samples.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(os.path.join(workdir, "results.json")))["steps"] == 2


SLOW = pytest.mark.skipif(os.environ.get("FDISTILL_SLOW_TESTS", "0") != "1",
                          reason="Score-SDE configs on mock CIFAR-10 (~2 min of CPU each; the EDM one always "
                                 "runs): run with FDISTILL_SLOW_TESTS=1")


@pytest.mark.parametrize("module", [pytest.param(cifar10_vp_ddpmpp, marks=SLOW),
                                    pytest.param(cifar10_ve_ncsnpp, marks=SLOW)], ids=["vp", "ve"])
def test_score_sde_cifar10_configs_train_on_mock_tfds(tmp_path, mock_cifar10, module):
    """At initialisation the network output is ~0 (EDM's 1e-5 output init), so with the 'vp' /
    've' preconditioning x0_hat = x_t / alpha and the score is 0: the DSM loss
    sigma^2 ||s + z / sigma||^2 (mean over dimensions) is mean(z^2) = 1 +- 0.013 for 4 x 3072
    values, whatever t is drawn."""
    config = _tiny_unet(module.get_config(), mock_cifar10)
    assert config.training.loss == "dsm" and config.model.precond in ("vp", "ve")
    out = modes.train_teacher(config, str(tmp_path))
    _check_trained(str(tmp_path), out)
    assert abs(out["history"][0][1]["train/loss"] - 1.0) < 0.05, out["history"][0]
