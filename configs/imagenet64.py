"""ImageNet-64 (tfds ``imagenet_resized/64x64``, which has labels), class-conditional EDM with ADM.

Architecture and recipe of EDM's ImageNet-64 model (Karras et al. 2022, `edm-imagenet-64x64-cond-adm`):
ADM (Dhariwal & Nichol; EDM's DhariwalUNet, `model.name = "adm"`, 295,899,267 parameters) with 192
channels, channel_mult (1, 2, 3, 4), 3 blocks per resolution, attention at 32, 16 and 8, 1000
classes; EDM preconditioning and loss; batch 4096, Adam lr 1e-4 with a 10M-image warm-up (2,441
steps), dropout 0.10, no augmentation, EMA half-life 50M images, 2,500M images (610,352 steps).
Heun with 40 steps = 79 NFE. EDM's published snapshot of this model imports as a teacher
(configs/distill_imagenet64.py) instead of training it.
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
    c.cpu_devices = 0         # on a CPU: one device per core (a GPU/TPU run uses its accelerators)
    c.data.name = "imagenet64"
    c.data.image_size = 64
    c.data.num_channels = 3
    c.data.num_classes = 1000
    c.data.random_flip = False
    c.process.name = "edm"
    c.model.name = "adm"
    c.model.precond = "edm"
    c.model.model_channels = 192
    c.model.channel_mult = (1, 2, 3, 4)
    c.model.channel_mult_emb = 4
    c.model.num_blocks = 3
    c.model.attn_resolutions = (32, 16, 8)
    c.model.dropout = 0.1
    c.model.label_dropout = 0.0
    c.training.loss = "edm"
    c.training.batch_size = 4096
    c.training.num_steps = 610_352
    c.training.ema_rate = 0.5 ** (4096 / 50_000_000)
    c.training.log_every = 1000
    c.training.ckpt_every = 10000
    c.training.param_sharding = "fsdp"
    c.optim.lr = 1e-4
    c.optim.warmup = 2441
    c.optim.grad_clip = 0.0
    c.sampling.sampler = "heun"
    c.sampling.num_steps = 40
    return c
