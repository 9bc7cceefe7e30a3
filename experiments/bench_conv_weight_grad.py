"""Weight-gradient formulations of a 3x3 convolution on XLA:CPU, timed side by side.

A two-layer net (SiLU, 3x3 conv, SiLU, 3x3 conv, batch 16) at a few resolutions and widths of the
benchmark network; its parameter gradient with XLA's own weight gradient ('default') and with
each formulation from experiments/xla_cpu_variants.py, interleaved rounds, median wall and process
CPU milliseconds and their ratios to 'default', and the largest relative difference of the
gradients (all formulations are exact up to float rounding).

    PYTHONPATH=. python experiments/bench_conv_weight_grad.py [--rounds 7] [--forms batch_groups]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from experiments import xla_cpu_variants as xv

FORMS = {'shift_matmuls': xv.weight_gradient_shift_matmuls, 'im2col': xv.weight_gradient_im2col,
         'kernel_larger': xv.weight_gradient_kernel_larger,
         'batch_groups': xv.weight_gradient_batch_groups}
SHAPES = ((32, 32), (32, 64), (16, 64))       # (resolution, channels) of the benchmark network


def grad_fn(conv):
    def loss(ws, x):
        h = x
        for w in ws:
            h = conv(jax.nn.silu(h), w, pad=1)
        return jnp.sum(h ** 2)
    return jax.jit(jax.grad(loss))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--forms', default=','.join(FORMS), help=f'comma-separated: {", ".join(FORMS)}')
    args = p.parse_args(argv)
    forms = [f.strip() for f in args.forms.split(',') if f.strip()]
    fns = {'default': grad_fn(lambda x, w, pad: xv._lax_conv(x, w, pad))}
    fns.update({f: grad_fn(xv._conv_with_weight_gradient(FORMS[f])) for f in forms})
    for res, c in SHAPES:
        x = jax.random.normal(jax.random.key(0), (args.batch, res, res, c))
        ws = [jax.random.normal(jax.random.key(i + 1), (3, 3, c, c)) * 0.05 for i in range(2)]
        ref = fns['default'](ws, x)
        err = {k: max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                      for a, b in zip(f(ws, x), ref)) for k, f in fns.items()}
        wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, f in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(f(ws, x))
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        med = lambda v: 1e3 * statistics.median(v)
        print(f'{res}x{res}x{c}, batch {args.batch}, median of {args.rounds} interleaved rounds')
        for k in fns:
            print(f'  {k:14s} {med(wall[k]):8.1f} ms {med(cpu[k]):8.1f} cpu ms   ratio wall '
                  f'{med(wall[k]) / med(wall["default"]):6.2f} cpu {med(cpu[k]) / med(cpu["default"]):6.2f}'
                  f'   max rel diff {err[k]:.1e}', flush=True)


if __name__ == '__main__':
    main()
