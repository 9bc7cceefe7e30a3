"""8x8 digits: teacher -> one-step students by reverse-KL (DMD2), forward-KL and Jensen-Shannon.

Trains the class-conditional DDPM++ teacher of configs/digits.py (or reuses it), samples it with
Heun at 35, 17, 9 and 5 network evaluations and with Euler-Maruyama (100), distils one student
per divergence with configs/distill_digits.py and scores every model with the project's in-domain
metrics (fdistill.evaluation.classifier): the Frechet distance in the features of a small digits
classifier trained by the project (fd_digits; NOT FID, not comparable with published numbers) and
the classifier's accuracy on class-conditional samples (the same random labels for every model).
A second draw of real digits gives the floor of each metric. Prints a table and writes
<workdir>/digits_fdistill.json and one PNG grid per model.

    PYTHONPATH=. python experiments/digits_fdistill.py --workdir=runs/digits_fdistill
    PYTHONPATH=. python experiments/digits_fdistill.py --teacher_steps=1000 --distill_steps=500 \
        --divergences=rkl,fkl                                             # a quick look
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from configs import digits, distill_digits
from fdistill import data, modes
from fdistill import main as cli
from fdistill.evaluation import classifier, inception

TEACHER_SAMPLERS = (("heun", 18), ("heun", 9), ("heun", 5), ("heun", 3), ("euler_maruyama", 100))


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


def score(clf, x, labels, real) -> dict:
    """fd_digits and class accuracy of samples quantised as saved images are (uint8, EDM's
    rounding and clipping), the protocol of --mode=eval."""
    x = inception.to_uint8(np.asarray(x)).astype(np.float32) / 127.5 - 1.0
    m = classifier.in_domain_metrics(clf, x, real, labels=labels)
    return {"fd_digits": m["fd_digits"], "accuracy_digits": m["accuracy_digits"]}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/digits_fdistill")
    p.add_argument("--divergences", default="rkl,fkl,js")
    p.add_argument("--teacher_steps", type=int, default=4000)
    p.add_argument("--distill_steps", type=int, default=3000)
    p.add_argument("--num_samples", type=int, default=512)
    args = p.parse_args()

    tc = digits.get_config()
    tc.training.num_steps = args.teacher_steps
    tc.training.ckpt_every = args.teacher_steps
    tc.sampling.num_samples = tc.sampling.batch_size = args.num_samples
    teacher_dir = os.path.join(args.workdir, "teacher")
    cli.run(tc, teacher_dir, "train")
    clf = classifier.get_classifier("digits", args.workdir)
    n = args.num_samples
    real = data.get_dataset(tc.data, global_batch_size=n, seed=123).batch(0)["x"]

    other = data.get_dataset(tc.data, global_batch_size=n, seed=456).batch(0)
    rows = [{"model": "real digits (another draw)", "nfe": 0,
             **score(clf, other["x"], np.asarray(other["label"]), real)}]
    model, _ = modes.load_teacher(tc, teacher_dir)
    for sampler, steps in TEACHER_SAMPLERS:
        draw, params = modes.teacher_sampler(tc, model, n, sampler_name=sampler, num_steps=steps)
        x, labels = draw_with_labels(draw, params, tc, n, n, jax.random.key(1))
        modes.save_samples(tc, args.workdir, x, f"teacher_{sampler}_{draw.nfe}")
        rows.append({"model": f"teacher ({sampler}, {steps} steps)", "nfe": draw.nfe,
                     **score(clf, x, labels, real)})
    for name in args.divergences.split(","):
        c = distill_digits.get_config()
        c.distill.teacher_workdir = teacher_dir
        c.distill.divergence = name
        c.distill.num_steps = args.distill_steps
        c.distill.ckpt_every = args.distill_steps
        c.distill.num_eval_samples = n
        c.distill.eval_batch_size = min(n, 256)
        wd = os.path.join(args.workdir, name)
        r = cli.run(c, wd, "distill")
        run_config = modes.run_config(c, wd)
        distillation, state = modes.load_student(run_config, wd)
        bs = min(n, 256)
        x, labels = draw_with_labels(modes.student_draw(run_config, distillation, bs),
                                     state["student_ema"], run_config, n, bs, jax.random.key(1))
        rows.append({"model": name, "nfe": r["nfe"], **score(clf, x, labels, real)})

    with open(os.path.join(args.workdir, "digits_fdistill.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print("| model | nfe | fd_digits (in-domain, not FID) | class accuracy |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['nfe']} | {r['fd_digits']:.3f} | {r['accuracy_digits']:.3f} |")


if __name__ == "__main__":
    main()
