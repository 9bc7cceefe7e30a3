"""Inception-v3 for FID, IS and precision/recall: the 2015-12-05 TensorFlow network in Flax NNX.

This is the network every FID in the diffusion literature is measured with (TF FID, pytorch-fid,
EDM, StyleGAN3, ADM's evaluator). It differs from torchvision's Inception-v3 in four blocks, which
pytorch-fid calls ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1`` (average pools that
ignore padding) and ``FIDInceptionE_2`` (a max pool in the pool branch), and it has 1008 output
classes. Module and attribute names follow pytorch-fid's state dict (``Mixed_5b.branch1x1.conv``)
so that the weight mapping is one rule per layer type.

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (download it from
https://github.com/mseitzer/pytorch-fid/releases/tag/fid_weights), used directly (needs torch) or
converted once to ``.npz`` with ``python -m fdistill.evaluation.convert_inception``.

Pre-processing is pytorch-fid's: uint8 [0, 255] -> [0, 1] -> bilinear resize to 299x299
(``F.interpolate(..., align_corners=False)``, no antialiasing) -> ``2x - 1``.
"""
from __future__ import annotations

import functools
import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdistill import sharding

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILENAME)
RESOLUTION = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3

HOW_TO_GET_WEIGHTS = (
    f"Download pytorch-fid's FID Inception weights {WEIGHTS_URL} (sha256 prefix 6726825d) and "
    "pass the .pth path, or convert it once without torch at evaluation time: "
    "`python -m fdistill.evaluation.convert_inception --pth=" + WEIGHTS_FILENAME
    + " --out=inception-2015-12-05.npz`.")


# ---------------------------------------------------------------------------------------------
# The network.

class BasicConv(nnx.Module):
    """conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *, stride: int = 1,
                 padding: int | tuple[int, int] = 0, rngs: nnx.Rngs):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(cin, cout, (kh, kw), strides=stride,
                             padding=((ph, ph), (pw, pw)), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPS, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    """3x3 stride-1 average over the valid pixels only (TF's and pytorch-fid's FID blocks)."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                        count_include_pad=False)


def _max_pool_3x3(x, stride: int = 1):
    padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nnx.Module):
    """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (pytorch-fid's FIDInceptionA)."""

    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            _max_pool_3x3(x, stride=2),
        ], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b-e: factorised 7x7 convolutions (pytorch-fid's FIDInceptionC)."""

    def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_3x3(x))],
                               axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                      self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7,
                                _max_pool_3x3(x, stride=2)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b/c: expanded 1x3 / 3x1 branches. ``pool='avg'`` is pytorch-fid's FIDInceptionE_1
    (padding-excluding average), ``pool='max'`` its FIDInceptionE_2 (TF's graph has a max pool)."""

    def __init__(self, cin: int, *, pool: str, rngs: nnx.Rngs):
        pools = {"avg": _avg_pool_3x3, "max": _max_pool_3x3}
        if pool not in pools:
            raise ValueError(f"unknown pool {pool!r}; valid: {sorted(pools)}")
        self.pool = pools[pool]
        self.branch1x1 = BasicConv(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(self.pool(x)),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """FID Inception-v3: x [N, 299, 299, 3] in [-1, 1] -> (pool [N, 2048], logits [N, 1008]).

    ``logits = pool @ W_fc (+ b_fc if output_bias)``. Without the bias (the default) these are
    the logits every reference Inception Score uses (openai/improved-gan's
    ``softmax/logits/MatMul``, StyleGAN3's ``no_output_bias=True``, torch-fidelity's
    ``logits_unbiased``).
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)
        self.fc = nnx.Linear(NUM_FEATURES, NUM_LOGITS, rngs=rngs)

    def __call__(self, x, *, output_bias: bool = False):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3(x, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool_3x3(x, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = pool @ self.fc.kernel[...]
        if output_bias:
            logits = logits + self.fc.bias[...]
        return pool, logits


# ---------------------------------------------------------------------------------------------
# Pre-processing.

def resize_matrix(in_size: int, out_size: int = RESOLUTION) -> np.ndarray:
    """[out, in] matrix of PyTorch's bilinear ``align_corners=False`` resampling along one axis.

    Source coordinate of output pixel i: s = (i + 1/2) in/out - 1/2, clamped below at 0; the
    output interpolates pixels floor(s) and floor(s)+1 (clamped at in-1). No antialiasing, so a
    downscale reads only two pixels per output, exactly as pytorch-fid's ``F.interpolate``.
    """
    i = np.arange(out_size, dtype=np.float64)
    src = np.maximum((i + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), i1), frac)
    return m.astype(np.float32)


def _preprocess(images, rows, cols):
    """uint8 NHWC -> [N, 299, 299, 3] in [-1, 1]: /255, bilinear resize, 2x - 1 (pytorch-fid)."""
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=hi)
    x = jnp.einsum("pw,nowc->nopc", cols, x, precision=hi)
    return 2.0 * x - 1.0


def check_images(images) -> np.ndarray:
    """Validates a batch for the feature extractor: uint8, NHWC, 1 or 3 channels."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"Inception expects uint8 images in [0, 255], got dtype {images.dtype} (range "
            f"[{images.min() if images.size else 0}, {images.max() if images.size else 0}]). "
            "Convert float images in [-1, 1] with fdistill.evaluation.inception.to_uint8(x).")
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or min(images.shape[1:3], default=0) < 1:
        raise ValueError(
            f"Inception expects NHWC images [N, H, W, 3] (or 1 channel, repeated to 3), got "
            f"shape {images.shape}. NCHW arrays need images.transpose(0, 2, 3, 1).")
    return images


def to_uint8(x) -> np.ndarray:
    """Float images in [-1, 1] -> uint8 [0, 255] by EDM's rule floor(127.5 x + 128), clipped.

    Exact inverse of the data pipeline's u / 127.5 - 1 for every uint8 u.
    """
    x = np.asarray(x, np.float32)
    if x.size and (not np.all(np.isfinite(x))):
        raise ValueError("images contain NaN or inf; the sampler diverged.")
    return np.clip(np.floor(x * 127.5 + 128.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Weights: names and shapes, conversion from pytorch-fid's state dict.

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


@functools.lru_cache(maxsize=1)
def _abstract_split():
    """(graphdef, abstract state) of the network, built once (shapes only, no weights)."""
    return nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path
                 if getattr(k, "name", None) != "value")


def _torch_name(names: tuple[str, ...]) -> str:
    """Flax path -> pytorch-fid state-dict key (e.g. Mixed_5b/branch1x1/bn/scale ->
    Mixed_5b.branch1x1.bn.weight)."""
    *prefix, module, leaf = names
    if module == "bn":
        leaf = _BN_NAMES[leaf]
    elif leaf == "kernel":
        leaf = "weight"
    return ".".join([*prefix, module, leaf])


def _torch_shape(names: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Flax layouts (HWIO conv, [in, out] dense) -> PyTorch's (OIHW, [out, in])."""
    if names[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if names[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _from_torch_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of pytorch-fid's FID Inception state dict with its shape (``num_batches_tracked``
    counters excluded), derived from this module's own structure."""
    _, state = _abstract_split()
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = _path_names(path)
        out[_torch_name(names)] = _torch_shape(names, leaf.shape)
    return dict(sorted(out.items()))


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
    """Seeded random weights in pytorch-fid's layout, for parity tests (numpy only, no torch).

    Draws ``Generator(PCG64(seed)).random`` per key in sorted key order: conv/dense kernels
    uniform with He variance 2/fan_in (dense: 1/fan_in), BN scale in [0.8, 1.2], BN shift and
    running mean in [-0.1, 0.1], running variance in [0.5, 1.5], so activations stay O(1) through
    the 94 layers.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    out = {}
    for name, shape in state_dict_shapes().items():
        u = rng.random(shape)
        if name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            a = np.sqrt(3.0 * 2.0 / fan_in) * (2 * u - 1)
        elif name == "fc.weight":
            a = np.sqrt(3.0 / shape[1]) * (2 * u - 1)
        elif name.endswith("bn.weight"):
            a = 0.8 + 0.4 * u
        elif name.endswith("running_var"):
            a = 0.5 + u
        else:
            a = 0.1 * (2 * u - 1)
        out[name] = a.astype(np.float32)
    return out


def check_state_dict(state_dict: dict, source: str) -> dict[str, np.ndarray]:
    """Checks every name and shape against the FID Inception; returns float32 numpy arrays."""
    expected = state_dict_shapes()
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(f"{k}: {tuple(np.shape(given[k]))} (expected {expected[k]})"
                   for k in set(expected) & set(given) if tuple(np.shape(given[k])) != expected[k])
    if missing or unexpected or wrong:
        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
        problems = [f"missing {show(missing)}" if missing else "",
                    f"unexpected {show(unexpected)}" if unexpected else "",
                    f"wrong shapes {show(wrong)}" if wrong else ""]
        raise ValueError(
            f"{source} is not pytorch-fid's FID Inception-v3 state dict: "
            + "; ".join(p for p in problems if p) + ". " + HOW_TO_GET_WEIGHTS)
    return {k: np.asarray(given[k], np.float32) for k in expected}


def model_from_state_dict(state_dict: dict, source: str = "state dict") -> InceptionV3:
    """Builds the Flax network from a (checked) pytorch-fid state dict of numpy arrays."""
    arrays = check_state_dict(state_dict, source)
    graphdef, state = _abstract_split()

    def fill(path, leaf):
        names = _path_names(path)
        return jnp.asarray(_from_torch_layout(arrays[_torch_name(names)]))

    state = jax.tree_util.tree_map_with_path(fill, state)
    return nnx.merge(graphdef, state)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads pytorch-fid's ``.pth`` (imports torch) or the converted ``.npz`` into numpy arrays."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found at {path!r}. {HOW_TO_GET_WEIGHTS}")
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: f[k] for k in f.files if not k.startswith("__")}
    if path.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"reading {path} needs torch; convert it once where torch is installed: "
                f"`python -m fdistill.evaluation.convert_inception --pth={path} "
                f"--out=inception-2015-12-05.npz`, then pass the .npz.") from e
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.detach().cpu().numpy() for k, v in sd.items()}
    raise ValueError(f"unknown Inception weights format {path!r}: expected .pth or .npz. "
                     + HOW_TO_GET_WEIGHTS)


# ---------------------------------------------------------------------------------------------
# The feature extractor.

class InceptionFeatures:
    """Callable: uint8 NHWC [N, H, W, 3] in [0, 255] -> (pool [N, 2048], logits [N, 1008]) numpy.

    Images go through in fixed-size chunks (the last one padded, so one compiled shape), each
    chunk's batch split over a 1-D mesh of all devices. Each process passes its own images and
    gets its own features. ``weights_sha256`` identifies the weights for the results' protocol.
    """

    def __init__(self, model: InceptionV3, *, batch_size: int = 64, output_bias: bool = False,
                 weights_path: str | None = None, weights_sha256: str | None = None):
        self.mesh = sharding.make_mesh()
        n_local = jax.local_device_count()
        self.batch_size = -(-batch_size // n_local) * n_local
        self.output_bias = output_bias
        self.weights_path, self.weights_sha256 = weights_path, weights_sha256
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, sharding.replicated(self.mesh))
        self._batch_sharding = sharding.batch_sharding(self.mesh)
        self._resize: dict[tuple[int, int], tuple[jax.Array, jax.Array]] = {}

        def forward(state, images, rows, cols):
            return nnx.merge(graphdef, state)(_preprocess(images, rows, cols),
                                              output_bias=output_bias)

        self._forward = jax.jit(forward)

    def __call__(self, images, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        images = check_images(images)
        n, h, w, _ = images.shape
        if (h, w) not in self._resize:
            self._resize[(h, w)] = (jnp.asarray(resize_matrix(h)), jnp.asarray(resize_matrix(w)))
        rows, cols = self._resize[(h, w)]
        pools, logits = [], []
        t0 = last = time.time()
        for start in range(0, n, self.batch_size):
            chunk = images[start:start + self.batch_size]
            m = len(chunk)
            if m < self.batch_size:
                pad = np.zeros((self.batch_size - m, *chunk.shape[1:]), np.uint8)
                chunk = np.concatenate([chunk, pad])
            x = jax.make_array_from_process_local_data(self._batch_sharding, chunk)
            p, lg = self._forward(self._state, x, rows, cols)
            pools.append(_local(p)[:m])
            logits.append(_local(lg)[:m])
            done = start + m
            if progress and jax.process_index() == 0 and (time.time() - last > 10 or done == n):
                last = time.time()
                print(f"inception features {done}/{n}  {done / (last - t0):.1f} img/s",
                      flush=True)
        if not pools:
            return (np.zeros((0, NUM_FEATURES), np.float32), np.zeros((0, NUM_LOGITS), np.float32))
        return np.concatenate(pools), np.concatenate(logits)


def _local(x: jax.Array) -> np.ndarray:
    """This process' rows of a batch-sharded array, in order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def load(path: str, *, batch_size: int = 64, output_bias: bool = False) -> InceptionFeatures:
    """Loads the FID Inception from pytorch-fid's ``.pth`` or the converted ``.npz``.

    Returns a callable uint8 NHWC images -> ``(pool [N, 2048], logits [N, 1008])``; see
    ``InceptionV3`` for the logits' bias convention.
    """
    arrays = read_state_dict(path)
    model = model_from_state_dict(arrays, source=path)
    sha = file_sha256(path)
    if path.endswith(".npz"):
        with np.load(path) as f:
            if "__source_sha256__" in f.files:
                sha = str(f["__source_sha256__"])
    return InceptionFeatures(model, batch_size=batch_size, output_bias=output_bias,
                             weights_path=os.path.abspath(path), weights_sha256=sha)


def from_random_weights(seed: int, **kwargs) -> InceptionFeatures:
    """The extractor with ``random_state_dict(seed)`` weights: for tests and pipeline checks only
    (its features are not Inception features; never report numbers made with it)."""
    model = model_from_state_dict(random_state_dict(seed), source=f"random weights (seed {seed})")
    return InceptionFeatures(model, weights_path=f"random:{seed}", weights_sha256=f"random:{seed}",
                             **kwargs)
