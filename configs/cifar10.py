"""CIFAR-10 base: the tfds ``cifar10`` train split (50k 32x32x3), random flips.

Prepare once on a machine with internet (random-access array_record files):
`tfds build cifar10 --file_format=array_record --data_dir=$DATA`, then pass
--config.data.data_dir=$DATA. The overrides (cifar10_edm_ddpmpp, cifar10_vp_ddpmpp,
cifar10_ve_ncsnpp) set the process, network and published hyperparameters.
"""
from configs.default import get_default_config


def get_config():
    c = get_default_config()
    c.cpu_devices = 0         # on a CPU: one device per core (a GPU/TPU run uses its accelerators)
    c.data.name = "cifar10"
    c.data.image_size = 32
    c.data.num_channels = 3
    c.data.num_classes = 0
    c.data.random_flip = True
    c.model.name = "ddpmpp"
    c.model.model_channels = 128
    c.model.channel_mult = (2, 2, 2)
    c.model.num_blocks = 4
    c.model.attn_resolutions = (16,)
    c.training.log_every = 1000
    c.training.ckpt_every = 10000
    c.training.keep_checkpoints = 5
    c.sampling.num_samples = 64
    c.sampling.batch_size = 64
    return c


def score_sde_recipe(c):
    """Score-SDE's shared CIFAR-10 recipe (continuous-time DSM, batch 128, lr 2e-4 with 5k
    warm-up, gradient clip 1, dropout 0.1, 1.3M steps, PC sampling at N = 1000, snr 0.16)."""
    c.model.dropout = 0.1
    c.training.loss = "dsm"
    c.training.batch_size = 128
    c.training.num_steps = 1_300_000
    c.optim.lr = 2e-4
    c.optim.warmup = 5000
    c.optim.grad_clip = 1.0
    c.sampling.sampler = "pc"
    c.sampling.num_steps = 1000
    c.sampling.snr = 0.16
    return c
