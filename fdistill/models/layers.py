"""Building blocks shared by the U-Nets (DDPM++, NCSN++, ADM) and the discriminator.

The layers follow EDM's re-implementation of Song et al.'s architectures (Karras et al. 2022,
`training/networks.py`) so that parameter shapes and initialisation agree with it, written for
JAX in NHWC layout: convolution kernels are HWIO, linear kernels are [in, out].

Mixed precision: parameters stay float32; every layer computes in its input's dtype (weights are
cast at use), GroupNorm statistics and the attention softmax in float32. The networks cast their
input and embedding to `compute_dtype` and their outputs back to float32.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INIT_MODES = ('xavier_uniform', 'xavier_normal', 'kaiming_uniform', 'kaiming_normal')
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype_of(name: str):
    """The jnp dtype for `model.compute_dtype` ('float32' or 'bfloat16')."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f'Unknown compute_dtype {name!r}; valid: {", ".join(COMPUTE_DTYPES)}.')
    return COMPUTE_DTYPES[name]


def weight_init(key, shape, mode: str, fan_in: int, fan_out: int, scale: float = 1.) -> jax.Array:
    """EDM's unified initialiser, times `scale`: Glorot (xavier) or He (kaiming), uniform or normal.

    Eagerly the draw is made with NumPy from a seed taken from `key` (deterministic, and free of the
    per-shape XLA compilations that eager `jax.random` calls cost: a 90-tensor U-Net then builds in
    about a second instead of ten). Under a JAX trace (`nnx.eval_shape`, a jitted constructor) the
    same distribution is drawn with `jax.random`.
    """
    if mode == 'xavier_uniform':
        std, uniform = math.sqrt(6 / (fan_in + fan_out)), True
    elif mode == 'xavier_normal':
        std, uniform = math.sqrt(2 / (fan_in + fan_out)), False
    elif mode == 'kaiming_uniform':
        std, uniform = math.sqrt(3 / fan_in), True
    elif mode == 'kaiming_normal':
        std, uniform = math.sqrt(1 / fan_in), False
    else:
        raise ValueError(f'Unknown init mode {mode!r}; valid modes: {", ".join(INIT_MODES)}.')
    if scale == 0:
        return jnp.asarray(np.zeros(shape, np.float32))
    if isinstance(key, jax.core.Tracer):
        draw = (jax.random.uniform(key, shape, minval=-1., maxval=1.) if uniform
                else jax.random.normal(key, shape))
        return (std * scale) * draw
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    draw = rng.uniform(-1., 1., shape) if uniform else rng.standard_normal(shape)
    return jnp.asarray((std * scale * draw).astype(np.float32))


def dropout(x: jax.Array, rate: float, key) -> jax.Array:
    """Inverted dropout; the identity when `key` is None or `rate` is 0."""
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1. - rate, x.shape)
    return jnp.where(keep, x / (1. - rate), 0.)


class Linear(nnx.Module):
    """Fully connected layer y = x W + b with EDM's initialisation (W scaled by `init_weight`)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 init_mode: str = 'kaiming_normal', init_weight: float = 1., init_bias: float = 0.,
                 rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        kw = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nnx.Param(weight_init(rngs.params(), (in_features, out_features), **kw, scale=init_weight))
        self.bias = nnx.data(nnx.Param(weight_init(rngs.params(), (out_features,), **kw, scale=init_bias))
                             if bias else None)

    def __call__(self, x):
        x = x @ self.weight[...].astype(x.dtype)
        return x if self.bias is None else x + self.bias[...].astype(x.dtype)


def _resample_kernel(resample_filter: Sequence[float]) -> np.ndarray:
    """Separable FIR filter f f^T / (sum f)^2 (EDM's `resample_filter`): [1,1] box, [1,3,3,1] binomial."""
    f = np.asarray(resample_filter, dtype=np.float32)
    if f.ndim != 1 or f.size < 1 or f.sum() == 0:
        raise ValueError(f'resample_filter must be a non-empty 1-D list with non-zero sum, e.g. [1, 1] or '
                         f'[1, 3, 3, 1]; got {resample_filter!r}.')
    return np.outer(f, f) / f.sum() ** 2


def downsample(x: jax.Array, resample_filter: Sequence[float] = (1, 1)) -> jax.Array:
    """Filter then subsample by 2 (EDM `Conv2d(down=True)` without weights), NHWC.

    Per channel: conv2d(x, f f^T / (sum f)^2, stride 2, padding (len(f) - 1) // 2).
    """
    if tuple(resample_filter) == (1, 1):
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return _depthwise(x, _resample_kernel(resample_filter), stride=2, pad=(len(resample_filter) - 1) // 2)


def upsample(x: jax.Array, resample_filter: Sequence[float] = (1, 1)) -> jax.Array:
    """Upsample by 2 (EDM `Conv2d(up=True)` without weights), NHWC.

    Per channel: conv_transpose2d(x, 4 f f^T / (sum f)^2, stride 2, padding (len(f) - 1) // 2);
    with [1, 1] this is nearest-neighbour upsampling.
    """
    if tuple(resample_filter) == (1, 1):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    k = len(resample_filter)
    pad = k - 1 - (k - 1) // 2
    return _depthwise(x, 4 * _resample_kernel(resample_filter)[::-1, ::-1], stride=1, pad=pad, lhs_dilation=2)


def _depthwise(x, kernel: np.ndarray, *, stride: int, pad: int, lhs_dilation: int = 1):
    """The same 2-D filter applied to every channel (a grouped convolution), NHWC."""
    c = x.shape[-1]
    w = jnp.broadcast_to(jnp.asarray(kernel, x.dtype)[:, :, None, None], kernel.shape + (1, c))
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        lhs_dilation=(lhs_dilation, lhs_dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=c)


def conv2d(x: jax.Array, w: jax.Array, *, pad: int) -> jax.Array:
    """Stride-1 convolution, NHWC input, HWIO kernel, symmetric zero padding (1x1: a matmul)."""
    if w.shape[:2] == (1, 1) and pad == 0:
        return x @ w[0, 0]
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class Conv2d(nnx.Module):
    """EDM's convolution with optional 2x up/downsampling by a FIR `resample_filter`.

    `kernel=0` gives a weightless resampler. Unfused: resample, then convolve. `fused_resample`
    (down only; NCSN++'s residual encoder): convolve with padding k//2 + (len(f)-1)//2, then filter
    with stride 2.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = 'kaiming_normal',
                 init_weight: float = 1., init_bias: float = 0., rngs: nnx.Rngs):
        if up and down:
            raise ValueError('Conv2d: up and down cannot both be set.')
        if fused_resample and (up or not kernel):
            raise ValueError('Conv2d: fused_resample is only defined for a weighted conv with down=True.')
        if not kernel and in_channels != out_channels:
            raise ValueError(f'Conv2d with kernel=0 only resamples: in_channels ({in_channels}) must equal '
                             f'out_channels ({out_channels}).')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        self.resample_filter = tuple(float(v) for v in resample_filter)
        _resample_kernel(self.resample_filter)
        kw = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nnx.data(nnx.Param(weight_init(rngs.params(), (kernel, kernel, in_channels, out_channels),
                                                     **kw, scale=init_weight)) if kernel else None)
        self.bias = nnx.data(nnx.Param(weight_init(rngs.params(), (out_channels,), **kw, scale=init_bias))
                             if kernel and bias else None)

    def __call__(self, x):
        w = None if self.weight is None else self.weight[...].astype(x.dtype)
        w_pad = 0 if w is None else w.shape[0] // 2
        f = self.resample_filter
        f_pad = (len(f) - 1) // 2
        if self.fused_resample and self.down and w is not None:
            x = conv2d(x, w, pad=w_pad + f_pad)
            x = _depthwise(x, _resample_kernel(f), stride=2, pad=0)
        else:
            if self.up:
                x = upsample(x, f)
            if self.down:
                x = downsample(x, f)
            if w is not None:
                x = conv2d(x, w, pad=w_pad)
        return x if self.bias is None else x + self.bias[...].astype(x.dtype)


def num_groups(num_channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """EDM's GroupNorm group count min(32, C // 4), validated to divide C."""
    groups = min(max_groups, num_channels // min_channels_per_group)
    if groups < 1 or num_channels % groups:
        raise ValueError(
            f'GroupNorm: {num_channels} channels cannot be split into min({max_groups}, C // '
            f'{min_channels_per_group}) = {groups} equal groups; choose model_channels and channel_mult '
            f'so every channel count (including decoder concatenations) is a multiple of '
            f'{min_channels_per_group} and of its group count, e.g. model_channels a multiple of 32.')
    return groups


class GroupNorm(nnx.Module):
    """Group normalisation with affine scale/shift (EDM: groups = min(32, C // 4)).

    y = (x - mean_g) / sqrt(var_g + eps) * weight + bias, with the mean and variance of each
    (sample, group) over the spatial axes and the group's channels, var = E[x^2] - E[x]^2 (one pass,
    clamped at 0; statistics in float32). Channel sums go to groups and back through a 0/1
    membership matrix [C, G] (two tiny matmuls, each for two statistics): the matmuls end XLA:CPU's
    loop fusions there, so each fused elementwise pass over the activations applies one
    per-(sample, channel) scale and shift instead of re-deriving the group statistics per element,
    and its backward does the same. The two statistics are stacked after the batch axis, not
    concatenated along it, so a batch sharded over devices stays on its devices.
    """

    def __init__(self, num_channels: int, *, groups: int | None = None, eps: float = 1e-5):
        self.num_channels = num_channels
        self.groups = num_groups(num_channels) if groups is None else groups
        if num_channels % self.groups:
            raise ValueError(f'GroupNorm: {num_channels} channels are not divisible by {self.groups} groups.')
        self.eps = eps
        self.weight = nnx.Param(jnp.asarray(np.ones((num_channels,), np.float32)))
        self.bias = nnx.Param(jnp.asarray(np.zeros((num_channels,), np.float32)))

    def __call__(self, x):
        b, c = x.shape[0], x.shape[-1]
        axes = tuple(range(1, x.ndim - 1))
        n = math.prod(x.shape[1:-1]) * (c // self.groups)
        member = jnp.asarray(np.repeat(np.eye(self.groups, dtype=np.float32), c // self.groups, axis=0))
        to_groups = lambda v: jnp.dot(v, member, precision=jax.lax.Precision.HIGHEST)
        to_channels = lambda v: jnp.dot(v, member.T, precision=jax.lax.Precision.HIGHEST)
        xf = x.astype(jnp.float32)
        sums = jnp.stack([xf.sum(axis=axes), jnp.square(xf).sum(axis=axes)], axis=1)  # [B, 2, C]
        stats = to_groups(sums) / n
        mean, sq = stats[:, 0], stats[:, 1]
        inv = jax.lax.rsqrt(jnp.maximum(sq - jnp.square(mean), 0.) + self.eps)
        inv_mean_c = to_channels(jnp.stack([inv, mean], axis=1))
        inv_c, mean_c = inv_mean_c[:, 0], inv_mean_c[:, 1]
        scale = inv_c * self.weight[...]
        shift = self.bias[...] - mean_c * scale
        expand = (b,) + (1,) * len(axes) + (c,)
        return (xf * scale.reshape(expand) + shift.reshape(expand)).astype(x.dtype)


def _materialize(x):
    """x times the identity matrix over channels: the same values (for finite x), computed by a
    matmul, which XLA:CPU never fuses into the elementwise loops around it."""
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.dot(x, eye, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def cotangent_barrier(x):
    """Identity whose cotangent is materialised once on CPU.

    Without it, XLA:CPU fuses the cheap elementwise backward of a residual stream (residual adds,
    the skip scale, GroupNorm's backward) across block after block into every consumer of each
    cotangent, including the layout copies of the weight-gradient convolutions, and recomputes
    that chain in each: one fused loop had ~500 operations per element. Elsewhere the identity.
    """
    return x


def _cotangent_barrier_fwd(x):
    return x, None


def _cotangent_barrier_bwd(_, g):
    return (jax.lax.platform_dependent(g, cpu=_materialize, default=lambda v: v),)


cotangent_barrier.defvjp(_cotangent_barrier_fwd, _cotangent_barrier_bwd)


SONG_INIT = dict(init_mode='xavier_uniform')
SONG_INIT_ZERO = dict(init_mode='xavier_uniform', init_weight=1e-5)
SONG_INIT_ATTN = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))


class UNetBlock(nnx.Module):
    """Residual block of DDPM++, NCSN++ and ADM (EDM's unified `UNetBlock`).

    h = conv0(silu(norm0(x))) (with optional 2x up/down); then h = silu(norm1(h + affine(emb))), or
    with `adaptive_scale` (ADM) [scale, shift] = affine(emb) and h = silu(shift + norm1(h) (1 + scale));
    x = (conv1(dropout(h)) + skip(x)) * skip_scale; then optional self-attention
    x = (proj(attn(norm2(x))) + x) * skip_scale with `num_heads` heads (None: out_channels //
    channels_per_head). skip is a 1x1 conv when channels change, or when only the resolution changes
    and `resample_proj` is set (a weightless resampler without it), else the identity. `init`,
    `init_zero` and `init_attn` are the initialisers of the ordinary, the output (conv1, proj) and
    the qkv layers; the defaults are SongUNet's.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = 1,
                 channels_per_head: int = 64, dropout: float = 0., skip_scale: float = math.sqrt(0.5),
                 eps: float = 1e-6, resample_filter: Sequence[float] = (1, 1), resample_proj: bool = True,
                 adaptive_scale: bool = False, init: dict | None = None, init_zero: dict | None = None,
                 init_attn: dict | None = None, rngs: nnx.Rngs):
        init = SONG_INIT if init is None else init
        init_zero = SONG_INIT_ZERO if init_zero is None else init_zero
        init_attn = SONG_INIT_ATTN if init_attn is None else init_attn
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        heads = out_channels // channels_per_head if num_heads is None else num_heads
        self.num_heads = heads if attention else 0
        if attention and (heads < 1 or out_channels % heads):
            raise ValueError(f'Attention: {out_channels} channels cannot be split into {heads} heads '
                             f'(channels_per_head={channels_per_head}); use more channels at this resolution '
                             f'or no attention there.')
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter,
                            **init, rngs=rngs)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init, rngs=rngs)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero, rngs=rngs)
        self.skip = nnx.data(None)
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **init, rngs=rngs)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **init_attn, rngs=rngs)
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero, rngs=rngs)

    def __call__(self, x, emb, *, key=None):
        x = orig = cotangent_barrier(x)
        x = self.conv0(jax.nn.silu(self.norm0(x)))
        params = self.affine(emb)[:, None, None, :]
        if self.adaptive_scale:
            scale, shift = jnp.split(params, 2, axis=-1)
            x = jax.nn.silu(shift + self.norm1(x) * (scale + 1))
        else:
            x = jax.nn.silu(self.norm1(x + params))
        x = self.conv1(dropout(x, self.dropout, key))
        x = (x + (orig if self.skip is None else self.skip(orig))) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self.attention(self.norm2(x))) + x) * self.skip_scale
        return x

    def attention(self, x):
        """Dot-product self-attention over the H*W positions. The qkv weight keeps EDM's output layout
        (head, channel, {q, k, v}); it is permuted to contiguous [q | k | v] blocks before use. The
        1/sqrt(d) scale is applied to q (H*W x d) rather than to the logits (H*W x H*W), and heads
        are a leading batch axis of 3-D matmuls (with one head, the transposes are free)."""
        b, h, w, c = x.shape
        n, d = self.num_heads, c // self.num_heads
        weight = self.qkv.weight[...].reshape(c, n, d, 3).transpose(0, 3, 1, 2).reshape(c, 3 * c)
        bias = self.qkv.bias[...].reshape(n, d, 3).transpose(2, 0, 1).reshape(3 * c)
        qkv = x.reshape(b, h * w, c) @ weight.astype(x.dtype) + bias.astype(x.dtype)
        q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, h * w, n, d).transpose(0, 2, 1, 3)
                   .reshape(b * n, h * w, d) for i in range(3))
        logits = jnp.einsum('bqd,bkd->bqk', q * (1 / math.sqrt(d)), k)
        p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        a = jnp.einsum('bqk,bkd->bqd', p, v)
        return a.reshape(b, n, h * w, d).transpose(0, 2, 1, 3).reshape(b, h, w, c)


def run_block(block: UNetBlock, x, emb, key=None, *, remat: bool = False):
    """block(x, emb, key=key); with `remat`, its activations are recomputed in the backward pass
    instead of stored (jax.checkpoint: less memory, one more forward of the block)."""
    if not remat:
        return block(x, emb, key=key)
    return nnx.remat(lambda block, x, emb, key: block(x, emb, key=key))(block, x, emb, key)


class Buffer(nnx.Variable):
    """A fixed (non-trainable) array stored with the module, e.g. Fourier frequencies."""


class PositionalEmbedding(nnx.Module):
    """Sinusoidal embedding of the noise label (DDPM++; EDM with endpoint=True):
    freqs_i = (1/max_positions)^(i / (C/2 - 1)), emb = [sin(t freqs), cos(t freqs)]."""

    def __init__(self, num_channels: int, *, max_positions: int = 10000, endpoint: bool = True):
        if num_channels % 2 or num_channels < 4:
            raise ValueError(f'PositionalEmbedding needs an even number of channels >= 4; got {num_channels}.')
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def __call__(self, t):
        half = self.num_channels // 2
        i = jnp.arange(half, dtype=jnp.float32) / (half - (1 if self.endpoint else 0))
        arg = t[:, None] * (1. / self.max_positions) ** i
        return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


class FourierEmbedding(nnx.Module):
    """Random Fourier features of the noise label (NCSN++): freqs ~ N(0, scale^2), fixed;
    emb = [sin(2 pi t freqs), cos(2 pi t freqs)]."""

    def __init__(self, num_channels: int, *, scale: float = 16., rngs: nnx.Rngs):
        if num_channels % 2:
            raise ValueError(f'FourierEmbedding needs an even number of channels; got {num_channels}.')
        # kaiming_normal with fan_in 1 is a unit normal: freqs ~ N(0, scale^2).
        self.freqs = Buffer(weight_init(rngs.params(), (num_channels // 2,), 'kaiming_normal', 1, 1, scale))

    def __call__(self, t):
        arg = t[:, None] * (2 * np.pi * self.freqs[...])
        return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


EMBEDDINGS = ('positional', 'fourier')


def noise_embedding(embedding_type: str, num_channels: int, *, rngs: nnx.Rngs):
    """'positional' (DDPM++) or 'fourier' (NCSN++) embedding of the noise label."""
    if embedding_type == 'positional':
        return PositionalEmbedding(num_channels)
    if embedding_type == 'fourier':
        return FourierEmbedding(num_channels, rngs=rngs)
    raise ValueError(f'Unknown embedding_type {embedding_type!r}; valid: {", ".join(EMBEDDINGS)}.')
