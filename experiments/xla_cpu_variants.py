"""Formulations of the U-Net layers tried for XLA:CPU speed, kept as benchmark variants.

Each variant is the library's current code with some layers swapped for another formulation
(patched only while a function is traced) and/or XLA compile options. All give the same outputs
and gradients to float tolerance; `experiments/bench_distill.py --variants ...` times them side by
side in one process. The effect measured for each (this 2-core shared CPU, batch 16, the
benchmark network (EDM DDPM++ 32 ch), ratios of process CPU time to 'current' unless said otherwise) is in its
description.

'pre_change' is the code before this work: the group statistics reshaped and repeated
elementwise, no cotangent barrier, attention through 4-D einsums with the scale on the logits.

Ratios without a stated source were measured with `bench_distill.py --phases param_grad` (process
CPU time, 5 interleaved rounds, load average 10-13); variants without a ratio are not measured yet.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import objective
from fdistill.models import layers


def group_norm_elementwise(self, x):
    """The pre-change GroupNorm: group moments by reshape + sum, back to channels by repeat."""
    b, c = x.shape[0], x.shape[-1]
    axes = tuple(range(1, x.ndim - 1))
    n = math.prod(x.shape[1:-1]) * (c // self.groups)
    mean = x.sum(axis=axes).reshape(b, self.groups, -1).sum(-1) / n
    sq = jnp.square(x).sum(axis=axes).reshape(b, self.groups, -1).sum(-1) / n
    inv = jax.lax.rsqrt(jnp.maximum(sq - jnp.square(mean), 0.) + self.eps)
    scale = jnp.repeat(inv, c // self.groups, axis=1) * self.weight[...]
    shift = self.bias[...] - jnp.repeat(mean, c // self.groups, axis=1) * scale
    expand = (b,) + (1,) * len(axes) + (c,)
    return x * scale.reshape(expand) + shift.reshape(expand)


def _group_maps(self, x):
    """(batch, channels, spatial axes, elements per group, channels -> groups, groups ->
    channels): the membership matmuls of the matmul GroupNorm formulations."""
    b, c = x.shape[0], x.shape[-1]
    n = math.prod(x.shape[1:-1]) * (c // self.groups)
    member = jnp.asarray(np.repeat(np.eye(self.groups, dtype=np.float32), c // self.groups, axis=0))
    to_groups = lambda v: jnp.dot(v, member, precision=jax.lax.Precision.HIGHEST)
    to_channels = lambda v: jnp.dot(v, member.T, precision=jax.lax.Precision.HIGHEST)
    return b, c, tuple(range(1, x.ndim - 1)), n, to_groups, to_channels


def group_norm_matmul_per_statistic(self, x):
    """GroupNorm with one membership matmul per statistic (four per call instead of two)."""
    b, c, axes, n, to_groups, to_channels = _group_maps(self, x)
    mean = to_groups(x.sum(axis=axes)) / n
    sq = to_groups(jnp.square(x).sum(axis=axes)) / n
    inv = jax.lax.rsqrt(jnp.maximum(sq - jnp.square(mean), 0.) + self.eps)
    scale = to_channels(inv) * self.weight[...]
    shift = self.bias[...] - to_channels(mean) * scale
    expand = (b,) + (1,) * len(axes) + (c,)
    return x * scale.reshape(expand) + shift.reshape(expand)


def group_norm_batch_concat(self, x):
    """GroupNorm with its two statistics concatenated along the batch axis ([2B, C]), as before the
    statistics were stacked after it."""
    b, c, axes, n, to_groups, to_channels = _group_maps(self, x)
    xf = x.astype(jnp.float32)
    sums = jnp.concatenate([xf.sum(axis=axes), jnp.square(xf).sum(axis=axes)])
    mean, sq = jnp.split(to_groups(sums) / n, 2)
    inv = jax.lax.rsqrt(jnp.maximum(sq - jnp.square(mean), 0.) + self.eps)
    inv_c, mean_c = jnp.split(to_channels(jnp.concatenate([inv, mean])), 2)
    scale = inv_c * self.weight[...]
    shift = self.bias[...] - mean_c * scale
    expand = (b,) + (1,) * len(axes) + (c,)
    return (xf * scale.reshape(expand) + shift.reshape(expand)).astype(x.dtype)


def attention_einsum4d(self, x):
    """The pre-change attention: heads as an einsum axis, 1/sqrt(d) applied to the logits."""
    b, h, w, c = x.shape
    n, d = self.num_heads, c // self.num_heads
    weight = self.qkv.weight[...].reshape(c, n, d, 3).transpose(0, 3, 1, 2).reshape(c, 3 * c)
    bias = self.qkv.bias[...].reshape(n, d, 3).transpose(2, 0, 1).reshape(3 * c)
    qkv = (x.reshape(b, h * w, c) @ weight + bias).reshape(b, h * w, 3, n, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqnd,bknd->bnqk', q, k) / math.sqrt(d)
    a = jnp.einsum('bnqk,bknd->bqnd', jax.nn.softmax(logits, axis=-1), v)
    return a.reshape(b, h, w, c)


def attention_dot_product(self, x):
    """Attention by jax.nn.dot_product_attention (XLA implementation, [B, T, N, D] layout)."""
    b, h, w, c = x.shape
    n, d = self.num_heads, c // self.num_heads
    weight = self.qkv.weight[...].reshape(c, n, d, 3).transpose(0, 3, 1, 2).reshape(c, 3 * c)
    bias = self.qkv.bias[...].reshape(n, d, 3).transpose(2, 0, 1).reshape(3 * c)
    qkv = x.reshape(b, h * w, c) @ weight.astype(x.dtype) + bias.astype(x.dtype)
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, h * w, n, d) for i in range(3))
    a = jax.nn.dot_product_attention(q, k, v, implementation='xla')
    return a.reshape(b, h, w, c)


def attention_qkv_matmuls(self, x):
    """Attention with separate q, k, v projections (three [C, C] matmuls) and k transposed once
    ([B, D, T]), so both attention matmuls are plain row-major [T, D] x [D, T] and [T, T] x [T, D]
    (one head)."""
    b, h, w, c = x.shape
    n, d = self.num_heads, c // self.num_heads
    weight = self.qkv.weight[...].reshape(c, n, d, 3)
    bias = self.qkv.bias[...].reshape(n, d, 3)
    xs = x.reshape(b, h * w, c)
    proj = lambda j: xs @ weight[..., j].reshape(c, c) + bias[..., j].reshape(c)
    q, k, v = (proj(j).reshape(b, h * w, n, d).transpose(0, 2, 1, 3).reshape(b * n, h * w, d)
               for j in range(3))
    logits = jnp.matmul(q * (1 / math.sqrt(d)), k.transpose(0, 2, 1))
    a = jnp.matmul(jax.nn.softmax(logits, axis=-1), v)
    return a.reshape(b, n, h * w, d).transpose(0, 2, 1, 3).reshape(b, h, w, c)


def _backward_only(materialize: Callable) -> Callable:
    @jax.custom_vjp
    def barrier(x):
        return x

    barrier.defvjp(lambda x: (x, None), lambda _, g: (materialize(g),))
    return barrier


def _cond_copy(x):
    """A copy through a conditional on a run-time predicate (both branches give x)."""
    return jax.lax.cond(jnp.isnan(x.reshape(-1)[0]), lambda v: v * 1., lambda v: v, x)


def _forward_and_backward(materialize: Callable) -> Callable:
    @jax.custom_vjp
    def barrier(x):
        return materialize(x)

    barrier.defvjp(lambda x: (materialize(x), None), lambda _, g: (materialize(g),))
    return barrier


def _conv_with_weight_gradient(weight_gradient: Callable) -> Callable:
    """layers.conv2d with its weight gradient computed by `weight_gradient(x, dy, pad, k)`."""
    @jax.custom_vjp
    def conv(x, w, pad):
        return _lax_conv(x, w, pad)

    def fwd(x, w, pad):
        return _lax_conv(x, w, pad), (x, w, pad)

    def bwd(res, dy):
        x, w, pad = res
        _, vjp_x = jax.vjp(lambda x: _lax_conv(x, w, pad), x)
        return vjp_x(dy)[0], weight_gradient(x, dy, pad, w.shape[0]), None

    conv.defvjp(fwd, bwd)

    def conv2d(x, w, *, pad):
        if w.shape[:2] == (1, 1) and pad == 0:
            return x @ w[0, 0]
        return conv(x, w, pad)
    return conv2d


def _forward_only(materialize: Callable) -> Callable:
    """Identity whose forward value is `materialize(x)` and whose cotangent passes unchanged."""
    @jax.custom_vjp
    def barrier(x):
        return materialize(x)

    barrier.defvjp(lambda x: (materialize(x), None), lambda _, g: (g,))
    return barrier


def _conv_input_held(hold: Callable) -> Callable:
    """layers.conv2d with each 3x3 convolution's input passed through `hold` in the forward pass
    (the GroupNorm + SiLU output that feeds it): held as its own buffer, the weight-gradient
    layout copies would read it instead of recomputing it from the pre-norm activations."""
    base = layers.conv2d

    def conv2d(x, w, *, pad):
        if w.shape[:2] != (1, 1):
            x = hold(x)
        return base(x, w, pad=pad)
    return conv2d


def conv2d_nchw(x, w, *, pad):
    """layers.conv2d through NCHW / OIHW dimension numbers (explicit transposes around it, for XLA's
    layout assignment to absorb)."""
    if w.shape[:2] == (1, 1) and pad == 0:
        return x @ w[0, 0]
    y = jax.lax.conv_general_dilated(x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), (1, 1),
                                     ((pad, pad), (pad, pad)),
                                     dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
    return y.transpose(0, 2, 3, 1)


def _lax_conv(x, w, pad):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _shifted_windows(x, pad, k):
    b, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return [xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)]


def weight_gradient_shift_matmuls(x, dy, pad, k):
    """dW[i, j] = X_shift(i, j)^T dY: one [B*H*W, C_in]^T [B*H*W, C_out] matmul per tap."""
    c, co = x.shape[-1], dy.shape[-1]
    d = dy.reshape(-1, co)
    return jnp.stack([s.reshape(-1, c).T @ d for s in _shifted_windows(x, pad, k)]).reshape(k, k, c, co)


def weight_gradient_im2col(x, dy, pad, k):
    """dW = patches^T dY with the k*k shifted windows stacked into [B*H*W, k*k*C_in]."""
    c, co = x.shape[-1], dy.shape[-1]
    patches = jnp.stack(_shifted_windows(x, pad, k), axis=3).reshape(-1, k * k * c)
    return (patches.T @ dy.reshape(-1, co)).reshape(k, k, c, co)


def weight_gradient_kernel_larger(x, dy, pad, k):
    """dW as one convolution whose 'kernel' is the padded input (larger than its 'input', the
    output cotangent), then flipped: XLA:CPU gives YNNPACK no convolution with a kernel larger
    than its input, so the weight gradient runs on Eigen while the forward and input-gradient
    convolutions stay on YNNPACK.

    out[co, a, b, ci] = sum_{n,h,w} dy_padded[n, h + a, w + b, co] x_padded[n, h, w, ci]
                      = dW[k - 1 - a, k - 1 - b, ci, co]."""
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = jax.lax.conv_general_dilated(dy, xp, (1, 1), ((k - 1, k - 1), (k - 1, k - 1)),
                                       dimension_numbers=('CHWN', 'IHWO', 'NHWC'))
    return out[:, ::-1, ::-1, :].transpose(1, 2, 3, 0)


def weight_gradient_batch_groups(x, dy, pad, k, groups=2):
    """dW as XLA's own weight-gradient convolution split into `groups` batch groups (the input
    channels in contiguous chunks, dy repeated once per chunk along its output features): the same
    FLOPs, but XLA:CPU gives YNNPACK no convolution with batch_group_count > 1, so Eigen runs it."""
    ci, co = x.shape[-1], dy.shape[-1]
    groups = groups if ci % groups == 0 else 1    # (the RGB input layer)
    out = jax.lax.conv_general_dilated(x, jnp.tile(dy, (1, 1, 1, groups)), (1, 1),
                                       ((pad, pad), (pad, pad)),
                                       dimension_numbers=('CHWN', 'IHWO', 'NHWC'),
                                       batch_group_count=groups)        # [ci / g, k, k, g * co]
    return out.reshape(ci // groups, k, k, groups, co).transpose(1, 2, 3, 0, 4).reshape(k, k, ci, co)


@dataclasses.dataclass(frozen=True)
class Variant:
    description: str
    patches: tuple = ()                  # (object, attribute name, replacement)
    compiler_options: dict | None = None
    devices: int = 1                     # the batch split over this many (host) devices

    @contextlib.contextmanager
    def applied(self):
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in self.patches]
        try:
            for obj, name, new in self.patches:
                setattr(obj, name, new)
            yield
        finally:
            for obj, name, old in saved:
                setattr(obj, name, old)


_PRE_GN = (layers.GroupNorm, '__call__', group_norm_elementwise)
_PRE_ATTN = (layers.UNetBlock, 'attention', attention_einsum4d)
_NO_BARRIER = (layers, 'cotangent_barrier', lambda x: x)
_YNN_OFF = {'xla_cpu_experimental_ynn_fusion_type': ''}

VARIANTS = {
    'current': Variant('the library as it is'),
    'pre_change': Variant(
        'GroupNorm by reshape/repeat, no cotangent barrier, 4-D einsum attention (the code before '
        'this work). Parameter gradient 1.5-1.8x and DSM step ~1.6x the CPU time of current.',
        (_PRE_GN, _PRE_ATTN, _NO_BARRIER)),
    'old_groupnorm': Variant(
        'GroupNorm by reshape/repeat: the per-group statistics are recomputed per element inside '
        'each fused loop; parameter gradient ~1.25x.', (_PRE_GN,)),
    'groupnorm_4_matmuls': Variant(
        'GroupNorm with a membership matmul per statistic (mean, E[x^2]; inv, mean) instead of '
        'one per pair.', ((layers.GroupNorm, '__call__', group_norm_matmul_per_statistic),)),
    'no_barrier': Variant(
        'without the cotangent barrier: fused backward loops chain many blocks (~280 ops per '
        'element with the matmul GroupNorm, ~500 without); parameter gradient ~1.4x.', (_NO_BARRIER,)),
    'old_attention': Variant('4-D einsum attention, scale on the logits; attention alone ~1.3x '
                             'forward, ~1.2x backward; ~1-2% of the step.', (_PRE_ATTN,)),
    'barrier_cond': Variant(
        'cotangent barrier as a copy through a run-time conditional instead of an identity matmul '
        '(no extra FLOPs, but a data-dependent predicate); same speed as current within noise.',
        ((layers, 'cotangent_barrier', _backward_only(_cond_copy)),)),
    'barrier_optimization': Variant(
        'jax.lax.optimization_barrier on the cotangent: XLA:CPU removes it before fusion, so the '
        'program equals no_barrier.',
        ((layers, 'cotangent_barrier', _backward_only(jax.lax.optimization_barrier)),)),
    'groupnorm_output_barrier': Variant(
        'also materialise every GroupNorm output in the forward pass (so the weight-gradient '
        'layout copies stop recomputing it); no gain (1.00-1.02x).',
        ((layers.GroupNorm, '__call__',
          lambda self, x: _forward_and_backward(layers._materialize)(_GN_CALL(self, x))),)),
    'ynn_off': Variant(
        'XLA compile option xla_cpu_experimental_ynn_fusion_type="" (convolutions and matmuls '
        'by Eigen instead of YNNPACK): weight-gradient convolutions at 32x32 2.3x faster alone, '
        'but forward ones slower; parameter gradient 1.5x, forward 1.3x.', compiler_options=_YNN_OFF),
    'ynn_dot_only': Variant(
        'YNNPACK for matmuls only (convolutions by Eigen); parameter gradient 1.5x, forward 1.2x.',
        compiler_options={'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}),
    'ynn_eltwise': Variant(
        'YNNPACK also for elementwise fusions (xla_cpu_experimental_ynn_fusion_type adds '
        'LIBRARY_FUSION_TYPE_ELTWISE).', compiler_options={'xla_cpu_experimental_ynn_fusion_type': (
            'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,'
            'LIBRARY_FUSION_TYPE_ELTWISE')}),
    'ynn_dot_fusion': Variant(
        'YNNPACK matmuls fused with their elementwise neighbours (LIBRARY_FUSION_TYPE_DOT).',
        compiler_options={'xla_cpu_experimental_ynn_fusion_type': (
            'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION')}),
    'ynn_reduce': Variant(
        'YNNPACK also for reductions (LIBRARY_FUSION_TYPE_REDUCE: the GroupNorm statistics); '
        'parameter gradient 1.00x CPU time.',
        compiler_options={'xla_cpu_experimental_ynn_fusion_type': (
            'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,'
            'LIBRARY_FUSION_TYPE_REDUCE')}),
    'onednn_convolutions': Variant(
        'convolutions by oneDNN (xla_cpu_experimental_onednn_fusion_type '
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION), matmuls by YNNPACK; parameter gradient '
        '1.30x CPU time.',
        compiler_options={
            'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
            'xla_cpu_experimental_onednn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'}),
    'onednn_dots_convolutions': Variant(
        'matmuls and convolutions by oneDNN (xla_cpu_experimental_onednn_fusion_type); '
        'parameter gradient 1.32x CPU time.',
        compiler_options={
            'xla_cpu_experimental_ynn_fusion_type': '',
            'xla_cpu_experimental_onednn_fusion_type': (
                'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION')}),
    'concurrency_scheduler': Variant(
        'xla_cpu_enable_concurrency_optimized_scheduler (orders independent operations to run '
        'concurrently).', compiler_options={'xla_cpu_enable_concurrency_optimized_scheduler': True}),
    'vector_width_512': Variant('xla_cpu_prefer_vector_width=512 (AVX-512 loops).',
                                compiler_options={'xla_cpu_prefer_vector_width': 512}),
    'conv_input_cond': Variant(
        'each 3x3 convolution\'s input (the GroupNorm + SiLU output) held in the forward pass as a '
        'copy through a run-time conditional (no extra FLOPs), so the weight-gradient layout copies '
        'read it instead of recomputing it. Parameter gradient 1.01x.',
        ((layers, 'conv2d', _conv_input_held(_forward_only(_cond_copy))),)),
    'conv_input_opt_barrier': Variant(
        'each 3x3 convolution\'s input held by jax.lax.optimization_barrier in the forward pass; '
        'parameter gradient 1.08x.',
        ((layers, 'conv2d', _conv_input_held(_forward_only(jax.lax.optimization_barrier))),)),
    'conv_input_identity_matmul': Variant(
        'each 3x3 convolution\'s input held as the output of an identity matmul over channels '
        '(non-fusible on XLA:CPU; +C^2 FLOPs per pixel); parameter gradient 1.06x.',
        ((layers, 'conv2d', _conv_input_held(_forward_only(layers._materialize))),)),
    'nchw_convs': Variant(
        '3x3 convolutions through NCHW / OIHW dimension numbers, transposed around each; parameter '
        'gradient 1.02x.',
        ((layers, 'conv2d', conv2d_nchw),)),
    'xnn_eltwise': Variant(
        'XNNPACK for elementwise fusions (xla_cpu_experimental_xnn_fusion_type); parameter '
        'gradient 1.03x.',
        compiler_options={'xla_cpu_experimental_xnn_fusion_type': 'LIBRARY_FUSION_TYPE_ELTWISE'}),
    'xnn_graph_greedy': Variant(
        'xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY; parameter '
        'gradient 1.04x.',
        compiler_options={'xla_cpu_experimental_xnn_graph_fusion_mode':
                          'XNN_GRAPH_FUSION_MODE_GREEDY'}),
    'fast_runtime_preset': Variant(
        'xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME; parameter gradient 1.02x.',
        compiler_options={'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_RUNTIME'}),
    'tiling_propagation': Variant(
        'xla_cpu_experimental_enable_tiling_propagation; parameter gradient 1.16x.',
        compiler_options={'xla_cpu_experimental_enable_tiling_propagation': True}),
    'attention_dpa': Variant('attention through jax.nn.dot_product_attention (XLA implementation); '
                             'parameter gradient 1.03x, DSM step 1.06x wall.',
                             ((layers.UNetBlock, 'attention', attention_dot_product),)),
    'attention_qkv_matmuls': Variant(
        'attention with separate q, k, v projections and k transposed once; parameter gradient '
        '1.04x, DSM step 1.11x wall.',
        ((layers.UNetBlock, 'attention', attention_qkv_matmuls),)),
    'teacher_batched': Variant(
        'the critic iteration runs the teacher once over its fake and real inputs stacked along '
        'the batch (batch 32) instead of once per input; only the distillation iterations change. '
        'One device, 3 rounds: critic 0.94x wall, 0.99x CPU; student 1.01x (same GFLOP): within '
        'noise, and on several devices its concatenation along the batch moves activations.',
        ((objective, 'BATCH_TEACHER_FEATURES', True),)),
    'dw_shift_matmuls': Variant(
        'weight gradient of each 3x3 convolution as 9 shifted [BHW, Cin]^T [BHW, Cout] matmuls; '
        'alone 1.3-2.4x slower than XLA\'s own.',
        ((layers, 'conv2d', _conv_with_weight_gradient(weight_gradient_shift_matmuls)),)),
    'dw_eigen': Variant(
        'weight gradient of each 3x3 convolution as one convolution with the padded input as its '
        '(larger) kernel, which XLA:CPU keeps off YNNPACK (Eigen runs it); forward and input '
        'gradient convolutions unchanged. Two 3x3 convs + SiLU, batch 16, parameter gradient: '
        '22-70x the CPU time of current (Eigen with a kernel as large as the image is slow).',
        ((layers, 'conv2d', _conv_with_weight_gradient(weight_gradient_kernel_larger)),)),
    'dw_batch_groups': Variant(
        'weight gradient of each 3x3 convolution as XLA\'s own with batch_group_count 2 (Eigen '
        'instead of YNNPACK for it); forward and input gradient unchanged. Two 3x3 convs + SiLU, '
        'batch 16, parameter gradient: 6-17x the CPU time of current (two runs).',
        ((layers, 'conv2d', _conv_with_weight_gradient(weight_gradient_batch_groups)),)),
    'dw_im2col': Variant(
        'weight gradient as one im2col matmul; alone 1.8-4.4x slower than XLA\'s own (building the '
        'patches costs more than the matmul saves).',
        ((layers, 'conv2d', _conv_with_weight_gradient(weight_gradient_im2col)),)),
    'data_parallel_2': Variant(
        'the batch split over 2 host CPU devices (jax_num_cpu_devices=2, what --cpu_devices=2 '
        'does; each device program on its own thread, parameters replicated, gradients summed '
        'by an all-reduce). Wall time against current (one device), 3 rounds with the FastGen '
        'reference: forward 0.75x, input gradient 0.65x, parameter gradient 0.71x, DSM step '
        '0.77x, student 0.68x, critic 0.69x, 1 + 4 cycle 0.69x (parameter gradient 0.99x and '
        'DSM step 1.05x FastGen\'s); before GroupNorm stopped concatenating along the batch: '
        'parameter gradient 0.82-0.93x, DSM step 0.82-0.91x, cycle 0.91x.', devices=2),
    'groupnorm_batch_concat': Variant(
        'GroupNorm statistics concatenated along the batch axis ([2B, C], the formulation before '
        'they were stacked after it); one device: parameter gradient 1.05x, DSM step 1.07x wall '
        '(noise).', ((layers.GroupNorm, '__call__', group_norm_batch_concat),)),
    'data_parallel_2_batch_concat': Variant(
        'data_parallel_2 with the GroupNorm statistics concatenated along the (sharded) batch '
        'axis: XLA moves them between the devices (612 all-to-alls, 408 collective permutes in '
        'the parameter gradient) and the two device programs run in lockstep; parameter gradient '
        '1.02x, DSM step 1.07x the wall time of current on one device.',
        ((layers.GroupNorm, '__call__', group_norm_batch_concat),), devices=2),
    'data_parallel_2_eigen_1': Variant(
        'data_parallel_2 with xla_cpu_multi_thread_eigen off (each device program runs its '
        'operations on its own thread only): parameter gradient 0.64x, DSM step 0.69x wall '
        '(data_parallel_2 0.66x, 0.73x in the same run, load ~8); before the GroupNorm change '
        '0.85x, 0.90x (as data_parallel_2 then).', devices=2,
        compiler_options={'xla_cpu_multi_thread_eigen': False}),
    'data_parallel_2_concurrency': Variant(
        'data_parallel_2 with xla_cpu_enable_concurrency_optimized_scheduler; before the '
        'GroupNorm change: parameter gradient 0.94x, DSM step 0.90x (as data_parallel_2 then).',
        devices=2,
        compiler_options={'xla_cpu_enable_concurrency_optimized_scheduler': True}),
    'data_parallel_4': Variant(
        'the batch split over 4 host CPU devices (two per core): parameter gradient 0.62x, DSM '
        'step 0.72x wall (data_parallel_2 0.66x, 0.73x in the same run, load ~8); before the '
        'GroupNorm change 1.00x (parameter gradient, 7 rounds).',
        devices=4),
    'fusion_emitters_off': Variant(
        'xla_cpu_use_fusion_emitters off (the older loop emitter); parameter gradient 1.03x '
        'wall, 1.10x CPU.', compiler_options={'xla_cpu_use_fusion_emitters': False}),
    'copy_insertion_region_analysis': Variant(
        'xla_cpu_copy_insertion_use_region_analysis; parameter gradient 0.96x wall, 0.99x CPU '
        '(same GFLOP and buffers: noise).',
        compiler_options={'xla_cpu_copy_insertion_use_region_analysis': True}),
    'use_xnnpack': Variant('xla_cpu_use_xnnpack; parameter gradient 1.01x wall, 1.03x CPU.',
                           compiler_options={'xla_cpu_use_xnnpack': True}),
    'codegen_split_8': Variant(
        'xla_cpu_parallel_codegen_split_count=8 (how the LLVM module is split for compiling); '
        'parameter gradient 0.98x wall, 1.01x CPU.',
        compiler_options={'xla_cpu_parallel_codegen_split_count': 8}),
    'fast_math': Variant(
        'xla_cpu_enable_fast_math (reassociation, approximate functions); parameter gradient '
        '0.99x wall, 1.02x CPU.', compiler_options={'xla_cpu_enable_fast_math': True}),
}

_GN_CALL = layers.GroupNorm.__call__


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f'Unknown variant {name!r}; valid: {", ".join(VARIANTS)}.')
    return VARIANTS[name]
