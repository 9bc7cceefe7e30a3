"""The quickstart over several seeds: mean and spread of every row, and its targets checked.

Runs the README's first command (`fdistill.quickstart`: toy teacher, its Heun / Euler-Maruyama
samplers, the students' shared ODE-regression initialisation, one-step reverse-KL, forward-KL and
JS students) once per seed in <workdir>/seed<k> (runs resume: a finished seed is only
re-evaluated), then prints per row the mean +- sample standard deviation over seeds and whether
every student meets: recall 1.0, precision >= 0.85, KL(q||p) <= 2 nats, at every seed. Wall
times are those of this invocation (a resumed seed reports its re-evaluation only).

    PYTHONPATH=. python experiments/quickstart_seeds.py --workdir=runs/quickstart_seeds --seeds=0,1,2

`--set` changes the recipe for a trial: keys under `distill.` go to the students'
configs/distill_toy.py, the others to the teacher's configs/toy.py, e.g.
`--set model.hidden=64 distill.num_steps=400`.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from configs import toy
from experiments.toy_diagnostics import parse_overrides
from fdistill import quickstart

METRICS = ("recall", "precision", "mode_tv", "kl_pq", "kl_qp")


def run(workdir: str, seeds, overrides: dict | None = None) -> dict:
    overrides = dict(overrides or {})
    student = {k: v for k, v in overrides.items() if k.startswith("distill.")}
    per_seed = {}
    for seed in seeds:
        c = toy.get_config()
        c.update_from_flattened_dict({k: v for k, v in overrides.items() if k not in student})
        c.seed = seed
        per_seed[seed] = quickstart.run(c, os.path.join(workdir, f"seed{seed}"), student)
    return per_seed


def summary(per_seed: dict) -> tuple[str, bool]:
    seeds = sorted(per_seed)
    rows = [r["model"] for r in per_seed[seeds[0]]["quickstart"]]
    lines = [f"seeds: {', '.join(map(str, seeds))} (mean +- sample std)",
             "| model | nfe | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    ok = True
    for name in rows:
        found = [next(r for r in per_seed[s]["quickstart"] if r["model"] == name) for s in seeds]
        cells = []
        for m in METRICS:
            v = np.asarray([r[m] for r in found])
            spread = f" +- {v.std(ddof=1):.3f}" if len(v) > 1 else ""
            cells.append(f"{v.mean():.3f}{spread}")
        lines.append(f"| {name} | {found[0]['nfe']} | " + " | ".join(cells) + " |")
        if name.startswith("student/") and name != "student/ode_init":
            ok &= all(r["recall"] == 1.0 and r["precision"] >= 0.85 and r["kl_qp"] <= 2.0
                      for r in found)
    times = [per_seed[s].get("time", {}) for s in seeds]
    lines.append("wall s per seed: " + ", ".join(str(t.get("wall_s", "?")) for t in times))
    lines.append(f"targets (every student, every seed: recall 1, precision >= 0.85, "
                 f"KL(q||p) <= 2): {'met' if ok else 'NOT met'}")
    return "\n".join(lines), ok


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/quickstart_seeds")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", nargs="*", default=[],
                   help="recipe overrides, e.g. model.hidden=64 distill.num_steps=400")
    args = p.parse_args()
    per_seed = run(args.workdir, [int(s) for s in args.seeds.split(",")],
                   parse_overrides(args.set))
    text, _ = summary(per_seed)
    print(text)
    with open(os.path.join(args.workdir, "quickstart_seeds.json"), "w") as f:
        json.dump({str(k): v for k, v in per_seed.items()}, f, indent=1)


if __name__ == "__main__":
    main()
