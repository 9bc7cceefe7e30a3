"""The U-Net's fast formulations (matmul GroupNorm statistics, cotangent barrier, 3-D attention)
give the outputs and gradients of the straightforward formulation written here from the
definitions: textbook group normalisation, softmax attention per head, no barrier."""
import math

import jax
import jax.numpy as jnp
import numpy as np
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


def test_network_matches_straightforward_formulation(monkeypatch):
    net = randomize(SongUNet(8, 3, 3, label_dim=4, rngs=nnx.Rngs(0), **TINY))
    net.dec['8x8_in0'].num_heads = 2     # one two-head attention block, the others one head
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 3))
    t = jnp.array([-1.0, 0.3, 2.0])
    labels = jax.nn.one_hot(jnp.array([0, 3, 1]), 4)
    out, grads = outputs_and_grads(net, x, t, labels)
    with monkeypatch.context() as m:
        straightforward(m)
        ref_out, ref_grads = outputs_and_grads(net, x, t, labels)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5 * float(jnp.abs(ref_out).max()))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()) + 1e-7)


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
