"""ADM (EDM's DhariwalUNet): parameter counts of EDM's settings, interface, features, errors.

Numerical parity with an independent reimplementation of EDM's network is in test_edm_import.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import distill_imagenet64, imagenet64
from fdistill.models import Discriminator, DhariwalUNet, get_model

TINY = dict(model_channels=64, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.1)


def n_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def ref_dhariwal_params(img, c, label_dim, mc, mult, emb_mult, nb, attn):
    """Parameter count of EDM's DhariwalUNet read off its layer list (independent of our modules):
    conv k: k*k*ci*co + co, linear: ci*co + co (the label map has no bias), GroupNorm: 2C; blocks
    have a 2C-wide affine (scale and shift), a 1x1 skip only when channels change (up/down blocks
    resample without weights), attention GN + qkv + proj; augment layer omitted."""
    conv = lambda ci, co, k: k * k * ci * co + co
    lin = lambda ci, co: ci * co + co
    E = mc * emb_mult

    def block(ci, co, att):
        n = 2 * ci + conv(ci, co, 3) + lin(E, 2 * co) + 2 * co + conv(co, co, 3)
        n += conv(ci, co, 1) if ci != co else 0
        return n + (2 * co + conv(co, 3 * co, 1) + conv(co, co, 1) if att else 0)

    total = lin(mc, E) + lin(E, E) + label_dim * E
    skips, cout = [], c
    for lvl, m in enumerate(mult):
        res = img >> lvl
        if lvl == 0:
            total, cout = total + conv(c, mc * m, 3), mc * m
        else:
            total += block(cout, cout, False)
        skips.append(cout)
        for _ in range(nb):
            total, cout = total + block(cout, mc * m, res in attn), mc * m
            skips.append(cout)
    for lvl in reversed(range(len(mult))):
        res = img >> lvl
        total += (block(cout, cout, True) + block(cout, cout, False) if lvl == len(mult) - 1
                  else block(cout, cout, False))
        for _ in range(nb + 1):
            ci = cout + skips.pop()
            total, cout = total + block(ci, mc * mult[lvl], res in attn), mc * mult[lvl]
    return total + 2 * cout + conv(cout, c, 3)


def test_imagenet64_config_builds_edms_adm():
    """EDM's edm-imagenet-64x64-cond-adm: 295,899,267 parameters, 8x8 x 768 bottleneck (shapes only)."""
    config = imagenet64.get_config()
    model = nnx.eval_shape(lambda: get_model(config, rngs=nnx.Rngs(0)))
    assert isinstance(model.net, DhariwalUNet)
    assert n_params(model) == 295_899_267
    assert n_params(model) == ref_dhariwal_params(64, 3, 1000, 192, (1, 2, 3, 4), 4, 3, (32, 16, 8))
    assert model.feature_channels == {64: 192, 32: 384, 16: 576, 8: 768}
    assert (config.model.precond, config.process.name, config.data.num_classes) == ("edm", "edm", 1000)
    distill = distill_imagenet64.get_config()
    assert "model" not in distill and distill.eval == config.eval   # teacher read from its workdir
    assert distill.distill.disc_resolutions == (8,)


@pytest.mark.parametrize("kw", [dict(label_dim=0, model_channels=64, channel_mult=(1, 2, 2), num_blocks=2,
                                     attn_resolutions=(8, 4)),
                                dict(label_dim=7, model_channels=128, channel_mult=(1, 3), num_blocks=1,
                                     attn_resolutions=(16,), channel_mult_emb=2)])
def test_parameter_count_follows_edms_layer_list(kw):
    net = nnx.eval_shape(lambda: DhariwalUNet(16, 3, 3, rngs=nnx.Rngs(0), **kw))
    assert n_params(net) == ref_dhariwal_params(16, 3, kw["label_dim"], kw["model_channels"], kw["channel_mult"],
                                                kw.get("channel_mult_emb", 4), kw["num_blocks"],
                                                kw["attn_resolutions"])


@pytest.fixture(scope="module")
def tiny():
    net = DhariwalUNet(8, 3, 3, label_dim=5, rngs=nnx.Rngs(0), **TINY)
    graphdef, state = nnx.split(net)

    @jax.jit
    def run(state, x, c_noise, labels):
        return nnx.merge(graphdef, state)(x, c_noise, labels, return_features=True)

    return net, state, run


def _inputs(n=2):
    x = jax.random.normal(jax.random.key(0), (n, 8, 8, 3))
    return x, jnp.linspace(-1., 1., n), jax.nn.one_hot(jnp.arange(n) % 5, 5)


def test_edm_initialisation_zeroes_the_output(tiny):
    # EDM initialises ADM's output convolution (and every block's conv1 / proj) to zero, so an
    # untrained network outputs exactly 0 and the denoiser starts as c_skip x.
    net, state, run = tiny
    out, feats = run(state, *_inputs())
    assert out.shape == (2, 8, 8, 3) and not np.any(np.asarray(out))
    assert not np.any(np.asarray(net.enc["8x8_block0"].conv1.weight[...]))
    assert sorted(feats) == [4, 8] and feats[4].shape == (2, 4, 4, 128) and feats[8].shape == (2, 8, 8, 64)
    assert net.feature_channels == {8: 64, 4: 128}


def test_features_once_trained_feed_the_discriminator(tiny):
    net, state, run = tiny
    rng = np.random.default_rng(2)
    state = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), state)
    out, feats = run(state, *_inputs())
    assert np.abs(np.asarray(out)).max() > 1e-3 and np.all(np.isfinite(np.asarray(out)))
    disc = Discriminator(net.feature_channels, (4,), rngs=nnx.Rngs(0))
    assert jax.eval_shape(disc, feats).shape == (2, 1)   # the discriminator reads the bottleneck


def test_bad_arguments_and_inputs_give_clear_errors(tiny):
    with pytest.raises(ValueError, match="32 channels cannot be split into 0 heads"):
        DhariwalUNet(8, 3, 3, model_channels=32, channel_mult=(1,), num_blocks=1, attn_resolutions=(8,),
                     rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not among the network resolutions"):
        DhariwalUNet(8, 3, 3, model_channels=64, channel_mult=(1, 2), attn_resolutions=(16,), rngs=nnx.Rngs(0))
    net = tiny[0]
    with pytest.raises(ValueError, match="NHWC input"):
        net(jnp.zeros((1, 3, 8, 8)), jnp.zeros((1,)))
    with pytest.raises(ValueError, match="one-hot"):
        net(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), jnp.zeros((1, 4)))
