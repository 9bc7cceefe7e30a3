"""Cold compile time and optimised HLO size of the digits DDPM++ teacher DSM step and f-distill
steps (configs/distill_digits.py on configs/digits.py, random weights).

Compiles each program once with the persistent compilation cache off and prints the compile
seconds, the number of instructions of the optimised HLO (`compiled.as_text()`), its
convolutions, dots and fusions, and its commonest opcodes. The DSM step here is the teacher's
loss, backward and optimiser step (no EMA or finite guard).

    FDISTILL_COMPILATION_CACHE=0 PYTHONPATH=. python experiments/compile_distill.py
    FDISTILL_COMPILATION_CACHE=0 PYTHONPATH=. python experiments/compile_distill.py --steps critic --batch 8

Pass timings: add TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=hlo_pass_pipeline=1 to the environment.
"""
from __future__ import annotations

import argparse
import collections
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import digits, distill_digits
from fdistill import compilation_cache, data, losses, modes, sharding, train

STEPS = ("dsm", "critic", "student")


def report(name: str, lowered) -> None:
    t0 = time.perf_counter()
    exe = lowered.compile()
    seconds = time.perf_counter() - t0
    ops = collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", exe.as_text()))
    print(f"{name}: compile {seconds:.1f} s, optimised HLO {sum(ops.values())} instructions, "
          f"{ops['convolution']} convolutions, {ops['dot']} dots, {ops['fusion']} fusions",
          flush=True)
    print("    commonest:", ", ".join(f"{k} {v}" for k, v in ops.most_common(10)), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated: {', '.join(STEPS)}")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    compilation_cache.disable()
    steps = [s.strip() for s in args.steps.split(",")]
    teacher_config, c = digits.get_config(), distill_digits.get_config()
    for k in ("model", "process", "data"):
        c[k] = teacher_config[k]
    c.distill.batch_size = args.batch
    teacher = modes.build_model(c)
    mesh = sharding.make_mesh()
    shape = (args.batch,) + data.example_shape(c.data)
    x = np.random.RandomState(0).uniform(-1, 1, shape).astype(np.float32)
    labels = np.asarray(jax.nn.one_hot(np.arange(args.batch) % 10, 10))
    print(f"jax {jax.__version__}, batch {shape}", flush=True)
    if "dsm" in steps:
        graphdef, params, others = train.split(teacher)
        tx = train.make_optimizer(teacher_config.optim)

        def dsm(params, opt, key):
            def loss_fn(p):
                per, _ = losses.edm_losses(train.merge(graphdef, p, others), teacher.process, key,
                                           jnp.asarray(x), jnp.asarray(labels))
                return per.mean()
            value, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt, value

        report("teacher DSM step", jax.jit(dsm).lower(params, tx.init(params), jax.random.key(0)))
    dist = modes.build_distillation(c, teacher, mesh)
    batch = sharding.global_batch({"x": x, "label": labels}, mesh)
    print(f"distillation state: {len(jax.tree.leaves(dist.initial_state))} leaves", flush=True)
    for kind in ("critic", "student"):
        if kind in steps:
            lowered = getattr(dist, f"{kind}_step").lower(dist.initial_state, dist.teacher_params,
                                                          batch, dist.key)
            report(f"{kind} step", lowered)


if __name__ == "__main__":
    main()
