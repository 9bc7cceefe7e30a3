"""Sample-quality modes: ``--mode=fid_stats`` (reference statistics), ``--mode=eval`` (score a
checkpoint), and periodic evaluation with a best checkpoint for the training loops.

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
results.json records the sample count, reference file and its hash, the feature network's weights
file and hash, the sampler and the network evaluations per sample (nfe).
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdistill import checkpoint, generate, monitor
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
        self.weights_path = os.path.abspath(path)
        self.weights_sha256 = inception_lib.file_sha256(path)
        self.predictions: list[np.ndarray] = []

    def reset(self) -> None:
        self.predictions = []

    def __call__(self, images_uint8):
        feats, logits = self.clf(inception_lib.check_images(images_uint8))
        self.predictions.append(logits.argmax(axis=1))
        return feats, logits


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


def fid_stats(config, workdir: str) -> dict:
    """``--mode=fid_stats``: (mu, sigma) and up to 10k real features of the dataset
    (``config.data`` with its configured split, train by default) in ``config.eval.features``,
    written to ``config.eval.ref_stats`` (default ``<workdir>/ref_stats.npz``).

    Uses the first ``config.eval.num_samples`` images, or all of them when the split is smaller
    (EDM's CIFAR-10 reference: all 50,000 training images).
    """
    from fdistill import data
    _check_features(config)
    path = ref_stats_path(config, workdir)
    net = feature_network(config, workdir)
    ds = data.get_dataset(config.data, global_batch_size=1, seed=config.seed)
    n = min(int(config.eval.num_samples), int(ds.num_examples))
    t0 = time.time()
    protocol = fid_lib.write_reference_stats(path, ds, net, n, int(config.eval.batch_size),
                                             progress=jax.process_index() == 0)
    protocol.update(path=path, features=config.eval.features,
                    feature_weights=str(getattr(net, "weights_path", "")),
                    split=str(config.data.get("split", "default")),
                    dataset_num_examples=int(ds.num_examples), seconds=time.time() - t0)
    if isinstance(net, ClassifierFeatures):
        protocol["classifier_test_accuracy"] = net.clf.test_accuracy
    results = {"fid_stats/protocol": protocol}
    monitor.write_results(workdir, results)
    if jax.process_index() == 0:
        print(f"reference statistics of {n} {config.data.name} images ({config.eval.features} "
              f"features) -> {path}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# A teacher's sampler, compiled once per network structure.

class TeacherSampler:
    """``sampler(state, key, labels) -> x`` for a teacher Denoiser with ``config.sampling``'s
    sampler, jitted over the network state so that new weights (periodic evaluation) reuse the
    compiled sampler. ``nfe``: network evaluations per sample (known after the first call)."""

    def __init__(self, config, graphdef, batch_size: int):
        from fdistill import sampling, sde
        s = config.sampling
        sampler = sampling.get_sampler(s.sampler, num_steps=s.num_steps, snr=s.snr,
                                       n_corrector=s.n_corrector)
        process = sde.sde_from_config(config.process)
        shape = (batch_size,) + generate.example_shape(config)
        self.guidance = float(s.guidance) if config.data.num_classes else 1.0
        self._nfe: list[int] = []

        def draw(state, key, labels):
            net = nnx.merge(graphdef, state)

            def denoise_fn(x, t, c):
                return net(x, t, c)

            if self.guidance != 1.0:
                denoise_fn = sampling.guided(denoise_fn, self.guidance)
            x, nfe = sampler(denoise_fn, process, key, shape, labels)
            self._nfe.append(nfe)
            return x

        self._draw = jax.jit(draw)

    @property
    def nfe(self) -> int:
        if not self._nfe:
            raise RuntimeError("the number of network evaluations is known once the sampler ran")
        return int(self._nfe[0])

    def __call__(self, state, key, labels):
        return self._draw(state, key, labels)


def _labels(num_classes: int, batch_size: int):
    """Class indices cycling through the classes (generate.class_labels' order), or None."""
    return np.arange(batch_size) % num_classes if num_classes else None


def _one_hot(labels, num_classes: int):
    return None if labels is None else jax.nn.one_hot(jnp.asarray(labels), num_classes)


# ---------------------------------------------------------------------------------------------
# Scoring.

def score(config, net, ref, draw_batch: Callable[[int], tuple], num_samples: int, *,
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


def evaluate(config, workdir: str) -> dict:
    """``--mode=eval``: scores the checkpoint in ``workdir``.

    A teacher (``config.sampling``'s sampler and steps, EMA weights) or, when the config has a
    ``distill`` section, the EMA student (``student_steps`` network evaluations, 1 by default).
    ``config.eval.num_samples`` samples (50,000 unless ``config.eval.monitoring``) in batches of
    ``config.eval.batch_size``, labels cycling through the classes for conditional models.
    The protocol, reference file, weights and checkpoint are checked before anything is sampled.
    """
    n, monitoring = int(config.eval.num_samples), bool(config.eval.monitoring)
    fid_lib.metric_suffix(n, monitoring=monitoring)
    ref_path = ref_stats_path(config, workdir)
    fid_lib.load_stats(ref_path)
    net = feature_network(config, workdir)
    bs = int(config.eval.batch_size)
    k = int(config.data.num_classes)
    key = jax.random.key(config.seed + 3)
    if "distill" in config:
        from fdistill import distill, sharding
        distiller, state = distill.load_student(config, workdir)
        draw, params = distiller.sample_fn(bs), state["student_ema"]
        generator = {"model": "student", "nfe": len(distiller.objective.student_sigmas),
                     "checkpoint_step": int(sharding.to_host(state["step"]))}
    else:
        from fdistill import train
        model, step = train.load_model(config, workdir)
        graphdef, params = nnx.split(model)
        draw = TeacherSampler(config, graphdef, bs)
        generator = {"model": "teacher", "sampler": config.sampling.sampler,
                     "sampler_steps": int(config.sampling.num_steps),
                     "guidance": draw.guidance, "checkpoint_step": int(step)}

    def draw_batch(i):
        labels = _labels(k, bs)
        return draw(params, jax.random.fold_in(key, i), _one_hot(labels, k)), labels

    t0 = time.time()
    out = score(config, net, ref_path, draw_batch, n, monitoring=monitoring,
                progress=jax.process_index() == 0)
    if generator["model"] == "teacher":
        generator["nfe"] = draw.nfe
    protocol = dict(out.pop("protocol"), **generator, batch_size=bs, seed=int(config.seed),
                    seconds=time.time() - t0)
    results = {f"eval/{name}": v for name, v in out.items()}
    results["eval/protocol"] = protocol
    monitor.write_results(workdir, results)
    if jax.process_index() == 0:
        shown = "  ".join(f"{name}={v:.4g}" for name, v in out.items())
        print(f"{generator['model']} ({generator['nfe']} nfe), {n} samples: {shown}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Periodic evaluation during training, and the best checkpoint.

class PeriodicEval:
    """``evaluator(step, model) -> {'eval/<metric>': value}``: monitoring metrics of a teacher
    Denoiser (pass the EMA weights) from ``config.eval.periodic_num_samples`` samples, named by
    the count (``eval/fid_10k``, ``eval/fd_digits_2k``). The sampler is compiled on the first call
    and reused; every call uses the same noise, so successive values differ by the weights only.
    ``metric`` is the headline name that BestCheckpoint tracks.
    """

    def __init__(self, config, workdir: str, *, num_samples: int | None = None,
                 progress: bool = False):
        self.config, self.progress = config, progress
        self.num_samples = int(num_samples or config.eval.periodic_num_samples)
        self.metric = "eval/" + headline_metric(config, self.num_samples, monitoring=True)
        self.ref = fid_lib.load_stats(ref_stats_path(config, workdir))
        self.net = feature_network(config, workdir)
        self.batch_size = min(int(config.eval.batch_size), self.num_samples)
        self.key = jax.random.key(config.seed + 4)
        self._sampler: TeacherSampler | None = None

    def score_draw(self, draw_batch: Callable[[int], tuple]) -> dict:
        """The metrics of any generator: ``draw_batch(i) -> (images, class indices or None)``
        (e.g. a student's one-step sampler during distillation)."""
        out = score(self.config, self.net, self.ref, draw_batch, self.num_samples,
                    monitoring=True, progress=self.progress)
        out.pop("protocol")
        return {f"eval/{k}": v for k, v in out.items()}

    def __call__(self, step: int, model: nnx.Module) -> dict:
        del step  # the same noise at every step
        graphdef, state = nnx.split(model)
        if self._sampler is None:
            self._sampler = TeacherSampler(self.config, graphdef, self.batch_size)
        k = int(self.config.data.num_classes)

        def draw_batch(i):
            labels = _labels(k, self.batch_size)
            x = self._sampler(state, jax.random.fold_in(self.key, i), _one_hot(labels, k))
            return x, labels

        return self.score_draw(draw_batch)


def periodic_eval(config, workdir: str) -> PeriodicEval:
    """The evaluator for training loops (see ``PeriodicEval`` and ``training_hook``)."""
    return PeriodicEval(config, workdir)


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
            with open(self.record_path, "w") as f:
                json.dump(self.best, f, indent=2)
        return True


def local_copy(params):
    """The training state's (possibly multi-host, sharded) parameters as arrays on this process'
    default device, so that evaluation samples locally and reads its samples back."""
    from fdistill import sharding
    return jax.device_put(sharding.to_host(params))


def periodic_hook(config, workdir: str, score_state: Callable[[PeriodicEval, dict], dict], *,
                  every: int, log_every: int = 1) -> Callable[[int, dict], dict] | None:
    """``hook(step, state) -> metrics`` for ``train.fit(on_log=...)``: at steps that are
    multiples of ``every``, ``score_state(evaluator, state)``, keeping the best state in
    ``<workdir>/best``; ``{}`` at other steps. None when ``every`` is 0. fit calls on_log at log
    steps only, so ``every`` must be a multiple of the loop's ``log_every``."""
    every = int(every)
    if every <= 0:
        return None
    if every % int(log_every):
        raise ValueError(f"evaluation every={every} steps must be a multiple of the log interval "
                         f"{log_every} (evaluation runs at log steps)")
    evaluator = periodic_eval(config, workdir)
    best = BestCheckpoint(workdir, evaluator.metric)

    def hook(step: int, state) -> dict:
        if step % every:
            return {}
        metrics = score_state(evaluator, state)
        best.update(step, metrics, state)
        return metrics

    return hook


def training_hook(config, workdir: str, to_model: Callable, *, log_every: int = 1
                  ) -> Callable[[int, dict], dict] | None:
    """The teacher loop's ``periodic_hook``: every ``config.eval.every`` steps, the metrics of
    ``to_model(state)`` (the EMA teacher) with ``config.sampling``'s sampler."""
    return periodic_hook(config, workdir, lambda ev, state: ev(0, to_model(state)),
                         every=config.eval.every, log_every=log_every)


def student_hook(config, workdir: str, distiller, *, log_every: int = 1
                 ) -> Callable[[int, dict], dict] | None:
    """The distill loop's ``periodic_hook``: every ``config.distill.eval_every`` iterations, the
    metrics of the EMA student (its one- or few-step sampler, compiled once)."""
    every = int(config.distill.get("eval_every", 0))
    if every <= 0:
        return None
    k = int(config.data.num_classes)
    bs = min(int(config.eval.batch_size), int(config.eval.periodic_num_samples))
    draw = distiller.sample_fn(bs)

    def score_state(evaluator: PeriodicEval, state) -> dict:
        params = local_copy(state["student_ema"])

        def draw_batch(i):
            labels = _labels(k, bs)
            key = jax.random.fold_in(evaluator.key, i)
            return draw(params, key, _one_hot(labels, k)), labels
        return evaluator.score_draw(draw_batch)

    return periodic_hook(config, workdir, score_state, every=every, log_every=log_every)
