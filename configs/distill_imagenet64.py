"""f-distill of the class-conditional ImageNet-64 teacher with the paper's setting (arXiv
2502.15681): Jensen-Shannon, batch 512, lr 2e-6 (then a fine-tune at 5e-7), GAN weight 3e-3,
380k iterations, discriminator on the teacher's 8x8 bottleneck, r-EMA rate 0.5.

Teacher: EDM's published class-conditional ImageNet-64 model `edm-imagenet-64x64-cond-adm.pkl`
(EDM preconditioning, ADM; configs/imagenet64.py), from EDM's release site
https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/ with the FID reference statistics
`imagenet-64x64.npz` (the ones EDM pairs with this model) from
https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/. Download, import (once, needs torch:
pip install -e '.[edm]'), distill (a pod), evaluate the EMA student (50k samples):
    wget https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl \
        https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz
    python -m fdistill.main --config=configs/distill_imagenet64.py --workdir=runs/edm_imagenet64 \
        --mode=import_edm --config.import_edm.pkl=edm-imagenet-64x64-cond-adm.pkl
    python -m fdistill.main --config=configs/distill_imagenet64.py --workdir=runs/fdistill_imagenet64 \
        --mode=distill --config.distill.teacher_workdir=runs/edm_imagenet64 --config.data.data_dir=$DATA
    python -m fdistill.main --config=configs/distill_imagenet64.py --workdir=runs/fdistill_imagenet64 \
        --mode=eval --config.eval.inception_weights=inception-2015-12-05.npz \
        --config.eval.ref_stats=imagenet-64x64.npz
Fine-tune: rerun with a larger --config.distill.num_steps and
--config.distill.student_optim.lr=5e-7 (and the same for fake_score_optim, disc_optim); the run
resumes from its latest checkpoint.
Expected (paper, 50k-sample FID, 1 NFE, EDM's ADM teacher): JS 1.16; teacher 2.35 at 79 NFE.
"""
import ml_collections

from configs import imagenet64
from configs.distill_base import distill_config, optim

PUBLISHED_TEACHER = "edm-imagenet-64x64-cond-adm.pkl"


def get_config():
    c = distill_config(imagenet64.get_config(), teacher_workdir="runs/edm_imagenet64", divergence="js")
    c.import_edm = ml_collections.ConfigDict({"pkl": PUBLISHED_TEACHER})
    d = c.distill
    d.disc_resolutions = (8,)
    d.student_optim = optim(2e-6)
    d.fake_score_optim = optim(2e-6, grad_clip=0.0)
    d.disc_optim = optim(2e-6, grad_clip=0.0)
    d.batch_size = 512
    d.num_steps = 600_000              # the reference's max_iter (the paper's text: 380k + a fine-tune)
    d.gan_weight = 3e-3
    d.ratio_ema_rate = 0.5
    d.ema_rate = 0.9999
    d.param_sharding = "fsdp"
    d.log_every = 1000
    d.ckpt_every = 10_000
    d.num_eval_samples = 50_000
    d.eval_batch_size = 500
    return c
