"""The U-Net's speed options change nothing but speed and memory: the fast formulations (matmul
GroupNorm statistics, cotangent barrier, 3-D attention) give the outputs and gradients of the
straightforward formulation written here from the definitions (textbook group normalisation,
softmax attention per head, no barrier); rematerialisation gives exactly the same numbers; bfloat16
compute stays within bfloat16 rounding of float32 with float32 parameters, outputs and gradients."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdistill.models import SongUNet, layers

TINY = dict(model_channels=16, channel_mult=(1,), num_blocks=1, attn_resolutions=(8,), dropout=0.)


def textbook_group_norm(self, x):
    """(x - mean) / sqrt(var + eps) per (sample, group) over space and the group's channels."""
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, self.groups, c // self.groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
    y = ((g - mean) / jnp.sqrt(var + self.eps)).reshape(x.shape)
    return y * self.weight[...] + self.bias[...]


def textbook_attention(self, x):
    """softmax(q k^T / sqrt(d)) v for each head, with EDM's qkv channel layout (h * d + c) * 3 + j."""
    b, h, w, c = x.shape
    n, d = self.num_heads, c // self.num_heads
    qkv = (x.reshape(b, h * w, c) @ self.qkv.weight[...].reshape(c, 3 * c) + self.qkv.bias[...])
    qkv = qkv.reshape(b, h * w, n, d, 3)
    heads = []
    for i in range(n):
        q, k, v = qkv[:, :, i, :, 0], qkv[:, :, i, :, 1], qkv[:, :, i, :, 2]
        logits = jnp.einsum('bqd,bkd->bqk', q, k) / math.sqrt(d)
        heads.append(jnp.einsum('bqk,bkd->bqd', jax.nn.softmax(logits, axis=-1), v))
    return jnp.concatenate(heads, axis=-1).reshape(b, h, w, c)


def straightforward(monkeypatch):
    monkeypatch.setattr(layers.GroupNorm, '__call__', textbook_group_norm)
    monkeypatch.setattr(layers.UNetBlock, 'attention', textbook_attention)
    monkeypatch.setattr(layers, 'cotangent_barrier', lambda x: x)


def outputs_and_grads(net, x, t, labels):
    """The network's output and the gradients of a scalar of it (and of its features) with respect
    to the parameters and the input, in one compiled program."""
    graphdef, params = nnx.split(net)

    def loss(params, x):
        out, feats = nnx.merge(graphdef, params)(x, t, labels, return_features=True)
        return jnp.sum(out * jnp.cos(out)) + sum(jnp.sum(f ** 2) for f in feats.values()) * 1e-3, out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return out, grads


def randomize(net, seed=1):
    """Non-trivial values in every parameter (zero-initialised output layers would hide errors)."""
    graphdef, params = nnx.split(net)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


@pytest.fixture(scope='module')
def tiny():
    """A small SongUNet with random parameters (one two-head attention block), inputs, and its
    outputs and gradients as the library computes them."""
    net = randomize(SongUNet(8, 3, 3, label_dim=4, rngs=nnx.Rngs(0), **TINY))
    net.dec['8x8_in0'].num_heads = 2
    inputs = (jax.random.normal(jax.random.key(2), (3, 8, 8, 3)), jnp.array([-1.0, 0.3, 2.0]),
              jax.nn.one_hot(jnp.array([0, 3, 1]), 4))
    return net, inputs, outputs_and_grads(net, *inputs)


def test_network_matches_straightforward_formulation(monkeypatch, tiny):
    net, inputs, (out, grads) = tiny
    with monkeypatch.context() as m:
        straightforward(m)
        ref_out, ref_grads = outputs_and_grads(net, *inputs)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5 * float(jnp.abs(ref_out).max()))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()) + 1e-7)


def test_remat_gives_the_same_outputs_and_gradients(tiny):
    net, inputs, (out, grads) = tiny
    remat = nnx.clone(net)
    remat.remat = True
    graphdef, params = nnx.split(remat)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(*inputs))))(params))
    assert 'checkpoint' in jaxpr or 'remat' in jaxpr
    r_out, r_grads = outputs_and_grads(remat, *inputs)
    np.testing.assert_array_equal(r_out, out)
    # The recomputed forward is fused differently inside the backward pass, so gradients agree to
    # float32 rounding (summation order), not bit for bit.
    for g, r in zip(jax.tree.leaves(r_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()))


def test_bfloat16_compute_is_close_to_float32(tiny):
    net, inputs, (out, grads) = tiny
    half = nnx.clone(net)
    half.compute_dtype = 'bfloat16'
    h_out, h_grads = outputs_and_grads(half, *inputs)
    assert h_out.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(half, nnx.Param)))
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per operation); through this deep
    # random network that leaves ~1% on the output and ~2% on the gradient (the float32 programs
    # differ by ~1e-6), and it must not be zero (the blocks really ran in bfloat16).
    err = float(jnp.abs(h_out - out).max()) / float(jnp.abs(out).max())
    assert 1e-4 < err < 0.03
    flat = lambda t: jnp.concatenate([v.ravel() for v in jax.tree.leaves(t)])
    g, r = flat(h_grads), flat(grads)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(h_grads))
    assert 1e-4 < float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) < 0.05
    assert float(g @ r / (jnp.linalg.norm(g) * jnp.linalg.norm(r))) > 0.999


def test_unknown_compute_dtype_lists_valid_ones():
    with pytest.raises(ValueError, match='float32, bfloat16'):
        SongUNet(8, 3, 3, compute_dtype='float16', rngs=nnx.Rngs(0), **TINY)


def test_group_norm_gradient_matches_textbook():
    gn = layers.GroupNorm(24, eps=1e-6)
    gn.weight[...] = jnp.linspace(0.5, 1.5, 24)
    gn.bias[...] = jnp.linspace(-1., 1., 24)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 24)) * 2 + 0.5
    w = jax.random.normal(jax.random.key(1), x.shape)
    f = lambda call: jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(call(gn, x)) * w)))(x)
    np.testing.assert_allclose(f(layers.GroupNorm.__call__), f(textbook_group_norm), rtol=1e-4, atol=1e-5)


def test_cotangent_barrier_is_the_identity_both_ways():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    f = lambda x: jnp.sum(jnp.sin(x) * x)
    barrier = jax.jit(lambda x: layers.cotangent_barrier(x))
    np.testing.assert_array_equal(barrier(x), x)
    np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: f(layers.cotangent_barrier(x))))(x),
                                  jax.jit(jax.grad(f))(x))


SHARDED_GRADIENT = r"""
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, '.')
from fdistill.models import SongUNet

net = SongUNet(8, 3, 3, label_dim=4, rngs=nnx.Rngs(0), model_channels=16, channel_mult=(1,),
               num_blocks=1, attn_resolutions=(8,), dropout=0.)
graphdef, params = nnx.split(net)
mesh = Mesh(np.asarray(jax.devices()), ('data',))
batch = NamedSharding(mesh, P('data'))
x = jax.device_put(jnp.ones((4, 8, 8, 3)), batch)
t = jax.device_put(jnp.ones((4,)), batch)
labels = jax.device_put(jnp.ones((4, 4)), batch)
loss = lambda p, x, t, y: jnp.sum(nnx.merge(graphdef, p)(x, t, y) ** 2)
hlo = jax.jit(jax.grad(loss)).lower(params, x, t, labels).compile().as_text()
ops = ('all-to-all', 'collective-permute', 'all-gather', 'all-reduce')
print('RESULT' + json.dumps({op: len(re.findall(r' ' + op + r'(-start)?\(', hlo)) for op in ops}))
"""


def test_a_sharded_batch_stays_on_its_devices():
    """With the batch split over 2 devices, the parameter gradient's only collectives are the
    gradient all-reduces: no layer (GroupNorm's statistics, attention) moves activations between
    devices."""
    from tests.tiny import run_on_fake_devices
    counts = run_on_fake_devices(SHARDED_GRADIENT, devices=2)
    assert counts['all-to-all'] == counts['collective-permute'] == counts['all-gather'] == 0, counts
    assert counts['all-reduce'] >= 1, counts
