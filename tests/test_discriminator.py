"""Discriminator heads over encoder features."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdistill.models import MLP, Denoiser, Discriminator, SongUNet, feature_channels
from fdistill import sde


def n_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# Reference heads in float64 numpy, written from the layer definitions (convolution by explicit
# patch sums, GroupNorm by grouped moments), reading only the modules' parameters.

def _np(p):
    return np.asarray(p[...], np.float64)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _conv(x, conv):
    """NHWC x HWIO convolution with zero padding and stride, plus bias."""
    w, p, s = _np(conv.weight), conv.padding, conv.stride
    x = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    k = w.shape[0]
    size = (x.shape[1] - k) // s + 1
    out = np.zeros((x.shape[0], size, size, w.shape[-1]))
    for i in range(k):
        for j in range(k):
            out += np.einsum("bhwc,co->bhwo", x[:, i:i + s * size:s, j:j + s * size:s], w[i, j])
    return out + _np(conv.bias)


def _group_norm(x, norm):
    """Moments over space and the channels of each group (consecutive channels)."""
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, norm.groups, c // norm.groups)
    y = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True)
                                                           + norm.eps)
    return y.reshape(x.shape) * _np(norm.weight) + _np(norm.bias)


def _conv_head(head, h):
    h = np.asarray(h, np.float64)
    for conv, norm in zip(head.convs, head.norms):
        h = _silu(_group_norm(_conv(h, conv), norm))
    return _conv(h, head.out).mean(axis=(1, 2))[:, 0]


def _mlp_head(head, h):
    linear = lambda layer, x: x @ _np(layer.weight) + _np(layer.bias)
    h = _silu(linear(head.fc1, _silu(linear(head.fc0, np.asarray(h, np.float64)))))
    logits = linear(head.out, h)[..., 0]
    return logits.reshape(len(logits), -1).mean(axis=1)


def test_benchmark_head_has_fastgen_parameter_count():
    # One head on the 16x16x64 bottleneck: three 4x4 convs (16 -> 8 -> 4 -> 1) with GroupNorm(32) +
    # SiLU, then a 1x1 conv to one logit: 3 * (16*64*64 + 64 + 2*64) + 64 + 1 = 197,249.
    disc = Discriminator({32: 32, 16: 64}, [16], rngs=nnx.Rngs(0))
    assert n_params(disc) == 197_249
    head = disc.heads[0]
    assert len(head.convs) == 3 and [n.groups for n in head.norms] == [32, 32, 32]
    graphdef, state = nnx.split(disc)
    logits = jax.jit(lambda state, f: nnx.merge(graphdef, state)({16: f}))(
        state, jax.random.normal(jax.random.key(0), (3, 16, 16, 64)))
    assert logits.shape == (3, 1) and bool(jnp.all(jnp.isfinite(logits)))
    f = jax.random.normal(jax.random.key(0), (3, 16, 16, 64))
    np.testing.assert_allclose(logits[:, 0], _conv_head(head, f), rtol=1e-4, atol=1e-5)


def test_heads_are_per_sample_and_per_resolution():
    disc = Discriminator({8: 16, 4: 32}, [8, 4], rngs=nnx.Rngs(0))
    f8 = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
    f4 = jax.random.normal(jax.random.key(2), (2, 4, 4, 32))
    graphdef, state = nnx.split(disc)
    run = jax.jit(lambda state, f8, f4: nnx.merge(graphdef, state)({8: f8, 4: f4}))
    logits = run(state, f8, f4)
    assert logits.shape == (2, 2)
    np.testing.assert_allclose(logits, np.stack([_conv_head(disc.heads[0], f8),
                                                 _conv_head(disc.heads[1], f4)], axis=-1),
                               rtol=1e-4, atol=1e-5)
    # Changing sample 1's 4x4 feature changes only that sample's 4x4 head logit.
    other = run(state, f8, f4.at[1].set(-f4[1]))
    np.testing.assert_allclose(other[:, 0], logits[:, 0], rtol=1e-6)
    np.testing.assert_allclose(other[0, 1], logits[0, 1], rtol=1e-6)
    assert abs(float(other[1, 1] - logits[1, 1])) > 1e-6
    # Gradients reach every parameter of both heads.
    grads = jax.jit(jax.grad(lambda state: run(state, f8, f4).sum()))(state)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_mlp_head_on_toy_features_via_denoiser():
    den = Denoiser(MLP(2, hidden=16, depth=2, rngs=nnx.Rngs(0)), sde.EDM())
    disc = Discriminator(feature_channels(den), [0], rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(3), (5, 2))
    _, feats = den(x, jnp.full((5,), 0.7), return_features=True)
    assert feats[0].shape == (5, 16)
    logits = disc(feats)
    assert logits.shape == (5, 1)
    np.testing.assert_allclose(logits[:, 0], _mlp_head(disc.heads[0], feats[0]), rtol=1e-5,
                               atol=1e-6)
    # A hidden state per position ([B, T, H], the video network's frames): the mean over
    # positions of the per-position logits.
    frames = jnp.stack([feats[0], 2.0 * feats[0], -feats[0]], axis=1)
    per_frame = [_mlp_head(disc.heads[0], frames[:, t]) for t in range(3)]
    np.testing.assert_allclose(disc({0: frames})[:, 0], np.mean(per_frame, axis=0), rtol=1e-5,
                               atol=1e-6)


def test_feature_channels_of_a_unet_match_its_features():
    net = SongUNet(8, 3, 3, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                   dropout=0., rngs=nnx.Rngs(0))
    chans = feature_channels(net)
    shapes = jax.eval_shape(lambda: net(jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,)), return_features=True)[1])
    assert {r: s.shape[-1] for r, s in shapes.items()} == chans == {8: 16, 4: 32}
    disc = Discriminator(chans, [8, 4], rngs=nnx.Rngs(0))
    assert jax.eval_shape(disc, shapes).shape == (2, 2)


def test_errors():
    with pytest.raises(ValueError, match='not among the feature resolutions'):
        Discriminator({16: 64}, [8], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match='power-of-two'):
        Discriminator({6: 64}, [6], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match='feature_channels'):
        feature_channels(object())
    disc = Discriminator({4: 8}, [4], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match='lack resolutions'):
        disc({8: jnp.zeros((1, 8, 8, 8))})
