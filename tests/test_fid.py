"""Frechet distance vs pytorch-fid, streaming statistics, reference files and the eval protocol.

The pipeline tests use a cheap stand-in for the Inception callable (a fixed random projection
with the same interface); the real port is tested in test_inception.py.
"""
import json
import os
import warnings

import numpy as np
import pytest

from fdistill.evaluation import fid, inception

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "frechet_golden.npz")


@pytest.mark.parametrize("case", ["full", "singular", "equal", "nilpotent"])
def test_frechet_distance_equals_pytorch_fid_golden(case):
    """Golden values from pytorch-fid's calculate_frechet_distance (make_inception_golden.py);
    'singular' has rank-6 covariances in 32-d, 'nilpotent' takes pytorch-fid's eps branch."""
    with np.load(GOLDEN) as g, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fid.frechet_distance(g[f"{case}_mu1"], g[f"{case}_sigma1"], g[f"{case}_mu2"],
                                     g[f"{case}_sigma2"])
        expected = float(g[f"{case}_fd"])
    assert isinstance(value, float)
    assert any("adding 1e-06" in str(w.message) for w in caught) == (case == "nilpotent")
    np.testing.assert_allclose(value, expected, rtol=1e-9, atol=1e-12)


def test_frechet_distance_live_against_pytorch_fid():
    pytest.importorskip("torch")
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(5)
    for d, rank in ((8, 20), (24, 3)):
        a, b = rng.standard_normal((d, rank)), rng.standard_normal((d, rank))
        args = (rng.standard_normal(d), a @ a.T,
                rng.standard_normal(d), b @ b.T + 1e-9 * np.eye(d))
        np.testing.assert_allclose(fid.frechet_distance(*args),
                                   fid_score.calculate_frechet_distance(*args), rtol=1e-9)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)),
                               expected, rtol=1e-12)


def test_frechet_distance_bad_inputs():
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_streaming_stats_equal_numpy_mean_and_cov():
    x = np.random.default_rng(1).standard_normal((103, 2048)) * 3 + 7
    stats = fid.FeatureStats(2048)
    for chunk in np.split(x, [1, 40, 41, 100]):
        stats.update(chunk)
    mu, sigma = stats.mu_sigma()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        fid.FeatureStats(2048).mu_sigma()
    with pytest.raises(ValueError, match=r"\[N, 2048\]"):
        fid.FeatureStats(2048).update(np.zeros((3, 16)))


def test_metric_names_and_the_50k_guard():
    assert fid.metric_suffix(50_000, monitoring=False) == ""
    assert fid.metric_suffix(10_000, monitoring=True) == "_10k"
    assert fid.metric_suffix(1234, monitoring=True) == "_1234"
    with pytest.raises(ValueError, match="50,000 generated samples.*num_samples=10,000.*fid_10k"):
        fid.metric_suffix(10_000, monitoring=False)


def test_stats_files_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    mu, sigma = rng.standard_normal(64), np.eye(64)
    edm_style = str(tmp_path / "cifar10-32x32.npz")
    np.savez(edm_style, mu=mu, sigma=sigma)  # EDM's reference files hold exactly these keys
    stats = fid.load_stats(edm_style)
    np.testing.assert_array_equal(stats["mu"], mu)
    fd = fid.frechet_distance(stats["mu"], stats["sigma"], mu, sigma)
    assert fd == pytest.approx(0, abs=1e-9)

    missing = str(tmp_path / "nothing.npz")
    with pytest.raises(FileNotFoundError) as e:
        fid.load_stats(missing)
    assert missing in str(e.value) and "--mode=fid_stats" in str(e.value)
    assert fid.EDM_REFERENCE_URLS["cifar10"] in str(e.value)

    bad = str(tmp_path / "bad.npz")
    np.savez(bad, mean=mu)
    with pytest.raises(ValueError, match=r"no \['mu', 'sigma'\]"):
        fid.load_stats(bad)


class StandInInception:
    """Same interface as inception.load(...)'s callable: a fixed random projection to 16
    features (the pipeline takes the feature size from the network)."""
    weights_path, weights_sha256 = "stand-in", "stand-in-sha"

    def __init__(self, pixels: int):
        rng = np.random.default_rng(3)
        self.w = rng.standard_normal((pixels, 16)) / np.sqrt(pixels)
        self.v = rng.standard_normal((16, 10))
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        images = inception.check_images(images)
        pool = np.tanh((images.reshape(len(images), -1) / 127.5 - 1.0) @ self.w)
        return pool.astype(np.float32), (pool @ self.v).astype(np.float32)


class ArrayDataset:
    """The data interface: num_examples, examples(indices) -> {'x': [-1, 1] NHWC, 'label'}."""
    name = "array"

    def __init__(self, n, shape=(8, 8, 3), seed=0):
        self.u = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
        self.num_examples = n

    def examples(self, indices):
        return {"x": self.u[indices].astype(np.float32) / 127.5 - 1.0,
                "label": np.zeros(len(indices), np.int32)}


def _sampler_from(dataset, batch):
    def sample_fn(i):
        idx = np.arange(i * batch, (i + 1) * batch) % dataset.num_examples
        return dataset.examples(idx)["x"]
    return sample_fn


def test_fid_stats_then_eval_end_to_end(tmp_path):
    data = ArrayDataset(60)
    net = StandInInception(8 * 8 * 3)
    ref_path = str(tmp_path / "ref.npz")
    protocol = fid.write_reference_stats(ref_path, data, net, batch_size=16, keep_features=60,
                                         progress=False)
    assert protocol == {"num_samples": 60, "dataset": "array",
                        "inception_weights_sha256": "stand-in-sha"}
    mu, sigma = fid.compute_reference_stats(data, net, 60, batch_size=7, progress=False)
    ref = fid.load_stats(ref_path)
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-12)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-9, atol=1e-12)
    assert ref["features"].shape == (60, 16)

    # the generator reproduces the data exactly: FID 0, precision = recall = 1
    out = fid.evaluate_samples(_sampler_from(data, 25), net, ref_path, 60, monitoring=True,
                               kid=True, kid_subsets=5, kid_subset_size=30, progress=False)
    assert out["fid_60"] == pytest.approx(0.0, abs=1e-8)
    assert out["precision_60"] == 1.0 and out["recall_60"] == 1.0
    fake_features = net(data.u)[0]
    kid = fid.metrics.kernel_inception_distance(ref["features"], fake_features, subsets=5,
                                                subset_size=30)
    assert (out["kid_60"], out["kid_60_std"]) == pytest.approx(kid, rel=1e-6)
    assert out["is_60"] >= 1.0
    p = out["protocol"]
    assert p["num_samples"] == 60 and p["monitoring"] and p["reference_num_samples"] == 60
    assert p["reference_stats_sha256"] == inception.file_sha256(ref_path)
    assert p["inception_weights_sha256"] == "stand-in-sha" and p["pr_k"] == 3

    # darker images: FID clearly positive; EDM-style reference (no features): P/R skipped
    other = ArrayDataset(60, seed=1)
    other.u //= 4
    edm_ref = {"mu": ref["mu"], "sigma": ref["sigma"]}
    out2 = fid.evaluate_samples(_sampler_from(other, 25), net, edm_ref, 60, monitoring=True,
                                progress=False)
    assert out2["fid_60"] > 1.0
    assert "precision_60" not in out2 and "skipped" in out2["protocol"]["precision_recall"]


def test_eval_refuses_bad_protocols_before_sampling(tmp_path):
    data = ArrayDataset(20)
    net = StandInInception(8 * 8 * 3)
    calls = []

    def sample_fn(i):
        calls.append(i)
        return data.examples(np.arange(10))["x"]

    ref = {"mu": np.zeros(16), "sigma": np.eye(16)}
    with pytest.raises(ValueError, match="50,000"):
        fid.evaluate_samples(sample_fn, net, ref, 10_000)
    with pytest.raises(ValueError, match="KID needs real features"):
        fid.evaluate_samples(sample_fn, net, ref, 20, monitoring=True, kid=True)
    with pytest.raises(ValueError, match="same weights"):
        fid.evaluate_samples(sample_fn, net, dict(ref, inception_weights_sha256="other"), 20,
                             monitoring=True)
    with pytest.raises(FileNotFoundError, match="fid_stats"):
        fid.evaluate_samples(sample_fn, net, str(tmp_path / "missing.npz"), 20, monitoring=True)
    assert calls == [] and net.calls == 0
    with pytest.raises(ValueError, match="returned no images"):
        fid.evaluate_samples(lambda i: np.zeros((0, 8, 8, 3), np.float32), net, ref, 20,
                             monitoring=True)
    with pytest.raises(ValueError, match="has 20"):
        fid.compute_reference_stats(data, net, 50, progress=False)


def test_two_processes_share_the_batches_and_get_the_single_process_metrics():
    import socket
    import subprocess
    import sys
    from tests import fid_worker
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    single = fid_worker.score(process_index=0, process_count=1)
    assert single["featurised"] == fid_worker.NUM_SAMPLES
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, os.path.join(root, "tests", "fid_worker.py"),
                               "--num_processes=2", f"--process_id={i}", f"--port={port}"],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    hosts = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        hosts.append(json.loads(out.split("RESULT ")[-1]))
    assert [h["processes"] for h in hosts] == [2, 2]
    # batches dealt out: process p draws batches p, p + 2, ... (12 batches of 8, the last has 2)
    assert hosts[0]["drawn"] == list(range(0, 12, 2)) and hosts[1]["drawn"] == list(range(1, 12, 2))
    assert [h["featurised"] for h in hosts] == [48, 42]
    assert [h["protocol_featurised"] for h in hosts] == [48, 42]
    for h in hosts:
        assert h["metrics"].keys() == single["metrics"].keys()
        for k, v in single["metrics"].items():
            assert h["metrics"][k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
