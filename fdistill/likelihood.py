"""Likelihood through the probability-flow ODE (Score-SDE Sec. 4.3 and Appendix D.2).

Integrating dx/dt = f~(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t) from t = eps to T together with
d log p/dt = div f~ gives the instantaneous change of variables (Chen et al. 2018; Score-SDE App. D.2):

    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt,

with the divergence estimated by Hutchinson's trick, div f~ = E_v[v^T (d f~/dx) v], one JVP per
evaluation and one noise v per example held fixed along the trajectory (Rademacher or Gaussian);
'exact' takes the full Jacobian trace (one JVP per dimension: for toy data).

Solver: scipy's adaptive RK45 with rtol = atol = 1e-5, as Score-SDE reports its bits/dim; each
right-hand-side evaluation is one jitted call (a network evaluation and its JVP), so the host loop
costs little next to the network on real models, the error control is the reference
implementation's, and `nfe` (the number of right-hand-side evaluations) is directly comparable to
Score-SDE's. Not jittable as a whole (use it in evaluation, not inside a train step).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import integrate

from fdistill.sde import EDM, SDE, sum_except_batch

HUTCHINSON = ('rademacher', 'gaussian', 'exact')
# Score-SDE integrates the likelihood ODE from eps = 1e-5 (`get_likelihood_fn`); EDM from sigma_min.
SCORE_SDE_EPS = 1e-5


def default_eps(process: SDE) -> float:
    """Lower end of the ODE: Score-SDE's 1e-5, or sigma_min for EDM."""
    return process.eps if isinstance(process, EDM) else SCORE_SDE_EPS


def hutchinson_noise(key, shape, kind: str) -> jax.Array:
    """Probe vectors v with E[v v^T] = I: Rademacher (+-1) or standard Gaussian."""
    if kind == 'rademacher':
        return jax.random.rademacher(key, shape, dtype=jnp.float32)
    return jax.random.normal(key, shape)


def pf_ode_drift_and_div(denoise_fn, process: SDE, x, t, v, class_labels=None, *,
                         hutchinson: str = 'rademacher'):
    """(f~(x, t) [B, ...], div f~ estimate [B]): v^T J v for the probe v, or the exact trace."""
    score_fn = lambda x_, t_: process.score_from_denoised(x_, t_, denoise_fn(x_, t_, class_labels))
    drift_fn = lambda x_: process.reverse(score_fn, probability_flow=True).sde(x_, t)[0]
    if hutchinson != 'exact':
        drift, jv = jax.jvp(drift_fn, (x,), (v,))
        return drift, sum_except_batch(jv * v)
    dim = math.prod(x.shape[1:])
    basis = jnp.broadcast_to(jnp.eye(dim).reshape((dim, 1) + x.shape[1:]), (dim,) + x.shape)
    drift = drift_fn(x)
    columns = jax.vmap(lambda e: jax.jvp(drift_fn, (x,), (e,))[1])(basis)  # [dim, B, ...]
    return drift, jnp.einsum('ibi->b', columns.reshape(dim, x.shape[0], dim))


def get_likelihood_fn(denoise_fn, process: SDE, *, hutchinson: str = 'rademacher', rtol: float = 1e-5,
                      atol: float = 1e-5, method: str = 'RK45', eps: float | None = None):
    """`likelihood_fn(key, x, class_labels=None) -> (logp, z, nfe)`: log p_eps(x) in nats per example
    through the PF-ODE from eps (default `default_eps`) to T, with z = x(T) and nfe the number of
    right-hand-side evaluations. Build it once and call it per batch: the right-hand side is
    compiled on the first call only.

    `denoise_fn(x_t, t, class_labels) -> x0_hat` is an nnx Module (the Denoiser; its parameters
    become arguments of the jitted right-hand side) or a plain callable (closed over)."""
    if hutchinson not in HUTCHINSON:
        raise ValueError(f"unknown hutchinson estimator {hutchinson!r}; valid: {list(HUTCHINSON)}")
    eps = default_eps(process) if eps is None else eps
    if isinstance(denoise_fn, nnx.Module):
        graphdef, state = nnx.split(denoise_fn)
        rhs = jax.jit(lambda state, x, t, v, c: pf_ode_drift_and_div(
            nnx.merge(graphdef, state), process, x, t, v, c, hutchinson=hutchinson))
    else:
        state = None
        rhs = jax.jit(lambda state, x, t, v, c: pf_ode_drift_and_div(
            denoise_fn, process, x, t, v, c, hutchinson=hutchinson))

    def likelihood_fn(key, x, class_labels=None):
        x = jnp.asarray(x, jnp.float32)
        shape, b = x.shape, x.shape[0]
        v = hutchinson_noise(key, shape, hutchinson)

        def ode_func(t, y):
            xt = jnp.asarray(y[:-b].reshape(shape), jnp.float32)
            drift, div = rhs(state, xt, jnp.full((b,), t, jnp.float32), v, class_labels)
            return np.concatenate([np.asarray(drift, np.float64).ravel(), np.asarray(div, np.float64)])

        y0 = np.concatenate([np.asarray(x, np.float64).ravel(), np.zeros(b)])
        sol = integrate.solve_ivp(ode_func, (eps, process.T), y0, rtol=rtol, atol=atol, method=method)
        if not sol.success:
            raise RuntimeError(f"PF-ODE likelihood solver ({method}) failed: {sol.message}")
        z = sol.y[:-b, -1].reshape(shape)
        delta_logp = sol.y[-b:, -1]
        logp = np.asarray(process.prior_logp(jnp.asarray(z, jnp.float32)), np.float64) + delta_logp
        return logp, z, int(sol.nfev)

    return likelihood_fn


def log_likelihood(denoise_fn, process: SDE, key, x, class_labels=None, **options):
    """One-shot `get_likelihood_fn(denoise_fn, process, **options)(key, x, class_labels)`."""
    return get_likelihood_fn(denoise_fn, process, **options)(key, x, class_labels)


def uniform_dequantize(key, images) -> jax.Array:
    """Score-SDE's uniform dequantisation of 8-bit images in [-1, 1]: the level k = (x + 1) 255 / 2
    becomes (k + u) / 256, u ~ U[0, 1), mapped back to [-1, 1)."""
    k = jnp.clip(jnp.round((images + 1.) * 127.5), 0., 255.)
    u = jax.random.uniform(key, images.shape)
    return 2. * (k + u) / 256. - 1.


# log p over [-1, 1) -> log p over [0, 256): the map x -> 128 (x + 1) costs log2(128) = 7 bits/dim.
BPD_OFFSET = 7.


def get_bpd_fn(denoise_fn, process: SDE, *, dequantize: bool = True, **ode_options):
    """`bpd_fn(key, images, class_labels=None) -> (bpd, z, nfe)`: Score-SDE's bits/dim of 8-bit
    images in [-1, 1], -log2 p(dequantised x) / D + 7.

    With uniform dequantisation this is an upper bound on the discrete 8-bit NLL (one sample of u).
    `ode_options` go to `get_likelihood_fn`."""
    likelihood_fn = get_likelihood_fn(denoise_fn, process, **ode_options)

    def bpd_fn(key, images, class_labels=None):
        images = jnp.asarray(images, jnp.float32)
        lo, hi = float(jnp.min(images)), float(jnp.max(images))
        if lo < -1. - 1e-6 or hi > 1. + 1e-6:
            raise ValueError(f"bits/dim expects images in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                             f"scale 8-bit data by x / 127.5 - 1")
        k_deq, k_ode = jax.random.split(key)
        x = uniform_dequantize(k_deq, images) if dequantize else images
        logp, z, nfe = likelihood_fn(k_ode, x, class_labels)
        dim = math.prod(images.shape[1:])
        return -logp / (dim * np.log(2.)) + BPD_OFFSET, z, nfe

    return bpd_fn


def bits_per_dim(denoise_fn, process: SDE, key, images, class_labels=None, **options):
    """One-shot `get_bpd_fn(denoise_fn, process, **options)(key, images, class_labels)`."""
    return get_bpd_fn(denoise_fn, process, **options)(key, images, class_labels)
