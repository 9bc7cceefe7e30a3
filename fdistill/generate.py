"""Modes that use a trained teacher: ``sample`` (images / points, PNG, npz) and ``likelihood``."""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdistill import monitor, train


def example_shape(config) -> tuple[int, ...]:
    """Per-example shape a config's network sees."""
    if config.data.name == "toy":
        return (config.data.dim,)
    return (config.data.image_size, config.data.image_size, config.data.num_channels)


def class_labels(config, n: int) -> jax.Array | None:
    """One-hot labels cycling through the classes (None for unconditional models)."""
    k = config.data.num_classes
    return jax.nn.one_hot(jnp.arange(n) % k, k) if k else None


def make_sample_fn(config, model: nnx.Module, *, sampler_name: str | None = None,
                   num_steps: int | None = None):
    """``draw(key, labels) -> x`` for the teacher, jitted over the model state, and its NFE."""
    from fdistill import sampling, sde
    s = config.sampling
    sampler = sampling.get_sampler(sampler_name or s.sampler, num_steps=num_steps or s.num_steps,
                                   snr=s.snr, n_corrector=s.n_corrector)
    process = sde.sde_from_config(config.process)
    graphdef, state = nnx.split(model)
    shape = (s.batch_size,) + example_shape(config)
    nfe = []

    @jax.jit
    def draw(state, key, labels):
        net = nnx.merge(graphdef, state)
        denoise_fn = lambda x, t, c: net(x, t, c)
        if config.data.num_classes and s.guidance != 1.0:
            denoise_fn = sampling.guided(denoise_fn, s.guidance)
        x, n = sampler(denoise_fn, process, key, shape, labels)
        nfe.append(n)
        return x

    def sample_batch(key, labels=None):
        return draw(state, key, labels)

    sample_batch(jax.random.key(0), class_labels(config, s.batch_size))  # trace once to learn nfe
    return sample_batch, nfe[0]


def draw_samples(sample_batch, config, n: int, key) -> np.ndarray:
    bs = config.sampling.batch_size
    out = []
    for i in range(-(-n // bs)):
        out.append(np.asarray(sample_batch(jax.random.fold_in(key, i), class_labels(config, bs))))
    return np.concatenate(out)[:n]


def save_samples(config, workdir: str, x: np.ndarray, name: str) -> str:
    """Writes ``name.npz`` and ``name.png`` (image grid, or density plot for 2-D toys)."""
    np.savez(os.path.join(workdir, f"{name}.npz"), samples=x)
    path = os.path.join(workdir, f"{name}.png")
    if config.data.name == "toy":
        monitor.save_png(path, monitor.density_image(x, extent=_toy_extent(config)))
    else:
        monitor.save_png(path, monitor.image_grid(x[:64]), scale=4 if x.shape[1] <= 16 else 2)
    return path


def _toy_extent(config) -> float:
    return 1.5 * config.data.radius + 4 * config.data.std + 0.5


def toy_metrics(config, x: np.ndarray, seed: int = 0) -> dict:
    from fdistill import data
    from fdistill.evaluation import toy
    ds = data.get_dataset(config.data, global_batch_size=8, seed=config.seed)
    return {k: float(v) for k, v in toy.toy_metrics(ds, x, jax.random.key(seed)).items()}


def sample(config, workdir: str) -> dict:
    """Samples the teacher in ``workdir`` with ``config.sampling``; writes samples.png/.npz."""
    model, step = train.load_model(config, workdir)
    sample_batch, nfe = make_sample_fn(config, model)
    key = jax.random.key(config.seed + 1)
    t0 = time.time()
    x = draw_samples(sample_batch, config, config.sampling.num_samples, key)
    seconds = time.time() - t0
    png = save_samples(config, workdir, x, "samples")
    results = {f"sample/{k}": v for k, v in
               {"sampler": config.sampling.sampler, "nfe": nfe, "num_samples": len(x),
                "checkpoint_step": step, "seconds_per_sample": seconds / len(x)}.items()}
    if config.data.name == "toy":
        results.update({f"sample/{k}": v for k, v in toy_metrics(config, x).items()})
    monitor.write_results(workdir, results)
    if jax.process_index() == 0:
        print(f"{len(x)} samples, {nfe} network evaluations each -> {png}")
    return results


def likelihood(config, workdir: str) -> dict:
    """Negative log-likelihood through the probability-flow ODE (Score-SDE's protocol).

    Images: bits/dim of ``config.eval.num_examples`` dataset images with uniform dequantisation
    and a Hutchinson trace. 2-D toys: NLL in nats of points drawn from the true density, with the
    exact trace, next to the true density's own NLL; their difference estimates KL(p || model).
    """
    from fdistill import data, sde
    from fdistill import likelihood as lik
    model, step = train.load_model(config, workdir)
    process = sde.sde_from_config(config.process)
    n = config.eval.num_examples
    key = jax.random.key(config.seed + 2)
    ds = data.get_dataset(config.data, global_batch_size=min(n, config.sampling.batch_size),
                          seed=config.seed)
    t0 = time.time()
    if config.data.name == "toy":
        x = ds.sample(key, n)
        nll, _, nfe = lik.log_likelihood(model, process, key, x, hutchinson="exact")
        nll = -nll
        true_nll = -np.asarray(ds.log_prob(x))
        results = {"likelihood/nll_nats": float(nll.mean()),
                   "likelihood/true_nll_nats": float(true_nll.mean()),
                   "likelihood/kl_pq_estimate": float((nll - true_nll).mean())}
    else:
        bpd_fn = lik.get_bpd_fn(model, process, hutchinson=config.eval.hutchinson)
        bs, values, nfe = config.sampling.batch_size, [], 0
        for i in range(0, min(n, ds.num_examples), bs):
            idx = np.arange(i, min(i + bs, n, ds.num_examples))
            ex = ds.examples(idx)
            batch_labels = None
            if config.data.num_classes:
                batch_labels = jax.nn.one_hot(ex["label"], config.data.num_classes)
            bpd, _, nfe = bpd_fn(jax.random.fold_in(key, i), ex["x"], batch_labels)
            values.append(np.asarray(bpd))
        values = np.concatenate(values)
        results = {"likelihood/bits_per_dim": float(values.mean()),
                   "likelihood/bits_per_dim_stderr": float(values.std() / np.sqrt(len(values)))}
    results.update({"likelihood/num_examples": n, "likelihood/nfe_last_batch": nfe,
                    "likelihood/checkpoint_step": step, "likelihood/seconds": time.time() - t0})
    monitor.write_results(workdir, results)
    if jax.process_index() == 0:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in results.items()))
    return results
