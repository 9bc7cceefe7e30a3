"""Scoring generated samples: feature networks, reference statistics, sample metrics, periodic
evaluation with a best checkpoint.

Every function here takes a *draw function* ``draw_batch(i) -> (images [B, H, W, C] in [-1, 1],
class indices [B] or None)``; what draws the samples (a teacher's sampler, a one-step student) is
the caller's business (``fdistill.modes``), so evaluation never imports training or distillation.

Features (``config.eval.features``):

* ``inception``: the FID Inception-v3 (``config.eval.inception_weights``, pytorch-fid's ``.pth``
  or its converted ``.npz``). Metrics ``fid`` (Heusel et al. 2017, eq. 6), ``is`` (Salimans et
  al. 2016) and, when the reference file holds real features, ``precision`` / ``recall``
  (Kynkaanniemi et al. 2019).
* ``classifier``: the in-domain classifier of ``fdistill.evaluation.classifier`` (digits,
  Fashion-MNIST). The same Frechet distance in its features is named ``fd_<dataset>`` (never
  FID), with ``precision_<dataset>`` / ``recall_<dataset>`` and, for class-conditional models,
  ``accuracy_<dataset>``: how often the classifier returns the class a sample was drawn for.
  The classifier is cached next to the reference statistics (``classifier_<dataset>_HxW.npz``),
  so the statistics and every evaluation against them use the same network.

Protocol (``fdistill.evaluation.fid``): a reported number uses 50,000 samples; fewer need
``config.eval.monitoring=True`` and the metric names carry the count (``fid_10k``). Dataset and
generated images go through the same uint8 quantisation (EDM's rule), as saved PNGs would.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable

import jax
import numpy as np

from fdistill import checkpoint
from fdistill import workdir as workdir_lib
from fdistill.evaluation import classifier as classifier_lib
from fdistill.evaluation import fid as fid_lib
from fdistill.evaluation import inception as inception_lib
from fdistill.evaluation import metrics as metrics_lib

FEATURES = ("inception", "classifier")


# ---------------------------------------------------------------------------------------------
# Feature networks and reference statistics.

def ref_stats_path(config, workdir: str) -> str:
    """``config.eval.ref_stats``, or ``<workdir>/ref_stats.npz`` when it is empty."""
    return os.path.abspath(config.eval.ref_stats or os.path.join(workdir, "ref_stats.npz"))


def _check_features(config) -> str:
    name = config.eval.features
    if name not in FEATURES:
        raise ValueError(f"unknown config.eval.features {name!r}; valid: {', '.join(FEATURES)}")
    if name == "classifier" and config.data.name not in classifier_lib.DEFAULT_IMAGE_SIZE:
        raise ValueError(
            f"config.eval.features='classifier' needs an in-domain classifier, which exists for "
            f"{sorted(classifier_lib.DEFAULT_IMAGE_SIZE)}, not {config.data.name!r}; use "
            "features='inception'.")
    return name


@functools.lru_cache(maxsize=2)
def _load_inception(path: str, mtime: float, batch_size: int):
    """One compiled extractor per weights file and batch size, shared by fid_stats, eval and
    periodic evaluation in one process."""
    del mtime  # part of the cache key only: a rewritten file is loaded again
    return inception_lib.load(path, batch_size=batch_size)


class ClassifierFeatures:
    """The in-domain classifier behind the Inception callable's interface (uint8 NHWC ->
    (features, logits)), identified by its weights file's sha256; remembers the predicted
    classes of everything it sees since ``reset()`` (for ``accuracy_<dataset>``)."""

    def __init__(self, clf: classifier_lib.InDomainClassifier, path: str):
        self.clf, self.name = clf, clf.name
        self.feature_dim = classifier_lib.NUM_FEATURES
        self.weights_path = os.path.abspath(path)
        self.weights_sha256 = inception_lib.file_sha256(path)
        self.predictions: list[np.ndarray] = []

    def reset(self) -> None:
        self.predictions = []

    def __call__(self, images_uint8):
        feats, logits = self.clf(inception_lib.check_images(images_uint8))
        self.predictions.append(logits.argmax(axis=1))
        return feats, logits


def check_dimensions(ref: dict, net, path: str) -> None:
    """Fails before anything is sampled when the reference statistics were computed in features
    of another dimension than ``net``'s (another feature network)."""
    dim = int(getattr(net, "feature_dim", inception_lib.NUM_FEATURES))
    got = int(np.shape(ref["mu"])[0])
    if got != dim:
        raise ValueError(f"reference statistics {path} are {got}-dimensional but the feature "
                         f"network ({getattr(net, 'name', 'inception')}) gives {dim}-d features: "
                         f"they were computed with other features. Recompute them with "
                         f"--mode=fid_stats and the same config.eval.features.")


def feature_network(config, workdir: str):
    """The feature callable of ``config.eval.features``; the in-domain classifier is cached
    (trained on first use) next to the reference statistics file."""
    if _check_features(config) == "inception":
        path = config.eval.inception_weights
        if not path:
            raise FileNotFoundError("config.eval.inception_weights is empty: FID needs the "
                                    "Inception weights file. " + inception_lib.HOW_TO_GET_WEIGHTS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights not found at {path!r}. "
                                    + inception_lib.HOW_TO_GET_WEIGHTS)
        path = os.path.abspath(path)
        return _load_inception(path, os.path.getmtime(path), int(config.eval.batch_size))
    size = int(config.data.image_size or classifier_lib.DEFAULT_IMAGE_SIZE[config.data.name])
    directory = os.path.dirname(ref_stats_path(config, workdir))
    clf = classifier_lib.get_classifier(config.data.name, directory, image_size=size)
    return ClassifierFeatures(clf, classifier_lib.cache_path(directory, config.data.name,
                                                             clf.image_shape))


def _metric_names(config, suffix: str) -> dict[str, str]:
    """evaluate_samples' names -> this feature network's names (IS only for Inception)."""
    if config.eval.features == "inception":
        names = [f"{m}{suffix}" for m in ("fid", "is", "precision", "recall")]
        names.append(f"is{suffix}_std")
        return {n: n for n in names}
    ds = config.data.name
    return {f"fid{suffix}": f"fd_{ds}{suffix}", f"precision{suffix}": f"precision_{ds}{suffix}",
            f"recall{suffix}": f"recall_{ds}{suffix}"}


def headline_metric(config, num_samples: int, *, monitoring: bool) -> str:
    """``fid`` or ``fd_<dataset>`` with the count suffix (what periodic evaluation tracks)."""
    suffix = fid_lib.metric_suffix(num_samples, monitoring=monitoring)
    if _check_features(config) == "inception":
        return f"fid{suffix}"
    return f"fd_{config.data.name}{suffix}"


# ---------------------------------------------------------------------------------------------
# Scoring.

def sample_metrics(config, net, ref, draw_batch: Callable[[int], tuple], num_samples: int, *,
          monitoring: bool, progress: bool = True) -> dict:
    """Metrics of ``num_samples`` generated images against ``ref`` (path or dict) in ``net``'s
    features. ``draw_batch(i) -> (images [B, H, W, C] in [-1, 1], class indices [B] or None)``.
    Returns the metrics (named per ``config.eval.features``) and 'protocol'."""
    suffix = fid_lib.metric_suffix(num_samples, monitoring=monitoring)
    labels: list[np.ndarray] = []

    def sample_fn(i):
        x, lab = draw_batch(i)
        if lab is not None:
            labels.append(np.asarray(lab))
        return np.asarray(x)

    if isinstance(net, ClassifierFeatures):
        net.reset()
    raw = fid_lib.evaluate_samples(sample_fn, net, ref, num_samples, monitoring=monitoring,
                                   is_splits=min(metrics_lib.IS_SPLITS, num_samples),
                                   progress=progress)
    names = _metric_names(config, suffix)
    out = {names[k]: float(v) for k, v in raw.items() if k in names}
    protocol = dict(raw["protocol"], features=config.eval.features)
    if isinstance(net, ClassifierFeatures):
        for k in ("is_splits", "is_logits"):
            protocol.pop(k)
        protocol["classifier_test_accuracy"] = net.clf.test_accuracy
        if labels:
            predicted = np.concatenate(net.predictions)
            wanted = np.concatenate(labels)[:len(predicted)]
            out[f"accuracy_{config.data.name}{suffix}"] = float((predicted == wanted).mean())
    out["protocol"] = protocol
    return out


# ---------------------------------------------------------------------------------------------
# Periodic evaluation during training, and the best checkpoint.

class PeriodicEval:
    """``evaluator(draw_batch) -> {'eval/<metric>': value}``: monitoring metrics of any generator
    from ``config.eval.periodic_num_samples`` samples, named by the count (``eval/fid_10k``,
    ``eval/fd_digits_2k``). ``key`` and ``batch_size`` are the ones draw functions should use
    (the same noise at every evaluation, so successive values differ by the weights only);
    ``metric`` is the headline name that BestCheckpoint tracks.
    """

    def __init__(self, config, workdir: str, *, num_samples: int | None = None,
                 progress: bool = False):
        self.config, self.progress = config, progress
        self.num_samples = int(num_samples or config.eval.periodic_num_samples)
        self.metric = "eval/" + headline_metric(config, self.num_samples, monitoring=True)
        self.ref = fid_lib.load_stats(ref_stats_path(config, workdir))
        self.net = feature_network(config, workdir)
        check_dimensions(self.ref, self.net, ref_stats_path(config, workdir))
        self.batch_size = min(int(config.eval.batch_size), self.num_samples)
        self.key = jax.random.key(config.seed + 4)

    def __call__(self, draw_batch: Callable[[int], tuple]) -> dict:
        out = sample_metrics(self.config, self.net, self.ref, draw_batch, self.num_samples,
                             monitoring=True, progress=self.progress)
        out.pop("protocol")
        return {f"eval/{k}": v for k, v in out.items()}


def lower_is_better(metric: str) -> bool:
    """Distances (fid, fd_<dataset>, kid) improve downwards; scores (is, precision, recall,
    accuracy) upwards."""
    return metric.split("/")[-1].startswith(("fid", "fd_", "kid"))


class BestCheckpoint:
    """Keeps the best-so-far training state in ``<workdir>/best`` (orbax, one checkpoint) and its
    step and value in ``<workdir>/best.json``, which a resumed run reads back, so that a worse
    state never replaces a better one."""

    def __init__(self, workdir: str, metric: str, *, lower: bool | None = None):
        self.directory = os.path.join(os.path.abspath(workdir), "best")
        self.record_path = os.path.join(workdir, "best.json")
        self.metric = metric
        self.lower = lower_is_better(metric) if lower is None else lower
        self.best: dict | None = None
        if os.path.isfile(self.record_path):
            with open(self.record_path) as f:
                record = json.load(f)
            if record.get("metric") == metric:
                self.best = record

    def improves(self, value: float) -> bool:
        if not np.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best["value"] if self.lower else value > self.best["value"]

    def update(self, step: int, metrics: dict, state) -> bool:
        """Saves ``state`` when ``metrics[self.metric]`` improves on the best so far."""
        if self.metric not in metrics:
            raise KeyError(f"BestCheckpoint tracks {self.metric!r}, but the metrics hold "
                           f"{sorted(metrics)}")
        value = float(metrics[self.metric])
        if not self.improves(value):
            return False
        ckpt = checkpoint.Checkpointer(self.directory, max_to_keep=1)
        try:
            ckpt.save(step, state)
        finally:
            ckpt.close()
        self.best = {"metric": self.metric, "value": value, "step": int(step)}
        if jax.process_index() == 0:
            workdir_lib.write_json(self.record_path, self.best)
        return True


def periodic_hook(config, workdir: str, draw_for_state: Callable, *, every: int,
                  log_every: int = 1) -> Callable[[int, dict], dict] | None:
    """``hook(step, state) -> metrics`` for ``train.fit(on_log=...)``: at steps that are
    multiples of ``every``, the metrics of ``draw_for_state(state, key, batch_size) ->
    draw_batch``, keeping the best state in ``<workdir>/best``; ``{}`` at other steps. None when
    ``every`` is 0. fit calls on_log at log steps only, so ``every`` must be a multiple of the
    loop's ``log_every``."""
    every = int(every)
    if every <= 0:
        return None
    if every % int(log_every):
        raise ValueError(f"evaluation every={every} steps must be a multiple of the log interval "
                         f"{log_every} (evaluation runs at log steps)")
    evaluator = PeriodicEval(config, workdir)
    best = BestCheckpoint(workdir, evaluator.metric)

    def hook(step: int, state) -> dict:
        if step % every:
            return {}
        metrics = evaluator(draw_for_state(state, evaluator.key, evaluator.batch_size))
        best.update(step, metrics, state)
        return metrics

    return hook
