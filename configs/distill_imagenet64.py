"""f-distill of the class-conditional ImageNet-64 teacher with the paper's setting (arXiv
2502.15681): Jensen-Shannon, batch 512, lr 2e-6 (then a fine-tune at 5e-7), GAN weight 3e-3,
380k iterations, discriminator on the teacher's 8x8 bottleneck, r-EMA rate 0.5.

Run on a pod (teacher from configs/imagenet64.py):
    python -m fdistill.main --config=configs/distill_imagenet64.py --workdir=$W --mode=distill \
        --config.distill.teacher_workdir=$TEACHER --config.data.data_dir=$DATA
Fine-tune: rerun with a larger --config.distill.num_steps and
--config.distill.student_optim.lr=5e-7 (and the same for fake_score_optim, disc_optim); the run
resumes from its latest checkpoint.
Expected (paper, 50k-sample FID, 1 NFE, EDM's ADM teacher): JS 1.16; teacher 2.35 at 79 NFE.
"""
from configs import imagenet64
from configs.distill_base import distill_config, optim


def get_config():
    c = distill_config(imagenet64.get_config(), divergence="js")
    d = c.distill
    d.disc_resolutions = (8,)
    d.student_optim = optim(2e-6)
    d.fake_score_optim = optim(2e-6, grad_clip=0.0)
    d.disc_optim = optim(2e-6, grad_clip=0.0)
    d.batch_size = 512
    d.num_steps = 380_000
    d.gan_weight = 3e-3
    d.r1_weight = 1.0
    d.ratio_ema_rate = 0.5
    d.ema_rate = 0.9999
    d.param_sharding = "fsdp"
    d.log_every = 1000
    d.ckpt_every = 10_000
    d.num_eval_samples = 50_000
    d.eval_batch_size = 500
    return c
