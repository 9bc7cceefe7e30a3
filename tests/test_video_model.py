"""Video transformer: attention masks, KV cache == block-causal forward, sliding window, errors,
3-D RoPE, and use of the clip's other frames after brief training."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from fdistill import sde
from fdistill.data.video import BouncingSquares
from fdistill.models import video as V

T, BS, SIZE = 4, 2, 8


def tiny_denoiser(seed: int = 0, *, dim: int = 16, depth: int = 2) -> V.VideoDenoiser:
    """A tiny video denoiser whose zero-initialised layers are perturbed (so every path matters)."""
    net = V.VideoTransformer(frame_size=SIZE, channels=1, patch_size=4, dim=dim, depth=depth,
                             num_heads=2, mlp_ratio=2, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(net)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    return V.VideoDenoiser(nnx.merge(graphdef, jax.tree.unflatten(tree, leaves)), sde.EDM())


def _clip(seed, t=T, b=2):
    return jax.random.normal(jax.random.key(seed), (b, t, SIZE, SIZE, 1))


def test_block_causal_mask_allows_exactly_the_intended_pairs():
    t, bs = 6, 2
    mask = V.frame_mask(t, "block_causal", bs)
    expected = np.zeros((t, t), bool)
    for i in range(t):
        for j in range(t):
            same_block = i // bs == j // bs
            earlier_block = j // bs < i // bs
            expected[i, j] = same_block or earlier_block
    np.testing.assert_array_equal(mask, expected)
    assert mask[0, 1] and not mask[1, 2] and mask[3, 0] and not mask[3, 4]
    assert V.frame_mask(t, "bidirectional").all()
    np.testing.assert_array_equal(V.frame_mask(t, "block_causal", 1), np.tril(np.ones((t, t), bool)))


def test_block_causal_forward_ignores_the_future_and_bidirectional_does_not():
    model = tiny_denoiser()
    x, sigma = _clip(0), jnp.full((2, T), 1.5)
    x_changed = x.at[:, BS:].add(1.0)
    bc = lambda a: model(a, sigma, attention="block_causal", block_size=BS)
    np.testing.assert_allclose(bc(x)[:, :BS], bc(x_changed)[:, :BS], atol=1e-6)
    assert jnp.abs(model(x, sigma)[:, :BS] - model(x_changed, sigma)[:, :BS]).max() > 1e-3


def test_kv_cache_inference_equals_block_causal_forward():
    model = tiny_denoiser(1)
    x = _clip(1)
    sigma = jnp.exp(jax.random.normal(jax.random.key(2), (2, T)))
    full = model(x, sigma, attention="block_causal", block_size=BS)
    cache = V.empty_cache(model.net, 2, window=T, block_size=BS)
    outs = []
    for b in range(T // BS):
        sl = slice(b * BS, (b + 1) * BS)
        out, kv = model.cached(x[:, sl], sigma[:, sl], cache, frame_offset=b * BS)
        cache = V.append_to_cache(cache, kv)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)
    assert bool(cache["valid"].all())


def test_window_of_one_block_is_each_block_alone_anywhere_in_time():
    """With no cached context each block is denoised on its own; RoPE makes the result
    independent of the block's absolute position."""
    model = tiny_denoiser(2)
    x, sigma = _clip(3), jnp.full((2, T), 0.7)
    cache = V.empty_cache(model.net, 2, window=BS, block_size=BS)
    assert cache["valid"].shape == (0,)
    for b in range(T // BS):
        sl = slice(b * BS, (b + 1) * BS)
        out, _ = model.cached(x[:, sl], sigma[:, sl], cache, frame_offset=b * BS + 7)
        np.testing.assert_allclose(out, model(x[:, sl], sigma[:, sl]), atol=2e-5)


def test_sliding_window_keeps_the_newest_blocks():
    model = tiny_denoiser(3)
    x, sigma = _clip(4, t=6), jnp.full((2, 6), 1.0)
    cache = V.empty_cache(model.net, 2, window=2 * BS, block_size=BS)   # one block of context
    kvs = []
    for b in range(3):
        sl = slice(b * BS, (b + 1) * BS)
        _, kv = model.cached(x[:, sl], sigma[:, sl], cache, frame_offset=b * BS)
        cache = V.append_to_cache(cache, kv)
        kvs.append(kv)
    np.testing.assert_array_equal(cache["k"], kvs[-1][0])
    np.testing.assert_array_equal(cache["v"], kvs[-1][1])


def test_bad_inputs_fail_with_clear_errors():
    model = tiny_denoiser()
    x, sigma = _clip(0), jnp.ones((2, T))
    with pytest.raises(ValueError, match="valid: bidirectional, block_causal, cached"):
        model(x, sigma, attention="causal")
    with pytest.raises(ValueError, match="not divisible by the block size 3"):
        model(x, sigma, attention="block_causal", block_size=3)
    with pytest.raises(ValueError, match="needs a positive block_size"):
        model(x, sigma, attention="block_causal")
    with pytest.raises(ValueError, match="smaller than one block"):
        V.empty_cache(model.net, 2, window=1, block_size=BS)
    with pytest.raises(ValueError, match="not a whole number of blocks"):
        V.empty_cache(model.net, 2, window=3, block_size=BS)
    with pytest.raises(ValueError, match=r"sigma must be per clip \(2,\) or per frame \(2, 4\); got \(3,\)"):
        model(x, jnp.ones((3,)))
    with pytest.raises(ValueError, match="video models are unconditional"):
        model(x, sigma, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="expected clips"):
        model(x[:, :, :4], sigma)
    with pytest.raises(ValueError, match="needs a cache"):
        model.net(x, sigma, attention="cached")


def test_edm_preconditioning_per_frame():
    """D = c_skip x + c_out F(c_in x, c_noise) frame by frame: at init F = 0 (zero output layer),
    so D(x, sigma) = sigma_data^2 / (sigma^2 + sigma_data^2) x per frame."""
    net = V.VideoTransformer(frame_size=SIZE, dim=16, depth=1, num_heads=2, rngs=nnx.Rngs(0))
    model = V.VideoDenoiser(net, sde.EDM())
    x = _clip(5)
    sigma = jnp.asarray([[0.1, 1.0, 10.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    s = jnp.maximum(sigma, 0.002)
    expected = (0.25 / (s ** 2 + 0.25))[:, :, None, None, None] * x
    np.testing.assert_allclose(model(x, sigma), expected, rtol=1e-6)


def test_rope_3d_logits_depend_on_offsets_in_time_and_in_space():
    """With the same query and key at every token, 3-D RoPE makes the attention logit a function
    of the (frame, row, column) offset alone, largest at no offset and changing with each axis,
    so attention can find the same place, or a displaced one, in another frame."""
    d, grid, frames = 16, 4, 3
    vec = jax.random.normal(jax.random.key(0), (1, 1, 1, d))
    f, r, c = (jnp.asarray(a.ravel()) for a in np.meshgrid(np.arange(frames), np.arange(grid),
                                                           np.arange(grid), indexing="ij"))
    rot = V.rope_3d(jnp.broadcast_to(vec, (1, f.size, 1, d)), f, r, c)[0, :, 0]
    logits = np.asarray(rot @ rot.T)
    index = {(int(a), int(b), int(e)): i for i, (a, b, e) in enumerate(zip(f, r, c))}
    logit = lambda p, q: logits[index[p], index[q]]
    np.testing.assert_allclose(logit((0, 0, 0), (1, 2, 1)), logit((1, 1, 2), (2, 3, 3)), rtol=1e-5)
    np.testing.assert_allclose(np.diag(logits), float(jnp.sum(vec ** 2)), rtol=1e-5)
    assert (logits <= np.diag(logits)[:, None] + 1e-4).all()
    for moved in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        assert abs(logit((0, 0, 0), moved) - logit((0, 0, 0), (0, 0, 0))) > 1e-3


def test_rope_3d_rotates_each_axis_at_the_frequencies_of_its_base():
    """RoPE's logit between a token and its displaced copy is sum_i |pair_i|^2 cos(offset w_i):
    the frame pairs turn at time_base^(-i / n_t), the row and column pairs at
    space_base^(-i / n_s); and the bases of ``config.model`` reach every block."""
    d, time_base, space_base = 16, 10.0, 4.0
    vec = jax.random.normal(jax.random.key(1), (d,))
    f, r, c = jnp.asarray([0, 3, 0, 0]), jnp.asarray([0, 0, 2, 0]), jnp.asarray([0, 0, 0, 3])
    rot = V.rope_3d(jnp.broadcast_to(vec, (1, 4, 1, d)), f, r, c, time_base=time_base,
                    space_base=space_base)[0, :, 0]
    logits = np.asarray(rot[0] @ rot[1:].T)

    def expected(part, base, offset):
        half = len(part) // 2
        power = np.asarray(part[:half] ** 2 + part[half:] ** 2)
        return float(np.sum(power * np.cos(offset * base ** (-np.arange(half) / half))))

    v = np.asarray(vec)
    rest = lambda *skip: sum(float(np.sum(v[a:b] ** 2)) for a, b in
                             ((0, 8), (8, 12), (12, 16)) if (a, b) not in skip)
    np.testing.assert_allclose(logits, [expected(v[:8], time_base, 3) + rest((0, 8)),
                                        expected(v[8:12], space_base, 2) + rest((8, 12)),
                                        expected(v[12:], space_base, 3) + rest((12, 16))],
                               rtol=1e-5)

    config = ml_collections.ConfigDict({
        "data": {"size": 8, "channels": 1},
        "model": {"patch_size": 2, "dim": 16, "depth": 2, "num_heads": 1, "mlp_ratio": 2,
                  "rope_time_base": time_base, "rope_space_base": space_base}})
    net = V.build_video_transformer(config, rngs=nnx.Rngs(0))
    assert all(b.rope_bases == (time_base, space_base) for b in net.blocks)


@pytest.mark.skipif(os.environ.get("FDISTILL_SLOW_TESTS", "0") != "1",
                    reason="trains a tiny denoiser for 300 steps (~30 s on 2 CPU cores): run "
                           "with FDISTILL_SLOW_TESTS=1")
def test_briefly_trained_denoiser_uses_the_clips_other_frames():
    """A correct denoiser of bouncing squares uses the other frames (linear motion is
    predictable): after 300 Adam steps on 8x8 clips, frame 0's x0 error at sigma = 1 and 2 is
    smaller with its own clip's other frames than with another clip's (same noise)."""
    net = V.VideoTransformer(frame_size=8, patch_size=2, dim=16, depth=2, num_heads=2,
                             mlp_ratio=2, rngs=nnx.Rngs(0))
    model = V.VideoDenoiser(net, sde.EDM())
    data = BouncingSquares(num_frames=4, size=8, square=3.0, global_batch_size=32)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, key):
        k_sigma, k_noise = jax.random.split(key)
        sigma = jnp.exp(jax.random.uniform(k_sigma, (len(x),), minval=-1.2, maxval=1.4))
        x_t = x + sigma[:, None, None, None, None] * jax.random.normal(k_noise, x.shape)
        weight = ((sigma ** 2 + 0.25) / (0.5 * sigma) ** 2)[:, None, None, None, None]
        loss = lambda m: jnp.mean(weight * (m(x_t, sigma) - x) ** 2)
        opt.update(model, nnx.grad(loss)(model))

    for i in range(300):
        step(model, opt, jnp.asarray(data.batch(i)["x"]), jax.random.key(i))
    x = BouncingSquares(num_frames=4, size=8, square=3.0, global_batch_size=256,
                        seed=1).batch(0)["x"]
    other = np.roll(x, 1, axis=0)
    other[:, 0] = x[:, 0]
    noise = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    for s in (1.0, 2.0):
        level = jnp.full((len(x),), s)
        err = lambda clips: float(np.mean((model(clips + s * noise, level)[:, 0] - x[:, 0]) ** 2))
        assert err(x) < 0.9 * err(other), s
