"""One toy student's metrics along its distillation: the ODE-regression start, then every --every
distribution-matching iterations.

Builds the student of configs/distill_toy.py (plus --set overrides) for a trained toy teacher,
initialises it by ODE regression in --init (kept there, so several runs share it; a new --init
or changed `distill.ode_init_*` overrides give a new one) and runs `Distillation.step` for
`distill.num_steps` iterations, printing the EMA student's toy metrics (recall, precision,
mode_tv, KL(p||q), KL(q||p) on --num_samples samples, fdistill.evaluation.toy) at iteration 0
and every --every iterations. With `distill.num_steps=0` it scores the initialisation alone.

    python -m fdistill.main --config=configs/toy.py --workdir=runs/toy --mode=train
    PYTHONPATH=. python experiments/toy_trajectory.py --teacher=runs/toy --init=runs/toy_init \
        --divergence=rkl --every=200
    PYTHONPATH=. python experiments/toy_trajectory.py --teacher=runs/toy \
        --init=runs/toy_init_lr5e-3 --set distill.num_steps=0 distill.ode_init_optim.lr=5e-3
    PYTHONPATH=. python experiments/toy_trajectory.py --teacher=runs/toy --init=runs/toy_init \
        --set distill.fake_score_optim.lr=6e-3 distill.num_steps=1000
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import ml_collections
import numpy as np

from experiments.toy_diagnostics import parse_overrides
from fdistill import compilation_cache, modes, sharding
from fdistill.quickstart import student_config


def run(args) -> list[dict]:
    c = student_config(ml_collections.ConfigDict({"seed": args.seed}), args.teacher,
                       args.divergence, args.init)
    for name, value in parse_overrides(args.set).items():
        node, *path = name.split(".")
        target = c[node]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    config, teacher, _ = modes.teacher_of(c)
    mesh = sharding.make_mesh()
    dc = config.distill
    init = modes.regression_init(config, teacher, args.init, mesh) if dc.ode_init_steps else None
    distillation = modes.build_distillation(config, teacher, mesh, student=init)
    ds = modes.dataset(config, dc.batch_size)
    draw = modes.student_draw(config, distillation, args.num_samples)
    state, log, start = distillation.initial_state, [], time.time()
    for i in range(int(dc.num_steps) + 1):
        if i % args.every == 0 or i == int(dc.num_steps):
            x = np.asarray(draw(sharding.local_copy(state["student_ema"]), jax.random.key(7), None))
            row = {"iteration": i, "seconds": round(time.time() - start, 1),
                   **{k: round(v, 3) for k, v in modes.toy_metrics(config, x).items()}}
            log.append(row)
            print(json.dumps(row), flush=True)
        if i < int(dc.num_steps):
            batch = modes.with_one_hot_labels(ds.batch(i), 0)
            state, _ = distillation.step(state, i, sharding.global_batch(batch, mesh))
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a trained toy teacher's workdir")
    p.add_argument("--init", required=True, help="where the ODE-regression init is kept")
    p.add_argument("--divergence", default="fkl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--num_samples", type=int, default=4096)
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. distill.gan_weight=0.3")
    args = p.parse_args(argv)
    compilation_cache.enable()
    run(args)


if __name__ == "__main__":
    main()
