"""ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"), as re-implemented
by EDM (Karras et al. 2022) in its `DhariwalUNet`: EDM's ImageNet-64 teacher.

At EDM's settings it matches EDM's `DhariwalUNet` parameter for parameter (same layers, names,
shapes and initialisation) without EDM's optional augmentation-label layer, which EDM skips when it
is given no augmentation labels (always, when sampling); EDM's snapshots load into it
(`fdistill.models.edm_import`). Layout NHWC.

What differs from the DDPM++/NCSN++ `SongUNet`: the class label is mapped after the noise MLP
(emb = silu(L1(silu(L0(pos(c_noise)))) + L_label(y))), the residual blocks use adaptive group
normalisation (scale and shift from the embedding), one attention head per 64 channels, attention
in every block at `attn_resolutions` (decoder included), no skip scaling, Kaiming-uniform
initialisation with the output layers set to zero, and a single output head.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fdistill.models.ddpmpp import check_unet_args
from fdistill.models.layers import (Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, compute_dtype_of,
                                    run_block)

CHANNELS_PER_HEAD = 64


class DhariwalUNet(nnx.Module):
    """The ADM U-Net (EDM's `DhariwalUNet`); EDM's ImageNet-64 settings are the defaults.

    Mapping: emb = silu(L1(silu(L0(pos(c_noise)))) + L_label(y)), pos = [cos, sin] sinusoidal
    features of the noise label (no endpoint). Encoder per resolution: [3x3 conv (first level) |
    down block], `num_blocks` blocks; decoder: two bottleneck blocks (the first with attention),
    then per resolution [up block], `num_blocks + 1` blocks fed by the encoder skips; output
    GroupNorm + silu + 3x3 conv. Attention (64 channels per head) in every block at
    `attn_resolutions`.

    Call: `net(x, noise_labels, class_labels=None, *, key=None, return_features=False)` with x NHWC,
    noise_labels [B] (the preconditioned c_noise), class_labels one-hot [B, label_dim] (None = the
    all-zeros null label). Dropout is active iff `key` is given. With `return_features`, also
    returns {resolution: encoder feature map at the end of that resolution}; the lowest resolution's
    entry is the bottleneck input (8x8 x 768 at the ImageNet-64 settings). `self.feature_channels`
    gives their channel counts. `remat` and `compute_dtype` as in `SongUNet`.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *, label_dim: int = 0,
                 model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (32, 16, 8), dropout: float = 0.10, remat: bool = False,
                 compute_dtype: str = 'float32', rngs: nnx.Rngs):
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        compute_dtype_of(compute_dtype)
        self.remat, self.compute_dtype = bool(remat), compute_dtype
        check_unet_args(img_resolution, channel_mult, attn_resolutions, num_blocks, dropout)
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim = label_dim
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0., init_bias=0.)
        block = dict(emb_channels=emb_channels, num_heads=None, channels_per_head=CHANNELS_PER_HEAD,
                     dropout=dropout, skip_scale=1., eps=1e-5, resample_proj=False, adaptive_scale=True,
                     init=init, init_zero=init_zero, init_attn=init, rngs=rngs)

        self.map_noise = PositionalEmbedding(model_channels, endpoint=False)
        self.map_layer0 = Linear(model_channels, emb_channels, **init, rngs=rngs)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init, rngs=rngs)
        self.map_label = nnx.data(
            Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                   init_weight=math.sqrt(label_dim), rngs=rngs) if label_dim else None)

        enc, skips, self.feature_channels = {}, [], {}
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels * mult
                enc[f'{res}x{res}_conv'] = Conv2d(in_channels, cout, 3, **init, rngs=rngs)
            else:
                enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block)
            skips.append(cout)
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
                dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.dec_names = tuple(dec)
        self.dec = nnx.Dict(dec)
        self.out_norm = GroupNorm(cout, eps=1e-5)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero, rngs=rngs)

    def embed(self, noise_labels, class_labels=None):
        """Mapping network: noise label (+ class label) -> embedding [B, emb_channels]."""
        sin, cos = jnp.split(self.map_noise(noise_labels), 2, axis=-1)
        emb = jax.nn.silu(self.map_layer0(jnp.concatenate([cos, sin], axis=-1)))
        emb = self.map_layer1(emb)
        if self.map_label is not None and class_labels is not None:
            emb = emb + self.map_label(class_labels)
        return jax.nn.silu(emb)

    def __call__(self, x, noise_labels, class_labels=None, *, key=None, return_features=False):
        self._check_input(x, noise_labels, class_labels)
        dtype = compute_dtype_of(self.compute_dtype)
        emb = self.embed(noise_labels, class_labels).astype(dtype)
        x = x.astype(dtype)
        names = self.enc_names + self.dec_names
        keys = iter(jax.random.split(key, len(names)) if key is not None else [None] * len(names))

        skips, features = [], {}
        for name in self.enc_names:
            layer, k = self.enc[name], next(keys)
            x = run_block(layer, x, emb, k, remat=self.remat) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
            features[x.shape[1]] = x
        for name in self.dec_names:
            layer, k = self.dec[name], next(keys)
            if x.shape[-1] != layer.in_channels:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = run_block(layer, x, emb, k, remat=self.remat)
        out = self.out_conv(jax.nn.silu(self.out_norm(x))).astype(jnp.float32)
        if return_features:
            return out, {r: f.astype(jnp.float32) for r, f in features.items()}
        return out

    def _check_input(self, x, noise_labels, class_labels):
        expect = (self.img_resolution, self.img_resolution, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(f'DhariwalUNet expects NHWC input [B, {expect[0]}, {expect[1]}, {expect[2]}]; '
                             f'got shape {tuple(x.shape)}.')
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f'noise_labels must have shape [B] = ({x.shape[0]},); got {noise_labels.shape}.')
        if class_labels is not None and (self.label_dim == 0 or class_labels.shape != (x.shape[0], self.label_dim)):
            raise ValueError(f'class_labels must be one-hot [B, {self.label_dim}] (or None); got shape '
                             f'{class_labels.shape} for a network with label_dim={self.label_dim}.')
