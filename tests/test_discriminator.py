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


def test_heads_are_per_sample_and_per_resolution():
    disc = Discriminator({8: 16, 4: 32}, [8, 4], rngs=nnx.Rngs(0))
    f8 = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
    f4 = jax.random.normal(jax.random.key(2), (2, 4, 4, 32))
    graphdef, state = nnx.split(disc)
    run = jax.jit(lambda state, f8, f4: nnx.merge(graphdef, state)({8: f8, 4: f4}))
    logits = run(state, f8, f4)
    assert logits.shape == (2, 2)
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
    _, feats = den(jnp.ones((5, 2)), jnp.full((5,), 0.7), return_features=True)
    assert disc(feats).shape == (5, 1)


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
