"""Networks and the denoiser (teacher) interface.

`get_model(config, *, rngs)` builds `Denoiser(net, process)` from a full config:

- `config.model.name`: 'ddpmpp' | 'ncsnpp' | 'adm' | 'mlp' (see `NETWORKS`).
- `config.model.precond`: 'edm' | 'vp' | 've' (EDM Table 1 preconditioning, see `denoiser.py`).
- U-Nets (`SongUNet` arguments): `.model_channels`, `.channel_mult` (tuple), `.num_blocks`,
  `.attn_resolutions`, `.dropout`, `.embedding_type` ('positional' | 'fourier'),
  `.channel_mult_noise`, `.channel_mult_emb`, `.resample_filter` (tuple), `.encoder_type`
  ('standard' | 'skip' | 'residual'), `.decoder_type` ('standard' | 'skip'). A field missing from
  the config takes that architecture's EDM CIFAR-10 default (`DDPMpp.DEFAULTS`, `NCSNpp.DEFAULTS`).
  `.fourier_freqs` (optional tuple): fixed frequencies of a 'fourier' noise embedding, e.g. those of an
  imported EDM snapshot (a fresh network draws them from the seed).
- ADM (`DhariwalUNet`, EDM's ImageNet-64 network): `.model_channels`, `.channel_mult`,
  `.channel_mult_emb`, `.num_blocks`, `.attn_resolutions`, `.dropout` (`ADM_FIELDS`); the
  DDPM++/NCSN++-only fields are ignored.
- U-Nets and ADM, speed and memory only: `.remat` (bool, recompute each residual block's
  activations in the backward pass) and `.compute_dtype` ('float32' | 'bfloat16': bfloat16 blocks,
  float32 parameters, optimiser state and outputs).
- MLP: `.hidden`, `.depth`, `.embedding_type`, `.dropout`.
- Video transformer ('video_transformer', clips of `config.data.size` / `.channels`):
  `.patch_size`, `.dim`, `.depth`, `.num_heads`, `.mlp_ratio`; `get_model` gives a
  `VideoDenoiser` (EDM preconditioning per frame).
- `.label_dropout` is read by the losses (classifier-free guidance), not here.
- `config.data.image_size`, `.num_channels` (U-Nets), `.dim` (MLP), `.num_classes` (0 =
  unconditional; otherwise one-hot class labels of that size).
- `config.process` builds the forward process via `fdistill.sde.sde_from_config`; its
  `sigma_data` (default 0.5) is the EDM preconditioning's sigma_data.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdistill.models.adm import DhariwalUNet
from fdistill.models.ddpmpp import DDPMpp, SongUNet
from fdistill.models.denoiser import Denoiser, preconditioning
from fdistill.models.discriminator import Discriminator, feature_channels
from fdistill.models.mlp import MLP
from fdistill.models.ncsnpp import NCSNpp
from fdistill.models.video import VideoDenoiser, VideoTransformer, build_video_transformer
from fdistill.sde import sde_from_config

UNET_FIELDS = ('model_channels', 'channel_mult', 'channel_mult_emb', 'num_blocks', 'attn_resolutions',
               'dropout', 'embedding_type', 'channel_mult_noise', 'encoder_type', 'decoder_type',
               'resample_filter', 'remat', 'compute_dtype')
ADM_FIELDS = ('model_channels', 'channel_mult', 'channel_mult_emb', 'num_blocks', 'attn_resolutions', 'dropout',
              'remat', 'compute_dtype')


def _unet_kwargs(model_config, fields=UNET_FIELDS) -> dict:
    kw = {k: model_config[k] for k in fields if k in model_config}
    for k in ('channel_mult', 'attn_resolutions', 'resample_filter'):
        if k in kw:
            kw[k] = tuple(kw[k])
    return kw


def _build_unet(cls, config, rngs):
    d = config.data
    net = cls(d.image_size, d.num_channels, d.num_channels, label_dim=d.get('num_classes', 0),
              rngs=rngs, **_unet_kwargs(config.model))
    freqs = config.model.get('fourier_freqs', ())
    if freqs:
        expect = getattr(net.map_noise, 'freqs', None)
        if expect is None or expect.shape != (len(freqs),):
            raise ValueError(f'config.model.fourier_freqs has {len(freqs)} values; it applies to a '
                             f"'fourier' noise embedding of 2 x that many channels, and this network has "
                             f'{"none" if expect is None else f"{expect.shape[0]} frequencies"}.')
        net.map_noise.freqs[...] = jnp.asarray(np.asarray(freqs, np.float32))
    return net


def build_ddpmpp(config, *, rngs: nnx.Rngs) -> SongUNet:
    """DDPM++ (EDM's SongUNet, DDPM++ settings) for `config.data` images."""
    return _build_unet(DDPMpp, config, rngs)


def build_ncsnpp(config, *, rngs: nnx.Rngs) -> SongUNet:
    """NCSN++ (EDM's SongUNet, NCSN++ settings) for `config.data` images."""
    return _build_unet(NCSNpp, config, rngs)


def build_adm(config, *, rngs: nnx.Rngs) -> DhariwalUNet:
    """ADM (EDM's DhariwalUNet) for `config.data` images."""
    d = config.data
    return DhariwalUNet(d.image_size, d.num_channels, d.num_channels, label_dim=d.get('num_classes', 0),
                        rngs=rngs, **_unet_kwargs(config.model, ADM_FIELDS))


def build_mlp(config, *, rngs: nnx.Rngs) -> MLP:
    """Residual MLP for `config.data.dim`-dimensional points."""
    m = config.model
    kw = {k: m[k] for k in ('hidden', 'depth', 'embedding_type', 'dropout') if k in m}
    return MLP(config.data.dim, label_dim=config.data.get('num_classes', 0), rngs=rngs, **kw)


NETWORKS = {'ddpmpp': build_ddpmpp, 'ncsnpp': build_ncsnpp, 'adm': build_adm, 'mlp': build_mlp,
            'video_transformer': build_video_transformer}


def get_network(config, *, rngs: nnx.Rngs) -> nnx.Module:
    """The bare network F named by `config.model.name` (no preconditioning)."""
    name = config.model.name
    if name not in NETWORKS:
        raise ValueError(f'Unknown model name {name!r}; valid names: {", ".join(NETWORKS)}.')
    return NETWORKS[name](config, rngs=rngs)


def get_model(config, *, rngs: nnx.Rngs) -> Denoiser | VideoDenoiser:
    """The denoiser of a full config (see the module docstring): `Denoiser(net, process, precond,
    sigma_data)`, or a `VideoDenoiser` for the video network."""
    net = get_network(config, rngs=rngs)
    process = sde_from_config(config.process)
    if isinstance(net, VideoTransformer):
        return VideoDenoiser(net, process)
    return Denoiser(net, process, precond=config.model.get('precond', 'edm'),
                    sigma_data=config.process.get('sigma_data', 0.5))


def get_discriminator(feature_net, resolutions, *, rngs: nnx.Rngs) -> Discriminator:
    """Discriminator heads on `feature_net`'s features at `resolutions` (0: a hidden state)."""
    return Discriminator(feature_channels(feature_net), tuple(resolutions), rngs=rngs)


__all__ = ['DDPMpp', 'Denoiser', 'DhariwalUNet', 'Discriminator', 'MLP', 'NCSNpp', 'NETWORKS',
           'SongUNet', 'VideoDenoiser', 'VideoTransformer', 'feature_channels',
           'get_discriminator', 'get_model', 'get_network', 'preconditioning']
