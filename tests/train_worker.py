"""Runs a tiny toy teacher training in a fresh process (CPU devices / jax.distributed).

    python tests/train_worker.py WORKDIR --devices=2 [--num_processes=2 --process_id=0 --port=P]

--devices splits the CPU by `sharding.set_cpu_devices` (as --cpu_devices does); --digits trains
a small DDPM++ (convolutions, GroupNorm, attention) on the 8x8 digits instead of the toy MLP.

Prints one JSON line: the per-step losses and a checksum-free copy of the final EMA parameters.
"""
import argparse
import json
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("workdir")
p.add_argument("--devices", type=int, default=1)
p.add_argument("--num_processes", type=int, default=1)
p.add_argument("--process_id", type=int, default=0)
p.add_argument("--port", type=int, default=0)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--param_sharding", default="replicated")
p.add_argument("--digits", action="store_true")
args = p.parse_args()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from fdistill import sharding  # noqa: E402

sharding.set_cpu_devices(args.devices)

if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Generous timeouts: on a loaded 2-core machine a starved process misses the default heartbeats.
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                               heartbeat_timeout_seconds=900, shutdown_timeout_seconds=900)

import numpy as np  # noqa: E402

from fdistill import modes  # noqa: E402
from tests.tiny import tiny_digits_config, tiny_toy_config  # noqa: E402

tiny_config = tiny_digits_config if args.digits else tiny_toy_config
config = tiny_config(num_steps=args.steps, param_sharding=args.param_sharding)
out = modes.train_teacher(config, args.workdir)
ema = sharding.to_host(out["state"]["ema"])
if args.num_processes > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("train_worker done")
print("RESULT " + json.dumps({
    "devices": jax.device_count(), "processes": jax.process_count(),
    "losses": [m["train/loss"] for _, m in out["history"]],
    "ema": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(ema)]}))
if args.num_processes > 1:
    # Both processes are past the final barrier and the result is printed. Skip JAX's
    # coordination-service disconnect at interpreter exit: its RPC deadline is short, and on a
    # loaded 2-core machine a starved process misses it and aborts after the work is done.
    sys.stdout.flush()
    os._exit(0)
