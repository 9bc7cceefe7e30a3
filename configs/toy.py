"""2-D toy teacher: an EDM-preconditioned residual MLP on a mixture of Gaussians.

Run (under a minute on 2 CPU cores):
    python -m fdistill.main --config=configs/toy.py --workdir=runs/toy --mode=train
    python -m fdistill.main --config=configs/toy.py --workdir=runs/toy --mode=sample
Other toys: --config.data.toy=grid25 | unbalanced | moons.
Expected: Heun-sampled points cover all 8 modes (recall 1.0, precision > 0.9).
"""
from configs.default import get_default_config


def get_config():
    c = get_default_config()
    c.data.name = "toy"
    c.data.toy = "ring8"
    c.process.sigma_data = 1.0
    c.model.name = "mlp"
    # 64 wide: on 2 CPU cores a step costs 2.6x less than at 128 (5 vs 13 ms at batch 512), which
    # keeps the quickstart within 3 minutes, and its Heun samples are no worse (3 seeds,
    # experiments/quickstart_seeds.py: KL(p||q) 0.09 / KL(q||p) 0.19 vs 0.13 / 0.30 at 128).
    c.model.hidden = 64
    c.model.depth = 4
    c.training.batch_size = 512
    c.training.num_steps = 2000
    c.training.log_every = 500
    c.training.ckpt_every = 2000
    c.training.ema_rate = 0.995
    c.optim.lr = 2e-3
    c.sampling.num_samples = 4096
    c.sampling.batch_size = 4096
    return c
