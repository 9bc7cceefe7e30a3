"""Discriminator heads over a network's encoder features (f-distill, Xu et al. 2025, Sec. 3.3).

Each head reads the feature map of one resolution and outputs one logit per sample; at the
optimum of the logistic loss a logit estimates log p_t(x_t) / q_t(x_t), the density ratio the
f-divergence weighting h(r) needs. Heads on images: 4x4 stride-2 convolutions with GroupNorm and
SiLU halving the map down to 4x4, a 4x4 valid convolution to 1x1 (GroupNorm + SiLU), then a 1x1
convolution to one logit, averaged over space. Heads on the MLP's hidden state (resolution 0):
a small MLP. Averaging the heads and clamping are left to the distillation code.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdistill.models.layers import GroupNorm, Linear, weight_init


def feature_channels(net) -> dict[int, int]:
    """{resolution: channels} of the features `net(..., return_features=True)` returns (a network or
    a `Denoiser`)."""
    if not hasattr(net, 'feature_channels'):
        raise ValueError(f'{type(net).__name__} does not expose `feature_channels`; pass a SongUNet '
                         f'(DDPM++/NCSN++), an MLP, or a Denoiser wrapping one.')
    return dict(net.feature_channels)


class StridedConv(nnx.Module):
    """Convolution with stride and zero padding, NHWC / HWIO, xavier-uniform weights, zero bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, stride: int, padding: int,
                 rngs: nnx.Rngs):
        fan = dict(fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nnx.Param(weight_init(rngs.params(), (kernel, kernel, in_channels, out_channels),
                                            'xavier_uniform', **fan))
        self.bias = nnx.Param(jnp.asarray(np.zeros((out_channels,), np.float32)))
        self.stride, self.padding = stride, padding

    def __call__(self, x):
        p = self.padding
        return jax.lax.conv_general_dilated(
            x, self.weight[...], (self.stride, self.stride), ((p, p), (p, p)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + self.bias[...]


def head_groups(channels: int) -> int:
    """GroupNorm groups of a head (as FastGen): C // 4 up to 32 channels, else the largest divisor of
    C that is <= 32 (32 for multiples of 32)."""
    if channels <= 32:
        return max(1, channels // 4)
    return max(g for g in range(1, 33) if channels % g == 0)


class ConvHead(nnx.Module):
    """One image head: [4x4 stride-2 conv (pad 1), GN, SiLU] while the map is larger than 4x4, then a
    4x4 valid conv to 1x1 with GN + SiLU, then a 1x1 conv to one logit (mean over space).
    This is FastGen's EDM head (the official f-distill code); note that its last GroupNorm acts on a
    1x1 map, so each group normalises only its C / groups channels."""

    def __init__(self, channels: int, resolution: int, *, rngs: nnx.Rngs):
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f'Discriminator conv heads need a power-of-two feature resolution >= 4; got '
                             f'{resolution}.')
        n_down = int(math.log2(resolution // 4))
        convs = [StridedConv(channels, channels, 4, stride=2, padding=1, rngs=rngs) for _ in range(n_down)]
        convs.append(StridedConv(channels, channels, 4, stride=1, padding=0, rngs=rngs))
        self.convs = nnx.List(convs)
        self.norms = nnx.List([GroupNorm(channels, groups=head_groups(channels)) for _ in convs])
        self.out = StridedConv(channels, 1, 1, stride=1, padding=0, rngs=rngs)

    def __call__(self, h):
        for conv, norm in zip(self.convs, self.norms):
            h = jax.nn.silu(norm(conv(h)))
        return self.out(h).mean(axis=(1, 2))[:, 0]


class MLPHead(nnx.Module):
    """Head on a hidden state [B, ..., H] (an MLP's [B, H], a video network's per-frame [B, T, H]):
    Linear-SiLU-Linear-SiLU-Linear to one logit per position, averaged over positions: [B]."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        init = dict(init_mode='xavier_uniform')
        self.fc0 = Linear(channels, channels, **init, rngs=rngs)
        self.fc1 = Linear(channels, channels, **init, rngs=rngs)
        self.out = Linear(channels, 1, **init, rngs=rngs)

    def __call__(self, h):
        h = jax.nn.silu(self.fc0(h))
        h = jax.nn.silu(self.fc1(h))
        logits = self.out(h)[..., 0]
        return logits.reshape(logits.shape[0], -1).mean(axis=1)


class Discriminator(nnx.Module):
    """Heads over selected feature resolutions: `disc(features) -> logits [B, n_heads]`, in the order
    of `resolutions`. `feature_channels` is `{resolution: channels}` of the feature network (see
    `feature_channels(net)`); resolution 0 means a hidden state (the MLP's, or the video network's
    per-frame features)."""

    def __init__(self, feature_channels: dict[int, int], resolutions: Sequence[int], *, rngs: nnx.Rngs):
        resolutions = tuple(int(r) for r in resolutions)
        if not resolutions:
            raise ValueError('Discriminator needs at least one feature resolution.')
        missing = [r for r in resolutions if r not in feature_channels]
        if missing:
            raise ValueError(f'Discriminator resolutions {missing} are not among the feature resolutions '
                             f'{sorted(feature_channels)} of the feature network.')
        self.resolutions = resolutions
        self.heads = nnx.List([
            MLPHead(feature_channels[r], rngs=rngs) if r == 0 else ConvHead(feature_channels[r], r, rngs=rngs)
            for r in resolutions])

    def __call__(self, features: dict[int, jax.Array]) -> jax.Array:
        missing = [r for r in self.resolutions if r not in features]
        if missing:
            raise ValueError(f'features lack resolutions {missing}; got {sorted(features)}.')
        return jnp.stack([head(features[r]) for head, r in zip(self.heads, self.resolutions)], axis=-1)
