"""HiAR ablation at CPU scale: block-first vs hierarchical self-rollout, the forward-KL motion
regulariser (on / off, bidirectional / block-causal mask), reverse-KL vs Jensen-Shannon.

    python experiments/video_hiar.py --quick                 # minutes on 2 CPU cores
    python experiments/video_hiar.py --seeds 0 1 2           # configs/video.py, longer
    python experiments/video_hiar.py --quick --pipeline      # only: pipelined vs sequential
                                                             #   sampling on fake CPU devices
    python experiments/video_hiar.py --merge runs/video_hiar/video_hiar_seeds0.json \
        runs/video_hiar/video_hiar_seeds1.json               # one table from separate runs

One bidirectional teacher is trained (or resumed) in ``<workdir>/teacher``; per seed, the
teacher's ODE pairs and an ODE-regression-initialised block-causal student are shared by all
variants, which are then distilled with the self-rollout f-distill loop. Every row reports, as
mean +- std over seeds: mean object speed (pixels/frame, exact centroid tracking) and its ratio
to the data's, dynamic degree (fraction of clips moving > 0.25 px/frame), frame-difference
energy, shape error (distance to an ideal one-square frame) at the training length, and drift
(slope of the per-segment shape error over a rollout 4x the training length, sliding KV window).
Writes ``<workdir>/video_hiar_seeds<seeds>.json`` and ``.md`` and one GIF per row; seeds run
as separate processes (same workdir, after the teacher is trained) are combined by ``--merge``.
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

from fdistill.data.video import get_video_dataset       # noqa: E402
from fdistill.video import distill as VD                # noqa: E402
from fdistill.video import hiar, metrics                # noqa: E402

VARIANTS = {
    "block-first, RKL (Self-Forcing)": dict(order="block_first", divergence="reverse_kl",
                                            fkl_weight=0.0),
    "hierarchical, RKL": dict(order="hierarchical", divergence="reverse_kl", fkl_weight=0.0),
    "hierarchical, RKL + FKL bidir (HiAR)": dict(order="hierarchical", divergence="reverse_kl",
                                                 fkl_weight=0.1, fkl_mask="bidirectional"),
    "hierarchical, RKL + FKL block-causal": dict(order="hierarchical", divergence="reverse_kl",
                                                 fkl_weight=0.1, fkl_mask="block_causal"),
    "hierarchical, JS + FKL bidir": dict(order="hierarchical", divergence="jensen_shannon",
                                         fkl_weight=0.1, fkl_mask="bidirectional"),
}
COLUMNS = ("speed", "speed_ratio", "dynamic", "frame_diff", "shape_error", "drift")


def load_config(quick: bool):
    if quick:
        from configs.video_quick import get_config
    else:
        from configs.video import get_config
    return get_config()


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
                   help=f"subset of: {list(VARIANTS)}")
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
    VD.train_video_teacher(config, teacher_dir)
    teacher = VD.load_video_teacher(config, teacher_dir)
    t_teacher = time.time() - t_start
    if args.pipeline:
        timing = pipeline_timing(teacher, config)
        print("pipelined vs sequential hierarchical sampling:", json.dumps(timing))
        with open(os.path.join(args.workdir, "video_hiar_pipeline.json"), "w") as f:
            json.dump(timing, f, indent=2)
        return timing

    ds = get_video_dataset(config.data, global_batch_size=config.eval.num_clips, seed=1234)
    data_clips = ds.batch(0)["x"]
    data_row = metrics.motion_stats(data_clips, square=config.data.square)
    data_long = ds.batch(1, num_frames=config.data.num_frames * config.eval.rollout_factor)["x"]
    data_row["drift"] = metrics.drift(data_long, config.data.num_frames,
                                      square=config.data.square)["slope"]
    data_speed = data_row["speed"]
    data_row["speed_ratio"] = 1.0
    rows: dict[str, list[dict]] = {"data": [data_row], "teacher (Heun, 35 NFE, bidir)": []}
    rows["ODE-init student (hierarchical)"] = []
    rows.update({name: [] for name in args.variants})
    timings: dict[str, list[float]] = {name: [] for name in args.variants}

    for seed in args.seeds:
        cfg = config.copy_and_resolve_references()
        cfg.seed = seed
        key = jax.random.key(1000 + seed)
        teacher_clips = np.asarray(hiar.teacher_sample(
            teacher, jax.random.fold_in(key, 1), data_clips.shape,
            num_steps=config.sampling.num_steps))
        row = metrics.motion_stats(teacher_clips, square=config.data.square)
        row["speed_ratio"] = row["speed"] / data_speed
        rows["teacher (Heun, 35 NFE, bidir)"].append(row)

        sigmas = VD.student_sigmas_of(cfg, teacher.process)
        t0 = time.time()
        pairs = VD.ode_pairs(teacher, jax.random.fold_in(key, 2), cfg.distill.num_pairs,
                             ds.shape, sigmas, substeps=cfg.distill.pair_substeps)
        init, _ = VD.ode_initialise(teacher, pairs, sigmas, block_size=cfg.student.block_size,
                                    num_steps=cfg.distill.ode_init_steps,
                                    batch_size=cfg.distill.batch_size,
                                    lr=cfg.distill.student_optim.lr * 10, seed=seed)
        print(f"seed {seed}: teacher pairs + ODE init in {time.time() - t0:.0f}s", flush=True)
        row, _ = VD.evaluate_student(init, cfg, jax.random.fold_in(key, 3), "hierarchical",
                                  data_speed)
        rows["ODE-init student (hierarchical)"].append(row)

        for name in args.variants:
            v = VARIANTS[name]
            vcfg = cfg.copy_and_resolve_references()
            for field, value in v.items():
                vcfg.distill[field] = value
            slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
            t0 = time.time()
            student, _ = VD.distill_video(vcfg, teacher, os.path.join(args.workdir,
                                                                      f"{slug}_seed{seed}"),
                                          pairs=pairs, student=init)
            timings[name].append(time.time() - t0)
            row, long = VD.evaluate_student(student, vcfg, jax.random.fold_in(key, 3), v["order"],
                                         data_speed)
            rows[name].append(row)
            print(f"seed {seed} | {name}: " + ", ".join(f"{k}={row[k]:.3g}" for k in COLUMNS),
                  flush=True)
            if seed == args.seeds[0]:
                metrics.save_gif(os.path.join(args.workdir, f"{slug}.gif"), long[:8])

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
