"""scikit-learn 8x8 digits (1,797 images), class-conditional EDM DDPM++, 16x16 after padding.

Run (minutes on 2 CPU cores):
    python -m fdistill.main --config=configs/digits.py --workdir=runs/digits --mode=train
    python -m fdistill.main --config=configs/digits.py --workdir=runs/digits --mode=sample
Expected: recognisable digits in runs/digits/samples.png after a few thousand steps.
"""
from configs.default import get_default_config


def get_config():
    c = get_default_config()
    c.cpu_devices = 0         # on a CPU: one device per core (a GPU/TPU run uses its accelerators)
    c.data.name = "digits"
    c.data.image_size = 8
    c.data.num_channels = 1
    c.data.num_classes = 10
    c.model.name = "ddpmpp"
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_blocks = 2
    c.model.attn_resolutions = (4,)
    c.model.label_dropout = 0.1
    c.training.batch_size = 128
    c.training.num_steps = 4000
    c.training.log_every = 200
    c.training.ckpt_every = 1000
    c.training.ema_rate = 0.999
    c.optim.lr = 1e-3
    c.optim.warmup = 200
    return c
