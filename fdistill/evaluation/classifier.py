"""In-domain metrics at CPU scale: a small convnet trained by the project on digits / Fashion-MNIST.

Inception features mean little for 8x8 digits, and the Inception weights cannot be downloaded on
every machine, so at CPU scale sample quality is measured in the features of a classifier trained
on the dataset itself:

* ``fd_<dataset>``: the Frechet distance (Heusel et al. 2017, eq. 6, the same formula as FID)
  between Gaussians fitted to the classifier's penultimate features (128-d) of generated and real
  images. It is *not* FID and is not comparable with any published number; it is named for the
  dataset on purpose.
* ``accuracy_<dataset>``: how often the classifier assigns a class-conditional sample to the
  class it was generated for.

The classifier is trained on the dataset's ``train`` split and its held-out ``test`` accuracy is
recorded; weights are cached in ``<workdir>/classifier_<dataset>_<H>x<W>.npz`` and re-used.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fdistill import sharding
from fdistill.evaluation import fid as fid_lib

NUM_FEATURES = 128
DEFAULT_IMAGE_SIZE = {"digits": 8, "fashion_mnist": 32}
DEFAULT_STEPS = {"digits": 400, "fashion_mnist": 3000}


def load_labelled_images(name: str, split: str, image_size: int | None = None):
    """(images float32 [N, H, W, C] in [-1, 1], labels int32 [N]) from ``fdistill.data``'s loaders,
    scaled and fitted exactly as the generative models see them."""
    from fdistill.data import images as data_images
    loaders = {"digits": data_images.load_digits, "fashion_mnist": _fashion}
    if name not in loaders:
        raise ValueError(f"no in-domain classifier for dataset {name!r}; valid: {sorted(loaders)}")
    size = image_size or DEFAULT_IMAGE_SIZE[name]
    source = loaders[name](split, size)
    return source.images, source.labels


def _fashion(split: str, size: int):
    from fdistill.data import images as data_images
    return data_images.load_fashion_mnist(None, split, size)


class ConvNet(nnx.Module):
    """3 conv layers (32, 64 stride 2, 64 stride 2 channels, ReLU) -> flatten -> 128-d ReLU
    features (the penultimate layer) -> class logits."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, *, rngs: nnx.Rngs):
        h, w, channels = image_shape
        self.conv1 = nnx.Conv(channels, 32, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
        self.conv3 = nnx.Conv(64, 64, (3, 3), strides=2, rngs=rngs)
        flat = -(-h // 4) * -(-w // 4) * 64
        self.hidden = nnx.Linear(flat, NUM_FEATURES, rngs=rngs)
        self.out = nnx.Linear(NUM_FEATURES, num_classes, rngs=rngs)

    def features(self, x):
        h = jax.nn.relu(self.conv1(x))
        h = jax.nn.relu(self.conv2(h))
        h = jax.nn.relu(self.conv3(h))
        return jax.nn.relu(self.hidden(h.reshape(h.shape[0], -1)))

    def __call__(self, x):
        return self.out(self.features(x))


class InDomainClassifier:
    """A trained ConvNet for one dataset and image shape, with batched jitted evaluation (each
    chunk of ``batch_size`` split over this process' devices when it has several,
    ``sharding.SplitBatch``)."""

    def __init__(self, name: str, model: ConvNet, image_shape: tuple[int, int, int],
                 test_accuracy: float, batch_size: int = 500):
        self.name, self.image_shape, self.test_accuracy = name, tuple(image_shape), test_accuracy
        self.batch_size = batch_size
        self.graphdef, self.state = nnx.split(model)

        def run(state, x):
            model = nnx.merge(self.graphdef, state)
            feats = model.features(x)
            return feats, model.out(feats)

        self._run = sharding.SplitBatch(run, batch_size, batch_argnums=(1,))

    def _check(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype == np.uint8 or x.ndim != 4 or x.shape[1:] != self.image_shape:
            raise ValueError(f"the {self.name} classifier takes float images "
                             f"{list(self.image_shape)} (NHWC) in [-1, 1], got {x.dtype} {x.shape}")
        if x.size and (np.abs(x).max() > 1.5 or not np.all(np.isfinite(x))):
            raise ValueError(f"images must lie in [-1, 1]; got range [{x.min():.3g}, {x.max():.3g}]"
                             " (uint8 data: x / 127.5 - 1)")
        return x.astype(np.float32)

    def features_and_logits(self, x) -> tuple[np.ndarray, np.ndarray]:
        x = self._check(x)
        feats, logits = [], []
        for s in range(0, len(x), self.batch_size):
            chunk = x[s:s + self.batch_size]
            m = len(chunk)
            if m < self.batch_size:  # one compiled shape
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - m, *chunk.shape[1:]),
                                                        np.float32)])
            f, lg = self._run(self.state, chunk)
            feats.append(np.asarray(f)[:m])
            logits.append(np.asarray(lg)[:m])
        return np.concatenate(feats), np.concatenate(logits)

    def __call__(self, images_uint8) -> tuple[np.ndarray, np.ndarray]:
        """The Inception callable's interface (uint8 NHWC -> (features, logits)), so that
        ``fid.write_reference_stats`` / ``fid.evaluate_samples`` machinery also runs on it."""
        return self.features_and_logits(np.asarray(images_uint8, np.float32) / 127.5 - 1.0)

    def predict(self, x) -> np.ndarray:
        return self.features_and_logits(x)[1].argmax(axis=1)


def _random_shift(x: np.ndarray, rng: np.random.Generator, shift: int) -> np.ndarray:
    """Translates each image by up to ``shift`` pixels, filling with the background value -1."""
    if shift == 0:
        return x
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), constant_values=-1.0)
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
    return np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _train(name: str, images, labels, *, steps: int, batch_size: int, seed: int,
           learning_rate: float = 2e-3, shift: int = 1) -> ConvNet:
    """Adam with a cosine-decayed learning rate on cross-entropy, random +-``shift`` pixel
    translations as augmentation."""
    num_classes = int(labels.max()) + 1
    model = ConvNet(images.shape[1:], num_classes, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.Generator(np.random.PCG64(seed))
    order, pos = rng.permutation(len(images)), 0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(images)), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        x = _random_shift(images[idx], rng, shift)
        params, opt_state, _ = step(params, opt_state, jnp.asarray(x), jnp.asarray(labels[idx]))
    return nnx.merge(graphdef, params)


def train_classifier(name: str, *, image_size: int | None = None, steps: int | None = None,
                     batch_size: int = 128, seed: int = 0) -> InDomainClassifier:
    """Trains on the ``train`` split and measures accuracy on the held-out ``test`` split."""
    x_train, y_train = load_labelled_images(name, "train", image_size)
    x_test, y_test = load_labelled_images(name, "test", image_size)
    model = _train(name, x_train, y_train, steps=steps or DEFAULT_STEPS[name],
                   batch_size=batch_size, seed=seed)
    clf = InDomainClassifier(name, model, x_train.shape[1:], test_accuracy=float("nan"))
    clf.test_accuracy = float((clf.predict(x_test) == y_test).mean())
    return clf


def cache_path(workdir: str, name: str, image_shape) -> str:
    h, w, _ = image_shape
    return os.path.join(workdir, f"classifier_{name}_{h}x{w}.npz")


def save(clf: InDomainClassifier, path: str) -> None:
    flat = {"/".join(map(str, k)): np.asarray(v) for k, v in
            nnx.to_flat_state(clf.state)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, __name__=np.array(clf.name), __image_shape__=np.array(clf.image_shape),
             __test_accuracy__=np.array(clf.test_accuracy), **flat)


def load(path: str) -> InDomainClassifier:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no classifier at {path!r}; train one with "
                                "classifier.get_classifier(dataset, workdir)")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    name, shape = str(arrays.pop("__name__")), tuple(int(s) for s in arrays.pop("__image_shape__"))
    test_accuracy = float(arrays.pop("__test_accuracy__"))
    num_classes = arrays["out/bias"].shape[0]
    abstract = nnx.eval_shape(lambda: ConvNet(shape, num_classes, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = {"/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(state)}
    got = {k: v.shape for k, v in arrays.items()}
    if expected != got:
        raise ValueError(f"{path} does not hold a {name} ConvNet: expected {expected}, got {got}; "
                         "delete it to retrain")
    state = jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(arrays["/".join(str(getattr(k, "key", k)) for k in p
                                                 if getattr(k, "name", None) != "value")]), state)
    return InDomainClassifier(name, nnx.merge(graphdef, state), shape, test_accuracy)


def get_classifier(name: str, workdir: str, *, image_size: int | None = None,
                   steps: int | None = None, seed: int = 0, verbose: bool = True
                   ) -> InDomainClassifier:
    """The cached classifier for ``name`` at ``image_size`` (trained and saved on first use)."""
    size = image_size or DEFAULT_IMAGE_SIZE.get(name)
    if size is None:
        raise ValueError(f"no in-domain classifier for dataset {name!r}; valid: "
                         f"{sorted(DEFAULT_IMAGE_SIZE)}")
    channels = 1
    path = cache_path(workdir, name, (size, size, channels))
    if os.path.isfile(path):
        return load(path)
    t0 = time.time()
    clf = train_classifier(name, image_size=size, steps=steps, seed=seed)
    save(clf, path)
    if verbose:
        print(f"trained the {name} classifier in {time.time() - t0:.0f} s: held-out accuracy "
              f"{clf.test_accuracy:.4f}; saved {path}", flush=True)
    return clf


def in_domain_metrics(clf: InDomainClassifier, generated, real, *, labels=None) -> dict:
    """``fd_<dataset>`` of generated vs real images (float [-1, 1] NHWC) in the classifier's
    features, and ``accuracy_<dataset>`` of the classifier on generated images against their
    conditioning ``labels`` (int [N]) when given."""
    gen_feats, gen_logits = clf.features_and_logits(generated)
    real_feats, _ = clf.features_and_logits(real)
    if len(gen_feats) < 2 or len(real_feats) < 2:
        raise ValueError(f"fd_{clf.name} needs at least 2 generated and 2 real images, got "
                         f"{len(gen_feats)} and {len(real_feats)}")
    stats = []
    for feats in (gen_feats, real_feats):
        s = fid_lib.FeatureStats(feats.shape[1])
        s.update(feats)
        stats.append(s.mu_sigma())
    out = {f"fd_{clf.name}": fid_lib.frechet_distance(*stats[0], *stats[1])}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 2:  # one-hot class labels (the models' convention)
            labels = labels.argmax(axis=1)
        if labels.shape != (len(gen_feats),):
            raise ValueError(f"labels {labels.shape} do not match {len(gen_feats)} samples")
        out[f"accuracy_{clf.name}"] = float((gen_logits.argmax(axis=1) == labels).mean())
    out["protocol"] = {"num_generated": len(gen_feats), "num_real": len(real_feats),
                       "classifier_test_accuracy": clf.test_accuracy,
                       "features": f"{NUM_FEATURES}-d penultimate layer of the {clf.name} "
                                   "classifier (not Inception; not FID)"}
    return out
