"""Teacher training throughput and model FLOP utilisation (MFU) on an accelerator.

For the CIFAR-10 network (EDM DDPM++, configs/cifar10_edm_ddpmpp.py, class-conditional) and the
ImageNet-64 network (EDM ADM, configs/imagenet64.py), with synthetic data: one EDM-loss training
step (forward with dropout, backward, Adam) jitted over all local devices (data parallel), and
one denoiser evaluation (a sampler's NFE). Prints compile seconds, ms per step, images/s, XLA's
FLOP count per step (its cost analysis of the compiled program), the achieved TFLOP/s and MFU =
achieved / peak, for float32 or bfloat16 compute (`--compute_dtype`, parameters and Adam state
stay float32) with or without rematerialisation (`--remat`).

    PYTHONPATH=. python experiments/bench_gpu.py                              # both networks
    PYTHONPATH=. python experiments/bench_gpu.py --compute_dtype=bfloat16 --remat
    PYTHONPATH=. python experiments/bench_gpu.py --networks=imagenet64 --batch=128
    PYTHONPATH=. python experiments/bench_gpu.py --tiny --peak_tflops=1   # small, on a CPU

Peak (dense, per device): `--peak_tflops`, else by device kind: H100 / H200 (SXM) 989 bfloat16,
495 float32 (TF32 tensor cores, what XLA uses for float32 matmuls and convolutions at default
precision); A100 312 / 156. Unknown devices (a CPU) need --peak_tflops for the MFU column.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fdistill import losses, models

# Dense peak TFLOP/s per device: {device kind substring: {compute dtype: peak}}.
PEAK_TFLOPS = {
    'H200': {'bfloat16': 989.0, 'float32': 494.5},
    'H100': {'bfloat16': 989.0, 'float32': 494.5},
    'A100': {'bfloat16': 312.0, 'float32': 156.0},
}
NETWORKS = ('cifar10', 'imagenet64')
DEFAULT_BATCH = {'cifar10': 256, 'imagenet64': 64}


def network_config(name: str, *, tiny: bool, compute_dtype: str, remat: bool):
    if name == 'cifar10':
        from configs.cifar10_edm_ddpmpp import get_config
        c = get_config()
        c.data.num_classes = 10
    elif name == 'imagenet64':
        from configs.imagenet64 import get_config
        c = get_config()
    else:
        raise ValueError(f'Unknown network {name!r}; valid: {", ".join(NETWORKS)}.')
    if tiny:                # 16x16, one level, one block (ADM's attention needs 64 channels per head)
        c.data.image_size = 16
        c.model.model_channels = 64 if name == 'imagenet64' else 16
        c.model.num_blocks = 1
        c.model.channel_mult = (1,)
        c.model.attn_resolutions = ()
    c.model.compute_dtype = compute_dtype
    c.model.remat = remat
    return c


def peak_tflops(device, compute_dtype: str, override: float | None) -> float | None:
    if override:
        return override
    for kind, peaks in PEAK_TFLOPS.items():
        if kind in device.device_kind:
            return peaks[compute_dtype]
    return None


def compile_timed(fn, *args):
    t0 = time.perf_counter()
    exe = jax.jit(fn, donate_argnums=0).lower(*args).compile() if isinstance(args[0], tuple) \
        else jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return exe, seconds, float(cost.get('flops', 0.0)) if cost else 0.0


def benchmark(config, batch: int, steps: int, seed: int = 0) -> dict:
    """Compiles and times the training step and one denoiser evaluation of `config`'s network."""
    den = models.get_model(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(den)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    process = den.process
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
    data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if batch % jax.device_count():
        raise ValueError(f'--batch {batch} must be a multiple of the {jax.device_count()} devices.')
    d = config.data
    key = jax.random.key(seed)
    x0 = jax.device_put(jax.random.uniform(key, (batch, d.image_size, d.image_size, d.num_channels),
                                           minval=-1.0, maxval=1.0), data_sharding)
    labels = jax.device_put(jax.nn.one_hot(jnp.arange(batch) % d.num_classes, d.num_classes),
                            data_sharding)
    tx = optax.adam(1e-4)
    state = jax.device_put((params, tx.init(params)), replicated)

    def train_step(state, key):
        params, opt_state = state
        k_loss, k_drop = jax.random.split(key)

        def loss_fn(params):
            per_example, _ = losses.edm_losses(nnx.merge(graphdef, params), process, k_loss, x0,
                                               labels, dropout_key=k_drop)
            return per_example.mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def denoise(params, key):
        sigma = jnp.exp(jax.random.normal(key, (batch,)))
        return nnx.merge(graphdef, params)(x0 + sigma[:, None, None, None] * x0, sigma, labels)

    rows = {}
    step_exe, step_compile, step_flops = compile_timed(train_step, state, key)
    state, loss = step_exe(state, key)           # warm-up
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for i in range(steps):
        state, loss = step_exe(state, jax.random.fold_in(key, i))
    jax.block_until_ready((state, loss))
    rows['train step'] = (step_compile, (time.perf_counter() - t0) / steps, step_flops)
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f'the training step gave loss {float(loss)}')

    fwd_exe, fwd_compile, fwd_flops = compile_timed(denoise, state[0], key)
    jax.block_until_ready(fwd_exe(state[0], key))
    t0 = time.perf_counter()
    for i in range(steps):
        out = fwd_exe(state[0], jax.random.fold_in(key, i))
    jax.block_until_ready(out)
    rows['denoiser evaluation (1 NFE)'] = (fwd_compile, (time.perf_counter() - t0) / steps,
                                           fwd_flops)
    return {'params': n_params, 'rows': rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--networks', default=','.join(NETWORKS), help=f'comma-separated: {NETWORKS}')
    p.add_argument('--batch', type=int, default=0,
                   help=f'global batch (default {DEFAULT_BATCH}; 4 with --tiny)')
    p.add_argument('--steps', type=int, default=20, help='timed steps after one warm-up step')
    p.add_argument('--compute_dtype', default='float32', choices=('float32', 'bfloat16'))
    p.add_argument('--remat', action='store_true', help='recompute block activations in backward')
    p.add_argument('--peak_tflops', type=float, default=0.0,
                   help='peak TFLOP/s per device for MFU (default: by device kind)')
    p.add_argument('--tiny', action='store_true', help='16 channels, 1 block: checks the script')
    args = p.parse_args(argv)
    names = [n.strip() for n in args.networks.split(',') if n.strip()]
    dev = jax.devices()[0]
    peak = peak_tflops(dev, args.compute_dtype, args.peak_tflops)
    print(f'jax {jax.__version__}, {jax.device_count()} x {dev.device_kind} ({dev.platform}); '
          f'compute {args.compute_dtype}, remat {args.remat}; peak '
          f'{f"{peak:g} TFLOP/s per device" if peak else "unknown (pass --peak_tflops)"}')
    print(f'{"network":12s} {"params":>11s} {"batch":>5s} {"what":28s} {"compile s":>9s} '
          f'{"ms":>9s} {"img/s":>9s} {"GFLOP":>9s} {"TFLOP/s":>8s} {"MFU":>6s}')
    results = {}
    for name in names:
        config = network_config(name, tiny=args.tiny, compute_dtype=args.compute_dtype,
                                remat=args.remat)
        batch = args.batch or (4 if args.tiny else DEFAULT_BATCH[name])
        r = benchmark(config, batch, args.steps)
        for what, (compile_s, seconds, flops) in r['rows'].items():
            tflops = flops / seconds / 1e12
            mfu = tflops / (peak * jax.device_count()) if peak else float('nan')
            print(f'{name:12s} {r["params"]:11,d} {batch:5d} {what:28s} {compile_s:9.1f} '
                  f'{seconds * 1e3:9.2f} {batch / seconds:9.1f} {flops / 1e9:9.1f} {tflops:8.2f} '
                  f'{mfu:6.1%}')
            results[(name, what)] = dict(seconds=seconds, images_per_s=batch / seconds,
                                         flops=flops, mfu=mfu)
    return results


if __name__ == '__main__':
    main()
