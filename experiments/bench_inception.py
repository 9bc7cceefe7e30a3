"""Throughput of the FID Inception port at CIFAR-10 resolution and the time of a 50k evaluation.

    python experiments/bench_inception.py [--weights=inception-2015-12-05.npz] [--batch_size=50]

Timings do not depend on the weights' values, so without --weights the network gets seeded random
weights. Images are uint8 32x32x3 (resized to 299x299 inside, as for FID). Prints one table row
per batch size: compile time, images/s, and the extrapolated time to featurise 50,000 samples;
then the time of one 2048-d Frechet distance (scipy's sqrtm, as pytorch-fid), which a 50k
evaluation adds once. The CPU machines are shared: the load average is printed, and the process
CPU time per image (all threads) is a number that other processes disturb less than wall time.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from fdistill.evaluation import fid, inception


def bench(batch_size: int, num_batches: int, weights: str | None) -> dict:
    fn = (inception.load(weights, batch_size=batch_size) if weights
          else inception.from_random_weights(0, batch_size=batch_size))
    images = np.random.default_rng(0).integers(0, 256, (fn.batch_size, 32, 32, 3), np.uint8)
    t0 = time.perf_counter()
    fn(images)
    compile_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        fn(images)
    n = num_batches * fn.batch_size
    rate = n / (time.perf_counter() - t0)
    cpu_s_per_img = (time.process_time() - c0) / n
    return {"batch": fn.batch_size, "compile_s": compile_s, "img_per_s": rate,
            "cpu_s_per_img": cpu_s_per_img, "fifty_k_min": 50_000 / rate / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help=".pth or .npz (default: random weights)")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[16, 50])
    parser.add_argument("--num_batches", type=int, default=4)
    parser.add_argument("--skip_frechet", action="store_true")
    args = parser.parse_args()

    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| batch | first call (compile) s | images/s | CPU s / image | 50k samples, min |")
    print("|---|---|---|---|---|")
    for b in args.batch_size:
        r = bench(b, args.num_batches, args.weights)
        print(f"| {r['batch']} | {r['compile_s']:.1f} | {r['img_per_s']:.2f} | "
              f"{r['cpu_s_per_img']:.2f} | {r['fifty_k_min']:.0f} |", flush=True)
    if not args.skip_frechet:
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((4096, 2048)) for _ in range(2))
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        t0 = time.perf_counter()
        fid.frechet_distance(a.mean(0), s1, b.mean(0), s2)
        print(f"Frechet distance, 2048-d (scipy sqrtm): {time.perf_counter() - t0:.1f} s")
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
