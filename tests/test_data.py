"""Datasets: toy mixtures (sampling, density, denoiser), batching invariants, image loaders."""
import gzip
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import logsumexp

from fdistill import data
from fdistill.data import images, toy


def _config(**fields):
    return ml_collections.ConfigDict(fields)


def _mixture_log_prob_np(x, means, weights, var):
    """Closed-form log-density of sum_k w_k N(x; mu_k, var I) in 2-D, float64."""
    d2 = np.sum((x[:, None, :] - means[None]) ** 2, axis=-1)
    return logsumexp(np.log(weights) - d2 / (2 * var) - np.log(2 * np.pi * var), axis=-1)


# ---------------------------------------------------------------------------------------------
# Toy mixtures.

def test_mixture_sampling_matches_weights_and_means():
    dist = toy.unbalanced(std=0.1, radius=2.0, weights=(0.5, 0.3, 0.2))
    n = 20000
    x, k = dist.sample_with_modes(jax.random.split(jax.random.key(0), n))
    x, k = np.asarray(x, np.float64), np.asarray(k)
    freq = np.bincount(k, minlength=3) / n
    w = np.array([0.5, 0.3, 0.2])
    assert np.all(np.abs(freq - w) < 4 * np.sqrt(w * (1 - w) / n)), freq
    for j in range(3):
        xj = x[k == j]
        np.testing.assert_allclose(xj.mean(0), dist.means[j], atol=4 * 0.1 / np.sqrt(len(xj)))
        np.testing.assert_allclose(xj.std(0), 0.1, rtol=0.05)
    np.testing.assert_allclose(dist.means[0], [2.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("name", sorted(toy.TOYS))
def test_log_prob_closed_form_and_normalised(name):
    std = 0.2
    dist = toy.get_toy(_config(toy=name, std=std, radius=1.0, weights=()))
    x = np.random.default_rng(0).normal(size=(64, 2)) * 1.5
    expected = _mixture_log_prob_np(x, dist.means.astype(np.float64),
                                    dist.weights.astype(np.float64), std ** 2)
    np.testing.assert_allclose(np.asarray(dist.log_prob(x)), expected, rtol=1e-5, atol=1e-4)
    # Riemann sum on a grid with spacing std / 4 covering every mode +- 8 std.
    h = std / 4
    lo, hi = dist.means.min() - 8 * std, dist.means.max() + 8 * std
    ticks = np.arange(lo, hi, h)
    grid = np.stack(np.meshgrid(ticks, ticks, indexing="ij"), axis=-1)
    mass = float(jnp.sum(jnp.exp(dist.log_prob(grid))) * h * h)
    assert abs(mass - 1.0) < 1e-3, mass


def test_moons_geometry():
    dist = toy.moons(std=0.1, radius=1.0)
    m = len(dist.means) // 2
    upper, lower = dist.means[:m] + [0.5, 0.25], dist.means[m:] + [0.5, 0.25]
    np.testing.assert_allclose(np.linalg.norm(upper, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(lower - [1.0, 0.5], axis=1), 1.0, rtol=1e-5)
    spacing = np.linalg.norm(np.diff(dist.means[:m], axis=0), axis=1)
    assert spacing.max() <= dist.std / 2


def test_noised_marginal_and_denoiser_are_exact():
    dist = toy.ring8(std=0.1, radius=2.0)
    x_t = np.random.default_rng(1).normal(size=(16, 2)).astype(np.float32) * 2
    alpha = np.linspace(0.3, 1.0, 16).astype(np.float32)
    sigma = np.linspace(0.05, 2.0, 16).astype(np.float32)
    for i in (0, 7, 15):
        expected = _mixture_log_prob_np(x_t[i:i + 1], alpha[i] * dist.means.astype(np.float64),
                                        dist.weights.astype(np.float64),
                                        alpha[i] ** 2 * 0.01 + sigma[i] ** 2)
        np.testing.assert_allclose(dist.marginal_log_prob(x_t[i], alpha[i], sigma[i]), expected[0],
                                   rtol=1e-5)
    # Tweedie: grad log p_t(x_t) = (alpha E[x0 | x_t] - x_t) / sigma^2.
    score = jax.vmap(jax.grad(dist.marginal_log_prob))(x_t, alpha, sigma)
    x0_hat = dist.denoise(x_t, alpha, sigma)
    np.testing.assert_allclose((alpha[:, None] * x0_hat - x_t) / sigma[:, None] ** 2, score,
                               rtol=1e-3, atol=1e-3)


def test_toy_validation_errors():
    with pytest.raises(ValueError, match="ring8, grid25, unbalanced, moons"):
        toy.get_toy(_config(toy="spiral"))
    with pytest.raises(ValueError, match="one weight per mode"):
        toy.ring8(std=0.1, radius=1.0, weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="positive"):
        toy.ring8(std=0.0, radius=1.0)


# ---------------------------------------------------------------------------------------------
# Batching invariants.

def _assert_batching_invariants(make):
    """Deterministic in (seed, step), new data each step, 2-process slices == 1-process batch."""
    one = make(process_index=0, process_count=1, seed=3)
    b5 = one.batch(5)
    again = make(process_index=0, process_count=1, seed=3).batch(5)
    for key in ("x", "label"):
        np.testing.assert_array_equal(b5[key], again[key])
    assert not np.array_equal(b5["x"], one.batch(6)["x"])
    assert not np.array_equal(b5["x"], make(process_index=0, process_count=1, seed=4).batch(5)["x"])
    halves = [make(process_index=p, process_count=2, seed=3).batch(5) for p in (0, 1)]
    for key in ("x", "label"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), b5[key])
    assert b5["x"].dtype == np.float32 and b5["label"].dtype == np.int32


def test_toy_batches():
    config = _config(name="toy", toy="ring8", std=0.05, radius=2.0, weights=())

    def make(**kw):
        return data.get_dataset(config, global_batch_size=8, **kw)

    _assert_batching_invariants(make)
    ds = make()
    batch = ds.batch(0)
    assert batch["x"].shape == (8, 2) and ds.shape == (2,) and ds.num_classes == 0
    # Labels are the modes the points were drawn from.
    np.testing.assert_array_less(np.linalg.norm(batch["x"] - ds.means[batch["label"]], axis=1), 0.5)


def test_image_batches_over_epoch_boundary_with_flips():
    config = _config(name="digits", image_size=8, random_flip=True, num_classes=10)

    def make(**kw):
        return data.get_dataset(config, global_batch_size=12, **kw)

    _assert_batching_invariants(make)
    ds = make(seed=0)
    step = 1797 // 12  # positions 1788..1799 straddle the first epoch boundary
    batch = ds.batch(step)
    plain = ds.examples(ds.indices(step))
    flipped = [np.array_equal(batch["x"][i], plain["x"][i][:, ::-1]) for i in range(12)]
    same = [np.array_equal(batch["x"][i], plain["x"][i]) for i in range(12)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)
    np.testing.assert_array_equal(batch["label"], plain["label"])


def test_epochs_are_permutations():
    source = images.ArraySource(np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) / 10,
                                np.arange(10), num_classes=10)
    ds = images.ImageDataset("ten", source, num_classes=0, global_batch_size=4, seed=1)
    order = np.concatenate([ds.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert not np.array_equal(order[:10], order[10:])
    np.testing.assert_array_equal(ds.batch(2)["label"], order[8:12])


# ---------------------------------------------------------------------------------------------
# Image loaders.

def test_digits_shape_range_labels():
    from sklearn.datasets import load_digits
    ds = data.get_dataset(_config(name="digits", image_size=8, num_classes=10), global_batch_size=4)
    assert ds.shape == (8, 8, 1) and ds.num_examples == 1797 and ds.num_classes == 10
    everything = ds.examples(np.arange(ds.num_examples))
    raw = load_digits()
    np.testing.assert_allclose(everything["x"][..., 0], raw.images / 8 - 1, atol=1e-6)
    np.testing.assert_array_equal(everything["label"], raw.target)
    assert everything["x"].min() == -1.0 and everything["x"].max() == 1.0
    big = data.get_dataset(_config(name="digits", image_size=16, split="test"), global_batch_size=4)
    assert big.shape == (16, 16, 1) and big.num_examples == 360
    x = big.batch(0)["x"]
    assert x.shape == (4, 16, 16, 1) and x.min() >= -1.0 and x.max() <= 1.0


def _write_idx(path, array, compress):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, compress=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=False)
    config = _config(name="fashion_mnist", data_dir=str(tmp_path), image_size=32, num_classes=10)
    ds = data.get_dataset(config, global_batch_size=2)
    assert ds.shape == (32, 32, 1) and ds.num_examples == 5
    ex = ds.examples(np.arange(5))
    np.testing.assert_allclose(ex["x"][:, 2:30, 2:30, 0], imgs / 127.5 - 1, atol=1e-6)
    assert np.all(ex["x"][:, :2] == -1) and np.all(ex["x"][:, :, 30:] == -1)
    np.testing.assert_array_equal(ex["label"], labels)
    np.testing.assert_array_equal(images.read_idx(str(tmp_path / "train-labels-idx1-ubyte")),
                                  labels)
    wide = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    _write_idx(tmp_path / "wide.idx", wide, compress=False)
    np.testing.assert_array_equal(images.read_idx(str(tmp_path / "wide.idx")), wide)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        images.read_idx(str(tmp_path / "bad.idx"))


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    config = _config(name="fashion_mnist", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist") as err:
        data.get_dataset(config, global_batch_size=2)
    assert str(tmp_path / "nowhere") in str(err.value) and "data_dir" in str(err.value)


# ---------------------------------------------------------------------------------------------
# tfds (CIFAR-10 schema, offline).

def _write_prepared_metadata(data_dir, name, splits, file_format="array_record"):
    """Writes the metadata of a prepared tfds dataset (no records: tfds' mock supplies them)."""
    import tensorflow_datasets as tfds
    builder = tfds.builder(name, data_dir=str(data_dir), try_gcs=False, file_format=file_format)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
        for s, n in splits.items()]))
    os.makedirs(builder.data_path, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)


def test_cifar10_through_tfds_data_source(tmp_path):
    import tensorflow_datasets as tfds
    _write_prepared_metadata(tmp_path, "cifar10", {"train": 24, "test": 8})
    config = _config(name="cifar10", data_dir=str(tmp_path), image_size=32, random_flip=True)
    with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
        def make(**kw):
            return data.get_dataset(config, global_batch_size=8, **kw)

        _assert_batching_invariants(make)
        ds = make()
        assert ds.shape == (32, 32, 3) and ds.num_examples == 24 and ds.num_classes == 0
        source = tfds.data_source("cifar10", split="train", data_dir=str(tmp_path), download=False)
        ex = ds.examples([0, 5])
        np.testing.assert_allclose(ex["x"][1], source[5]["image"] / 127.5 - 1, atol=1e-6)
        assert ex["label"][1] == source[5]["label"]
        batch = ds.batch(4)
        assert batch["x"].shape == (8, 32, 32, 3) and -1 <= batch["x"].min() < batch["x"].max() <= 1
        assert np.all((0 <= batch["label"]) & (batch["label"] < 10))
        conditional = data.get_dataset(_config(name="cifar10", data_dir=str(tmp_path),
                                               num_classes=10), global_batch_size=8)
        assert conditional.num_classes == 10
        with pytest.raises(ValueError, match="must be 0 .* or 10"):
            data.get_dataset(_config(name="cifar10", data_dir=str(tmp_path), num_classes=100),
                             global_batch_size=8)
        with pytest.raises(ValueError, match=r"Unknown split 'val'.*'train', 'test'"):
            data.get_dataset(_config(name="cifar10", data_dir=str(tmp_path), split="val"),
                             global_batch_size=8)


def test_tfds_missing_data_fails_fast_with_the_prepare_command(tmp_path):
    start = time.time()
    with pytest.raises(FileNotFoundError) as err:
        data.get_dataset(_config(name="cifar10", data_dir=str(tmp_path)), global_batch_size=8)
    assert time.time() - start < 10
    message = str(err.value)
    assert str(tmp_path) in message and "tfds build cifar10" in message
    assert "download_and_prepare" in message and "array_record" in message


def test_tfds_tfrecord_dataset_is_refused(tmp_path):
    _write_prepared_metadata(tmp_path, "cifar10", {"train": 4}, file_format="tfrecord")
    with pytest.raises(ValueError, match="needs array_record"):
        data.get_dataset(_config(name="cifar10", data_dir=str(tmp_path)), global_batch_size=2)


def test_get_dataset_errors():
    with pytest.raises(ValueError, match="toy, digits, fashion_mnist, cifar10, imagenet64"):
        data.get_dataset(_config(name="mnist"), global_batch_size=8)
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.get_dataset(_config(name="toy"), global_batch_size=9, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        data.get_dataset(_config(name="toy"), global_batch_size=8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="must be 0 .* or 10"):
        data.get_dataset(_config(name="digits", num_classes=3), global_batch_size=8)
