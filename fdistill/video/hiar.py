"""Samplers and schedules for autoregressive video (HiAR, arXiv 2603.08703).

A few-step student denoises every block of ``block_size`` frames through the step levels
``sigma_0 = sigma_max > sigma_1 > ... > sigma_{S-1} > sigma_S = 0`` (``step_sigmas``). One
step at level j is the consistency-style update of DMD / Self-Forcing:

    x0_hat = G(x^{(j)}, sigma_j | context),    x^{(j+1)} = x0_hat + sigma_{j+1} eps_{j+1}.

Two orders over the (block b, step j) grid:

- ``'block_first'`` (CausVid / Self-Forcing): finish block b through all S steps, then append
  its *clean* result to the KV cache and start block b+1.
- ``'hierarchical'`` (HiAR, step-first): for each step j, run causally over all blocks; block b
  attends to blocks < b at the *same* level sigma_{j+1} (the output level of step j), never to
  fully clean context; the cache is rebuilt at every step. (``context='input'``: the paper's
  ablation with context at the step's input level sigma_j instead.)

In the hierarchical order cell (b, j) needs only (b, j-1) and the cells (< b, j), so the
anti-diagonals b + j = const can run at once: ``pipelined_hierarchical`` places step j on
device j of a mesh axis ``'step'`` and passes blocks down the pipeline with ``ppermute``.

All randomness is one array ``noise [S, B, T, H, W, C]`` (``draw_noise``, from the teacher's
process noise): ``noise[0]`` is the initial noise (x^{(0)} = sigma_0 noise[0]) and ``noise[j]``
(j >= 1) re-noises to level sigma_j, so every schedule over the same noise yields the same video.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fdistill import sharding
from fdistill.models import video as video_models
from fdistill.sde import karras_grid

ORDERS = ("block_first", "hierarchical")
CONTEXT_LEVELS = ("output", "input")
STEP_AXIS = "step"


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown denoising order {order!r}; valid: {', '.join(ORDERS)}.")


def check_context(context: str) -> None:
    if context not in CONTEXT_LEVELS:
        raise ValueError(f"unknown context level {context!r}; valid: "
                         f"{', '.join(CONTEXT_LEVELS)}.")


def step_sigmas(num_steps: int, *, sigma_max: float = 80.0, sigma_last: float = 0.5,
                rho: float = 7.0) -> np.ndarray:
    """The student's levels: ``num_steps`` Karras-spaced (EDM eq. 5) from sigma_max down to
    ``sigma_last``, then 0 (length ``num_steps + 1``)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}.")
    return np.asarray(karras_grid(sigma_last, sigma_max, num_steps, rho), np.float32)


def draw_noise(key, num_steps: int, shape, process) -> jax.Array:
    """``[num_steps, *shape]``: initial noise, then one re-noising per level, each an independent
    draw of the teacher's unit noise for clips ``shape = [B, T, H, W, C]`` (``process.noise``:
    standard normal, or correlated across the clip's frames by the teacher's
    ``frame_correlation``; with rho = 0 exactly ``jax.random.normal(key, (num_steps, *shape))``)."""
    b = shape[0]
    z = process.noise(key, (num_steps * b, *tuple(shape)[1:]))
    return z.reshape(num_steps, *shape).astype(jnp.float32)


def _blocks(x, block_size):
    """``[B, T, ...] -> [T / block_size, B, block_size, ...]`` (scan over blocks)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // block_size, block_size, *x.shape[2:]), 1, 0)


def _unblocks(x):
    nb, b, bs = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, nb * bs, *x.shape[3:])


def _level(x, sigma):
    return jnp.full(x.shape[:2], sigma, jnp.float32)


def _check(model, noise, sigmas, block_size, window):
    sigmas = np.asarray(sigmas)
    if noise.ndim != 6 or noise.shape[0] != len(sigmas) - 1:
        raise ValueError(f"noise must be [num_steps={len(sigmas) - 1}, B, T, H, W, C] "
                         f"(draw_noise); got shape {noise.shape}.")
    video_models.check_attention("block_causal", noise.shape[2], block_size)
    video_models.check_window(window, block_size)
    if sigmas[-1] != 0:
        raise ValueError(f"the last student level must be 0; got {sigmas[-1]}.")


def cell(model, x_in, sigma_in, sigma_out, eps, cache, offset, context: str = "output"):
    """Cell (b, j): one step of one block against ``cache``.

    Returns ``(x0_hat, x_out, cache')`` with ``x_out = x0_hat + sigma_out eps`` and the cache
    extended by the block's keys/values as context for later blocks: with ``context='output'``
    (HiAR) those of ``x_out`` at its level sigma_out = t_{j+1} (a second pass); with ``'input'``
    (the paper's t_j ablation) those of ``x_in`` at sigma_in = t_j, which the denoising pass has
    already computed (one pass per cell).
    """
    x0, kv = model.cached(x_in, _level(x_in, sigma_in), cache, frame_offset=offset)
    x_out = x0 + sigma_out * eps
    if context == "output":
        _, kv = model.cached(x_out, _level(x_out, sigma_out), cache, frame_offset=offset)
    return x0, x_out, video_models.append_to_cache(cache, kv)


def fused_step(model, x, eps, sigma_in, sigma_out, cache, block_size: int):
    """One hierarchical step over all blocks ``x [nb, B, bs, ...]`` with HiAR's fused passes:
    block b's cache write (its ``x_out`` at ``sigma_out``) and block b+1's denoising (at
    ``sigma_in``) are one pass over the two blocks with per-frame sigma (``model.cached`` with
    ``block_size``), nb passes instead of 2 nb - 1, and the same video as `cell` by `cell`
    with ``context='output'``. Returns ``(x0 [nb, ...], x_out [nb, ...])``."""
    tokens = model.net.tokens_per_frame * block_size
    x0, _ = model.cached(x[0], _level(x[0], sigma_in), cache, frame_offset=0)
    first = x0 + sigma_out * eps[0]

    def over_blocks(carry, inputs):
        cache, prev = carry
        x_in, e, off = inputs
        chunk = jnp.concatenate([prev, x_in], axis=1)
        sig = jnp.concatenate([_level(prev, sigma_out), _level(x_in, sigma_in)], axis=1)
        x0c, (k, v) = model.cached(chunk, sig, cache, frame_offset=off - block_size,
                                   block_size=block_size)
        cache = video_models.append_to_cache(cache, (k[:, :, :tokens], v[:, :, :tokens]))
        x0 = x0c[:, block_size:]
        x_out = x0 + sigma_out * e
        return (cache, x_out), (x0, x_out)

    offsets = jnp.arange(1, x.shape[0]) * block_size
    _, (x0s, outs) = jax.lax.scan(over_blocks, (cache, first), (x[1:], eps[1:], offsets))
    return (jnp.concatenate([x0[None], x0s]), jnp.concatenate([first[None], outs]))


def rollout(model, noise, sigmas, *, block_size: int, window: int,
            order: str = "hierarchical", exit_step=None, context: str = "output",
            fused: bool = False):
    """The student's autoregressive rollout (traceable; ``model`` is a merged VideoDenoiser).

    ``noise [S, B, T, ...]``, ``sigmas`` the S + 1 levels; ``context`` the level of the
    hierarchical order's context (`cell`; block-first context is always the clean block).
    ``fused`` (inference, hierarchical, context 'output'): `fused_step`'s passes.
    Returns the clip ``[B, T, ...]``:
    x0_hat of the last step, or of step ``exit_step`` (a traced int) for self-rollout
    training, where the rollout stops at that step for every block and gradients flow only
    through that step's network calls (inputs and KV caches are ``stop_gradient``-ed).
    """
    check_order(order)
    check_context(context)
    _check(model, noise, sigmas, block_size, window)
    if fused and (order, context, exit_step) != ("hierarchical", "output", None):
        raise ValueError("the fused pass is for hierarchical sampling with context 'output' "
                         "(no exit step); it is off for this rollout.")
    sigmas = np.asarray(sigmas, np.float32)
    num_steps, batch = noise.shape[0], noise.shape[1]
    eps = jax.vmap(lambda n: _blocks(n, block_size))(noise)           # [S, nb, B, bs, ...]
    offsets = jnp.arange(eps.shape[1]) * block_size
    grad = exit_step is not None
    sg = jax.lax.stop_gradient if grad else (lambda a: a)
    fresh = lambda: video_models.empty_cache(model.net, batch, window=window,
                                             block_size=block_size)
    level_out = lambda j: float(sigmas[j + 1])                        # 0 after the last step
    noise_out = lambda e, j: e[min(j + 1, num_steps - 1)]             # unused when level is 0

    def steps(x, run):
        """Runs ``run(j, x) -> (x0, x_next)`` for j = 0..S-1; returns x0 of the last/exit step."""
        out = jnp.zeros_like(x)
        for j in range(num_steps):
            if grad:
                x0, x_next = jax.lax.cond(j <= exit_step, lambda x, j=j: run(j, x),
                                          lambda x: (x, x), x)
                out = jnp.where(j == exit_step, x0, out)
            else:
                x0, x_next = run(j, x)
                out = x0
            x = sg(x_next)
        return out

    if order == "hierarchical" and fused:
        def fused_one_step(j, x):
            return fused_step(model, x, noise_out(eps, j), float(sigmas[j]), level_out(j),
                              fresh(), block_size)

        return _unblocks(steps(sigmas[0] * eps[0], fused_one_step))

    if order == "hierarchical":
        def one_step(j, x):
            def over_blocks(cache, inputs):
                x_in, e, off = inputs
                x0, x_out, cache = cell(model, x_in, sigmas[j], level_out(j), e, cache, off,
                                        context)
                return jax.tree.map(sg, cache), (x0, x_out)

            _, (x0, x_out) = jax.lax.scan(over_blocks, fresh(),
                                          (x, noise_out(eps, j), offsets))
            return x0, x_out

        return _unblocks(steps(sigmas[0] * eps[0], one_step))

    def one_block(cache, inputs):
        e, off = inputs                                               # e [S, B, bs, ...]

        def one_step(j, x):
            x0, _ = model.cached(x, _level(x, sigmas[j]), cache, frame_offset=off)
            return x0, x0 + level_out(j) * noise_out(e, j)

        out = steps(sigmas[0] * e[0], one_step)
        _, kv = model.cached(sg(out), _level(out, 0.0), cache, frame_offset=off)
        return jax.tree.map(sg, video_models.append_to_cache(cache, kv)), out

    _, out = jax.lax.scan(one_block, fresh(), (jnp.moveaxis(eps, 0, 1), offsets))
    return _unblocks(out)


def sample(model, noise, sigmas, *, block_size: int, window: int,
           order: str = "hierarchical", context: str = "output",
           fused: bool = False) -> jax.Array:
    """Jitted rollout of a VideoDenoiser (any clip length; sliding KV window of ``window``).
    With several local devices (``--cpu_devices=2``, several GPUs) whose count divides the
    number of clips, the clips are split over them (``noise``'s batch axis; the weights
    replicated): each device rolls out its share, and the video is one device's to float
    tolerance."""
    check_order(order)
    check_context(context)
    _check(model, noise, sigmas, block_size, window)
    graphdef, state = nnx.split(model)
    devices = jax.local_devices()
    if len(devices) > 1 and noise.shape[1] % len(devices) == 0:
        mesh = sharding.local_mesh(devices)
        noise = jax.device_put(noise, NamedSharding(mesh, P(None, sharding.DATA_AXIS)))
        state = jax.device_put(state, sharding.replicated(mesh))
    return _sample_jit(graphdef, state, noise, tuple(float(s) for s in sigmas), block_size,
                       window, order, context, fused)


def _sample_impl(graphdef, state, noise, sigmas, block_size, window, order, context, fused):
    return rollout(nnx.merge(graphdef, state), noise, np.asarray(sigmas, np.float32),
                   block_size=block_size, window=window, order=order, context=context,
                   fused=fused)


_sample_jit = jax.jit(_sample_impl, static_argnums=(0, 3, 4, 5, 6, 7, 8))


# ---------------------------------------------------------------------------------------------
# Pipelined hierarchical schedule: one device per step, anti-diagonal waves.

def step_mesh(num_steps: int) -> Mesh:
    """A 1-D mesh of ``num_steps`` devices along axis ``'step'``."""
    devices = jax.devices()
    if len(devices) < num_steps:
        raise ValueError(
            f"the pipelined schedule needs one device per step: {num_steps} steps but "
            f"{len(devices)} devices. On CPU, set XLA_FLAGS=--xla_force_host_platform_device_"
            f"count={num_steps} before importing jax; or use fewer student steps.")
    return Mesh(np.asarray(devices[:num_steps]), (STEP_AXIS,), axis_types=(AxisType.Auto,))


def pipelined_hierarchical(model, noise, sigmas, *, block_size: int, window: int,
                           mesh: Mesh | None = None, context: str = "output") -> jax.Array:
    """The hierarchical rollout with step j on device j: wave w runs cells (w - j, j) at once.

    Device j keeps the KV cache of step j (context at sigma_{j+1}); after each wave it sends its
    block's ``x_out`` to device j + 1 (``ppermute``). The last device's x0_hat are the frames.
    Same cells, same noise, same arithmetic as ``rollout(order='hierarchical')``.
    """
    check_context(context)
    _check(model, noise, sigmas, block_size, window)
    num_steps, batch, t = noise.shape[:3]
    mesh = step_mesh(num_steps) if mesh is None else mesh
    if mesh.shape.get(STEP_AXIS) != num_steps:
        raise ValueError(f"mesh axis '{STEP_AXIS}' must have {num_steps} devices (one per "
                         f"step); got mesh shape {dict(mesh.shape)}.")
    graphdef, state = nnx.split(model)
    fn = _pipeline_fn(graphdef, tuple(float(s) for s in sigmas), block_size, window, mesh,
                      noise.shape, context)
    # Weights and noise replicated on the step mesh (a loaded model's arrays sit on one device).
    state, noise = jax.device_put((state, noise), NamedSharding(mesh, P()))
    return fn(state, noise)[num_steps - 1]


@functools.lru_cache(maxsize=16)
def _pipeline_fn(graphdef, sigmas, block_size, window, mesh, shape, context):
    num_steps, batch, t = shape[:3]
    nb = t // block_size
    sig = jnp.asarray(sigmas + (0.0,), jnp.float32)
    perm = [(i, i + 1) for i in range(num_steps - 1)]

    def body(state, noise):
        model = nnx.merge(graphdef, state)
        j = jax.lax.axis_index(STEP_AXIS)
        sigma_in, sigma_out = sig[j], jnp.where(j + 1 < num_steps, sig[j + 1], 0.0)
        block = lambda a, b: jax.lax.dynamic_slice_in_dim(a, b * block_size, block_size, 1)
        cache0 = video_models.empty_cache(model.net, batch, window=window,
                                          block_size=block_size)
        recv0 = jnp.zeros((batch, block_size, *shape[3:]), jnp.float32)
        out0 = jnp.zeros(shape[1:], jnp.float32)

        def wave(w, carry):
            cache, recv, out = carry
            b = w - j
            active = (b >= 0) & (b < nb)
            bc = jnp.clip(b, 0, nb - 1)
            x_in = jnp.where(j == 0, sig[0] * block(noise[0], bc), recv)
            eps = block(noise[jnp.minimum(j + 1, num_steps - 1)], bc)
            x0, x_out, new_cache = cell(model, x_in, sigma_in, sigma_out, eps, cache,
                                        bc * block_size, context)
            cache = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_cache, cache)
            written = jax.lax.dynamic_update_slice_in_dim(out, x0, bc * block_size, 1)
            out = jnp.where(active & (j == num_steps - 1), written, out)
            recv = jax.lax.ppermute(x_out, STEP_AXIS, perm)
            return cache, recv, out

        _, _, out = jax.lax.fori_loop(0, nb + num_steps - 1, wave, (cache0, recv0, out0))
        return out[None]

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P()), out_specs=P(STEP_AXIS),
                                 check_vma=False))
