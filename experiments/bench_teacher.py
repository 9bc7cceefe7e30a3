"""Teacher benchmark on the benchmark network (EDM DDPM++ 32 ch): EDM-preconditioned DDPM++ (SongUNet, 32x32x3,
10 classes, 32 channels, mults (1, 2), 4 blocks, attention at 16; 1,601,091 parameters).

Measures, for one batch size on this machine: compile time and median time of (a) a denoiser
forward with encoder features, (b) one EDM-loss training step (forward, x0 loss, backward, global
norm clip, Adam), with images/s and XLA's FLOP count; and (c) each sampler's NFE, compile time
and time per image. Prints a table.

    PYTHONPATH=. python experiments/bench_teacher.py                  # batch 16, the benchmark setting
    PYTHONPATH=. python experiments/bench_teacher.py --batch 64 --reps 5

FastGen (PyTorch, same 2 cores, batch 16) takes 329 ms for the plain DSM step .
The machine is shared: the load average is printed before and after; compare runs only at
similar load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from fdistill import losses, sampling
from fdistill.models import get_model


def benchmark_config() -> ml_collections.ConfigDict:
    """The benchmark network: EDM DDPM++ for CIFAR-10-sized, class-conditional images."""
    return ml_collections.ConfigDict(dict(
        data=dict(name='cifar10', image_size=32, num_channels=3, num_classes=10, dim=0),
        process=dict(name='edm', sigma_min=0.002, sigma_max=80., sigma_data=0.5, P_mean=-1.2,
                     P_std=1.2, rho=7., N=1000),
        model=dict(name='ddpmpp', precond='edm', model_channels=32, channel_mult=(1, 2), num_blocks=4,
                   attn_resolutions=(16,), channel_mult_emb=4, channel_mult_noise=1,
                   embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   resample_filter=(1, 1), dropout=0., label_dropout=0.)))


def timed(fn, *args, reps: int):
    """(compile s, median wall s per call over `reps` calls, median CPU s of this process per call,
    XLA's flop count per call). On a shared machine the CPU time is the steadier number."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', 0.)) if cost else 0.
    jax.block_until_ready(compiled(*args))
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return compile_s, statistics.median(wall), statistics.median(cpu), flops


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--reps', type=int, default=10, help='timed repetitions of the forward / train step')
    p.add_argument('--sde_steps', type=int, default=50, help='steps of the Euler-Maruyama / PC samplers')
    p.add_argument('--skip_samplers', action='store_true')
    args = p.parse_args()
    print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus, '
          f'load average {os.getloadavg()[0]:.2f}')

    config = benchmark_config()
    den = get_model(config, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(den, nnx.Param)))
    graphdef, params = nnx.split(den)
    process = den.process
    b = args.batch
    key = jax.random.key(0)
    x = jax.random.uniform(key, (b, 32, 32, 3), minval=-1., maxval=1.)
    labels = jax.nn.one_hot(jnp.arange(b) % 10, 10)
    sigma = process.sample_training_sigma(key, b)
    rows = []

    def forward(params, x, sigma, labels):
        return nnx.merge(graphdef, params)(x, sigma, labels, return_features=True)

    c, t, cpu, f = timed(forward, params, x, sigma, labels, reps=args.reps)
    rows.append(('denoiser forward + features', '', c, t * 1e3, cpu * 1e3, f))

    tx = optax.chain(optax.clip_by_global_norm(10.), optax.adam(1e-4))
    opt_state = tx.init(params)

    def train_step(params, opt_state, key):
        def loss_fn(params):
            per_example, _ = losses.edm_losses(nnx.merge(graphdef, params), process, key, x, labels)
            return per_example.mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    c, t, cpu, f = timed(train_step, params, opt_state, key, reps=args.reps)
    rows.append(('EDM-loss train step (fwd+bwd+clip+Adam)', '', c, t * 1e3, cpu * 1e3, f))

    if not args.skip_samplers:
        samplers = [('heun', dict(num_steps=18)), ('euler_ode', dict(num_steps=18)),
                    ('euler_maruyama', dict(num_steps=args.sde_steps)),
                    ('pc', dict(num_steps=args.sde_steps // 2, n_corrector=1))]
        for name, opts in samplers:
            sample = sampling.get_sampler(name, **opts)
            nfe = {}

            def run(params, key, sample=sample, nfe=nfe):
                out, nfe['n'] = sample(nnx.merge(graphdef, params), process, key, (b, 32, 32, 3), labels)
                return out

            c, t, cpu, _ = timed(run, params, key, reps=1)
            desc = ', '.join(f'{k}={v}' for k, v in opts.items())
            rows.append((f'sampler {name} ({desc})', nfe['n'], c, t * 1e3, cpu * 1e3, 0.))

    print(f'\nDDPM++ (benchmark setting), {n_params:,} parameters, batch {b}, float32')
    print(f'{"what":44s} {"NFE":>4s} {"compile s":>9s} {"ms/batch":>9s} {"cpu ms":>8s} {"ms/img":>7s} '
          f'{"img/s":>7s} {"GFLOP":>6s} {"GFLOP/s":>7s}')
    for what, nfe, c, ms, cpu_ms, flops in rows:
        gf = f'{flops / 1e9:6.1f}' if flops else '     -'
        gfs = f'{flops / 1e9 / (ms / 1e3):7.1f}' if flops else '      -'
        print(f'{what:44s} {str(nfe):>4s} {c:9.1f} {ms:9.1f} {cpu_ms:8.1f} {ms / b:7.2f} {b / (ms / 1e3):7.1f} '
              f'{gf} {gfs}')
    print(f'load average after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
    main()
