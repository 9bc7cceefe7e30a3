"""f-distill of the Fashion-MNIST teacher (configs/fashion_mnist.py) into a one-step student.

Run (a GPU is advised; on 2 CPU cores use it for smoke runs):
    python -m fdistill.main --config=configs/distill_fashion_mnist.py --workdir=runs/fmnist_fkl \
        --mode=distill --config.distill.teacher_workdir=runs/fmnist
"""
from configs import fashion_mnist
from configs.distill_base import distill_config, optim


def get_config():
    c = distill_config(fashion_mnist.get_config(), teacher_workdir="runs/fmnist", divergence="fkl")
    d = c.distill
    d.disc_resolutions = (16, 8)
    d.student_optim = optim(5e-5)
    d.fake_score_optim = optim(5e-5, grad_clip=0.0)
    d.disc_optim = optim(5e-5, grad_clip=0.0)
    d.gan_weight = 1e-3
    d.batch_size = 256
    d.num_steps = 20_000
    d.ema_rate = 0.9998             # per iteration: ~0.999 per student update
    d.log_every = 500
    d.ckpt_every = 2000
    d.num_eval_samples = 1024
    d.eval_batch_size = 256
    return c
