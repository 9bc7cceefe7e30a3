"""Scores fixed pseudo-random images with evaluate_samples in a fresh process, alone or as one of
several jax.distributed processes on 127.0.0.1.

    python tests/fid_worker.py [--num_processes=2 --process_id=0 --port=P]

The feature network is a fixed random projection (NumPy, no compilation) that counts the images
it sees. Prints one JSON line: the metrics, the batches this process drew and the images it
featurised.
"""
import argparse
import json
import os
import sys

import numpy as np

NUM_SAMPLES, BATCH, DIM, CLASSES = 90, 8, 12, 10   # 12 batches, the last one short


class ProjectionFeatures:
    """(pool [B, DIM], logits [B, CLASSES]) from a fixed projection of the pixels."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.w = rng.standard_normal((4 * 4 * 3, DIM + CLASSES)) / 48
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        z = (np.asarray(images, np.float64).reshape(len(images), -1) / 255.0) @ self.w
        return np.tanh(z[:, :DIM]) + 1.0, z[:, DIM:]


def sample_batch(i):
    """The i-th batch of uint8 4x4 RGB images (the same in every process)."""
    return np.random.default_rng(1000 + i).integers(0, 256, (BATCH, 4, 4, 3), dtype=np.uint8)


def reference():
    rng = np.random.default_rng(7)
    features = np.tanh(rng.standard_normal((40, DIM))) + 1.0
    return {"mu": features.mean(0), "sigma": np.cov(features, rowvar=False), "features": features}


def score(process_index=None, process_count=None):
    from fdistill.evaluation import fid
    net, drawn = ProjectionFeatures(), []

    def sample_fn(i):
        drawn.append(i)
        return sample_batch(i)

    out = fid.evaluate_samples(sample_fn, net, reference(), NUM_SAMPLES, monitoring=True,
                               is_splits=3, pr_k=3, pr_num_samples=30, progress=False,
                               process_index=process_index, process_count=process_count)
    metrics = {k: float(v) for k, v in out.items() if k != "protocol"}
    return {"metrics": metrics, "drawn": drawn, "featurised": net.seen,
            "protocol_featurised": out["protocol"]["featurised_by_this_process"]}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                                   heartbeat_timeout_seconds=900, shutdown_timeout_seconds=900)
    result = score()
    print("RESULT " + json.dumps(dict(result, processes=jax.process_count())), flush=True)
    if args.num_processes > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("fid_worker done")
        os._exit(0)   # as tests/train_worker.py: skip the coordination service's short exit RPC
