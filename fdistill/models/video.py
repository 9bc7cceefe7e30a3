"""A small spatio-temporal transformer for video diffusion, and its EDM-preconditioned denoiser.

One set of weights, three attention modes (HiAR, arXiv 2603.08703, Sec. 3; CausVid /
Self-Forcing for the causal student):

- ``'bidirectional'``: every token sees every frame (the teacher and the fake-score critic);
- ``'block_causal'``: frames are grouped in blocks of ``block_size``; a query frame sees all
  frames of its own block and of earlier blocks (the student, trained on whole clips);
- ``'cached'``: the causal inference form of ``'block_causal'``: one block of frames attends to
  itself and to the keys/values of earlier blocks held in a KV cache (or, with ``block_size``,
  a chunk of consecutive blocks, block-causal among themselves: HiAR's fused pass). The cache is a sliding
  window of ``window`` frames (current block included), so rollouts can run past the training
  length: with ``window`` >= the clip length the result equals the block-causal forward pass.

Layout: clips ``[B, T, H, W, C]``, per-frame noise levels ``[B, T]``. Frames are cut into
``patch_size`` patches (tokens), embedded, and given a learned spatial position embedding.
Attention sees positions through 3-D rotary position embeddings (RoPE): half of each head's
channels rotate with the absolute frame index, a quarter each with the patch's row and column,
so attention logits depend on offsets in time and space (a token can look up the same place, or
a displaced one, in another frame) and a cache filled at earlier positions stays valid. Each
frame's noise level conditions its tokens through adaLN-Zero modulation (DiT).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdistill.models.denoiser import preconditioning

ATTENTION_MODES = ("bidirectional", "block_causal", "cached")


# ---------------------------------------------------------------------------------------------
# Masks and input checks (plain Python / numpy: they run before anything is traced).

def check_attention(attention: str, num_frames: int, block_size: int | None) -> None:
    """Raises a ``ValueError`` naming the fix for an unknown mode or a bad block size."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {attention!r}; valid: "
                         f"{', '.join(ATTENTION_MODES)}.")
    if attention == "bidirectional":
        return
    if block_size is None or block_size < 1:
        raise ValueError(f"attention {attention!r} needs a positive block_size (frames per "
                         f"block); got {block_size!r}.")
    if num_frames % block_size:
        raise ValueError(f"clip length {num_frames} is not divisible by the block size "
                         f"{block_size}; use a clip length that is a multiple of the block size.")


def check_window(window: int, block_size: int) -> None:
    """The KV-cache window (frames, current block included) must hold whole blocks, at least one."""
    if window < block_size:
        raise ValueError(f"cache window of {window} frames is smaller than one block "
                         f"({block_size} frames); use a window of at least one block.")
    if window % block_size:
        raise ValueError(f"cache window of {window} frames is not a whole number of blocks of "
                         f"{block_size} frames; use a multiple of the block size.")


def frame_mask(num_frames: int, attention: str, block_size: int | None = None) -> np.ndarray:
    """Boolean ``[T_query, T_key]``: may query frame i attend to key frame j?

    bidirectional: always; block_causal: block(j) <= block(i), block(i) = i // block_size.
    """
    check_attention(attention, num_frames, block_size)
    if attention == "bidirectional":
        return np.ones((num_frames, num_frames), bool)
    if attention == "cached":
        raise ValueError("'cached' attention has no full-clip mask; it attends to a KV cache "
                         "(use 'block_causal' for the equivalent full-clip mask).")
    block = np.arange(num_frames) // block_size
    return block[None, :] <= block[:, None]


# ---------------------------------------------------------------------------------------------
# Layers.

def rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary embedding (Su et al. 2021) of ``x [B, S, heads, d]`` at ``positions [S]``."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, None] * freqs[None, :]        # [S, half]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def rope_3d(x: jax.Array, frames: jax.Array, rows: jax.Array, cols: jax.Array, *,
            time_base: float = 10_000.0, space_base: float = 100.0) -> jax.Array:
    """RoPE over (frame, row, column) of ``x [B, S, heads, d]``, positions ``[S]`` each: the
    first ``d / 2`` channels rotate with the frame index (frequencies ``time_base^(-i / (d/4))``),
    ``d / 4`` each with the patch row and column (``space_base^(-i / (d/8))``)."""
    t, s = x.shape[-1] // 2, x.shape[-1] // 4
    return jnp.concatenate([rope(x[..., :t], frames, base=time_base),
                            rope(x[..., t:t + s], rows, base=space_base),
                            rope(x[..., t + s:], cols, base=space_base)], axis=-1)


def attend(q, k, v, mask) -> jax.Array:
    """softmax(q k^T / sqrt(d) masked) v; ``q [B,S,h,d]``, ``k, v [B,S',h,d]``, ``mask [S,S']``.

    Computed head-major ([B, h, S, d]): batched matmuls in that layout are several times faster
    on CPU than the token-major einsum.
    """
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    logits = q @ jnp.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    logits = jnp.where(mask, logits, -1e30)
    return jnp.swapaxes(jax.nn.softmax(logits, axis=-1) @ v, 1, 2)


def _linear(din, dout, rngs, *, zero=False):
    init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
    return nnx.Linear(din, dout, kernel_init=init, bias_init=nnx.initializers.zeros_init(),
                      rngs=rngs)


def _modulate(h, shift, scale):
    return h * (1.0 + scale) + shift


class Block(nnx.Module):
    """Pre-LN transformer block with per-frame adaLN-Zero (shift, scale, gate) modulation."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, *, rope_bases=(10_000.0, 100.0),
                 rngs: nnx.Rngs):
        if dim % num_heads or (dim // num_heads) % 8:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of a size divisible "
                             f"by 8 (3-D RoPE: a half and two even quarters).")
        self.num_heads = num_heads
        self.rope_bases = tuple(float(b) for b in rope_bases)
        self.norm1 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
        self.qkv = _linear(dim, 3 * dim, rngs)
        self.proj = _linear(dim, dim, rngs)
        self.fc1 = _linear(dim, mlp_ratio * dim, rngs)
        self.fc2 = _linear(mlp_ratio * dim, dim, rngs)
        self.ada = _linear(dim, 6 * dim, rngs, zero=True)

    def __call__(self, h, cond, positions, mask, prefix=None):
        """``h [B,F,N,D]``, ``cond [B,F,D]``, ``positions [F]`` (frame indices), ``mask
        [F*N, P+F*N]`` over (prefix keys, own keys); ``prefix`` = cached ``(k, v) [B,P,h,d]``.

        Returns the new ``h`` and this block's rotated ``(k, v)`` of shape ``[B, F*N, h, d]``.
        """
        b, f, n, d = h.shape
        mod = self.ada(nnx.silu(cond))[:, :, None, :]                      # [B, F, 1, 6D]
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        x = _modulate(self.norm1(h), shift1, scale1).reshape(b, f * n, d)
        q, k, v = jnp.split(self.qkv(x).reshape(b, f * n, 3, self.num_heads, -1), 3, axis=2)
        frames = jnp.repeat(positions, n)
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"3-D RoPE needs a square grid of patches per frame; got {n} patches.")
        rows, cols = (jnp.tile(a, f) for a in (jnp.arange(n) // grid, jnp.arange(n) % grid))
        time_base, space_base = self.rope_bases
        rotate = lambda a: rope_3d(a[:, :, 0], frames, rows, cols, time_base=time_base,
                                   space_base=space_base)
        q, k, v = rotate(q), rotate(k), v[:, :, 0]
        keys, values = (k, v) if prefix is None else (jnp.concatenate([prefix[0], k], 1),
                                                      jnp.concatenate([prefix[1], v], 1))
        a = self.proj(attend(q, keys, values, mask).reshape(b, f * n, d)).reshape(b, f, n, d)
        h = h + gate1 * a
        x = _modulate(self.norm2(h), shift2, scale2)
        h = h + gate2 * self.fc2(nnx.gelu(self.fc1(x)))
        return h, (k, v)


class VideoTransformer(nnx.Module):
    """Patchified spatio-temporal transformer ``F(x, c_noise) -> [B, T, H, W, C]``.

    ``net(x, noise_labels, attention=..., block_size=...)`` for whole clips;
    ``net(x_block, noise_labels, attention='cached', cache=..., frame_offset=...)`` for one block
    against a KV cache, returning ``(out, kv)`` with ``kv = (k, v)`` of shape
    ``[depth, B, F*N, heads, head_dim]`` to append to the cache (``append_to_cache``).
    """

    def __init__(self, *, frame_size: int = 16, channels: int = 1, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: int = 4,
                 rope_bases=(10_000.0, 100.0), rngs: nnx.Rngs):
        if frame_size % patch_size:
            raise ValueError(f"frame size {frame_size} is not divisible by patch size "
                             f"{patch_size}.")
        self.frame_size, self.channels, self.patch_size = frame_size, channels, patch_size
        self.dim, self.depth, self.num_heads = dim, depth, num_heads
        self.tokens_per_frame = (frame_size // patch_size) ** 2
        patch_dim = patch_size * patch_size * channels
        self.embed = _linear(patch_dim, dim, rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                      (self.tokens_per_frame, dim)))
        self.noise1 = _linear(dim, dim, rngs)
        self.noise2 = _linear(dim, dim, rngs)
        self.blocks = nnx.List([Block(dim, num_heads, mlp_ratio, rope_bases=rope_bases, rngs=rngs)
                                for _ in range(depth)])
        self.norm_out = nnx.LayerNorm(dim, use_scale=False, use_bias=False, epsilon=1e-6,
                                      rngs=rngs)
        self.ada_out = _linear(dim, 2 * dim, rngs, zero=True)
        self.out = _linear(dim, patch_dim, rngs, zero=True)

    # -- patches ----------------------------------------------------------------------------
    def _patchify(self, x):
        b, t, hh, ww, c = x.shape
        p = self.patch_size
        x = x.reshape(b, t, hh // p, p, ww // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, (hh // p) * (ww // p), p * p * c)

    def _unpatchify(self, tokens):
        b, t = tokens.shape[:2]
        p, g, c = self.patch_size, self.frame_size // self.patch_size, self.channels
        x = tokens.reshape(b, t, g, g, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, g * p, g * p, c)

    def _noise_embedding(self, noise_labels):
        """Sinusoidal features of c_noise (frequencies 1..100 rad), then a 2-layer MLP."""
        half = self.dim // 2
        freqs = jnp.geomspace(1.0, 100.0, half)
        angle = noise_labels[..., None] * freqs
        emb = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)
        return self.noise2(nnx.silu(self.noise1(emb)))

    def _check_input(self, x, noise_labels):
        if x.ndim != 5 or x.shape[2:] != (self.frame_size, self.frame_size, self.channels):
            raise ValueError(f"expected clips [B, T, {self.frame_size}, {self.frame_size}, "
                             f"{self.channels}]; got shape {x.shape}.")
        if noise_labels.shape != x.shape[:2]:
            raise ValueError(f"noise_labels must be per frame, shape {x.shape[:2]}; got "
                             f"{noise_labels.shape}.")

    def __call__(self, x, noise_labels, *, attention: str = "bidirectional",
                 block_size: int | None = None, cache: dict | None = None,
                 frame_offset=0, return_features: bool = False):
        self._check_input(x, noise_labels)
        b, t = x.shape[:2]
        n = self.tokens_per_frame
        check_attention(attention, t, (block_size or t) if attention == "cached" else block_size)
        if attention == "cached":
            if cache is None:
                raise ValueError("attention='cached' needs a cache (see empty_cache).")
            if return_features:
                raise ValueError("features are only returned by the full-clip modes.")
            mask = _cached_mask(cache["valid"], t, n, block_size or t)
        else:
            if cache is not None:
                raise ValueError(f"a cache is only used with attention='cached', not "
                                 f"{attention!r}.")
            mask = jnp.asarray(np.repeat(np.repeat(frame_mask(t, attention, block_size), n, 0),
                                         n, 1))
        positions = frame_offset + jnp.arange(t)
        h = self.embed(self._patchify(x)) + self.pos[...]
        cond = self._noise_embedding(noise_labels)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            prefix = None if cache is None else (cache["k"][i], cache["v"][i])
            h, (k, v) = block(h, cond, positions, mask, prefix)
            ks.append(k)
            vs.append(v)
        shift, scale = jnp.split(self.ada_out(nnx.silu(cond))[:, :, None, :], 2, axis=-1)
        out = self._unpatchify(self.out(_modulate(self.norm_out(h), shift, scale)))
        if attention == "cached":
            return out, (jnp.stack(ks), jnp.stack(vs))
        if return_features:
            return out, {0: h.mean(axis=2)}
        return out

    @property
    def feature_channels(self) -> dict[int, int]:
        """Features returned with ``return_features``: per-frame token means ``{0: [B, T, dim]}``."""
        return {0: self.dim}


def _cached_mask(valid, num_frames: int, tokens: int, block_size: int):
    """``[F*N, ctx + F*N]``: a chunk of ``F / block_size`` blocks against the cache. Every block
    of the chunk sees the same sliding window of context as it would alone: the chunk's earlier
    blocks within the window (block-causal), and the cache without its oldest ``i * block_size``
    frames for block i (the chunk's earlier blocks take those frames' places)."""
    ctx = valid.shape[0]
    block = np.repeat(np.arange(num_frames) // block_size, tokens)            # [F*N]
    back = (block[:, None] - block[None, :]) * block_size * tokens            # tokens back
    own = (back >= 0) & (back <= ctx)                      # earlier chunk blocks in the window
    skip = np.arange(ctx)[None, :] >= (block * block_size * tokens)[:, None]  # [F*N, ctx]
    return jnp.concatenate([jnp.asarray(skip) & valid[None, :], jnp.asarray(own)], axis=1)


# ---------------------------------------------------------------------------------------------
# KV cache: a pure pytree, fixed shape (jit-friendly), sliding window.

def empty_cache(net: VideoTransformer, batch_size: int, *, window: int,
                block_size: int) -> dict:
    """A cache for ``window - block_size`` context frames (the current block is not cached).

    ``{'k', 'v': [depth, B, ctx_tokens, heads, head_dim], 'valid': [ctx_tokens] bool}``; the
    newest tokens sit at the end; invalid slots are masked out of attention.
    """
    check_window(window, block_size)
    ctx = (window - block_size) * net.tokens_per_frame
    shape = (net.depth, batch_size, ctx, net.num_heads, net.dim // net.num_heads)
    return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32),
            "valid": jnp.zeros((ctx,), bool)}


def append_to_cache(cache: dict, kv) -> dict:
    """Shifts the window left and writes the new block's ``kv`` at the end (oldest drop out)."""
    ctx = cache["valid"].shape[0]
    if ctx == 0:
        return cache
    k, v = kv
    new = k.shape[2]
    keep = lambda old, add: jnp.concatenate([old, add], axis=2)[:, :, -ctx:]
    valid = jnp.concatenate([cache["valid"], jnp.ones((new,), bool)])[-ctx:]
    return {"k": keep(cache["k"], k), "v": keep(cache["v"], v), "valid": valid}


# ---------------------------------------------------------------------------------------------
# The denoiser: EDM preconditioning per frame.

class VideoDenoiser(nnx.Module):
    """x0_hat = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), per frame.

    EDM (Karras et al. 2022, Table 1) with ``sigma [B, T]`` (each frame its own noise level) or
    ``[B]`` (one per clip). ``sigma`` is floored at ``process.sigma_min`` so that clean context
    (sigma = 0, e.g. finished blocks in a KV cache) gets a finite c_noise; there c_skip ~ 1 and
    c_out ~ 0. The call matches the image ``Denoiser``'s, ``den(x_t, sigma, class_labels=None)``,
    so samplers, losses and distillation use either; video models are unconditional.
    """

    def __init__(self, net: VideoTransformer, process):
        if not hasattr(process, "sigma_data"):
            raise ValueError(f"video denoisers use EDM preconditioning; config.process.name must "
                             f"be 'edm', got {type(process).__name__}.")
        self.net, self.process = net, process

    @property
    def feature_channels(self) -> dict[int, int]:
        return self.net.feature_channels

    def _coefs(self, x, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        if sigma.shape == x.shape[:1]:
            sigma = jnp.broadcast_to(sigma[:, None], x.shape[:2])
        if sigma.shape != x.shape[:2]:
            raise ValueError(f"sigma must be per clip {x.shape[:1]} or per frame {x.shape[:2]}; "
                             f"got {sigma.shape}.")
        sigma = jnp.maximum(sigma, self.process.sigma_min)
        c_skip, c_out, c_in, c_noise = preconditioning("edm", sigma, sigma,
                                                       sigma_data=self.process.sigma_data)
        expand = lambda c: c[:, :, None, None, None]
        return expand(c_skip), expand(c_out), expand(c_in), c_noise

    def __call__(self, x_t, sigma, class_labels=None, *, key=None,
                 attention: str = "bidirectional", block_size: int | None = None,
                 return_features: bool = False):
        del key  # no dropout
        if class_labels is not None:
            raise ValueError("video models are unconditional: class_labels must be None "
                             "(config.data.num_classes = 0).")
        c_skip, c_out, c_in, c_noise = self._coefs(x_t, sigma)
        out = self.net(c_in * x_t, c_noise, attention=attention, block_size=block_size,
                       return_features=return_features)
        if return_features:
            return c_skip * x_t + c_out * out[0], out[1]
        return c_skip * x_t + c_out * out

    def cached(self, x_t, sigma, cache: dict, *, frame_offset=0, block_size=None):
        """One block against the KV cache: ``(x0_hat, kv)``; ``kv`` goes to ``append_to_cache``.
        With ``block_size``, ``x_t`` may hold several consecutive blocks, each with its own
        per-frame sigma, computed as if one after the other (see ``_cached_mask``)."""
        c_skip, c_out, c_in, c_noise = self._coefs(x_t, sigma)
        out, kv = self.net(c_in * x_t, c_noise, attention="cached", cache=cache,
                           frame_offset=frame_offset, block_size=block_size)
        return c_skip * x_t + c_out * out, kv


def build_video_transformer(config, *, rngs: nnx.Rngs) -> VideoTransformer:
    """The video network of ``config.model`` (patch_size, dim, depth, num_heads, mlp_ratio, and
    the RoPE bases rope_time_base, rope_space_base) for clips of ``config.data`` (size,
    channels)."""
    m = config.model
    return VideoTransformer(frame_size=config.data.size, channels=config.data.get("channels", 1),
                            patch_size=m.patch_size, dim=m.dim, depth=m.depth,
                            num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                            rope_bases=(m.get("rope_time_base", 10_000.0),
                                        m.get("rope_space_base", 100.0)), rngs=rngs)
