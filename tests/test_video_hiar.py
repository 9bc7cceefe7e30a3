"""Samplers: hierarchical and block-first rollouts against plain reference loops; the pipelined
schedule against the sequential one on fake CPU devices; self-rollout exit steps; Heun."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import ode_regression, sampling, sde
from fdistill.models import video as V
from fdistill.video import hiar
from tests.test_video_model import BS, SIZE, T, tiny_denoiser

S = 3
SIGMAS = hiar.step_sigmas(S, sigma_max=80.0, sigma_last=0.5)


def _noise(seed=0, t=T):
    return hiar.draw_noise(jax.random.key(seed), S, (2, t, SIZE, SIZE, 1), sde.EDM())


def reference_hierarchical(model, noise, sigmas, window, context="output"):
    """HiAR's step-first order written as plain loops: the x0 of every step, and each step's
    per-block (input, cache) pairs. The cache holds each block at its step's output level
    (``context='output'``, t_{j+1}) or its input level (``'input'``, t_j)."""
    nb = noise.shape[2] // BS
    blk = lambda a, b: a[:, b * BS:(b + 1) * BS]
    x = [sigmas[0] * blk(noise[0], b) for b in range(nb)]
    x0_per_step, inputs = [], []
    for j in range(S):
        cache = V.empty_cache(model.net, 2, window=window, block_size=BS)
        x0s = []
        inputs.append([])
        for b in range(nb):
            inputs[j].append((x[b], cache))
            level = lambda s: jnp.full((2, BS), s)
            x0, _ = model.cached(x[b], level(sigmas[j]), cache, frame_offset=b * BS)
            x_out = x0 + sigmas[j + 1] * blk(noise[min(j + 1, S - 1)], b)
            ctx, ctx_level = (x_out, sigmas[j + 1]) if context == "output" else (x[b], sigmas[j])
            _, kv = model.cached(ctx, level(ctx_level), cache, frame_offset=b * BS)
            cache = V.append_to_cache(cache, kv)
            x[b] = x_out
            x0s.append(x0)
        x0_per_step.append(jnp.concatenate(x0s, 1))
    return x0_per_step, inputs


def reference_block_first(model, noise, sigmas, window):
    nb = noise.shape[2] // BS
    cache = V.empty_cache(model.net, 2, window=window, block_size=BS)
    out = []
    for b in range(nb):
        sl = slice(b * BS, (b + 1) * BS)
        x = sigmas[0] * noise[0][:, sl]
        for j in range(S):
            x0, _ = model.cached(x, jnp.full((2, BS), sigmas[j]), cache, frame_offset=b * BS)
            x = x0 + sigmas[j + 1] * noise[min(j + 1, S - 1)][:, sl]
        _, kv = model.cached(x0, jnp.zeros((2, BS)), cache, frame_offset=b * BS)
        cache = V.append_to_cache(cache, kv)
        out.append(x0)
    return jnp.concatenate(out, 1)


def test_step_sigmas():
    np.testing.assert_allclose(SIGMAS[[0, -2, -1]], [80.0, 0.5, 0.0], rtol=1e-6)
    assert np.all(np.diff(SIGMAS) < 0)
    grid, where = ode_regression.teacher_grid(SIGMAS, 4)
    np.testing.assert_allclose(grid[where], SIGMAS[:-1], rtol=1e-6)
    assert grid[-1] == 0 and np.all(np.diff(grid) < 0) and len(grid) == 4 * S + 2


@pytest.mark.parametrize("window", [T, BS])
def test_hierarchical_sampler_equals_reference_loop(window):
    model = tiny_denoiser(0, depth=1)
    noise = _noise(0)
    got = hiar.sample(model, noise, SIGMAS, block_size=BS, window=window, order="hierarchical")
    ref = reference_hierarchical(model, noise, SIGMAS, window)
    np.testing.assert_allclose(got, ref[0][-1], atol=1e-5)


def test_context_at_the_input_level_equals_its_reference_loop():
    """The t_j ablation: context blocks at their step's input level (one pass per cell, the
    denoising pass's keys/values) gives the plain loop's video, not the t_{j+1} one."""
    model = tiny_denoiser(5, depth=1)
    noise = _noise(5)
    got = hiar.sample(model, noise, SIGMAS, block_size=BS, window=T, context="input")
    np.testing.assert_allclose(got, reference_hierarchical(model, noise, SIGMAS, T,
                                                           "input")[0][-1], atol=1e-5)
    out = hiar.sample(model, noise, SIGMAS, block_size=BS, window=T, context="output")
    np.testing.assert_allclose(got[:, :BS], out[:, :BS], atol=1e-5)    # block 0: no context
    assert jnp.abs(got[:, BS:] - out[:, BS:]).max() > 1e-3
    with pytest.raises(ValueError, match="valid: output, input"):
        hiar.sample(model, noise, SIGMAS, block_size=BS, window=T, context="clean")


def test_block_first_sampler_equals_reference_loop_and_differs_from_hierarchical():
    model = tiny_denoiser(1, depth=1)
    noise = _noise(1)
    got = hiar.sample(model, noise, SIGMAS, block_size=BS, window=T, order="block_first")
    np.testing.assert_allclose(got, reference_block_first(model, noise, SIGMAS, T), atol=1e-5)
    hier = hiar.sample(model, noise, SIGMAS, block_size=BS, window=T, order="hierarchical")
    np.testing.assert_allclose(got[:, :BS], hier[:, :BS], atol=1e-5)   # block 0: no context
    assert jnp.abs(got[:, BS:] - hier[:, BS:]).max() > 1e-3


def test_rollout_past_training_length_with_sliding_window():
    model = tiny_denoiser(2, depth=1)
    noise = _noise(2, t=4 * T)
    got = hiar.sample(model, noise, SIGMAS, block_size=BS, window=T, order="hierarchical")
    ref = reference_hierarchical(model, noise, SIGMAS, T)
    np.testing.assert_allclose(got, ref[0][-1], atol=1e-5)


def test_self_rollout_exit_step_value_and_gradient():
    """exit_step j returns step j's x0 for every block, and the parameter gradient is that of
    step j's network calls alone, with their inputs and KV caches held fixed."""
    from flax import nnx
    model = tiny_denoiser(3, depth=1)
    noise = _noise(3)
    x0s, inputs = reference_hierarchical(model, noise, SIGMAS, T)
    graphdef, state = nnx.split(model)

    def loss(st, j):
        out = hiar.rollout(nnx.merge(graphdef, st), noise, SIGMAS, block_size=BS, window=T,
                           exit_step=j)
        return jnp.sum(out ** 2), out

    grad_fn = jax.jit(jax.grad(loss, has_aux=True))
    j = 1
    g, out = grad_fn(state, j)
    np.testing.assert_allclose(out, x0s[j], atol=1e-5)
    np.testing.assert_allclose(grad_fn(state, 0)[1], x0s[0], atol=1e-5)

    def reference_loss(st):
        m = nnx.merge(graphdef, st)
        total = 0.0
        for b, (x_in, cache) in enumerate(inputs[j]):
            x0, _ = m.cached(x_in, jnp.full((2, BS), SIGMAS[j]), cache, frame_offset=b * BS)
            total = total + jnp.sum(x0 ** 2)
        return total

    g_ref = jax.grad(reference_loss)(state)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
    assert sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(g)) > 0


def test_bad_sampler_inputs():
    model = tiny_denoiser(0)
    noise = _noise(0)
    with pytest.raises(ValueError, match="valid: block_first, hierarchical"):
        hiar.sample(model, noise, SIGMAS, block_size=BS, window=T, order="frame_first")
    with pytest.raises(ValueError, match="not divisible by the block size 3"):
        hiar.sample(model, noise, SIGMAS, block_size=3, window=3)
    with pytest.raises(ValueError, match="smaller than one block"):
        hiar.sample(model, noise, SIGMAS, block_size=BS, window=1)
    with pytest.raises(ValueError, match="noise must be"):
        hiar.sample(model, noise[:2], SIGMAS, block_size=BS, window=T)
    with pytest.raises(ValueError, match="one device per step"):
        hiar.step_mesh(len(jax.devices()) + 1)


def test_heun_trajectory_solves_the_gaussian_probability_flow_to_second_order():
    """Data N(0, s^2) per pixel: D(x, sigma) = s^2 / (s^2 + sigma^2) x, and the PF-ODE maps x_T
    to x_T sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2); Heun's error falls ~4x per doubling;
    the recorded states are the trajectory's (the teacher's ODE pairs use this)."""
    s = 0.5
    model = lambda x, sigma: (s ** 2 / (s ** 2 + sigma ** 2))[:, None, None, None, None] * x
    x_T = 80.0 * jax.random.normal(jax.random.key(0), (2, T, SIZE, SIZE, 1))
    exact = lambda sigma: x_T * np.sqrt(s ** 2 + sigma ** 2) / np.sqrt(s ** 2 + 80.0 ** 2)
    errors = []
    for n in (20, 40):
        grid = np.asarray(sde.EDM().karras_sigmas(n))
        x0, kept = sampling.heun_trajectory(model, x_T, grid, record=(0, n // 2))
        np.testing.assert_array_equal(kept[0], x_T)
        np.testing.assert_allclose(kept[1], exact(grid[n // 2]), rtol=2e-2)
        errors.append(float(jnp.abs(x0 - exact(0.0)).max() / jnp.abs(exact(0.0)).max()))
        assert sampling.grid_nfe(grid) == 2 * n - 1
    assert errors[1] < 1e-2 and errors[0] / errors[1] > 3, errors


PIPELINE_SCRIPT = textwrap.dedent("""
    import os, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
    import jax, numpy as np
    from tests.test_video_model import tiny_denoiser, BS, T, SIZE
    from fdistill import sde
    from fdistill.video import hiar
    assert len(jax.devices()) == 3
    model = tiny_denoiser(4)
    sigmas = hiar.step_sigmas(3)
    noise = hiar.draw_noise(jax.random.key(5), 3, (2, 3 * T, SIZE, SIZE, 1), sde.EDM())
    seq = hiar.sample(model, noise, sigmas, block_size=BS, window=T)
    pipe = hiar.pipelined_hierarchical(model, noise, sigmas, block_size=BS, window=T)
    # Weights and noise committed to one device, as a model restored from a checkpoint.
    from flax import nnx
    graphdef, state = nnx.split(model)
    loaded = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
    pipe_loaded = hiar.pipelined_hierarchical(loaded, jax.device_put(noise, jax.devices()[0]),
                                              sigmas, block_size=BS, window=T)
    print("MAXDIFF", max(float(np.abs(np.asarray(seq) - np.asarray(p)).max())
                         for p in (pipe, pipe_loaded)))
""")


def test_pipelined_schedule_gives_the_same_video_as_sequential():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diff = float(out.stdout.split("MAXDIFF")[1])
    assert diff <= 1e-6, diff


@pytest.mark.parametrize("window", [T, 2 * BS, BS])
def test_fused_passes_give_the_sequential_video(window):
    """HiAR's fused pass (a block's cache write and the next block's denoising in one pass over
    both, per-frame sigma) yields the cell-by-cell video, past the training length and with a
    sliding window (one block: no context at all)."""
    model = tiny_denoiser(6, depth=2)
    noise = _noise(6, t=3 * T)
    plain = hiar.sample(model, noise, SIGMAS, block_size=BS, window=window)
    fused = hiar.sample(model, noise, SIGMAS, block_size=BS, window=window, fused=True)
    np.testing.assert_allclose(fused, plain, atol=2e-5)
    with pytest.raises(ValueError, match="fused pass is for hierarchical"):
        hiar.sample(model, noise, SIGMAS, block_size=BS, window=window, fused=True,
                    context="input")


SPLIT_SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    from flax import nnx
    from tests.test_video_model import tiny_denoiser, BS, T, SIZE
    from fdistill import sde
    from fdistill.video import hiar
    assert jax.device_count() == 2
    model = tiny_denoiser(7, depth=1)
    sigmas = tuple(float(s) for s in hiar.step_sigmas(3))
    noise = hiar.draw_noise(jax.random.key(8), 3, (4, 2 * T, SIZE, SIZE, 1), sde.EDM())
    split = hiar.sample(model, noise, sigmas, block_size=BS, window=T)
    graphdef, state = nnx.split(model)
    one = hiar._sample_jit(graphdef, state, noise, sigmas, BS, T, "hierarchical", "output", False)
    odd = hiar.sample(model, noise[:, :3], sigmas, block_size=BS, window=T)
    print("RESULT" + json.dumps({
        "maxdiff": float(np.abs(np.asarray(split) - np.asarray(one)).max()),
        "scale": float(np.abs(np.asarray(one)).max()),
        "split_devices": len(split.sharding.device_set),
        "rows": sorted({s.data.shape[0] for s in split.addressable_shards}),
        "one_devices": len(one.sharding.device_set),
        "odd_devices": len(odd.sharding.device_set),
        "odd_maxdiff": float(np.abs(np.asarray(odd) - np.asarray(one)[:3]).max())}))
""")


def test_sampler_splits_clips_over_local_devices():
    """With 2 (fake CPU) devices the rollout's clips are split over them, 2 clips each, and the
    video is the one-device program's to float tolerance; 3 clips (not divisible) stay on one
    device."""
    from tests.tiny import run_on_fake_devices
    r = run_on_fake_devices(SPLIT_SCRIPT, devices=2)
    assert r["split_devices"] == 2 and r["rows"] == [2] and r["one_devices"] == 1
    assert r["odd_devices"] == 1
    assert r["maxdiff"] <= 1e-5 * max(r["scale"], 1.0), r
    assert r["odd_maxdiff"] <= 1e-5 * max(r["scale"], 1.0), r
