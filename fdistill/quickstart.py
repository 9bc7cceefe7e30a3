"""The README's first command: a 2-D toy teacher and its one-step students, in minutes on a CPU.

Trains the toy teacher of ``configs/toy.py`` (a mixture of Gaussians, whose density is known),
samples it with EDM's Heun sampler on the probability-flow ODE and with Euler-Maruyama on the
reverse SDE, distills one-step students with reverse-KL, forward-KL and Jensen-Shannon
(``configs/distill_toy.py``: all three start from one ODE-regression initialisation, shown as its
own row), prints a table, and writes ``results.json`` and ``quickstart.png`` (the true density,
then one panel per row of the table).
"""
from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from fdistill import data, modes, monitor

SAMPLERS = (("heun", 18), ("euler_maruyama", 100))
STUDENTS = ("rkl", "fkl", "js")


def _table(rows: list[dict]) -> str:
    cols = ["model", "nfe", "recall", "precision", "mode_tv", "kl_pq", "kl_qp"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) if isinstance(r[c], (str, int)) else f"{r[c]:.3f}"
                                       for c in cols) + " |")
    return "\n".join(lines)


def _title(what: str, row: dict) -> str:
    return f"{what}\n{row['nfe']} NFE\nP {row['precision']:.2f} R {row['recall']:.2f}"


def student_config(config, teacher_dir: str, divergence: str, init_dir: str = "",
                   overrides: dict | None = None) -> ml_collections.ConfigDict:
    """``configs/distill_toy.py`` for the teacher in ``teacher_dir``, with the quickstart's seed,
    the students' shared ODE-regression initialisation in ``init_dir`` and ``overrides``
    (flattened keys, e.g. ``{'distill.num_steps': 400}``)."""
    from configs import distill_toy
    c = distill_toy.get_config()
    c.seed = config.seed
    c.distill.teacher_workdir = teacher_dir
    c.distill.divergence = divergence
    c.distill.init_workdir = init_dir
    c.update_from_flattened_dict(dict(overrides or {}))
    return c


def init_samples(config, teacher_dir: str, init_dir: str, n: int, key,
                 overrides: dict | None = None) -> np.ndarray:
    """One-step samples of the ODE-regression initialisation in ``init_dir`` (computed there if
    missing), before any distribution matching."""
    draw, params, _ = modes.regression_init_sampler(
        student_config(config, teacher_dir, "rkl", init_dir, overrides), init_dir, n)
    return np.asarray(draw(params, key, None))


class _Phases:
    """Wall seconds of each phase of the run, in order (``lap(name)`` ends the current one)."""

    def __init__(self):
        self.seconds, self._t = {}, time.time()

    def lap(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self._t, 1)
        self._t = now


def run(config, workdir: str, student_overrides: dict | None = None) -> dict:
    """The quickstart in ``workdir`` for the toy teacher ``config``; ``student_overrides`` change
    ``configs/distill_toy.py`` for the students (flattened keys)."""
    start_wall, start_cpu = time.time(), time.process_time()
    phases = _Phases()
    os.makedirs(workdir, exist_ok=True)
    teacher_dir = os.path.join(workdir, "teacher")
    modes.train_teacher(config, teacher_dir)
    phases.lap("teacher")
    model, _ = modes.load_teacher(config, teacher_dir)
    n = config.sampling.num_samples
    key = jax.random.key(config.seed + 1)
    truth = data.get_dataset(config.data, global_batch_size=8, seed=config.seed)
    extent = modes.toy_extent(config)
    panels = [monitor.density_image(np.asarray(truth.sample(key, n)), extent=extent)]
    titles = [f"truth: {config.data.toy}"]
    rows = []
    for name, steps in SAMPLERS:
        draw, params = modes.teacher_sampler(config, model, config.sampling.batch_size,
                                             sampler_name=name, num_steps=steps)
        x = modes.draw_samples(draw, params, config, n, config.sampling.batch_size, key)
        rows.append({"model": f"teacher/{name}", "nfe": draw.nfe, **modes.toy_metrics(config, x)})
        panels.append(monitor.density_image(x, extent=extent))
        titles.append(_title(f"teacher, {name}", rows[-1]))
    phases.lap("teacher samplers")
    init_dir = os.path.join(workdir, "student_init")
    x = init_samples(config, teacher_dir, init_dir, n, key, student_overrides)
    rows.append({"model": "student/ode_init", "nfe": 1, **modes.toy_metrics(config, x)})
    panels.append(monitor.density_image(x, extent=extent))
    titles.append(_title("student, ODE init", rows[-1]))
    phases.lap("ODE init")
    for divergence in STUDENTS:
        student_dir = os.path.join(workdir, f"student_{divergence}")
        out = modes.distill(student_config(config, teacher_dir, divergence, init_dir,
                                           student_overrides), student_dir)
        x = np.load(os.path.join(student_dir, "student_samples.npz"))["samples"][:n]
        rows.append({"model": f"student/{divergence}", "nfe": out["nfe"],
                     **modes.toy_metrics(config, x)})
        panels.append(monitor.density_image(x, extent=extent))
        titles.append(_title(f"student, {divergence}", rows[-1]))
        phases.lap(f"student {divergence}")
    png = os.path.join(workdir, "quickstart.png")
    monitor.save_png(png, monitor.panel_row(panels, titles=titles))
    timing = {"wall_s": round(time.time() - start_wall, 1),
              "cpu_s": round(time.process_time() - start_cpu, 1), "phases_s": phases.seconds}
    results = {"quickstart": rows, "time": timing}
    path = monitor.write_results(workdir, results)
    if jax.process_index() == 0:
        print(_table(rows))
        print(f"wall {timing['wall_s']} s, CPU {timing['cpu_s']} s (all cores); wall by phase: "
              + ", ".join(f"{k} {v} s" for k, v in phases.seconds.items()))
        print(f"results: {path}\nplot (truth, then each row, titled): {png}")
    return results
