"""f-distill of EDM's class-conditional CIFAR-10 DDPM++ teacher: the paper's setting (arXiv
2502.15681, Sec. 5 / App. C): forward-KL, batch 2048, AdamW lr 1e-4 and weight decay 1e-2 for all
three networks, GAN weight 1e-3, R1 weight 1, 60k iterations, student updated every 5th, student
gradient clip 10, discriminator heads on the teacher's 32/16/8 encoder features.

Teacher: EDM's published class-conditional CIFAR-10 model `edm-cifar10-32x32-cond-vp.pkl` (EDM
preconditioning, DDPM++; FID 1.79 at 35 NFE), from EDM's release site
https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/ with the FID reference statistics from
https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/. Download, import (once, needs torch:
pip install -e '.[edm]'), distill (8 GPUs), evaluate the EMA student (50k samples):
    wget https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl \
        https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    python -m fdistill.main --config=configs/distill_cifar10.py --workdir=runs/edm_cifar10 \
        --mode=import_edm --config.import_edm.pkl=edm-cifar10-32x32-cond-vp.pkl
    python -m fdistill.main --config=configs/distill_cifar10.py --workdir=runs/fdistill_cifar10 \
        --mode=distill --config.distill.teacher_workdir=runs/edm_cifar10 --config.data.data_dir=$DATA
    python -m fdistill.main --config=configs/distill_cifar10.py --workdir=runs/fdistill_cifar10 \
        --mode=eval --config.eval.inception_weights=inception-2015-12-05.npz \
        --config.eval.ref_stats=cifar10-32x32.npz
A teacher trained here instead (configs/cifar10_edm_ddpmpp.py with --config.data.num_classes=10)
works the same way: pass its workdir as teacher_workdir.
Other divergences: --config.distill.divergence=js | rkl | sh | ... (rkl = DMD2).
Expected (paper, 50k-sample FID, 1 NFE): forward-KL 1.92 (its best); teacher 1.79 at 35 NFE.
"""
import ml_collections

from configs import cifar10_edm_ddpmpp
from configs.distill_base import distill_config

PUBLISHED_TEACHER = "edm-cifar10-32x32-cond-vp.pkl"


def get_config():
    c = distill_config(cifar10_edm_ddpmpp.get_config(), teacher_workdir="runs/edm_cifar10", divergence="fkl")
    c.import_edm = ml_collections.ConfigDict({"pkl": PUBLISHED_TEACHER})
    d = c.distill
    d.disc_resolutions = (32, 16, 8)
    d.batch_size = 2048
    d.num_steps = 100_000              # the reference's max_iter (the paper's text: 60k)
    d.gan_weight = 1e-3
    d.ema_rate = 0.9999
    d.log_every = 500
    d.ckpt_every = 5000
    d.num_eval_samples = 50_000
    d.eval_batch_size = 1000
    return c
