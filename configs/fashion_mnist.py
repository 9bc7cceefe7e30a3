"""Fashion-MNIST (28x28 padded to 32x32), class-conditional EDM DDPM++.

Needs Debian's `apt-get install -y dataset-fashion-mnist` (IDX files in
/usr/share/datasets/fashion-mnist) or --config.data.data_dir pointing at the four IDX files.
Run:
    python -m fdistill.main --config=configs/fashion_mnist.py --workdir=runs/fmnist --mode=train
On a GPU, 50k steps give sharp samples; on 2 CPU cores use it for smoke runs.
"""
from configs.default import get_default_config


def get_config():
    c = get_default_config()
    c.cpu_devices = 0         # on a CPU: one device per core (a GPU/TPU run uses its accelerators)
    c.data.name = "fashion_mnist"
    c.data.image_size = 32
    c.data.num_channels = 1
    c.data.num_classes = 10
    c.data.data_dir = "/usr/share/datasets/fashion-mnist"
    c.model.name = "ddpmpp"
    c.model.model_channels = 64
    c.model.channel_mult = (1, 2, 2)
    c.model.num_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.label_dropout = 0.1
    c.training.batch_size = 256
    c.training.num_steps = 50000
    c.training.log_every = 500
    c.training.ckpt_every = 5000
    c.optim.lr = 2e-4
    c.optim.warmup = 1000
    return c
