"""CIFAR-10, EDM parametrisation, DDPM++ (EDM "cifar10 ddpmpp", Karras et al. 2022, Table 7).

EDM: batch 512, lr 1e-3 with 10M-image warm-up (~19.5k steps), EMA half-life 0.5M images
(rate ~0.99993 per step at batch 512), dropout 0.13, 200M images (~390k steps), sigma_data 0.5,
log-normal sigmas (P_mean -1.2, P_std 1.2); no gradient clipping. Heun, 18 steps = 35 NFE.
Run on 8 GPUs:
    python -m fdistill.main --config=configs/cifar10_edm_ddpmpp.py --workdir=$W --mode=train \
        --config.data.data_dir=$DATA
Expected: FID ~1.97 (unconditional, EDM's number) at 35 NFE with the 50k protocol;
class-conditional (--config.data.num_classes=10): ~1.79.
"""
from configs.cifar10 import get_config as base


def get_config():
    c = base()
    c.process.name = "edm"
    c.model.name = "ddpmpp"
    c.model.precond = "edm"
    c.model.dropout = 0.13
    c.model.embedding_type = "positional"
    c.model.resample_filter = (1, 1)
    c.training.loss = "edm"
    c.training.batch_size = 512
    c.training.num_steps = 390_625
    c.training.ema_rate = 0.5 ** (512 / 500_000)
    c.optim.lr = 1e-3
    c.optim.warmup = 19_531
    c.optim.grad_clip = 0.0
    c.optim.eps = 1e-8
    c.sampling.sampler = "heun"
    c.sampling.num_steps = 18
    return c
