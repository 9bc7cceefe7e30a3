"""The README's first command: a 2-D toy teacher, sampled two ways, in a few minutes on a CPU.

Trains the toy teacher of ``configs/toy.py`` (mixture of Gaussians; its density is known, so
the metrics are exact-ish), samples it with EDM's Heun sampler on the probability-flow ODE and
with Euler-Maruyama on the reverse SDE, prints a table, writes ``results.json`` and
``quickstart.png`` (true density, then one panel per sampler).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from fdistill import data, generate, monitor, train

SAMPLERS = (("heun", 18), ("euler_maruyama", 100))


def _table(rows: list[dict]) -> str:
    cols = ["model", "nfe", "recall", "precision", "mode_tv", "kl_pq", "kl_qp"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) if isinstance(r[c], (str, int)) else f"{r[c]:.3f}"
                                       for c in cols) + " |")
    return "\n".join(lines)


def run(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    teacher_dir = os.path.join(workdir, "teacher")
    train.train(config, teacher_dir)
    model, _ = train.load_model(config, teacher_dir)
    n = config.sampling.num_samples
    key = jax.random.key(config.seed + 1)
    truth = data.get_dataset(config.data, global_batch_size=8, seed=config.seed)
    extent = generate._toy_extent(config)
    panels = [monitor.density_image(np.asarray(truth.sample(key, n)), extent=extent)]
    rows = []
    for name, steps in SAMPLERS:
        sample_batch, nfe = generate.make_sample_fn(config, model, sampler_name=name,
                                                    num_steps=steps)
        x = generate.draw_samples(sample_batch, config, n, key)
        rows.append({"model": f"teacher/{name}", "nfe": nfe, **generate.toy_metrics(config, x)})
        panels.append(monitor.density_image(x, extent=extent))
    png = os.path.join(workdir, "quickstart.png")
    monitor.save_png(png, monitor.panel_row(panels))
    results = {"quickstart": rows}
    path = monitor.write_results(workdir, results)
    if jax.process_index() == 0:
        print(_table(rows))
        print(f"results: {path}\nplot (truth, then each row): {png}")
    return results
