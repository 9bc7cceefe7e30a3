"""8x8 digits: teacher -> one-step students by reverse-KL (DMD2), forward-KL and Jensen-Shannon.

Trains the class-conditional DDPM++ teacher of configs/digits.py (or reuses it), samples it with
Heun at 35, 17, 9 and 5 network evaluations and with Euler-Maruyama (100), distils one student
per divergence with configs/distill_digits.py (all from one ODE-regression initialisation onto
the teacher's Heun-18 map, in <workdir>/student_init, scored as its own row "student/ode_init")
and scores every model with the project's in-domain metrics (fdistill.evaluation.classifier):
the Frechet distance in the features of a small digits classifier trained by the project
(fd_digits; NOT FID, not comparable with published numbers) and the classifier's accuracy on
class-conditional samples (the same random labels for every model), each the mean over --draws
independent draws of --num_samples (one 2,000-sample draw of one generator varies by about
+-0.3, more than the models differ), with its standard deviation. A second draw of real digits
gives the floor of each metric (above 1,797 samples both draws hold every digit, so it is then the
dataset against itself). Prints a table, whether the one-step students meet the targets
(fd_digits at or below the teacher's 17-NFE Heun; within 1.25x of its 35-NFE Heun), and writes
<workdir>/digits_fdistill.json, one PNG grid per teacher sampler, and the table's two figures:
digits_samples.png (titled panels of samples: real digits, each teacher sampler with its NFE,
each student, with their fd_digits and accuracy; the same class labels in every model panel)
and digits_fd_nfe.png (fd_digits against NFE, the teacher's samplers as lines, the one-step
students as points, the real-digits floor as a dashed line; needs matplotlib, pinned in the
[notebooks] and [test] extras). --figures_dir also writes both there
(e.g. docs/figures).

    PYTHONPATH=. python experiments/digits_fdistill.py --workdir=runs/digits_fdistill \
        --teacher_steps=3000 --distill_steps=1000 \
        --teacher_samplers=heun:18,heun:9,heun:5,heun:3 --figures_dir=docs/figures
    PYTHONPATH=. python experiments/digits_fdistill.py --teacher_steps=1000 --distill_steps=500 \
        --divergences=rkl,fkl                                             # a quick look

Trials reuse the teacher and the initialisation of a workdir: `--set` overrides the students'
distill config (`--set distill.gan_weight=0.1`; the students then go to <divergence>_<tag>),
`--init_set` the initialisation's (ODE-regression keys, e.g. `distill.ode_init_steps=3000`; it is
then kept in student_init_<init_tag>), and `--score_every N` scores each student every N
iterations (rows "student/<name>@<step>", by resuming its run in N-iteration stages). Teacher
rows are computed once per teacher checkpoint, sampler, sample count and draws
(<workdir>/teacher_rows.json and the samples' npz) and reused.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import jax
import numpy as np

from configs import digits, distill_digits
from experiments.toy_diagnostics import parse_overrides
from fdistill import compilation_cache, data, modes, monitor, sharding
from fdistill import main as cli
from fdistill.evaluation import classifier, inception

TEACHER_SAMPLERS = "heun:18,heun:9,heun:5,heun:3,euler_maruyama:100"
TARGET_RATIO = 1.25          # students within 1.25x of the teacher's 35-NFE Heun


def draw_with_labels(draw, params, config, n: int, batch_size: int, key):
    """n samples of ``draw(params, key, labels)`` and their class indices, labels drawn at random
    from ``key`` as the modes draw them (``modes.label_draws``)."""
    labels = modes.label_draws(config, jax.random.fold_in(key, 1), batch_size)
    xs, ys = [], []
    for i in range(-(-n // batch_size)):
        one_hot, idx = labels(i)
        xs.append(np.asarray(draw(params, jax.random.fold_in(key, i), one_hot)))
        ys.append(idx)
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


def targets(rows: list[dict]) -> dict:
    """The targets for each one-step student row: mean fd_digits at or below the teacher's
    17-NFE Heun (``meets_17``) and within TARGET_RATIO of its 35-NFE Heun (``within_35``), and
    whether the first comparison is resolved (``resolved_17``): the per-draw differences (draw d
    of every row has the same class labels) have a mean more than twice its standard error;
    False with one draw."""
    heun = {r["nfe"]: r for r in rows if r["kind"] == "teacher" and r["sampler"] == "heun"}
    t17 = heun[17]
    out = {}
    for r in rows:
        if r["kind"] != "student":
            continue
        out[r["model"]] = {"meets_17": r["fd_digits"] <= t17["fd_digits"],
                           "within_35": r["fd_digits"] <= TARGET_RATIO * heun[35]["fd_digits"],
                           "resolved_17": _resolved(r, t17)}
    return out


def _resolved(a: dict, b: dict) -> bool:
    """Whether the mean of a's per-draw fd_digits minus b's is more than 2 standard errors."""
    da, db = a.get("fd_digits_draws", []), b.get("fd_digits_draws", [])
    if len(da) < 2 or len(da) != len(db):
        return False
    diff = np.asarray(da) - np.asarray(db)
    return bool(abs(diff.mean()) > 2 * diff.std(ddof=1) / np.sqrt(len(diff)))


def score(clf, x, labels, real) -> dict:
    """fd_digits and class accuracy of samples quantised as saved images are (uint8, EDM's
    rounding and clipping), the protocol of --mode=eval."""
    x = inception.to_uint8(np.asarray(x)).astype(np.float32) / 127.5 - 1.0
    m = classifier.in_domain_metrics(clf, x, real, labels=labels)
    return {"fd_digits": m["fd_digits"], "accuracy_digits": m["accuracy_digits"]}


def score_draws(clf, draw, params, config, n: int, batch_size: int, real, draws: int):
    """(metrics, first draw's samples): fd_digits and accuracy averaged over ``draws``
    independent draws of n samples (draw d: noise and labels from key d), with the sample
    standard deviation of fd_digits over the draws (``fd_digits_std``) and each draw's value."""
    per_draw, first = [], None
    for d in range(1, draws + 1):
        x, labels = draw_with_labels(draw, params, config, n, batch_size, jax.random.key(d))
        per_draw.append(score(clf, x, labels, real))
        first = x if first is None else first
    fd = np.array([m["fd_digits"] for m in per_draw])
    return {"fd_digits": float(fd.mean()),
            "fd_digits_std": float(fd.std(ddof=1)) if draws > 1 else float("nan"),
            "fd_digits_draws": fd.tolist(),
            "accuracy_digits": float(np.mean([m["accuracy_digits"] for m in per_draw]))}, first


def _metrics_line(row: dict) -> str:
    return f"FD {row['fd_digits']:.1f} acc {row['accuracy_digits']:.2f}"


def table_line(r: dict) -> str:
    draws = len(r.get("fd_digits_draws", [0]))
    fd = f"{r['fd_digits']:.3f}" + (f" +- {r['fd_digits_std']:.3f}" if draws > 1 else "")
    return f"| {r['model']} | {r['nfe']} | {fd} | {r['accuracy_digits']:.3f} |"


def samples_figure(panels: list[tuple[dict, np.ndarray]], *, per_panel: int = 36,
                   scale: int = 3, ncols: int = 5) -> np.ndarray:
    """One titled panel per table row: the first ``per_panel`` samples (NHWC in [-1, 1]) as a
    grid enlarged ``scale`` times, titled with the row's model, NFE and metrics."""
    images, titles = [], []
    for row, x in panels:
        grid = monitor.image_grid(np.asarray(x)[:per_panel],
                                  ncols=int(np.ceil(np.sqrt(per_panel))))
        images.append(monitor.enlarge(grid, scale))
        if row["kind"] == "data":
            titles.append(f"real digits\n(another draw)\n{_metrics_line(row)}")
        else:
            what = f"teacher, {row['sampler']}" if row["kind"] == "teacher" else \
                f"student, {row['model'].removeprefix('student/')}"
            titles.append(f"{what}\n{row['nfe']} NFE\n{_metrics_line(row)}")
    return monitor.panel_grid(images, titles=titles, ncols=ncols)


def fd_nfe_plot(rows: list[dict], path: str) -> str:
    """fd_digits against NFE (both logarithmic): the teacher's samplers as lines, the one-step
    students as points, the real-digits floor as a dashed line; a PNG at 100 dpi."""
    from matplotlib.figure import Figure   # no pyplot: no display backend needed
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    ax = fig.add_subplot()
    for sampler in dict.fromkeys(r["sampler"] for r in rows if r["kind"] == "teacher"):
        pts = sorted((r["nfe"], r["fd_digits"]) for r in rows
                     if r["kind"] == "teacher" and r["sampler"] == sampler)
        ax.plot(*zip(*pts), marker="o", label=f"teacher, {sampler}")
    for r, marker in zip([r for r in rows if r["kind"] == "student"], "s^vD<>ph*"):
        ax.plot([r["nfe"]], [r["fd_digits"]], marker=marker, linestyle="none", markersize=8,
                label=f"student, {r['model'].removeprefix('student/')} ({r['nfe']} NFE)")
    for r in rows:
        if r["kind"] == "data":
            ax.axhline(r["fd_digits"], color="k", linestyle="--", linewidth=1,
                       label="real digits (another draw)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("fd_digits (in-domain, not FID)")
    ax.set_title("8x8 digits: teacher samplers and one-step students", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_figures(rows: list[dict], panels: list[tuple[dict, np.ndarray]],
                  dirs: list[str], suffix: str = "") -> list[str]:
    """digits_samples<suffix>.png and digits_fd_nfe<suffix>.png into each of ``dirs`` (the
    final students only, not their intermediate scores); the plot is skipped, with a message,
    where matplotlib is not installed."""
    rows = [r for r in rows if "@" not in r["model"]]
    grid = samples_figure(panels)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = None
        print("digits_fd_nfe.png skipped: matplotlib is not installed "
              "(pip install -e '.[notebooks]')")
    written = []
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"digits_samples{suffix}.png")
        monitor.save_png(path, grid)
        written.append(path)
        if matplotlib is not None:
            written.append(fd_nfe_plot(rows, os.path.join(d, f"digits_fd_nfe{suffix}.png")))
    return written


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/digits_fdistill")
    p.add_argument("--divergences", default="rkl,fkl,js",
                   help="the students distilled from the shared init (empty: the init alone)")
    p.add_argument("--teacher_steps", type=int, default=4000)
    p.add_argument("--distill_steps", type=int, default=3000)
    p.add_argument("--num_samples", type=int, default=2000,
                   help="samples per row, and real digits per draw")
    p.add_argument("--teacher_samplers", default=TEACHER_SAMPLERS,
                   help="sampler:steps list; heun:18 and heun:9 are the targets' references")
    p.add_argument("--figures_dir", default="",
                   help="also write the two figures here (e.g. docs/figures)")
    p.add_argument("--set", nargs="*", default=[],
                   help="students' distill overrides, e.g. distill.gan_weight=0.1 (needs --tag)")
    p.add_argument("--tag", default="", help="suffix of the students' directories and rows")
    p.add_argument("--init_set", nargs="*", default=[],
                   help="the initialisation's overrides, e.g. distill.ode_init_steps=3000 "
                        "(needs --init_tag)")
    p.add_argument("--init_tag", default="", help="suffix of the initialisation's directory")
    p.add_argument("--draws", type=int, default=5,
                   help="independent draws of --num_samples per row; fd_digits is their mean "
                        "(one 2,000-sample draw varies by about +-0.3)")
    p.add_argument("--score_every", type=int, default=0,
                   help="also score each student every N iterations (0: at the end only)")
    args = p.parse_args()
    if (args.set and not args.tag) or (args.init_set and not args.init_tag):
        p.error("--set needs --tag and --init_set needs --init_tag, so that a trial never "
                "resumes or overwrites the default run's students and initialisation")
    tc = digits.get_config()
    # The CLI's CPU split (cpu_devices = 0: one device per core) for both the teacher's and the
    # students' batches.
    devices = math.gcd(cli.cpu_devices_for(tc, "train"),
                       cli.cpu_devices_for(distill_digits.get_config(), "distill"))
    if devices > 1:
        sharding.set_cpu_devices(devices)
    compilation_cache.enable()

    tc.training.num_steps = args.teacher_steps
    tc.training.ckpt_every = min(1000, args.teacher_steps)   # an interrupted run resumes
    tc.sampling.num_samples = tc.sampling.batch_size = args.num_samples
    teacher_dir = os.path.join(args.workdir, "teacher")
    cli.run(tc, teacher_dir, "train")
    clf = classifier.get_classifier("digits", args.workdir)
    n = args.num_samples
    real = data.get_dataset(tc.data, global_batch_size=n, seed=123).batch(0)["x"]

    other = data.get_dataset(tc.data, global_batch_size=n, seed=456).batch(0)
    rows = [{"model": "real digits (another draw)", "kind": "data", "nfe": 0,
             **score(clf, other["x"], np.asarray(other["label"]), real)}]
    panels = [(rows[-1], other["x"])]
    print(f"row: {table_line(rows[-1])}", flush=True)
    model, teacher_step = modes.load_teacher(tc, teacher_dir)
    bs = min(n, 250)
    cache_path = os.path.join(args.workdir, "teacher_rows.json")
    cache = json.load(open(cache_path)) if os.path.isfile(cache_path) else {}
    for sampler, steps in (item.split(":") for item in args.teacher_samplers.split(",")):
        steps = int(steps)
        key = f"{sampler}:{steps}:{n}:{bs}:{args.draws}:{teacher_step}"
        if key in cache:                # the same teacher, sampler, noise and labels: reuse
            row = cache[key]
            x = np.load(os.path.join(args.workdir, f"teacher_{sampler}_{row['nfe']}.npz"))
            x = x["samples"]
        else:
            draw, params = modes.teacher_sampler(tc, model, bs, sampler_name=sampler,
                                                 num_steps=steps)
            m, x = score_draws(clf, draw, params, tc, n, bs, real, args.draws)
            modes.save_samples(tc, args.workdir, x, f"teacher_{sampler}_{draw.nfe}")
            row = {"model": f"teacher ({sampler}, {steps} steps)", "kind": "teacher",
                   "sampler": sampler, "nfe": draw.nfe, **m}
            cache[key] = row
            with open(cache_path, "w") as f:
                json.dump(cache, f, indent=2)
        rows.append(row)
        panels.append((rows[-1], x))
        print(f"row: {table_line(rows[-1])}", flush=True)
    init_suffix = f"_{args.init_tag}" if args.init_tag else ""
    suffix = f"_{args.tag}" if args.tag else ""
    init_dir = os.path.join(args.workdir, "student_init" + init_suffix)
    init_overrides, overrides = parse_overrides(args.init_set), parse_overrides(args.set)

    def student_config(divergence, num_steps=args.distill_steps):
        c = distill_digits.get_config()
        c.distill.teacher_workdir = teacher_dir
        c.distill.init_workdir = init_dir
        c.distill.divergence = divergence
        c.distill.num_steps = num_steps
        c.distill.ckpt_every = args.score_every or args.distill_steps
        c.distill.num_eval_samples = n
        c.distill.eval_batch_size = bs
        c.update_from_flattened_dict({**init_overrides, **overrides})
        return c

    draw, params, nfe = modes.regression_init_sampler(student_config("rkl"), init_dir, bs)
    m, x = score_draws(clf, draw, params, tc, n, bs, real, args.draws)
    rows.append({"model": "student/ode_init" + init_suffix, "kind": "student", "nfe": nfe, **m})
    panels.append((rows[-1], x))
    print(f"row: {table_line(rows[-1])}", flush=True)
    for name in [d for d in args.divergences.split(",") if d]:
        wd = os.path.join(args.workdir, name + init_suffix + suffix)
        stages = range(args.score_every, args.distill_steps + 1, args.score_every) \
            if args.score_every else [args.distill_steps]
        for stage in sorted({*stages, args.distill_steps}):
            c = student_config(name, stage)
            r = cli.run(c, wd, "distill")
            run_config = modes.run_config(c, wd)
            distillation, state = modes.load_student(run_config, wd)
            m, x = score_draws(clf, modes.student_draw(run_config, distillation, bs),
                               state["student_ema"], run_config, n, bs, real, args.draws)
            at = "" if stage == args.distill_steps else f"@{stage}"
            rows.append({"model": f"student/{name}{init_suffix}{suffix}{at}", "kind": "student",
                         "nfe": r["nfe"], **m})
            if not at:
                panels.append((rows[-1], x))
            print(f"row: {table_line(rows[-1])}", flush=True)

    met = targets(rows)
    with open(os.path.join(args.workdir, f"digits_fdistill{init_suffix}{suffix}.json"), "w") as f:
        json.dump({"rows": rows, "targets": met, "num_samples": n}, f, indent=2)
    print(f"{n} samples per draw, {args.draws} draws per row (fd_digits: mean +- std over the "
          f"draws)\n| model | nfe | fd_digits (in-domain, not FID) | class accuracy |"
          "\n|---|---|---|---|")
    for r in rows:
        print(table_line(r))
    fd = {r["nfe"]: r["fd_digits"] for r in rows if r.get("sampler") == "heun"}
    print(f"targets: fd_digits <= teacher 17-NFE Heun ({fd[17]:.3f}); within "
          f"{TARGET_RATIO}x of its 35-NFE Heun (<= {TARGET_RATIO * fd[35]:.3f})")
    for model, m in met.items():
        print(f"  {model}: <= 17-NFE Heun: {'met' if m['meets_17'] else 'MISSED'} "
              f"({'' if m['resolved_17'] else 'not '}resolved by {args.draws} draws); within "
              f"{TARGET_RATIO}x of 35-NFE Heun: {'met' if m['within_35'] else 'MISSED'}")
    dirs = [args.workdir] + ([args.figures_dir] if args.figures_dir else [])
    for path in write_figures(rows, panels, dirs, init_suffix + suffix):
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
