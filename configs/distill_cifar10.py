"""f-distill of EDM's class-conditional CIFAR-10 DDPM++ teacher: the paper's setting (arXiv
2502.15681, Sec. 5 / App. C): forward-KL, batch 2048, AdamW lr 1e-4 and weight decay 1e-2 for all
three networks, GAN weight 1e-3, R1 weight 1, 60k iterations, student updated every 5th, student
gradient clip 10, discriminator heads on the teacher's 32/16/8 encoder features.

Run on 8 GPUs (after training the teacher with configs/cifar10_edm_ddpmpp.py and
--config.data.num_classes=10):
    python -m fdistill.main --config=configs/distill_cifar10.py --workdir=$W --mode=distill \
        --config.distill.teacher_workdir=$TEACHER --config.data.data_dir=$DATA
Other divergences: --config.distill.divergence=js | rkl | sh | ... (rkl = DMD2).
Expected (paper, 50k-sample FID, 1 NFE): forward-KL 1.92 (its best); teacher 1.79 at 35 NFE.
"""
from configs import cifar10_edm_ddpmpp
from configs.distill_base import distill_config


def get_config():
    c = distill_config(cifar10_edm_ddpmpp.get_config(), divergence="fkl")
    d = c.distill
    d.disc_resolutions = (32, 16, 8)
    d.batch_size = 2048
    d.num_steps = 60_000
    d.gan_weight = 1e-3
    d.r1_weight = 1.0
    d.ema_rate = 0.9999
    d.log_every = 500
    d.ckpt_every = 5000
    d.num_eval_samples = 50_000
    d.eval_batch_size = 1000
    return c
