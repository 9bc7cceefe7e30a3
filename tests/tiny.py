"""Tiny configs shared by the tests (small networks, few steps, few compiled shapes), and a
runner for scripts that need fake CPU devices (a fresh process: the device count is fixed at
JAX's start)."""
import json
import os
import subprocess
import sys

import ml_collections

from configs import digits, toy


def tiny_toy_config(num_steps: int = 6, **training) -> ml_collections.ConfigDict:
    c = toy.get_config()
    c.model.hidden = 32
    c.model.depth = 2
    c.training.batch_size = 16
    c.training.num_steps = num_steps
    c.training.log_every = 1
    c.training.ckpt_every = 1000
    c.training.update(training)
    c.sampling.num_samples = 64
    c.sampling.batch_size = 64
    c.sampling.num_steps = 6
    return c


def tiny_digits_config(num_steps: int = 3, **training) -> ml_collections.ConfigDict:
    """A small DDPM++ on the 8x8 digits: 16 channels, one block per resolution, attention at 4."""
    c = digits.get_config()
    c.model.model_channels = 16
    c.model.num_blocks = 1
    c.model.label_dropout = 0.
    c.training.batch_size = 16
    c.training.num_steps = num_steps
    c.training.log_every = 1
    c.training.ckpt_every = 1000
    c.training.update(training)
    return c


def run_on_fake_devices(script: str, devices: int = 2, timeout: int = 600):
    """Runs ``script`` (python source printing ``RESULT<json>``) with ``devices`` fake CPU
    devices from the repository root; returns the decoded JSON."""
    # Tiny programs: compile time dominates, so XLA's expensive CPU optimisations are off.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT")[-1])
