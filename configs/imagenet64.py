"""ImageNet-64 (tfds ``imagenet_resized/64x64``, which has labels), class-conditional EDM DDPM++.

Architecture: EDM's published ImageNet-64 teacher is ADM (Dhariwal & Nichol); this codebase
ships the Score-SDE/EDM SongUNet family, so the base uses DDPM++ at 64x64 with channel_mult
(1, 2, 3, 4) (ADM's widths), attention at 32, 16 and 8, 1000 classes, the EDM loss and EDM's ImageNet
hyperparameters (batch 4096, lr 2e-4, dropout 0.1, EMA half-life 50M images). Adding ADM means
one new module in fdistill/models and one entry in its factory (see README "Extending").
Prepare once with internet (needs the ImageNet archives in tfds' manual dir):
`tfds build imagenet_resized/64x64 --file_format=array_record --data_dir=$DATA`.
Unconditional runs (--config.data.num_classes=0) read `downsampled_imagenet/64x64`.
Run on a TPU pod / multi-GPU:
    python -m fdistill.main --config=configs/imagenet64.py --workdir=$W --mode=train \
        --config.data.data_dir=$DATA
"""
from configs.default import get_default_config


def get_config():
    c = get_default_config()
    c.data.name = "imagenet64"
    c.data.image_size = 64
    c.data.num_channels = 3
    c.data.num_classes = 1000
    c.data.random_flip = False
    c.process.name = "edm"
    c.model.name = "ddpmpp"
    c.model.precond = "edm"
    c.model.model_channels = 192
    c.model.channel_mult = (1, 2, 3, 4)
    c.model.num_blocks = 3
    c.model.attn_resolutions = (32, 16, 8)
    c.model.dropout = 0.1
    c.model.label_dropout = 0.1
    c.training.loss = "edm"
    c.training.batch_size = 4096
    c.training.num_steps = 610_000
    c.training.ema_rate = 0.5 ** (4096 / 50_000_000)
    c.training.log_every = 1000
    c.training.ckpt_every = 10000
    c.training.param_sharding = "fsdp"
    c.optim.lr = 2e-4
    c.optim.warmup = 2500
    c.optim.grad_clip = 0.0
    c.sampling.sampler = "heun"
    c.sampling.num_steps = 40
    return c
