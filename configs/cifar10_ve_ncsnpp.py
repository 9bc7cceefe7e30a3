"""CIFAR-10, VE SDE, NCSN++ continuous (Score-SDE `ve/cifar10_ncsnpp_continuous`).

Score-SDE: sigma 0.01..50, batch 128, lr 2e-4, warm-up 5k, grad clip 1, EMA 0.999, dropout 0.1,
Fourier noise embedding, FIR resampling [1,3,3,1], residual encoder; PC sampling (reverse
diffusion + Langevin, snr 0.16, N = 1000). NCSN++ here is EDM's SongUNet form of it. Run:
    python -m fdistill.main --config=configs/cifar10_ve_ncsnpp.py --workdir=$W --mode=train \
        --config.data.data_dir=$DATA
Expected (Score-SDE Table 3): FID ~2.38 with PC sampling.
"""
from configs.cifar10 import get_config as base, score_sde_recipe


def get_config():
    c = score_sde_recipe(base())
    c.process.name = "vesde"
    c.process.sigma_min = 0.01
    c.process.sigma_max = 50.0
    c.process.N = 1000
    c.model.name = "ncsnpp"
    c.model.precond = "ve"
    c.model.embedding_type = "fourier"
    c.model.channel_mult_noise = 2
    c.model.encoder_type = "residual"
    c.model.decoder_type = "standard"
    c.model.resample_filter = (1, 3, 3, 1)
    c.training.ema_rate = 0.999
    return c
