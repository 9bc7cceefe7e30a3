"""Image datasets with deterministic random-access batches: digits, Fashion-MNIST, tfds.

All image datasets are ``ImageDataset`` objects over an indexable example source:

- ``batch(step) -> {'x': float32 [B_local, H, W, C] in [-1, 1], 'label': int32 [B_local]}``
  (numpy). The global batch of step ``s`` is positions ``s * B .. (s + 1) * B - 1`` of an endless
  stream of epochs, each epoch a permutation of the split drawn from ``(seed, epoch)``; process
  ``p`` of ``P`` reads only positions ``p * B / P .. (p + 1) * B / P - 1`` of it. Random horizontal
  flips (``random_flip``) are drawn per global position from ``(seed, step)``. So a batch depends
  only on ``(seed, step)`` and the processes' slices concatenate to the single-process batch.
- ``num_examples`` and ``examples(indices)`` give random access to the whole split (float32 in
  [-1, 1], no flips), e.g. for reference statistics.
- ``label`` is the dataset's class label (zeros where it has none); ``num_classes`` is the number
  of classes the model is conditioned on (0: unconditional), as the config asks.

Sources:

- ``digits``: scikit-learn's 8x8 digits (1,797 images, pixel values 0..16, in the wheel); split
  ``all`` (default), or ``train`` / ``test`` = the first 1,437 / last 360 images.
- ``fashion_mnist``: the IDX files (``.gz`` or raw) of Fashion-MNIST, parsed here with numpy;
  default folder ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
- ``cifar10`` / ``imagenet64``: ``tfds.data_source`` (array_record, random access, no
  TensorFlow) over a prepared tfds ``data_dir``. Preparing needs internet; we check that the
  prepared dataset is on disk before touching tfds' loading, so a missing dataset fails at once
  with the command that prepares it (tfds' download path would retry for minutes offline).
"""
from __future__ import annotations

import gzip
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DIGITS_SPLITS = {"all": slice(0, None), "train": slice(0, 1437), "test": slice(1437, None)}

# IDX type codes (http://yann.lecun.com/exdb/mnist/): big-endian numbers after a 4-byte magic.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ArraySource:
    """In-memory examples: ``images`` float32 [N, H, W, C] in [-1, 1], ``labels`` int [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images, np.float32)
        self.labels = np.asarray(labels, np.int32)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray):
        return self.images[indices], self.labels[indices]


class TfdsSource:
    """Random-access tfds data source (array_record); images uint8 -> float32 in [-1, 1].

    Records are read and decoded on a small thread pool (decoding releases the GIL).
    """

    def __init__(self, source, image_size: int, num_classes: int):
        self.source = source
        self.image_size = image_size
        self.num_classes = num_classes
        self._pool = ThreadPoolExecutor(min(16, os.cpu_count() or 1))

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray):
        records = list(self._pool.map(self.source.__getitem__, (int(i) for i in indices)))
        images = np.stack([r["image"] for r in records])
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"tfds images are {images.shape[1]}x{images.shape[2]} but "
                             f"data.image_size is {self.image_size}; set data.image_size to match")
        labels = np.array([r.get("label", 0) for r in records], np.int32)
        return images.astype(np.float32) / 127.5 - 1.0, labels


class ImageDataset:
    """Deterministic random-access batches over an example source (see the module docstring)."""

    def __init__(self, name: str, source, *, num_classes: int, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1, seed: int = 0,
                 shuffle: bool = True, random_flip: bool = False):
        if len(source) == 0:
            raise ValueError(f"dataset {name!r} has no examples")
        if num_classes not in (0, source.num_classes):
            raise ValueError(f"dataset {name!r} has {source.num_classes} classes: "
                             f"data.num_classes must be 0 (unconditional) or {source.num_classes}, "
                             f"got {num_classes}")
        self.name = name
        self.source = source
        self.num_classes = num_classes
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.seed = seed
        self.shuffle = shuffle
        self.random_flip = random_flip
        self._permutations = {}
        self.shape = tuple(self.examples(np.zeros(1, np.int64))["x"].shape[1:])

    @property
    def num_examples(self) -> int:
        return len(self.source)

    def examples(self, indices) -> dict:
        """Examples by index in the split: ``{'x': float32 [n, H, W, C] in [-1, 1], 'label'}``."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
            raise IndexError(f"indices must be in [0, {self.num_examples}) for {self.name!r}")
        x, label = self.source.read(indices)
        return {"x": x, "label": label}

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng((self.seed, 0, epoch))
            self._permutations[epoch] = rng.permutation(self.num_examples)
        return self._permutations[epoch]

    def indices(self, step: int) -> np.ndarray:
        """This process's example indices for ``step``: [B_local] int64."""
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        positions = np.arange(start, start + self.local_batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_examples)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            out[at] = self._permutation(int(epoch))[offsets[at]]
        return out

    def batch(self, step: int) -> dict:
        batch = self.examples(self.indices(step))
        if self.random_flip:
            flips = np.random.default_rng((self.seed, 1, step)).random(self.global_batch_size) < 0.5
            mine = flips[self.process_index * self.local_batch_size:][:self.local_batch_size]
            batch["x"] = np.where(mine[:, None, None, None], batch["x"][:, :, ::-1], batch["x"])
        return batch


# ---------------------------------------------------------------------------------------------
# Sources.

def fit_images(images: np.ndarray, size: int, fit: str) -> np.ndarray:
    """Brings float images [N, H, W, C] in [-1, 1] to ``size x size``.

    ``pad``: centre them on a -1 (black) canvas; ``resize``: bilinear resampling (antialiased
    when shrinking), as ``jax.image.resize``.
    """
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    if fit == "pad":
        if size < h or size < w:
            raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}; use fit='resize'")
        top, left = (size - h) // 2, (size - w) // 2
        return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)),
                      constant_values=-1.0)
    if fit == "resize":
        import jax
        return np.asarray(jax.image.resize(images, (n, size, size, c), "bilinear"))
    raise ValueError(f"unknown fit {fit!r}; valid: pad, resize")


def load_digits(split: str = "all", image_size: int = 8, fit: str = "resize") -> ArraySource:
    """scikit-learn's 8x8 digits scaled from 0..16 to [-1, 1]; labels 0..9."""
    from sklearn.datasets import load_digits as sklearn_digits
    if split not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {split!r}; valid: {', '.join(DIGITS_SPLITS)}")
    digits = sklearn_digits()
    images = digits.images[DIGITS_SPLITS[split], :, :, None].astype(np.float32) / 8.0 - 1.0
    return ArraySource(fit_images(images, image_size, fit), digits.target[DIGITS_SPLITS[split]], 10)


def read_idx(path: str) -> np.ndarray:
    """Parses an IDX file (raw, or gzip-compressed when the name ends in ``.gz``)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = 4 + 4 * ndim
    if len(data) - body != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: header says shape {shape} ({dtype}) but the file holds "
                         f"{len(data) - body} bytes of data")
    return np.frombuffer(data, dtype, offset=body).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(data_dir: str | None = None, split: str = "train", image_size: int = 32,
                       fit: str = "pad") -> ArraySource:
    """Fashion-MNIST from its IDX files: 28x28 grey images to [-1, 1] (padded to 32 by default)."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid: "
                         f"{', '.join(FASHION_MNIST_FILES)}")
    data_dir = data_dir or FASHION_MNIST_DIR
    arrays = []
    for stem in FASHION_MNIST_FILES[split]:
        candidates = [os.path.join(data_dir, stem + ext) for ext in (".gz", "")]
        found = [p for p in candidates if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(
                f"Fashion-MNIST file {stem}[.gz] not found in {data_dir}. Install the data with "
                f"`apt-get install -y dataset-fashion-mnist` (files in {FASHION_MNIST_DIR}), or "
                f"set config.data.data_dir to a folder holding the four IDX files "
                f"({', '.join(s for pair in FASHION_MNIST_FILES.values() for s in pair)}).")
        arrays.append(read_idx(found[0]))
    images, labels = arrays
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} and labels "
                         f"{labels.shape} do not form a [N, H, W] / [N] pair")
    images = images[..., None].astype(np.float32) / 127.5 - 1.0
    return ArraySource(fit_images(images, image_size, fit), labels, 10)


def tfds_source(name: str, split: str, data_dir: str | None, image_size: int) -> TfdsSource:
    """``tfds`` random-access source of a prepared dataset (``builder.as_data_source``, which is
    what ``tfds.data_source(name, split=split, data_dir=data_dir, download=False)`` returns).

    Checks first that the prepared dataset (``dataset_info.json`` and ``features.json`` of its
    version folder, array_record files) is on disk, and raises FileNotFoundError at once if not:
    the download path is never reached.
    """
    import tensorflow_datasets as tfds
    builder = tfds.builder(name, data_dir=data_dir or None, try_gcs=False)
    root = builder.data_dir_root
    prepare = (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
               f"data_dir='{root}', file_format='array_record').download_and_prepare()\"")
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir}. On a machine with "
            f"internet run\n    {prepare}\n(or `tfds build {name} --data_dir={root} "
            f"--file_format=array_record`) and copy the prepared folder to {root} on this machine, "
            f"or set config.data.data_dir to a prepared tfds data_dir.")
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "array_record":
        raise ValueError(
            f"tfds dataset {name!r} in {builder.data_dir} is prepared as {file_format}, but "
            f"random access needs array_record. Prepare it again with\n    {prepare}")
    try:
        builder.info.splits[split]  # accepts sub-splits such as 'train[:90%]'
    except ValueError as e:
        raise ValueError(f"bad split {split!r} for tfds dataset {name!r}: {e}") from None
    features = builder.info.features
    num_classes = features["label"].num_classes if "label" in features else 0
    return TfdsSource(builder.as_data_source(split=split), image_size, num_classes)
