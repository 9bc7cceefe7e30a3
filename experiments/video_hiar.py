"""HiAR ablation at CPU scale: the video students of `configs/video.py`'s VARIANTS (block-first
vs hierarchical self-rollout, the forward-KL motion regulariser on / off, its mask, reverse-KL vs
Jensen-Shannon), each distilled by the command line's own recipe (`fdistill.modes.distill`).

    python experiments/video_hiar.py --quick                 # configs/video_quick.py
    python experiments/video_hiar.py --seeds 0 1 2           # configs/video.py, longer
    python experiments/video_hiar.py --quick --pipeline      # only: pipelined vs sequential
                                                             #   sampling on fake CPU devices
    python experiments/video_hiar.py --merge runs/video_hiar/video_hiar_seeds0.json \
        runs/video_hiar/video_hiar_seeds1.json               # one table from separate runs

One bidirectional teacher is trained (or resumed) in ``<workdir>/teacher``; per seed, the
teacher's ODE pairs and the ODE-regression initialisation are made once in
``<workdir>/init_seed<seed>`` (``distill.init_workdir``) and shared by all variants. Every row
reports, as mean +- std over seeds: mean object speed (pixels/frame, exact centroid tracking) and
its ratio to the data's, dynamic degree, frame-difference energy, shape error at the training
length, and drift (slope of the per-segment shape error over a rollout 4x the training length,
sliding KV window). Writes ``<workdir>/video_hiar_seeds<seeds>.json`` and ``.md`` and one GIF per
row; seeds run as separate processes are combined by ``--merge``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--pipeline" in sys.argv:       # fake devices must be requested before jax is imported
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                              # noqa: E402
import numpy as np                                      # noqa: E402

from configs.video import VARIANTS                      # noqa: E402
from fdistill import checkpoint, modes, train           # noqa: E402
from fdistill.video import distill as VD                # noqa: E402
from fdistill.video import hiar, metrics                # noqa: E402

COLUMNS = ("speed", "speed_ratio", "dynamic", "frame_diff", "shape_error", "drift")


def load_config(quick: bool, variant: str = "hiar"):
    if quick:
        from configs.video_quick import get_config
    else:
        from configs.video import get_config
    return get_config(variant)


def summarise(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{np.mean(values):.3g} +- {np.std(values):.2g}"


def table(rows: dict[str, list[dict]]) -> str:
    header = "| row | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, runs in rows.items():
        cells = [summarise([r.get(c) for r in runs]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pipeline_timing(student, config, repeats: int = 5) -> dict:
    """Sequential vs pipelined hierarchical sampling (same video); wall-clock per clip batch."""
    s = config.student
    sigmas = VD.student_sigmas_of(config, student.process)
    shape = (8, config.data.num_frames * config.eval.rollout_factor, config.data.size,
             config.data.size, config.data.get("channels", 1))
    noise = hiar.draw_noise(jax.random.key(0), s.num_steps, shape)
    run_seq = lambda: hiar.sample(student, noise, sigmas, block_size=s.block_size,
                                  window=s.window).block_until_ready()
    run_pipe = lambda: hiar.pipelined_hierarchical(student, noise, sigmas,
                                                   block_size=s.block_size,
                                                   window=s.window).block_until_ready()
    seq, pipe = run_seq(), run_pipe()
    out = {"max_abs_diff": float(np.abs(np.asarray(seq) - np.asarray(pipe)).max()),
           "devices": [str(d) for d in jax.devices()[:s.num_steps]]}
    for name, fn in (("sequential_s", run_seq), ("pipelined_s", run_pipe)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    out["speedup"] = out["sequential_s"] / out["pipelined_s"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="configs/video_quick.py (CPU minutes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workdir", default="runs/video_hiar")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS),
                   help=f"subset of configs/video.py's VARIANTS: {list(VARIANTS)}")
    p.add_argument("--pipeline", action="store_true",
                   help="only time the pipelined schedule against the sequential one, with the "
                        "trained teacher's weights\n(on fake CPU devices: not a real speedup)")
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

    teacher_dir = os.path.join(args.workdir, "teacher")
    modes.train_teacher(config, teacher_dir)
    teacher, _ = modes.load_teacher(config, teacher_dir)
    t_teacher = time.time() - t_start
    if args.pipeline:
        timing = pipeline_timing(teacher, config)
        print("pipelined vs sequential hierarchical sampling:", json.dumps(timing))
        with open(os.path.join(args.workdir, "video_hiar_pipeline.json"), "w") as f:
            json.dump(timing, f, indent=2)
        return timing

    ds = modes.dataset(config, config.eval.num_clips, seed=1234)
    data_row = metrics.motion_stats(ds.batch(0)["x"], square=config.data.square)
    data_long = ds.batch(1, num_frames=config.data.num_frames * config.eval.rollout_factor)["x"]
    data_row["drift"] = metrics.drift(data_long, config.data.num_frames,
                                      square=config.data.square)["slope"]
    data_row["speed_ratio"] = 1.0
    rows: dict[str, list[dict]] = {"data": [data_row], "teacher (Heun, bidirectional)": [],
                                   "ODE-init student (hierarchical)": []}
    rows.update({name: [] for name in args.variants})
    timings: dict[str, list[float]] = {name: [] for name in args.variants}
    strip = lambda out, prefix: {k.split("/", 1)[1]: v for k, v in out.items()
                                 if k.startswith(prefix + "/")}

    for seed in args.seeds:
        cfg = config.copy_and_resolve_references()
        cfg.seed = seed
        cfg.sampling.num_samples = cfg.sampling.batch_size = cfg.eval.num_clips
        rows["teacher (Heun, bidirectional)"].append(
            strip(modes.sample_teacher(cfg, teacher_dir), "sample"))
        init_dir = os.path.join(args.workdir, f"init_seed{seed}")
        for name in args.variants:
            vcfg = load_config(args.quick, name)
            vcfg.seed = seed
            vcfg.distill.teacher_workdir = teacher_dir
            vcfg.distill.init_workdir = init_dir
            vdir = os.path.join(args.workdir, f"{name}_seed{seed}")
            t0 = time.time()
            row = strip(modes.distill(vcfg, vdir), "student")
            timings[name].append(time.time() - t0)
            rows[name].append(row)
            print(f"seed {seed} | {name}: " + ", ".join(f"{k}={row[k]:.3g}" for k in COLUMNS
                                                          if k in row), flush=True)
        init = _initialised_student(vcfg, teacher, init_dir)
        rows["ODE-init student (hierarchical)"].append(strip(modes.video_student_report(
            vcfg, init_dir, init, prefix="init", order="hierarchical"), "init"))

    text = table(rows)
    print("\n" + text)
    summary = {"config": "video_quick" if args.quick else "video", "seeds": args.seeds,
               "rows": rows, "distill_seconds": timings, "teacher_seconds": t_teacher,
               "total_seconds": time.time() - t_start}
    name = os.path.join(args.workdir, "video_hiar_seeds" + "_".join(map(str, args.seeds)))
    with open(name + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    with open(name + ".md", "w") as f:
        f.write(text + "\n")
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
    text = table(rows)
    print(f"seeds {seeds}\n{text}")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "video_hiar.json"), "w") as f:
        json.dump({"seeds": seeds, "rows": rows, "merged_from": paths}, f, indent=2)
    with open(os.path.join(workdir, "video_hiar.md"), "w") as f:
        f.write(f"seeds {seeds}\n\n{text}\n")
    return {"seeds": seeds, "rows": rows}


if __name__ == "__main__":
    main()
