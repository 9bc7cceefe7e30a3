"""fdistill: one-step diffusion distillation by f-divergence distribution matching (JAX/Flax NNX)."""
