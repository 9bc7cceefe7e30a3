"""Networks: EDM SongUNet parity (parameter counts, layouts, resampling), interface, errors, MLP."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fdistill.models import DDPMpp, MLP, NCSNpp, SongUNet, get_network
from fdistill.models import layers

TINY = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.)


def n_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def abstract_count(make) -> int:
    return n_params(nnx.eval_shape(make))


def ref_songunet_params(img, c, label_dim, mc, mult, emb_mult, nb, attn, noise_mult, enc, dec):
    """Parameter count of EDM's SongUNet read off its layer list (independent of our modules):
    conv k: k*k*ci*co + co, linear: ci*co + co, GroupNorm: 2C; 1x1 skip convs when channels or
    resolution change; attention adds GN + qkv + proj; augment layer omitted."""
    conv = lambda ci, co, k: k * k * ci * co + co
    lin = lambda ci, co: ci * co + co
    E, N = mc * emb_mult, mc * noise_mult

    def block(ci, co, att, resample=False):
        n = 2 * ci + conv(ci, co, 3) + lin(E, co) + 2 * co + conv(co, co, 3)
        n += conv(ci, co, 1) if ci != co or resample else 0
        return n + (2 * co + conv(co, 3 * co, 1) + conv(co, co, 1) if att else 0)

    total = (lin(label_dim, N) if label_dim else 0) + lin(N, E) + lin(E, E)
    skips, cout, caux = [], c, c
    for lvl, m in enumerate(mult):
        res = img >> lvl
        if lvl == 0:
            total, cout = total + conv(c, mc, 3), mc
        else:
            total += block(cout, cout, False, True)
            total += conv(caux, cout, 1) if enc == 'skip' else 0
            if enc == 'residual':
                total, caux = total + conv(caux, cout, 3), cout
        skips.append(cout)
        for _ in range(nb):
            total, cout = total + block(cout, mc * m, res in attn), mc * m
            skips.append(cout)
    for lvl in reversed(range(len(mult))):
        res = img >> lvl
        total += (block(cout, cout, True) + block(cout, cout, False) if lvl == len(mult) - 1
                  else block(cout, cout, False, True))
        for i in range(nb + 1):
            ci = cout + skips.pop()
            total, cout = total + block(ci, mc * mult[lvl], i == nb and res in attn), mc * mult[lvl]
        if dec == 'skip' or lvl == 0:
            total += 2 * cout + conv(cout, c, 3)
    return total


def benchmark_config():
    c = ml_collections.ConfigDict()
    c.data = dict(image_size=32, num_channels=3, num_classes=10, dim=0)
    c.model = dict(name='ddpmpp', precond='edm', model_channels=32, channel_mult=(1, 2), num_blocks=4,
                   attn_resolutions=(16,), dropout=0., embedding_type='positional', channel_mult_noise=1,
                   channel_mult_emb=4, resample_filter=(1, 1), encoder_type='standard',
                   decoder_type='standard')
    return c


def randomize(module, seed, scale=0.3):
    """Replace every parameter by N(0, scale^2) so near-zero-initialised layers have an effect."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(
        lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), state))
    return module


def jitted(module, **static):
    graphdef, state = nnx.split(module)

    @jax.jit
    def f(state, x, noise, labels=None, key=None):
        return nnx.merge(graphdef, state)(x, noise, labels, key=key, **static)
    return lambda *a, **k: f(state, *a, **k)


def test_benchmark_ddpmpp_matches_edm_parameter_count():
    net = get_network(benchmark_config(), rngs=nnx.Rngs(0))
    assert isinstance(net, SongUNet)
    assert n_params(net) == 1_601_091
    assert ref_songunet_params(32, 3, 10, 32, (1, 2), 4, 4, (16,), 1, 'standard', 'standard') == 1_601_091
    assert net.feature_channels == {32: 32, 16: 64}


def test_edm_cifar10_parameter_counts():
    # EDM's published CIFAR-10 nets also carry map_augment (augment_dim 9, no bias): 9 * 128 more
    # parameters for DDPM++ (55,733,891 in EDM's snapshot), 9 * 256 for NCSN++.
    ddpmpp = abstract_count(lambda: DDPMpp(32, 3, 3, rngs=nnx.Rngs(0)))
    assert ddpmpp == 55_733_891 - 9 * 128 == 55_732_739
    assert ddpmpp == ref_songunet_params(32, 3, 0, 128, (2, 2, 2), 4, 4, (16,), 1, 'standard', 'standard')
    ncsnpp = abstract_count(lambda: NCSNpp(32, 3, 3, rngs=nnx.Rngs(0)))
    assert ncsnpp == ref_songunet_params(32, 3, 0, 128, (2, 2, 2), 4, 4, (16,), 2, 'residual', 'standard')
    assert ncsnpp == 56_395_523


@pytest.mark.parametrize('enc,dec', [('skip', 'skip'), ('residual', 'skip')])
def test_progressive_variants_parameter_counts(enc, dec):
    kw = dict(TINY, channel_mult=(1, 2, 2))
    n = abstract_count(lambda: SongUNet(16, 3, 3, label_dim=2, encoder_type=enc, decoder_type=dec,
                                        rngs=nnx.Rngs(0), **kw))
    assert n == ref_songunet_params(16, 3, 2, 16, (1, 2, 2), 4, 1, (4,), 1, enc, dec)


@pytest.mark.parametrize('cls,kw', [
    (NCSNpp, {}),
    (SongUNet, dict(encoder_type='skip', decoder_type='skip', resample_filter=(1, 3, 3, 1))),
])
def test_forward_shapes_features_and_zero_init_output(cls, kw):
    net = cls(8, 3, 3, label_dim=3, rngs=nnx.Rngs(0), **(TINY | kw))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    y = jax.nn.one_hot(jnp.array([0, 2]), 3)
    out, feats = jitted(net, return_features=True)(x, jnp.array([-1., 0.5]), y)
    assert out.shape == x.shape
    assert net.feature_channels == {8: 16, 4: 32}
    assert {r: f.shape for r, f in feats.items()} == {8: (2, 8, 8, 16), 4: (2, 4, 4, 32)}
    # EDM's init: the output conv is xavier * 1e-5, so the untrained net outputs ~0.
    assert 0 < float(jnp.abs(out).max()) < 1e-3


def test_ddpmpp_features_dropout_and_class_conditioning():
    net = randomize(SongUNet(8, 3, 3, label_dim=3, rngs=nnx.Rngs(0), **(TINY | dict(dropout=0.5))), 3)
    graphdef, state = nnx.split(net)
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, 8, 8, 3)), (2, 8, 8, 3))
    noise = jnp.array([0.3, 0.3])
    y = jax.nn.one_hot(jnp.array([0, 1]), 3)

    @jax.jit
    def run(state, key=None):
        return nnx.merge(graphdef, state)(x, noise, y, key=key, return_features=True)

    @jax.jit
    def encoder(state):
        net = nnx.merge(graphdef, state)
        emb = net.embed(noise, y)
        h8 = net.enc['8x8_block0'](net.enc['8x8_conv'](x), emb)
        return h8, net.enc['4x4_block0'](net.enc['4x4_down'](h8, emb), emb)

    out, feats = run(state)
    h8, h4 = encoder(state)
    np.testing.assert_allclose(feats[8], h8, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats[4], h4, rtol=1e-5, atol=1e-5)
    # Same image and noise, different one-hot labels: different outputs.
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3
    # Dropout is off without a key (deterministic), on with one.
    np.testing.assert_array_equal(out, run(state)[0])
    k1, k2 = jax.random.split(jax.random.key(7))
    d1 = run(state, k1)[0]
    np.testing.assert_array_equal(d1, run(state, k1)[0])
    assert float(jnp.abs(d1 - out).max()) > 1e-3
    assert float(jnp.abs(d1 - run(state, k2)[0]).max()) > 1e-3
    # None is the all-zeros null label.
    np.testing.assert_allclose(net.embed(noise, None), net.embed(noise, jnp.zeros((2, 3))), atol=1e-6)


@pytest.mark.parametrize('filt', [(1, 1), (1, 3, 3, 1)])
def test_resampling_up_is_four_times_the_adjoint_of_down(filt):
    # EDM: down = conv(f f^T / s^2, stride 2), up = conv_transpose(4 f f^T / s^2, stride 2).
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 8, 8, 3))
    y = jax.random.normal(ky, (2, 4, 4, 3))
    down, up = layers.downsample(x, filt), layers.upsample(y, filt)
    assert down.shape == y.shape and up.shape == x.shape
    np.testing.assert_allclose(jnp.vdot(up, x), 4 * jnp.vdot(y, down), rtol=1e-5)


def test_box_filter_fast_paths_equal_the_general_filter():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    k = layers._resample_kernel((1, 1))
    np.testing.assert_allclose(layers.downsample(x, (1, 1)), layers._depthwise(x, k, stride=2, pad=0),
                               atol=1e-6)
    np.testing.assert_allclose(layers.upsample(x, (1, 1)),
                               layers._depthwise(x, 4 * k, stride=1, pad=1, lhs_dilation=2), atol=1e-6)
    # [1, 3, 3, 1] preserves a constant away from the zero-padded border.
    c = layers.downsample(jnp.ones((1, 8, 8, 1)), (1, 3, 3, 1))
    np.testing.assert_allclose(c[0, 1:-1, 1:-1, 0], 1., rtol=1e-6)


def test_fused_residual_downsample_matches_conv_then_filter():
    conv = layers.Conv2d(2, 4, 3, down=True, fused_resample=True, resample_filter=(1, 3, 3, 1),
                         init_bias=0., rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 2))
    w = conv.weight[...]
    full = jax.lax.conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    f = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.
    ref = np.zeros((1, 4, 4, 4))
    full = np.asarray(full)
    for i in range(4):
        for j in range(4):
            ref[0, i, j] = np.einsum('hwc,hw->c', full[0, 2 * i:2 * i + 4, 2 * j:2 * j + 4], f)
    np.testing.assert_allclose(conv(x), ref, rtol=1e-5, atol=1e-5)


def test_attention_matches_edm_channel_layout():
    # EDM reshapes qkv [N, 3C, H, W] to [N * heads, C / heads, 3, HW]: channel (h * d + c) * 3 + j.
    block = randomize(layers.UNetBlock(8, 8, 4, attention=True, num_heads=2, rngs=nnx.Rngs(0)), 2)
    x = jax.random.normal(jax.random.key(1), (1, 2, 2, 8))
    qkv = np.asarray(block.qkv(x)).reshape(4, 24)
    out = np.zeros((4, 8))
    for h in range(2):
        idx = lambda j: [(h * 4 + c) * 3 + j for c in range(4)]
        q, k, v = qkv[:, idx(0)], qkv[:, idx(1)], qkv[:, idx(2)]
        logits = q @ k.T / 2.
        w = np.exp(logits - logits.max(1, keepdims=True))
        out[:, h * 4:(h + 1) * 4] = (w / w.sum(1, keepdims=True)) @ v
    np.testing.assert_allclose(block.attention(x).reshape(4, 8), out, rtol=1e-4, atol=1e-5)


def test_embeddings():
    t = jnp.array([0.5, -2.])
    emb = layers.PositionalEmbedding(8)(t)
    freqs = (1 / 10000) ** (np.arange(4) / 3)   # EDM's endpoint=True
    arg = np.asarray(t)[:, None] * freqs
    np.testing.assert_allclose(emb, np.concatenate([np.sin(arg), np.cos(arg)], 1), rtol=1e-5, atol=1e-6)
    four = layers.FourierEmbedding(8, rngs=nnx.Rngs(0))
    f = np.asarray(four.freqs[...])
    assert 4 < f.std() < 40   # N(0, 16^2) frequencies
    arg = np.asarray(t)[:, None] * 2 * np.pi * f
    np.testing.assert_allclose(four(t), np.concatenate([np.sin(arg), np.cos(arg)], 1), rtol=1e-4, atol=1e-4)
    assert n_params(four) == 0   # fixed buffer, not trained


def test_groupnorm_matches_reference_and_edm_group_count():
    gn = layers.GroupNorm(96, eps=1e-6)
    assert gn.groups == 24   # min(32, 96 // 4)
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 3, 96))) * 3 + 1
    g = x.reshape(2, 9, 24, 4)
    ref = ((g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)).reshape(x.shape)
    np.testing.assert_allclose(gn(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-4)


def test_weight_init_follows_edm():
    net = SongUNet(8, 3, 3, rngs=nnx.Rngs(0), **TINY)
    w = np.asarray(net.enc['8x8_block0'].conv0.weight[...])
    bound = math.sqrt(6 / (9 * 16 + 9 * 16))
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    zero = np.asarray(net.enc['8x8_block0'].conv1.weight[...])
    assert np.abs(zero).max() <= 1e-5 * bound
    assert not np.any(np.asarray(net.enc['8x8_block0'].conv0.bias[...]))
    qkv = np.asarray(net.dec['4x4_in0'].qkv.weight[...])
    assert np.abs(qkv).max() <= math.sqrt(0.2) * math.sqrt(6 / (32 + 96)) * (1 + 1e-6)
    # Same seed, same weights.
    again = SongUNet(8, 3, 3, rngs=nnx.Rngs(0), **TINY)
    np.testing.assert_array_equal(w, again.enc['8x8_block0'].conv0.weight[...])


@pytest.mark.parametrize('kw,match', [
    (dict(channel_mult=(1, 2, 2, 2)), 'not divisible by 2\\^'),
    (dict(attn_resolutions=(7,)), 'not among the network resolutions'),
    (dict(model_channels=14), 'GroupNorm'),
    (dict(embedding_type='sinusoid'), "valid: positional, fourier"),
    (dict(encoder_type='progressive'), 'valid: standard, skip, residual'),
    (dict(decoder_type='residual'), 'valid: standard, skip'),
    (dict(resample_filter=()), 'resample_filter'),
])
def test_bad_configuration_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SongUNet(12, 3, 3, rngs=nnx.Rngs(0), **(TINY | dict(attn_resolutions=(6,)) | kw))


def test_unknown_model_name_lists_valid_names():
    c = benchmark_config()
    c.model.name = 'unet'
    with pytest.raises(ValueError, match='ddpmpp, ncsnpp, adm, mlp'):
        get_network(c, rngs=nnx.Rngs(0))


def test_wrong_input_shape_is_reported():
    net = SongUNet(8, 3, 3, rngs=nnx.Rngs(0), **TINY)
    with pytest.raises(ValueError, match='NHWC'):
        net(jnp.zeros((1, 3, 8, 8)), jnp.zeros((1,)))


def test_mlp_interface_features_and_conditioning():
    net = randomize(MLP(2, hidden=16, depth=2, label_dim=3, dropout=0.2, rngs=nnx.Rngs(0)), 1)
    x = jax.random.normal(jax.random.key(2), (5, 2))
    noise = jnp.linspace(-1, 1, 5)
    out, feats = net(x, noise, return_features=True)
    assert out.shape == (5, 2) and feats[0].shape == (5, 16) and net.feature_channels == {0: 16}
    np.testing.assert_array_equal(out, net(x, noise, jnp.zeros((5, 3))))
    assert float(jnp.abs(out - net(x, noise, jax.nn.one_hot(jnp.arange(5) % 3, 3))).max()) > 1e-3
    assert float(jnp.abs(out - net(x, noise, key=jax.random.key(0))).max()) > 1e-3
    fourier = MLP(2, hidden=16, depth=1, embedding_type='fourier', rngs=nnx.Rngs(0))
    assert fourier(x, noise).shape == (5, 2)
