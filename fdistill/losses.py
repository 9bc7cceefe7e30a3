"""Teacher losses: Score-SDE's continuous-time denoising score matching and EDM's loss.

Both are written against the Denoiser interface `model(x_t, t, class_labels, key=None) -> x0_hat`
(the score is Tweedie's s = (alpha_t x0_hat - x_t) / sigma_t^2). `get_loss_fn(config)` returns
`loss_fn(model, key, batch) -> (loss, metrics)` for the training loop, with `batch = {'x', 'label'}`.
"""
import math

import jax
import jax.numpy as jnp

from fdistill.sde import EDM, SDE, bcast, sde_from_config

# Score-SDE trains on t ~ U(eps, T) with eps = 1e-5 for every SDE (`get_sde_loss_fn`).
DSM_EPS = 1e-5
# Edges of the scaled noise level sigma_t / alpha_t for the per-bin loss metrics.
SIGMA_BIN_EDGES = (0.1, 1., 10.)


def _reduce(sq: jax.Array, reduce_mean: bool) -> jax.Array:
    """Per-example mean over the data dimensions, or Score-SDE's 1/2 sum."""
    sq = sq.reshape(sq.shape[0], -1)
    return jnp.mean(sq, axis=-1) if reduce_mean else 0.5 * jnp.sum(sq, axis=-1)


def dsm_losses(model, process: SDE, key, x0, class_labels=None, *, likelihood_weighting=False,
               reduce_mean=True, eps=DSM_EPS, dropout_key=None):
    """Score-SDE eq. 7 in continuous time, per example: t ~ U(eps, T), x_t = alpha x_0 + sigma z,

        lambda(t) || s(x_t, t) + z / sigma_t ||^2,   lambda = sigma_t^2 (default) or g(t)^2
                                                     (likelihood_weighting, Song et al. 2021b).

    With s = (alpha x0_hat - x_t) / sigma^2, s + z / sigma = alpha (x0_hat - x_0) / sigma^2, so the
    loss is lambda alpha^2 / sigma^4 ||x0_hat - x_0||^2, computed in that form. Returns
    (losses [B], scaled noise level sigma_t / alpha_t [B])."""
    k_t, k_z = jax.random.split(key)
    b = x0.shape[0]
    t = jax.random.uniform(k_t, (b,), minval=eps, maxval=process.T)
    z = jax.random.normal(k_z, x0.shape)
    alpha, sigma = process.marginal_coefs(t)
    x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * z
    x0_hat = model(x_t, t, class_labels, key=dropout_key)
    lam = process.sde(jnp.zeros_like(x0), t)[1] ** 2 if likelihood_weighting else sigma ** 2
    weight = lam * alpha ** 2 / sigma ** 4
    return weight * _reduce((x0_hat - x0) ** 2, reduce_mean), sigma / alpha


def edm_losses(model, process: EDM, key, x0, class_labels=None, *, reduce_mean=True, dropout_key=None,
               per_frame=False):
    """EDM eq. 8 / Table 1, per example: ln sigma ~ N(P_mean, P_std^2), n = sigma * process.noise
    (N(0, sigma^2 I) unless its frames are correlated),

        lambda(sigma) || D(x_0 + n; sigma) - x_0 ||^2,
        lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,

    summed over the data dimensions as in EDM (reduce_mean=False) or averaged (reduce_mean=True).
    With `per_frame` (clips x0 [B, T, ...]) every frame has its own sigma (diffusion forcing) and
    the losses are per frame. Returns (losses [B] or [B, T], sigma of the same shape)."""
    if not isinstance(process, EDM):
        raise ValueError(f"the 'edm' loss samples EDM's log-normal noise levels and needs process "
                         f"'edm', got {type(process).__name__}; use loss 'dsm' for Score-SDE processes")
    k_sigma, k_n = jax.random.split(key)
    shape = x0.shape[:2] if per_frame else x0.shape[:1]
    sigma = process.sample_training_sigma(k_sigma, math.prod(shape)).reshape(shape)
    x_t = x0 + bcast(sigma, x0) * process.noise(k_n, x0.shape)
    x0_hat = model(x_t, sigma, class_labels, key=dropout_key)
    sq = ((x0_hat - x0) ** 2).reshape(shape + (-1,))
    per_unit = jnp.mean(sq, axis=-1) if reduce_mean else jnp.sum(sq, axis=-1)
    return process.loss_weight(sigma) * per_unit, sigma


def drop_labels(key, class_labels: jax.Array, p: float) -> jax.Array:
    """Classifier-free guidance training: with probability p replace a one-hot label by the null
    (all-zeros) label (Ho & Salimans 2022)."""
    keep = jax.random.bernoulli(key, 1. - p, (class_labels.shape[0], 1))
    return jnp.where(keep, class_labels, 0.)


def sigma_bin_metrics(losses: jax.Array, sigma: jax.Array, prefix: str = 'train/loss') -> dict:
    """The loss split by noise level: entry [lo, hi) is mean_B(loss * 1[lo <= sigma < hi]), so the
    entries sum to the loss and average correctly over steps (an empty bin contributes 0)."""
    edges = (0.,) + SIGMA_BIN_EDGES + (float('inf'),)
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (sigma >= lo) & (sigma < hi)
        out[f'{prefix}_sigma_{lo:g}-{hi:g}'] = jnp.mean(jnp.where(mask, losses, 0.))
    return out


LOSSES = ('dsm', 'edm')
SIGMA_MODES = ('shared', 'per_frame')   # one sigma per example, or per frame of a clip


def get_loss_fn(config):
    """`loss_fn(model, key, batch) -> (loss, metrics)` for `config.training.loss` in LOSSES.

    Reads config.process (built by `sde_from_config`), config.training.{loss, likelihood_weighting,
    reduce_mean}, config.data.num_classes (int labels become one-hot when > 0),
    config.model.label_dropout (null-label probability; nothing to drop when unconditional) and
    config.model.dropout (a dropout key is passed to the model only when it is > 0)."""
    name = config.training.loss
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {list(LOSSES)}")
    process = sde_from_config(config.process)
    if name == 'edm' and not isinstance(process, EDM):
        raise ValueError(f"loss 'edm' needs config.process.name='edm', got {config.process.name!r}; "
                         f"use config.training.loss='dsm' for Score-SDE processes")
    num_classes = config.data.get('num_classes', 0)
    p_drop = float(config.model.get('label_dropout', 0.))
    if not 0. <= p_drop <= 1.:
        raise ValueError(f"config.model.label_dropout is a probability, got {p_drop}")
    use_dropout = float(config.model.get('dropout', 0.)) > 0
    reduce_mean = config.training.reduce_mean
    sigma_mode = config.training.get('sigma_mode', 'shared')
    if sigma_mode not in SIGMA_MODES:
        raise ValueError(f"unknown config.training.sigma_mode {sigma_mode!r}; valid: {list(SIGMA_MODES)}")
    if sigma_mode == 'per_frame' and (name != 'edm' or config.data.name != 'video'):
        raise ValueError("config.training.sigma_mode='per_frame' (one noise level per frame) needs "
                         "video data and the 'edm' loss")
    likelihood_weighting = config.training.get('likelihood_weighting', False)
    dsm_eps = process.eps if isinstance(process, EDM) else DSM_EPS  # EDM's time is sigma >= sigma_min
    if name == 'edm' and likelihood_weighting:
        raise ValueError("config.training.likelihood_weighting applies to loss 'dsm' only; "
                         "EDM's loss has its own weight lambda(sigma)")

    def loss_fn(model, key, batch):
        k_noise, k_label, k_drop = jax.random.split(key, 3)
        x0 = batch['x']
        labels = None
        if num_classes:
            labels = jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)
            if p_drop:
                labels = drop_labels(k_label, labels, p_drop)
        dropout_key = k_drop if use_dropout else None
        if name == 'edm':
            losses, sigma = edm_losses(model, process, k_noise, x0, labels, reduce_mean=reduce_mean,
                                       dropout_key=dropout_key, per_frame=sigma_mode == 'per_frame')
        else:
            losses, sigma = dsm_losses(model, process, k_noise, x0, labels, reduce_mean=reduce_mean,
                                       likelihood_weighting=likelihood_weighting, eps=dsm_eps,
                                       dropout_key=dropout_key)
        loss = jnp.mean(losses)
        return loss, {'train/loss': loss, **sigma_bin_metrics(losses, sigma)}

    return loss_fn
