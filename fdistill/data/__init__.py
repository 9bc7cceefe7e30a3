"""Datasets with deterministic random-access batches: ``get_dataset(config.data, ...)``.

``ds.batch(step)`` is this process's slice of the global batch of ``step``, a pure function of
``(seed, step)``: a resumed run sees the same data bit for bit. See ``toy`` (2-D mixtures with
known densities) and ``images`` (digits, Fashion-MNIST, tfds CIFAR-10 / ImageNet-64).

Config fields read (``config.data``):

- ``name``: toy | digits | fashion_mnist | cifar10 | imagenet64 | video
- video: ``num_frames``, ``size``, ``channels``, ``square``, ``speed_min``, ``speed_max``
  (bouncing squares, ``fdistill.data.video``)
- toys: ``toy`` (ring8 | grid25 | unbalanced | moons), ``std``, ``radius``, ``weights``
- images: ``image_size``, ``num_classes`` (0: unconditional), ``random_flip``, ``shuffle``
  (default True), ``split`` (digits: all | train | test, default all; Fashion-MNIST: train | test;
  tfds: the dataset's splits, default train), ``fit`` (pad | resize; digits default resize,
  Fashion-MNIST default pad), ``data_dir`` ('' = the default folder), ``tfds_name`` (tfds only;
  default ``cifar10``, and for imagenet64 ``imagenet_resized/64x64`` when ``num_classes > 0``
  (it has labels), else ``downsampled_imagenet/64x64`` (no labels)).
"""
from __future__ import annotations

from fdistill.data import images, toy, video
from fdistill.data.images import ImageDataset
from fdistill.data.toy import GaussianMixture2D, ToyDataset, get_toy


def _toy(c, **batching):
    return ToyDataset(get_toy(c), num_classes=int(c.get("num_classes", 0)), **batching)


def _digits(c, **batching):
    source = images.load_digits(c.get("split", "all"), int(c.get("image_size", 8) or 8),
                                c.get("fit", "resize"))
    return _image_dataset("digits", source, c, batching)


def _fashion_mnist(c, **batching):
    source = images.load_fashion_mnist(c.get("data_dir", "") or None, c.get("split", "train"),
                                       int(c.get("image_size", 32) or 32), c.get("fit", "pad"))
    return _image_dataset("fashion_mnist", source, c, batching)


def _cifar10(c, **batching):
    source = images.tfds_source(c.get("tfds_name", "cifar10"), c.get("split", "train"),
                                c.get("data_dir", "") or None, int(c.get("image_size", 32) or 32))
    return _image_dataset("cifar10", source, c, batching)


def _imagenet64(c, **batching):
    default = ("imagenet_resized/64x64" if c.get("num_classes", 0)
               else "downsampled_imagenet/64x64")
    source = images.tfds_source(c.get("tfds_name", default), c.get("split", "train"),
                                c.get("data_dir", "") or None, int(c.get("image_size", 64) or 64))
    return _image_dataset("imagenet64", source, c, batching)


def _image_dataset(name, source, c, batching):
    return ImageDataset(name, source, num_classes=int(c.get("num_classes", 0)),
                        shuffle=bool(c.get("shuffle", True)),
                        random_flip=bool(c.get("random_flip", False)), **batching)


def _video(c, **batching):
    return video.get_video_dataset(c, **batching)


DATASETS = {"toy": _toy, "digits": _digits, "fashion_mnist": _fashion_mnist,
            "cifar10": _cifar10, "imagenet64": _imagenet64, "video": _video}


def example_shape(config_data) -> tuple[int, ...]:
    """The shape of one example of ``config_data.name``: a point, an image (H, W, C) or a clip
    (T, H, W, C)."""
    if config_data.name == "toy":
        return (int(config_data.dim),)
    if config_data.name == "video":
        return (int(config_data.num_frames), int(config_data.size), int(config_data.size),
                int(config_data.get("channels", 1)))
    return (int(config_data.image_size), int(config_data.image_size),
            int(config_data.num_channels))


def get_dataset(config_data, *, global_batch_size: int, process_index: int = 0,
                process_count: int = 1, seed: int = 0):
    """The dataset ``config_data.name`` batched for process ``process_index`` of ``process_count``.

    Each process gets ``global_batch_size // process_count`` examples per step and reads only those.
    """
    name = config_data.get("name", None)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                         f"process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return DATASETS[name](config_data, global_batch_size=global_batch_size,
                          process_index=process_index, process_count=process_count, seed=seed)
