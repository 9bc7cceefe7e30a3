"""Tiny configs shared by the tests (small networks, few steps, few compiled shapes)."""
import ml_collections

from configs import toy


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
