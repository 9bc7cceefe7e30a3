"""CIFAR-10, VP SDE, DDPM++ continuous (Score-SDE `vp/cifar10_ddpmpp_continuous`).

Score-SDE: beta 0.1..20, batch 128, lr 2e-4, warm-up 5k, grad clip 1, EMA 0.9999, dropout 0.1,
1.3M steps, continuous-time DSM; predictor-corrector sampling (reverse diffusion + Langevin,
snr 0.16) at N = 1000. Run:
    python -m fdistill.main --config=configs/cifar10_vp_ddpmpp.py --workdir=$W --mode=train \
        --config.data.data_dir=$DATA
Expected (Score-SDE Table 3): FID ~2.41 with PC sampling; bits/dim ~3.1 via --mode=likelihood.
"""
from configs.cifar10 import get_config as base, score_sde_recipe


def get_config():
    c = score_sde_recipe(base())
    c.process.name = "vpsde"
    c.process.beta_min = 0.1
    c.process.beta_max = 20.0
    c.process.N = 1000
    c.model.name = "ddpmpp"
    c.model.precond = "vp"
    c.model.embedding_type = "positional"
    c.model.resample_filter = (1, 1)
    c.training.ema_rate = 0.9999
    return c
