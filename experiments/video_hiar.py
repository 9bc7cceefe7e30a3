"""HiAR ablation (arXiv 2603.08703, Tables 2-3) at CPU scale, through the command line's modes.

Rows (``configs/video.py``'s VARIANTS, each distilled by ``fdistill.modes.distill``):
Self-Forcing order (block-first), w/o FKL (hierarchical), FKL bidirectional K=1 (HiAR), causal
K=1, K=2, K=4, w/o re-training (the block-first student sampled hierarchically), context t_j,
and a Jensen-Shannon row; with the data, the teacher and the ODE-initialised student. Writes
``<workdir>/video_rollouts.png`` (and to ``--figures_dir``): per row, the first seed's first clip
as a filmstrip (every other frame of the long rollout; the teacher's training-length clip),
titled with its speed ratio and shape error.

    python experiments/video_hiar.py --quick                      # configs/video_quick.py, 3 seeds
    python experiments/video_hiar.py --quick --seeds 1 --distill-steps 120   # what fits 2 cores
    python experiments/video_hiar.py --seeds 3                    # configs/video.py (GPU-sized)
    python experiments/video_hiar.py --quick --pipeline           # only: sampler timings
    python experiments/video_hiar.py --quick --teacher-only       # only: the teacher's context use
    python experiments/video_hiar.py --merge A.json B.json        # one table from separate runs

One teacher is trained (or resumed) in ``<workdir>/teacher``; per seed, the ODE pairs and the
ODE-regression initialisation are made once in ``<workdir>/init_seed<seed>`` and shared by the
rows. Every row reports mean +- std over seeds of: at the training length, the tracked speed's
ratio to the data's, the dynamic degree (threshold: the data's lower quartile of per-pair
displacement, VBench's 1-in-4 rule) and the shape error; over a rollout ``eval.rollout_factor``
(4) times the training length, the speed ratio overall and in the last segment, the dynamic
degree, and the drift: the fitted relative change of the shape error, sharpness and intensity
from the first segment to the last (``|drift|``: their mean magnitude). See
``fdistill.video.metrics.evaluate_rollout``. With several seeds a second table gives each
trained row minus "hierarchical, w/o FKL" seed by seed (the rows of a seed share its
initialisation), mean +- standard error: the regulariser's effect is a paired difference.

Run length. On 2 CPU cores one ``video_quick`` student costs minutes; the rows' differences at
that length are inside the seed spread (see the README's video section). Separating them needs
students that move well away from their ODE initialisation: ``configs/video.py`` (3000 teacher
steps, 2400 iterations = 400 student updates, EMA horizon 50 iterations) on a GPU, 3 seeds.

``--pipeline`` times, on the trained teacher's weights, block-first sampling (the paper's
baseline), sequential hierarchical sampling (plain and with the fused pass) and the pipelined
schedule (one device per step; its cells are not fused).
On a machine with one accelerator per student step this is the paper's speed-up measurement;
on fake CPU devices sharing cores it only checks that the three run (and that the pipelined video
equals the sequential one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--pipeline" in sys.argv and "XLA_FLAGS" not in os.environ:   # before jax is imported
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                              # noqa: E402
import numpy as np                                      # noqa: E402

from fdistill import monitor                            # noqa: E402

from configs.video import VARIANTS                      # noqa: E402
from fdistill import checkpoint, modes, train           # noqa: E402
from fdistill.video import distill as VD                # noqa: E402
from fdistill.video import hiar, metrics                # noqa: E402

COLUMNS = {                                             # result key -> table heading
    "speed_ratio": "speed ratio",
    "dynamic": "dynamic",
    "shape_error": "shape err",
    "long/speed_ratio": "long: speed ratio",
    "long/speed_ratio_last": "last segment",
    "long/dynamic": "long: dynamic",
    "drift": "abs drift",
    "drift/shape_error/relative": "drift shape",
    "drift/sharpness/relative": "drift sharp",
    "drift/intensity/relative": "drift intens",
}
NO_RETRAINING = "w/o re-training (block-first student, hierarchical sampling)"
LABELS = {
    "self_forcing": "Self-Forcing order (block-first, w/o FKL)",
    "hierarchical": "hierarchical, w/o FKL",
    "hiar": "HiAR: FKL bidirectional, K=1",
    "hiar_causal_mask": "FKL block-causal, K=1",
    "hiar_k2": "FKL bidirectional, K=2",
    "hiar_k4": "FKL bidirectional, K=4",
    "hiar_context_tj": "context at t_j",
    "hiar_js": "Jensen-Shannon + FKL",
}


def load_config(quick: bool, variant: str = "hiar"):
    if quick:
        from configs.video_quick import get_config
    else:
        from configs.video import get_config
    return get_config(variant)


def summarise(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{np.mean(values):.3g} +- {np.std(values):.2g}"


def table(rows: dict[str, list[dict]]) -> str:
    lines = ["| row | " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for name, runs in rows.items():
        cells = [summarise([r.get(c) for r in runs]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRED_BASE = "hierarchical, w/o FKL"
PAIRED_COLUMNS = ("speed_ratio", "long/speed_ratio", "long/speed_ratio_last", "drift")


def paired_table(rows: dict[str, list[dict]], base: str = PAIRED_BASE) -> str:
    """Each trained row minus ``base`` seed by seed (the rows of one seed share its ODE pairs and
    initialisation), as mean +- standard error over the seeds: what the seed spread of either
    row alone hides. Empty with fewer than 2 seeds."""
    ref = rows.get(base, [])
    if len(ref) < 2:
        return ""
    lines = [f"| row - {base} (paired by seed) | "
             + " | ".join(COLUMNS[c] for c in PAIRED_COLUMNS) + " |",
             "|" + "---|" * (len(PAIRED_COLUMNS) + 1)]
    for name, runs in rows.items():
        if name in (base, "data") or len(runs) != len(ref):
            continue
        cells = []
        for c in PAIRED_COLUMNS:
            if any(r.get(c) is None for r in runs + ref):
                cells.append("n/a")
                continue
            d = np.array([r[c] for r in runs]) - np.array([r[c] for r in ref])
            cells.append(f"{d.mean():+.3f} +- {d.std(ddof=1) / np.sqrt(len(d)):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(rows: dict[str, list[dict]]) -> str:
    """The table of every row and, with several seeds, the paired table below it."""
    paired = paired_table(rows)
    return table(rows) + ("\n\n" + paired if paired else "")


def _strip(out: dict, prefix: str) -> dict:
    row = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith(prefix + "/")}
    if "long/speed_ratio_per_segment" in row:
        row["long/speed_ratio_last"] = row["long/speed_ratio_per_segment"][-1]
    return row


def filmstrip(clip: np.ndarray, *, stride: int = 1, scale: int = 3) -> np.ndarray:
    """One clip ``[T, H, W, C]`` in [-1, 1] as a row of every ``stride``-th frame (uint8,
    enlarged ``scale`` times, 1-pixel gaps)."""
    frames = np.asarray(clip)[::stride]
    return monitor.enlarge(monitor.image_grid(frames, ncols=len(frames)), scale)


def rollouts_figure(entries: list[tuple[str, dict | None, np.ndarray]], path: str, *,
                    stride: int = 2) -> str:
    """One titled filmstrip per model (``entries``: name, its table row or None, its clips):
    the first clip's frames at ``stride``, under the name and, when there is a row, the
    speed ratio and shape error at the training length."""
    images, titles = [], []
    for name, row, clips in entries:
        images.append(filmstrip(np.asarray(clips)[0], stride=stride))
        line = "" if row is None else (f"\nspeed ratio {row['speed_ratio']:.2f}, "
                                       f"shape err {row['shape_error']:.3f}")
        titles.append(name + line)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    monitor.save_png(path, monitor.panel_grid(images, titles=titles, ncols=1))
    return path


def seed_rollouts(args, config, rows: dict, seed: int, teacher_dir: str) -> list:
    """(name, row, clips) of the data, the teacher, the initialised student and every variant
    for ``rollouts_figure``, from what the run saved for ``seed``."""
    load = lambda d, name: np.load(os.path.join(d, f"{name}.npz"))["samples"]
    t = config.data.num_frames
    data = modes.dataset(config, 4, seed=1234).batch(
        1, num_frames=t * config.eval.rollout_factor)["x"]
    first = lambda label: rows[label][0] if rows.get(label) else None
    out = [("data", first("data"), data),
           (teacher_label(config), first(teacher_label(config)),
            load(teacher_dir, "samples")),
           ("ODE-init student (hierarchical)", first("ODE-init student (hierarchical)"),
            load(os.path.join(args.workdir, f"init_seed{seed}"), "student_rollout"))]
    for name in args.variants:
        vdir = os.path.join(args.workdir, f"{name}_seed{seed}")
        out.append((LABELS[name], first(LABELS[name]), load(vdir, "student_rollout")))
        if name == "self_forcing":
            out.append((NO_RETRAINING, first(NO_RETRAINING), load(vdir, "rollout_hierarchical")))
    return out


def teacher_label(config) -> str:
    """The teacher row's name, with its sampler as ``config.sampling`` sets it."""
    s = config.sampling
    churn = f", S_churn {s.S_churn:g}" if s.get("S_churn", 0.0) else ""
    return f"teacher ({s.sampler} {s.num_steps} steps{churn})"


def data_row(config) -> dict:
    """The data scored like a student (long clips of the same process, 4x the length)."""
    t, square = config.data.num_frames, config.data.square
    ref = modes.data_clips(config)
    ds = modes.dataset(config, config.eval.num_clips, seed=1234)
    short = ds.batch(0)["x"]
    ev = metrics.evaluate_rollout(ds.batch(1, num_frames=t * config.eval.rollout_factor)["x"],
                                  ref, t, square=square)
    threshold = metrics.dynamic_threshold(ref, square=square)
    row = {"speed_ratio": float(metrics.clip_speeds(short, square=square).mean()
                                / metrics.clip_speeds(ref, square=square).mean()),
           "dynamic": metrics.dynamic_degree(short, threshold, square=square),
           "shape_error": float(metrics.shape_error(short, square=square).mean())}
    row.update({f"long/{k}": v for k, v in ev.items() if not k.startswith(("drift", "data/"))})
    row.update({k: v for k, v in ev.items() if k.startswith("drift")})
    row["long/speed_ratio_last"] = ev["speed_ratio_per_segment"][-1]
    return row


def teacher_context_use(teacher, config, sigmas=(1.0, 2.0, 4.0, 8.0), n: int = 128) -> dict:
    """Does the teacher use the clip's other frames? Its x0 error on frame 0 of noised data
    clips, with the other frames from the same clip and from another clip (same noise). A
    teacher that has learnt the motion denoises frame 0 better with its own clip's frames; equal
    errors mean it denoises each frame alone, and its samples cannot move coherently."""
    x = modes.dataset(config, n, seed=4321).batch(0)["x"]
    mixed = np.roll(x, 1, axis=0)
    mixed[:, 0] = x[:, 0]
    eps = np.asarray(teacher.process.noise(jax.random.key(0), x.shape))   # the teacher's noise
    out = {}
    for s in sigmas:
        level = np.full((n,), s, np.float32)
        err = lambda clips: float(np.mean((np.asarray(teacher(clips + s * eps, level))[:, 0]
                                           - x[:, 0]) ** 2))
        out[f"sigma={s:g}"] = {"own_clip": err(x), "other_clip": err(mixed)}
    return out


def pipeline_timing(model, config, repeats: int = 5, batch: int = 8) -> dict:
    """Wall-clock per batch of ``batch`` long clips: block-first, sequential hierarchical and
    pipelined hierarchical (one device per step) sampling, medians of ``repeats`` after a
    compiling call; the pipelined video is checked equal to the sequential one."""
    s = config.student
    sigmas = VD.student_sigmas_of(config, model.process)
    shape = (batch, config.data.num_frames * config.eval.rollout_factor, config.data.size,
             config.data.size, config.data.get("channels", 1))
    noise = hiar.draw_noise(jax.random.key(0), s.num_steps, shape, model.process)
    kw = dict(block_size=s.block_size, window=s.window)
    runs = {
        "block_first_s": lambda: hiar.sample(model, noise, sigmas, order="block_first", **kw),
        "hierarchical_s": lambda: hiar.sample(model, noise, sigmas, order="hierarchical", **kw),
        "hierarchical_fused_s": lambda: hiar.sample(model, noise, sigmas, fused=True, **kw),
        "pipelined_s": lambda: hiar.pipelined_hierarchical(model, noise, sigmas, **kw),
    }
    out = {"devices": [str(d) for d in jax.devices()[:s.num_steps]], "batch": batch,
           "frames": shape[1]}
    videos = {k: np.asarray(fn().block_until_ready()) for k, fn in runs.items()}
    for name in ("pipelined_s", "hierarchical_fused_s"):
        out[f"{name[:-2]}_vs_sequential_max_abs_diff"] = float(
            np.abs(videos[name] - videos["hierarchical_s"]).max())
    for name, fn in runs.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn().block_until_ready()
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    out["speedup_vs_block_first"] = out["block_first_s"] / out["pipelined_s"]
    out["speedup_vs_sequential_hierarchical"] = out["hierarchical_s"] / out["pipelined_s"]
    out["fused_speedup_vs_sequential_hierarchical"] = (out["hierarchical_s"]
                                                       / out["hierarchical_fused_s"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="configs/video_quick.py (CPU minutes)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed .. first-seed + seeds - 1 (for runs split over "
                        "processes; combine with --merge)")
    p.add_argument("--distill-steps", type=int, default=0,
                   help="override distill.num_steps (and ckpt_every) for a shortened run")
    p.add_argument("--workdir", default="runs/video_hiar")
    p.add_argument("--teacher", default="",
                   help="the teacher's workdir (default <workdir>/teacher; trained or resumed "
                        "there with the config's teacher settings)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS),
                   help=f"subset of configs/video.py's VARIANTS: {list(VARIANTS)}")
    p.add_argument("--teacher-only", action="store_true",
                   help="only train (or resume) the teacher and print its use of the clip's "
                        "other frames")
    p.add_argument("--pipeline", action="store_true",
                   help="only time block-first, sequential hierarchical and pipelined sampling")
    p.add_argument("--figures_dir", default="",
                   help="also write video_rollouts.png (titled filmstrips) there")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine the rows of finished runs into one table and exit")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.workdir)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; valid: {list(VARIANTS)}")
    config = load_config(args.quick)
    os.makedirs(args.workdir, exist_ok=True)
    t_start = time.time()

    teacher_dir = args.teacher or os.path.join(args.workdir, "teacher")
    done = False
    if os.path.isdir(os.path.join(teacher_dir, "checkpoints")):
        with checkpoint.Checkpointer(os.path.join(teacher_dir, "checkpoints")) as ckpt:
            done = config.training.num_steps in ckpt.all_steps()
    if not done:
        modes.train_teacher(config, teacher_dir)
    # The teacher's own network, process and data (e.g. process.frame_correlation, which its
    # samples, students and diagnostics draw their noise with).
    config = modes.run_config(config, teacher_dir)
    teacher, _ = modes.load_teacher(config, teacher_dir)
    t_teacher = time.time() - t_start
    if args.pipeline:
        timing = pipeline_timing(teacher, config)
        print("sampling timings:", json.dumps(timing, indent=1))
        with open(os.path.join(args.workdir, "video_hiar_pipeline.json"), "w") as f:
            json.dump(timing, f, indent=2)
        return timing

    context_use = teacher_context_use(teacher, config)
    print("teacher: frame-0 x0 error with its own clip's other frames vs another clip's:",
          json.dumps(context_use), flush=True)
    if args.teacher_only:
        return context_use
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    rows: dict[str, list[dict]] = {"data": [data_row(config)], teacher_label(config): [],
                                   "ODE-init student (hierarchical)": []}
    for name in args.variants:
        rows[LABELS[name]] = []
        if name == "self_forcing":
            rows[NO_RETRAINING] = []
    timings: dict[str, list[float]] = {name: [] for name in args.variants}

    for seed in seeds:
        cfg = config.copy_and_resolve_references()
        cfg.seed = seed
        cfg.sampling.num_samples = cfg.sampling.batch_size = cfg.eval.num_clips
        rows[teacher_label(config)].append(
            _strip(modes.sample_teacher(cfg, teacher_dir), "sample"))
        init_dir = os.path.join(args.workdir, f"init_seed{seed}")
        for name in args.variants:
            vcfg = load_config(args.quick, name)
            vcfg.seed = seed
            vcfg.distill.teacher_workdir = teacher_dir
            vcfg.distill.init_workdir = init_dir
            if args.distill_steps:
                vcfg.distill.num_steps = vcfg.distill.ckpt_every = args.distill_steps
                vcfg.distill.log_every = min(vcfg.distill.log_every, args.distill_steps)
            vdir = os.path.join(args.workdir, f"{name}_seed{seed}")
            t0 = time.time()
            row = _strip(modes.distill(vcfg, vdir), "student")
            timings[name].append(time.time() - t0)
            rows[LABELS[name]].append(row)
            print(f"seed {seed} | {LABELS[name]}: " + ", ".join(
                f"{COLUMNS[k]}={row[k]:.3g}" for k in COLUMNS if k in row), flush=True)
            if name == "self_forcing":                  # the same weights, sampled step-first
                # The student's recorded network and process (the teacher's: e.g. its
                # frame-correlated noise), not the config file's.
                rcfg = modes.run_config(vcfg, vdir)
                distillation, state = modes.load_student(rcfg, vdir)
                rows[NO_RETRAINING].append(_strip(modes.video_student_report(
                    rcfg, vdir, distillation.denoiser(state["student_ema"]), prefix="student",
                    order="hierarchical", name="rollout_hierarchical"), "student"))
        icfg = modes.run_config(load_config(args.quick), teacher_dir)   # HiAR's sampler: t_{j+1}
        icfg.seed = seed
        init = _initialised_student(icfg, teacher, init_dir)
        rows["ODE-init student (hierarchical)"].append(_strip(modes.video_student_report(
            icfg, init_dir, init, prefix="init", order="hierarchical"), "init"))

    text = tables(rows)
    print(f"\nseeds {seeds}\n" + text)
    summary = {"config": "video_quick" if args.quick else "video", "seeds": seeds,
               "distill_steps": args.distill_steps or int(config.distill.num_steps),
               "rows": rows, "teacher_context_use": context_use,
               "distill_seconds": timings, "teacher_seconds": t_teacher,
               "total_seconds": time.time() - t_start}
    entries = seed_rollouts(args, config, rows, seeds[0], teacher_dir)
    for where in filter(None, (args.workdir, args.figures_dir)):
        print("rollouts (first clip of each row, seed", seeds[0], "):",
              rollouts_figure(entries, os.path.join(where, "video_rollouts.png")))
    name = os.path.join(args.workdir, "video_hiar_seeds" + "_".join(map(str, seeds)))
    with open(name + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    with open(name + ".md", "w") as f:
        f.write(f"seeds {seeds}\n\n{text}\n")
    print(f"\ntotal {summary['total_seconds']:.0f}s; wrote {name}.json")
    return summary


def _initialised_student(config, teacher, init_dir: str):
    """The ODE-regression-initialised student kept in ``init_dir/ode_init``."""
    graphdef, others, template = train.init_state(
        teacher, train.make_optimizer(config.distill.student_optim))
    with checkpoint.Checkpointer(os.path.join(init_dir, "ode_init", "checkpoints")) as ckpt:
        _, state = ckpt.restore_latest(template)
    return train.merge(graphdef, state["params"], others)


def merge(paths: list[str], workdir: str) -> dict:
    """One table over the seeds of several finished runs (the data row is taken once)."""
    rows: dict[str, list[dict]] = {}
    seeds = []
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        seeds += run["seeds"]
        for name, runs in run["rows"].items():
            if name == "data" and name in rows:
                continue
            rows.setdefault(name, []).extend(runs)
    text = tables(rows)
    print(f"seeds {seeds}\n{text}")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "video_hiar.json"), "w") as f:
        json.dump({"seeds": seeds, "rows": rows, "merged_from": paths}, f, indent=2)
    with open(os.path.join(workdir, "video_hiar.md"), "w") as f:
        f.write(f"seeds {seeds}\n\n{text}\n")
    return {"seeds": seeds, "rows": rows}


if __name__ == "__main__":
    main()
