"""f-distill of the 8x8 digits teacher (configs/digits.py) into a one-step conditional student.

Run on 2 CPU cores (teacher first, minutes each):
    python -m fdistill.main --config=configs/digits.py --workdir=runs/digits --mode=train
    python -m fdistill.main --config=configs/distill_digits.py --workdir=runs/digits_fkl \
        --mode=distill --config.distill.teacher_workdir=runs/digits
experiments/digits_fdistill.py runs teacher -> reverse-KL / forward-KL / JS students and scores
them with an in-domain Frechet distance.

The student starts from an ODE-regression initialisation (fdistill.ode_regression, as
configs/distill_toy.py): 16,384 of the teacher's Heun-18 (35 NFE) trajectories with random class
labels, then 4,000 cosine-decayed Adam steps of regression at batch 64. Over 5 draws of 2,000
samples (`experiments/digits_fdistill.py --init_set ...`) it scores fd_digits 3.12 +- 0.31;
8,192 pairs and 2,000 steps scored 3.26 +- 0.34, 4,096 and 1,000 3.54 +- 0.38. About 30 minutes
of pairs and 30 of regression on the 2-core CPU.
The experiment shares one initialisation among its students (distill.init_workdir) and scores it
alone as "student/ode_init"; the README's digits table gives what it measured.
"""
from configs import digits
from configs.distill_base import distill_config, optim


def get_config():
    c = distill_config(digits.get_config(), teacher_workdir="runs/digits", divergence="fkl")
    d = c.distill
    d.disc_resolutions = (8, 4)
    d.ode_init_steps = 4000
    d.num_pairs = 16384
    d.pair_substeps = 18               # the teacher's Heun-18 (35 NFE) map
    d.ode_init_optim = optim(5e-4, weight_decay=0.0, grad_clip=0.0)
    d.ode_init_optim.decay_steps = 4000
    d.student_optim = optim(1e-4, weight_decay=0.0)
    # The fake score must keep up with the student: reverse-KL from the 8,192-pair init (3.26) with
    # fake-score lr 2e-5 / 1e-4 / 5e-4 / 2e-3 scored 6.05 / 3.39 / 3.23 / 3.11 (5 draws each).
    d.fake_score_optim = optim(5e-4, weight_decay=0.0, grad_clip=0.0)
    d.disc_optim = optim(1e-4, weight_decay=0.0, grad_clip=0.0)
    # fd_digits of the reverse-KL student (5 draws of 2,000 samples, the 8,192-pair init at
    # 3.26 +- 0.34): GAN weight 0.01 3.60 +- 0.36, 0.1 3.39 +- 0.40, 1.0 4.52 +- 0.63
    # (experiments/digits_fdistill.py --set distill.gan_weight=...).
    d.gan_weight = 0.1
    d.r1_weight = 0.0
    d.batch_size = 64
    d.num_steps = 3000
    d.ema_rate = 0.998              # per iteration: ~0.99 per student update
    d.log_every = 250
    d.preview_every = 500           # the EMA student's sample grid in TensorBoard (base: 5000 > num_steps)
    d.ckpt_every = 1000
    d.num_eval_samples = 512
    d.eval_batch_size = 256
    return c
