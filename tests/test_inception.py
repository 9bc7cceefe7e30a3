"""The FID Inception port: parity with pytorch-fid on seeded random weights, loading, bad input.

The golden file (experiments/make_inception_golden.py) holds pytorch-fid's outputs for weights
that ``inception.random_state_dict(seed)`` regenerates here without torch. The live comparison at
the end runs where torch and pytorch-fid are installed.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fdistill.evaluation import convert_inception, inception

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "inception_parity.npz")
REL_TOL = 1e-4


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def random_npz(golden, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("w") / "random_inception.npz")
    np.savez(path, **inception.random_state_dict(int(golden["seed"])))
    return path


@pytest.fixture(scope="module")
def features(random_npz):
    return inception.load(random_npz, batch_size=2)


def test_names_and_shapes_equal_pytorch_fid_state_dict(golden):
    torch_shapes = {k: tuple(v) for k, v in
                    json.loads(str(golden["torch_state_dict_shapes"])).items()}
    assert inception.state_dict_shapes() == dict(sorted(torch_shapes.items()))


@pytest.mark.parametrize("size", ["32", "64", "304x336"])
def test_parity_with_pytorch_fid_golden(features, golden, size):
    pool, logits = features(golden[f"images_{size}"])
    assert pool.shape == (2, inception.NUM_FEATURES) and logits.shape == (2, inception.NUM_LOGITS)
    assert rel_err(pool, golden[f"pool_{size}"]) < REL_TOL
    assert rel_err(logits, golden[f"logits_{size}"]) < REL_TOL


def test_uneven_batch_is_padded_and_trimmed(features, golden):
    images = golden["images_32"]
    pool3, logits3 = features(np.concatenate([images, images[:1]]))  # second chunk padded
    assert pool3.shape == (3, inception.NUM_FEATURES) and logits3.shape[0] == 3
    assert rel_err(pool3[:2], golden["pool_32"]) < REL_TOL
    np.testing.assert_array_equal(pool3[2], pool3[0])


def test_preprocessing_scales_to_minus_one_one_and_repeats_gray():
    rows = inception.resize_matrix(4)
    gray = np.array([0, 255, 51, 102], np.uint8).reshape(1, 2, 2, 1).repeat(2, 1).repeat(2, 2)
    x = np.asarray(inception._preprocess(gray, rows, rows))
    assert x.shape == (1, 299, 299, 3)
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    np.testing.assert_allclose([x.min(), x.max()], [-1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(x[0, 0, 0, 0], -1.0, atol=1e-6)  # corner pixel value 0


def test_resize_matrix_is_pytorch_bilinear_align_corners_false():
    up = inception.resize_matrix(2, 4)  # sources -0.25 (clamped to 0), 0.25, 0.75, 1.25
    np.testing.assert_allclose(up, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    down = inception.resize_matrix(4, 2)  # no antialiasing: two taps at 0.5 and 2.5
    np.testing.assert_allclose(down, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(inception.resize_matrix(32).sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(inception.resize_matrix(299), np.eye(299))


def test_to_uint8_inverts_the_data_scaling():
    u = np.arange(256, dtype=np.uint8)
    x = u.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(inception.to_uint8(x), u)
    np.testing.assert_array_equal(inception.to_uint8(np.array([-3.0, 3.0])), [0, 255])
    with pytest.raises(ValueError, match="NaN"):
        inception.to_uint8(np.array([np.nan]))


def test_bad_images_are_rejected_with_the_fix(features, golden):
    images = golden["images_32"]
    with pytest.raises(ValueError, match="uint8.*to_uint8"):
        features(images.astype(np.float32) / 127.5 - 1.0)
    with pytest.raises(ValueError, match="NHWC.*transpose"):
        features(images.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="NHWC"):
        features(images[..., :2])
    with pytest.raises(ValueError, match="NHWC"):
        features(images[0])


def test_missing_weights_file_says_where_to_get_it(tmp_path):
    path = str(tmp_path / inception.WEIGHTS_FILENAME)
    with pytest.raises(FileNotFoundError) as e:
        inception.load(path)
    assert path in str(e.value) and inception.WEIGHTS_URL in str(e.value)
    assert "convert_inception" in str(e.value)


def test_wrong_state_dict_names_and_shapes(tmp_path):
    sd = inception.random_state_dict(1)
    del sd["Mixed_7c.branch_pool.conv.weight"]
    sd["fc.weight"] = sd["fc.weight"][:1000]
    sd["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    path = str(tmp_path / "bad.npz")
    np.savez(path, **sd)
    with pytest.raises(ValueError) as e:
        inception.load(path)
    msg = str(e.value)
    assert "missing Mixed_7c.branch_pool.conv.weight" in msg
    assert "unexpected AuxLogits.fc.weight" in msg
    assert "fc.weight: (1000, 2048) (expected (1008, 2048))" in msg
    other = str(tmp_path / "weights.h5")
    open(other, "w").close()
    with pytest.raises(ValueError, match=r"\.pth or \.npz"):
        inception.load(other)


def test_pth_without_torch_explains_the_conversion(tmp_path, monkeypatch):
    path = str(tmp_path / inception.WEIGHTS_FILENAME)
    open(path, "wb").close()
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="convert_inception"):
        inception.read_state_dict(path)


def test_sharded_over_two_devices_matches_golden(random_npz):
    """Batch split over a 1-D mesh of 2 (fake CPU) devices gives the golden features."""
    code = f"""
import numpy as np, jax
from fdistill.evaluation import inception
assert jax.device_count() == 2
g = np.load({GOLDEN!r})
fn = inception.load({random_npz!r}, batch_size=2)
assert fn._batch_sharding.mesh.devices.size == 2
pool, logits = fn(g['images_32'])
ref = g['pool_32']
print('REL', np.abs(pool - ref).max() / np.abs(ref).max())
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rel = float(out.stdout.split("REL")[-1])
    assert rel < REL_TOL


def test_live_parity_and_converter_with_pytorch_fid(tmp_path, features):
    """Runs only where torch + pytorch-fid are importable: fresh images, .pth -> .npz converter."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_fid")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import make_inception_golden as mig

    sd = inception.random_state_dict(7)
    pth = str(tmp_path / "random.pth")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
    npz = str(tmp_path / "random.npz")
    convert_inception.main([f"--pth={pth}", f"--out={npz}"])
    fn = inception.load(npz, batch_size=2)
    assert fn.weights_sha256 == inception.file_sha256(pth)
    images = np.random.default_rng(3).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    pool, logits = fn(images)
    ref_pool, ref_logits = mig.torch_fid_features(sd, images)
    assert rel_err(pool, ref_pool) < REL_TOL
    assert rel_err(logits, ref_logits) < REL_TOL
    assert inception.load(pth).weights_sha256 == fn.weights_sha256
