"""Residual MLP score network for low-dimensional (2-D toy) data.

The same interface as the image U-Nets: `net(x, noise_labels, class_labels=None, *, key=None,
return_features=False)`, x [B, dim]; the noise label is embedded (positional or Fourier) and mixed
into every residual block as in DDPM++ (`UNetBlock` with convolutions replaced by linear maps).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fdistill.models.layers import Linear, dropout, noise_embedding


class MLPBlock(nnx.Module):
    """h = (h + fc1(dropout(silu(fc0(silu(h)) + affine(emb))))) * skip_scale."""

    def __init__(self, hidden: int, emb_channels: int, *, dropout: float, rngs: nnx.Rngs):
        init = dict(init_mode='xavier_uniform')
        self.fc0 = Linear(hidden, hidden, **init, rngs=rngs)
        self.affine = Linear(emb_channels, hidden, **init, rngs=rngs)
        self.fc1 = Linear(hidden, hidden, init_mode='xavier_uniform', init_weight=1e-5, rngs=rngs)
        self.dropout = dropout

    def __call__(self, h, emb, *, key=None):
        y = jax.nn.silu(self.fc0(jax.nn.silu(h)) + self.affine(emb))
        return (h + self.fc1(dropout(y, self.dropout, key))) * math.sqrt(0.5)


class MLP(nnx.Module):
    """Residual MLP: in-projection, `depth` residual blocks of width `hidden` conditioned on the noise
    (and class) embedding, silu and a near-zero-initialised out-projection.

    Features for the discriminator: {0: last hidden state [B, hidden]}.
    """

    def __init__(self, dim: int, *, hidden: int = 256, depth: int = 4, label_dim: int = 0,
                 embedding_type: str = 'positional', dropout: float = 0., rngs: nnx.Rngs):
        if hidden < 4 or hidden % 2:
            raise ValueError(f'MLP hidden width must be an even number >= 4; got {hidden}.')
        if depth < 1:
            raise ValueError(f'MLP depth must be >= 1; got {depth}.')
        if not 0 <= dropout < 1:
            raise ValueError(f'dropout must be in [0, 1); got {dropout}.')
        init = dict(init_mode='xavier_uniform')
        self.dim, self.label_dim = dim, label_dim
        self.map_noise = noise_embedding(embedding_type, hidden, rngs=rngs)
        self.map_label = nnx.data(Linear(label_dim, hidden, **init, rngs=rngs) if label_dim else None)
        self.map_layer0 = Linear(hidden, hidden, **init, rngs=rngs)
        self.map_layer1 = Linear(hidden, hidden, **init, rngs=rngs)
        self.inp = Linear(dim, hidden, **init, rngs=rngs)
        self.blocks = nnx.List([MLPBlock(hidden, hidden, dropout=dropout, rngs=rngs) for _ in range(depth)])
        self.out = Linear(hidden, dim, init_mode='xavier_uniform', init_weight=1e-5, rngs=rngs)
        self.feature_channels = {0: hidden}

    def __call__(self, x, noise_labels, class_labels=None, *, key=None, return_features=False):
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f'MLP expects input [B, {self.dim}]; got shape {tuple(x.shape)}.')
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f'noise_labels must have shape [B] = ({x.shape[0]},); got {noise_labels.shape}.')
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            if class_labels is None:
                class_labels = jnp.zeros((x.shape[0], self.label_dim), emb.dtype)
            emb = emb + self.map_label(class_labels * math.sqrt(self.label_dim))
        elif class_labels is not None:
            raise ValueError('class_labels given to an unconditional MLP (label_dim=0).')
        emb = jax.nn.silu(self.map_layer1(jax.nn.silu(self.map_layer0(emb))))
        keys = jax.random.split(key, len(self.blocks)) if key is not None else [None] * len(self.blocks)
        h = self.inp(x)
        for block, k in zip(self.blocks, keys):
            h = block(h, emb, key=k)
        out = self.out(jax.nn.silu(h))
        return (out, {0: h}) if return_features else out
