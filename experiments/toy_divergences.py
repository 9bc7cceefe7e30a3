"""Every f-divergence on several 2-D toys, several seeds: which divergence covers the modes?

For each toy (default: ring8, grid25 and the unbalanced ring, whose modes weigh 1/2, 1/4, ...) a
teacher is trained once (configs/toy.py, EDM loss), then one one-step student per divergence and
seed is distilled from it (configs/distill_toy.py; the divergences of one toy and seed share one
ODE-regression initialisation, scored as its own row `ode_init`). Prints, per toy and divergence,
the mean and sample standard deviation over seeds of mode recall, precision, total variation of
the mass per mode against the true weights and both KL estimates (fdistill.evaluation.toy), plus
the teacher's Heun row; writes everything to <workdir>/toy_divergences.json and, per toy, a
figure <workdir>/toy_<toy>.png: titled density panels of the truth, the teacher's Heun samples,
the first seed's initialisation and each divergence's first-seed student (--figures_dir also
writes the figures there, e.g. docs/figures).

    PYTHONPATH=. python experiments/toy_divergences.py --workdir=runs/toy_divergences
    PYTHONPATH=. python experiments/toy_divergences.py --toys=unbalanced --seeds=0 \
        --divergences=rkl,fkl,js --distill_steps=1000          # a quick look

Runs resume: teachers and students already in the workdir are not retrained. `--set` changes the
teachers' configs/toy.py (the students follow their teacher's network), e.g. `--set
model.hidden=128` for the grid, whose 25 modes the 64-wide default MLP learns poorly.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from configs import distill_toy, toy
from experiments.toy_diagnostics import parse_overrides
from fdistill import data, divergences, modes, monitor, quickstart
from fdistill import main as cli

METRICS = ("recall", "precision", "mode_tv", "kl_pq", "kl_qp")


def teacher_row(config, workdir: str) -> tuple[dict, np.ndarray]:
    """The teacher's Heun row and its samples."""
    model, _ = modes.load_teacher(config, workdir)
    s = config.sampling
    draw, params = modes.teacher_sampler(config, model, s.batch_size)
    x = modes.draw_samples(draw, params, config, s.num_samples, s.batch_size, jax.random.key(1))
    return {"nfe": draw.nfe, **modes.toy_metrics(config, x)}, x


def panel(config, x, title: str, row: dict | None = None) -> tuple[np.ndarray, str]:
    """A titled density panel (precision, recall and mode weights' TV on the title's last line;
    titles have at most three lines)."""
    if row is not None:
        title += (f"\nP {row['precision']:.2f} R {row['recall']:.2f} "
                  f"TV {row['mode_tv']:.3f}")
    return monitor.density_image(np.asarray(x), extent=modes.toy_extent(config)), title


def save_figure(panels: list, path: str) -> None:
    images, titles = zip(*panels)
    monitor.save_png(path, monitor.panel_row(list(images), titles=list(titles)))


def init_dir(args, toy_name: str, seed: int) -> str:
    """The ODE-regression initialisation of one toy and seed, shared by its divergences."""
    return os.path.join(args.workdir, toy_name, f"init_seed{seed}")


def run(args) -> dict:
    names = [n.strip() for n in args.divergences.split(",")] if args.divergences else \
        list(divergences.NAMES)
    out = {}
    for toy_name in args.toys.split(","):
        tc = toy.get_config()
        tc.update_from_flattened_dict(parse_overrides(args.set))
        tc.data.toy = toy_name
        if args.teacher_steps:
            tc.training.num_steps = tc.training.ckpt_every = args.teacher_steps
        teacher_dir = os.path.join(args.workdir, toy_name, "teacher")
        cli.run(tc, teacher_dir, "train")
        heun_row, x = teacher_row(tc, teacher_dir)
        rows = {"teacher (Heun)": [heun_row], "ode_init": []}
        truth = data.get_dataset(tc.data, global_batch_size=8, seed=0).sample(
            jax.random.key(0), tc.sampling.num_samples)
        panels = [panel(tc, truth, f"truth: {toy_name}"),
                  panel(tc, x, f"teacher, Heun\n{heun_row['nfe']} NFE", heun_row)]
        for seed in (int(s) for s in args.seeds.split(",")):
            tc.seed = seed
            x = quickstart.init_samples(tc, teacher_dir, init_dir(args, toy_name, seed),
                                        tc.sampling.num_samples, jax.random.key(seed + 1))
            rows["ode_init"].append({"nfe": 1, **modes.toy_metrics(tc, x)})
            if len(rows["ode_init"]) == 1:
                panels.append(panel(tc, x, "student, ODE init\n1 NFE", rows["ode_init"][0]))
        for name in names:
            rows[name] = []
            for seed in (int(s) for s in args.seeds.split(",")):
                c = distill_toy.get_config()  # the toy comes from the teacher's record
                c.seed = seed
                c.distill.teacher_workdir = teacher_dir
                c.distill.divergence = name
                # one ODE-regression initialisation per toy and seed, shared by the divergences
                c.distill.init_workdir = init_dir(args, toy_name, seed)
                if name == "alpha":
                    c.distill.divergence_params.alpha = args.alpha
                if args.distill_steps:
                    c.distill.num_steps = c.distill.ckpt_every = args.distill_steps
                student_dir = os.path.join(args.workdir, toy_name, name, f"seed{seed}")
                r = cli.run(c, student_dir, "distill")
                rows[name].append({"nfe": r["nfe"], **{m: r[f"student/{m}"] for m in METRICS}})
                if len(rows[name]) == 1:
                    with np.load(os.path.join(student_dir, "student_samples.npz")) as f:
                        x = f["samples"][:tc.sampling.num_samples]
                    panels.append(panel(tc, x, f"student, {name}\n{r['nfe']} NFE", rows[name][0]))
        out[toy_name] = rows
        paths = [os.path.join(args.workdir, f"toy_{toy_name}.png")]
        if args.figures_dir:
            os.makedirs(args.figures_dir, exist_ok=True)
            paths.append(os.path.join(args.figures_dir, f"toy_{toy_name}.png"))
        for path in paths:
            save_figure(panels, path)
    return out


def table(out: dict) -> str:
    lines = []
    for toy_name, rows in out.items():
        lines += [f"\n{toy_name}", "| model | nfe | " + " | ".join(METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]
        for model, runs in rows.items():
            cells = []
            for m in METRICS:
                v = np.asarray([r[m] for r in runs])
                cells.append(f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else ""))
            lines.append(f"| {model} | {runs[0]['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/toy_divergences")
    p.add_argument("--toys", default="ring8,grid25,unbalanced")
    p.add_argument("--divergences", default="", help="comma-separated; default: all")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--teacher_steps", type=int, default=0, help="0: configs/toy.py's")
    p.add_argument("--distill_steps", type=int, default=0, help="0: configs/distill_toy.py's")
    p.add_argument("--figures_dir", default="", help="also write the figures here")
    p.add_argument("--set", nargs="*", default=[],
                   help="teacher config overrides, e.g. model.hidden=128")
    args = p.parse_args()
    out = run(args)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "toy_divergences.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(table(out))


if __name__ == "__main__":
    main()
