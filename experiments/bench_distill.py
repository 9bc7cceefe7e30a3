"""f-distill cost on the BENCHMARKS.md network, measured side by side in one run.

Network: EDM-preconditioned DDPM++ (SongUNet 32x32x3, 10 classes, 32 channels, mults (1, 2),
4 blocks, attention at 16; 1,601,091 parameters), discriminator: one head on the teacher's 16x16
features. Distillation as FastGen's CIFAR-10 f-distill config: forward-KL, 1 student update per 4
critic updates, GAN weight 1e-3, AdamW lr 1e-4 wd 1e-2, student gradient clip 10, no R1.

Prints, at one batch size: ms per student iteration, per critic iteration, per mean iteration of a
1 + 4 cycle and per plain DSM (EDM-loss) teacher step, with their ratios to the DSM step;
Jensen-Shannon's and reverse-KL's student iteration against forward-KL's; and the one-step
student's sampling throughput against the teacher's 35-evaluation Heun sampler.

    PYTHONPATH=. python experiments/bench_distill.py             # batch 16, as BENCHMARKS.md
    PYTHONPATH=. python experiments/bench_distill.py --batch 64 --reps 5

FastGen (PyTorch, same 2 cores, batch 16): student 626 ms (1.93x DSM), critic 460 ms (1.44x),
1 + 4 cycle mean 497 ms (1.54x), DSM 329 ms. The machine is shared: the load average is printed
before and after; compare runs only at similar load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs.distill_base import add_distill, optim
from experiments.bench_teacher import benchmark_config
from fdistill import distill, losses, sampling, sharding, train


def distill_config(divergence: str, batch: int, smoke: bool = False):
    c = add_distill(benchmark_config(), divergence=divergence)
    if smoke:                                   # a much smaller network, to check the script
        c.model.model_channels, c.model.num_blocks = 16, 1
    c.seed = 0
    d = c.distill
    d.disc_resolutions = (16,)
    d.student_update_every = 5
    d.gan_weight = 1e-3
    d.r1_weight = 0.0
    d.student_optim = optim(1e-4, weight_decay=1e-2, grad_clip=10.0)
    d.fake_score_optim = optim(1e-4, weight_decay=1e-2, grad_clip=0.0)
    d.disc_optim = optim(1e-4, weight_decay=1e-2, grad_clip=0.0)
    d.batch_size = batch
    return c


def compiled(jitted, *args):
    """(compile seconds, the compiled executable, XLA's FLOP count per call)."""
    t0 = time.perf_counter()
    exe = jitted.lower(*args).compile()
    seconds = time.perf_counter() - t0
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return seconds, exe, float(cost.get("flops", 0.0)) if cost else 0.0


def median_ms(fn, reps: int) -> float:
    """Median wall time of `fn()` (which blocks on its result) in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sample_batch", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="16 channels, 1 block: checks the script")
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.2f}")
    b = args.batch
    mesh = sharding.make_mesh()
    key = jax.random.key(0)
    batch = {"x": np.asarray(jax.random.uniform(key, (b, 32, 32, 3), minval=-1.0, maxval=1.0)),
             "label": np.arange(b, dtype=np.int32) % 10}
    gbatch = sharding.global_batch(batch, mesh)

    teacher = train.build_model(distill_config("fkl", b, args.smoke))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(teacher, nnx.Param)))
    rows, student_ms, flops = [], {}, {}
    for div in ("fkl", "js", "rkl"):
        d = distill.Distiller(distill_config(div, b, args.smoke), teacher, mesh)
        n_disc = sum(x.size for x in jax.tree.leaves(d.initial_state["disc"]))
        holder = {"state": d.initial_state}
        kinds = ("student", "critic") if div == "fkl" else ("student",)
        for kind in kinds:
            step = getattr(d, f"{kind}_step")
            c_s, fn, fl = compiled(step, holder["state"], d.teacher_params, gbatch)

            def run(fn=fn, holder=holder, d=d):
                holder["state"], m = fn(holder["state"], d.teacher_params, gbatch)
                jax.block_until_ready(m)

            ms = median_ms(run, args.reps)
            name = f"{kind} iteration" + (f" ({div})" if kind == "student" else "")
            rows.append((name, c_s, ms, fl))
            if kind == "student":
                student_ms[div], flops[div] = ms, fl
            else:
                critic_ms, critic_flops = ms, fl
        if div == "fkl":
            fkl_distiller = d

    # The plain DSM step: EDM loss, backward, clip 10, Adam (one teacher training step).
    graphdef, params, others = train.split(teacher)
    process = teacher.process
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-4))
    labels = jax.nn.one_hot(batch["label"], 10)

    def dsm_step(params, opt_state, key):
        def loss_fn(params):
            per_example, _ = losses.edm_losses(train.merge(graphdef, params, others), process, key,
                                               gbatch["x"], labels)
            return per_example.mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    dsm = {"p": params, "o": tx.init(params)}
    compile_dsm, dsm_exe, dsm_flops = compiled(jax.jit(dsm_step), dsm["p"], dsm["o"], key)

    def run_dsm():
        dsm["p"], dsm["o"], loss = dsm_exe(dsm["p"], dsm["o"], key)
        jax.block_until_ready(loss)

    dsm_ms = median_ms(run_dsm, args.reps)
    cycle_ms = (student_ms["fkl"] + 4 * critic_ms) / 5
    rows.insert(2, ("mean over a 1 student + 4 critic cycle", 0.0, cycle_ms,
                    (flops["fkl"] + 4 * critic_flops) / 5))
    rows.insert(3, ("plain DSM step (EDM loss, clip, Adam)", compile_dsm, dsm_ms, dsm_flops))

    # Sampling: one-step student vs the teacher's Heun (18 steps, 35 NFE).
    sb = args.sample_batch
    s_labels = jax.nn.one_hot(jnp.arange(sb) % 10, 10)
    draw = fkl_distiller.sample_fn(sb)
    student_params = fkl_distiller.teacher_params
    one_ms = median_ms(lambda: jax.block_until_ready(draw(student_params, key, s_labels)),
                       args.reps)
    heun = sampling.get_sampler("heun", num_steps=18)
    nfe = {}

    @jax.jit
    def heun_draw(params, key):
        x, nfe["n"] = heun(train.merge(graphdef, params, others), process, key, (sb, 32, 32, 3),
                           s_labels)
        return x

    heun_ms = median_ms(lambda: jax.block_until_ready(heun_draw(params, key)),
                        max(1, args.reps // 2))

    setting = "smoke, NOT the" if args.smoke else "the"
    print(f"\nDDPM++ ({setting} BENCHMARKS.md setting), {n_params:,} parameters; discriminator "
          f"{n_disc:,}; batch {b}, float32, median of {args.reps}")
    print(f"{'per iteration':42s} {'compile s':>9s} {'ms':>9s} {'/ DSM':>7s} {'GFLOP':>7s} "
          f"{'/ DSM':>7s}")
    for what, c, ms, fl in rows:
        comp = f"{c:9.1f}" if c else "        -"
        print(f"{what:42s} {comp} {ms:9.1f} {ms / dsm_ms:7.2f} {fl / 1e9:7.1f} "
              f"{fl / dsm_flops:7.2f}")
    print(f"JS / FKL student iteration: time {student_ms['js'] / student_ms['fkl']:.3f}, FLOPs "
          f"{flops['js'] / flops['fkl']:.4f}; JS / RKL: time "
          f"{student_ms['js'] / student_ms['rkl']:.3f}, FLOPs {flops['js'] / flops['rkl']:.4f}")
    print(f"\nsampling, batch {sb}: one-step student {one_ms:.1f} ms "
          f"({sb / one_ms * 1e3:.1f} img/s); "
          f"teacher Heun {nfe['n']} NFE {heun_ms:.1f} ms ({sb / heun_ms * 1e3:.1f} img/s); "
          f"speed-up {heun_ms / one_ms:.1f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
