"""DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs"), as re-implemented by
EDM (Karras et al. 2022) in its `SongUNet`; `SongUNet` here is that U-Net, shared with NCSN++.

At EDM's settings it matches EDM's `SongUNet` parameter for parameter (same layers, same shapes,
same initialisation, without EDM's optional augmentation-label layer), so EDM's published CIFAR-10
teachers can be converted into it. Layout NHWC.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fdistill.models.layers import (Conv2d, GroupNorm, Linear, UNetBlock, compute_dtype_of,
                                    noise_embedding, run_block)

ENCODER_TYPES = ('standard', 'skip', 'residual')
DECODER_TYPES = ('standard', 'skip')


class SongUNet(nnx.Module):
    """The DDPM++ / NCSN++ U-Net (EDM's `SongUNet`).

    Mapping: emb = silu(L1(silu(L0(embed(c_noise) + L_label(sqrt(label_dim) * y))))).
    Encoder per resolution: [3x3 conv (first level) | down block], `num_blocks` residual blocks
    (attention at `attn_resolutions`); with encoder_type 'skip' / 'residual' an auxiliary path from
    the input image (progressive input of Score-SDE). Decoder: two bottleneck blocks (the first with
    attention), then per resolution [up block], `num_blocks + 1` blocks fed by the encoder skips;
    output GroupNorm + silu + 3x3 conv ('skip' decoder: one such head per resolution, summed after
    upsampling).

    Call: `net(x, noise_labels, class_labels=None, *, key=None, return_features=False)` with x NHWC,
    noise_labels [B] (the preconditioned c_noise), class_labels one-hot [B, label_dim] (None = the
    all-zeros null label). Dropout is active iff `key` is given. With `return_features`, also
    returns {resolution: encoder feature map at the end of that resolution}; the lowest resolution's
    entry is the bottleneck input. `self.feature_channels` gives their channel counts.

    Speed and memory (results unchanged): `remat` recomputes each residual block's activations in
    the backward pass instead of storing them; `compute_dtype='bfloat16'` runs the blocks in
    bfloat16 (parameters, embedding and outputs stay float32; see `layers`).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *, label_dim: int = 0,
                 model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.10,
                 embedding_type: str = 'positional', channel_mult_noise: int = 1,
                 encoder_type: str = 'standard', decoder_type: str = 'standard',
                 resample_filter: Sequence[float] = (1, 1), remat: bool = False,
                 compute_dtype: str = 'float32', rngs: nnx.Rngs):
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        compute_dtype_of(compute_dtype)
        self.remat, self.compute_dtype = bool(remat), compute_dtype
        check_unet_args(img_resolution, channel_mult, attn_resolutions, num_blocks, dropout, encoder_type,
                        decoder_type)
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim = label_dim
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                     eps=1e-6, resample_filter=resample_filter, rngs=rngs)

        self.map_noise = noise_embedding(embedding_type, noise_channels, rngs=rngs)
        self.map_label = nnx.data(Linear(label_dim, noise_channels, **init, rngs=rngs) if label_dim else None)
        self.map_layer0 = Linear(noise_channels, emb_channels, **init, rngs=rngs)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init, rngs=rngs)

        enc, skips, self.feature_channels = {}, [], {}
        cout, caux = in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels
                enc[f'{res}x{res}_conv'] = Conv2d(in_channels, cout, 3, **init, rngs=rngs)
                skips.append(cout)
            else:
                enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block)
                skips.append(cout)
                if encoder_type == 'skip':
                    enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter,
                                                          rngs=rngs)
                    enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, 1, **init, rngs=rngs)
                if encoder_type == 'residual':
                    enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, 3, down=True, fused_resample=True,
                                                              resample_filter=resample_filter, **init, rngs=rngs)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                skips.append(cout)
            self.feature_channels[res] = cout
        self.enc_names = tuple(enc)
        self.enc = nnx.Dict(enc)

        dec = {}
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block)
                dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block)
            else:
                dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                dec[f'{res}x{res}_block{idx}'] = UNetBlock(
                    cin, cout, attention=(idx == num_blocks and res in attn_resolutions), **block)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, 0, up=True,
                                                        resample_filter=resample_filter, rngs=rngs)
                dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, 3, **init_zero, rngs=rngs)
        self.dec_names = tuple(dec)
        self.dec = nnx.Dict(dec)

    def embed(self, noise_labels, class_labels=None):
        """Mapping network: noise label (+ class label) -> embedding [B, emb_channels]."""
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            if class_labels is None:
                class_labels = jnp.zeros((noise_labels.shape[0], self.label_dim), emb.dtype)
            emb = emb + self.map_label(class_labels * math.sqrt(self.label_dim))
        emb = jax.nn.silu(self.map_layer0(emb))
        return jax.nn.silu(self.map_layer1(emb))

    def __call__(self, x, noise_labels, class_labels=None, *, key=None, return_features=False):
        self._check_input(x, noise_labels, class_labels)
        dtype = compute_dtype_of(self.compute_dtype)
        emb = self.embed(noise_labels, class_labels).astype(dtype)
        x = x.astype(dtype)
        keys = iter(jax.random.split(key, len(self.enc_names) + len(self.dec_names))
                    if key is not None else [None] * (len(self.enc_names) + len(self.dec_names)))

        skips, features, aux = [], {}, x
        for name in self.enc_names:
            layer, k = self.enc[name], next(keys)
            if 'aux_down' in name:
                aux = layer(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + layer(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = (run_block(layer, x, emb, k, remat=self.remat) if isinstance(layer, UNetBlock)
                     else layer(x))
                skips.append(x)
            features[x.shape[1]] = x

        aux, tmp = None, None
        for name in self.dec_names:
            layer, k = self.dec[name], next(keys)
            if 'aux_up' in name:
                aux = layer(aux)
            elif 'aux_norm' in name:
                tmp = layer(x)
            elif 'aux_conv' in name:
                tmp = layer(jax.nn.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[-1] != layer.in_channels:
                    x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = run_block(layer, x, emb, k, remat=self.remat)
        aux = aux.astype(jnp.float32)
        if return_features:
            return aux, {r: f.astype(jnp.float32) for r, f in features.items()}
        return aux

    def _check_input(self, x, noise_labels, class_labels):
        expect = (self.img_resolution, self.img_resolution, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(f'{type(self).__name__} expects NHWC input [B, {expect[0]}, {expect[1]}, '
                             f'{expect[2]}]; got shape {tuple(x.shape)}.')
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f'noise_labels must have shape [B] = ({x.shape[0]},); got {noise_labels.shape}.')
        if class_labels is not None and (self.label_dim == 0 or class_labels.shape != (x.shape[0], self.label_dim)):
            raise ValueError(f'class_labels must be one-hot [B, {self.label_dim}] (or None); got shape '
                             f'{class_labels.shape} for a network with label_dim={self.label_dim}.')


def check_unet_args(img_resolution, channel_mult, attn_resolutions, num_blocks, dropout,
                    encoder_type='standard', decoder_type='standard'):
    """Validates the U-Net arguments shared by SongUNet and DhariwalUNet (clear errors, valid values)."""
    if encoder_type not in ENCODER_TYPES:
        raise ValueError(f'Unknown encoder_type {encoder_type!r}; valid: {", ".join(ENCODER_TYPES)}.')
    if decoder_type not in DECODER_TYPES:
        raise ValueError(f'Unknown decoder_type {decoder_type!r}; valid: {", ".join(DECODER_TYPES)}.')
    if not channel_mult:
        raise ValueError('channel_mult must list at least one channel multiplier, e.g. (1, 2, 2, 2).')
    factor = 2 ** (len(channel_mult) - 1)
    if img_resolution % factor:
        raise ValueError(f'Image size {img_resolution} is not divisible by 2^(len(channel_mult) - 1) = '
                         f'{factor}: use an image size that is a multiple of {factor} or fewer levels in '
                         f'channel_mult {channel_mult}.')
    resolutions = [img_resolution >> level for level in range(len(channel_mult))]
    bad = [r for r in attn_resolutions if r not in resolutions]
    if bad:
        raise ValueError(f'attn_resolutions {list(attn_resolutions)} contains {bad}, not among the '
                         f'network resolutions {resolutions}.')
    if num_blocks < 1:
        raise ValueError(f'num_blocks must be >= 1; got {num_blocks}.')
    if not 0 <= dropout < 1:
        raise ValueError(f'dropout must be in [0, 1); got {dropout}.')


class DDPMpp(SongUNet):
    """DDPM++ with EDM's CIFAR-10 settings as defaults (positional embedding, standard
    encoder/decoder, [1, 1] resampling, 128 channels, mults (2, 2, 2), 4 blocks, attention at 16,
    dropout 0.13); any SongUNet keyword argument may be overridden."""

    DEFAULTS = dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                    dropout=0.13, embedding_type='positional', channel_mult_noise=1,
                    encoder_type='standard', decoder_type='standard', resample_filter=(1, 1))

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *, rngs: nnx.Rngs,
                 **kwargs):
        super().__init__(img_resolution, in_channels, out_channels, rngs=rngs, **(self.DEFAULTS | kwargs))
