"""Pure pieces of HiAR's forward-KL regulariser and of its noise-level distribution
(HiAR, arXiv 2603.08703, Sec. 4 and Eq. 10).

- ``chord_x0``: the teacher's low-frequency x0 estimate from two states of its PF-ODE
  trajectory, the chord through ``(sigma_k, x_k)`` and ``(sigma_{k+1}, x_{k+1})`` extended to
  sigma = 0 (Eq. 10 for k = 0):  x0 = x_k - sigma_k (x_{k+1} - x_k) / (sigma_{k+1} - sigma_k).
  A straight line in the flow-matching parametrisation x_s = (1 - s) x0 + s eps stays a
  straight line in the variance-exploding one used here (x / (1 - s) against sigma = s / (1 - s))
  with the same value at 0, so the target is the same in both.
- ``fkl_targets`` / ``fkl_example``: the regression pair of constrained step k (the student's
  input state, its level, and the target: the chord or the ODE end point).
- ``choose_constrained_step``: one of the first K student steps, drawn uniformly per iteration.
- ``shifted_sigmas``: the timestep-shifted noise distribution of HiAR / Self-Forcing for the
  distribution-matching loss and the critic (see its docstring for the exact mapping).

Everything is a pure ``jax.numpy`` function of its inputs (jit- and grad-friendly; the step
index may be traced).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

FKL_TARGETS = ("chord", "end_point")

# HiAR's released training code clamps the shifted flow time to [0.02, 0.98] of its 1000 steps
# (model/dmd.py: min_step, max_step).
FLOW_TIME_RANGE = (0.02, 0.98)


# ---------------------------------------------------------------------------------------------
# Forward-KL regulariser targets.

def chord_x0(x_k, x_next, sigma_k, sigma_next):
    """The chord from ``(sigma_k, x_k)`` to ``(sigma_next, x_next)`` evaluated at sigma = 0
    (HiAR Eq. 10): ``x_k - sigma_k (x_next - x_k) / (sigma_next - sigma_k)``.

    ``sigma_next = 0`` returns ``x_next`` (the chord then ends at the target itself).
    """
    sigma_k = jnp.asarray(sigma_k, jnp.float32)
    sigma_next = jnp.asarray(sigma_next, jnp.float32)
    return x_k - sigma_k * (x_next - x_k) / (sigma_next - sigma_k)


def _check_trajectory(states, x0, sigmas):
    sigmas = np.asarray(sigmas, np.float64)
    if states.shape[0] != len(sigmas) - 1:
        raise ValueError(f"states hold {states.shape[0]} student levels but sigmas has "
                         f"{len(sigmas)} values; pass the S + 1 student levels ending in 0 "
                         f"(one state per level before 0).")
    if sigmas[-1] != 0 or np.any(np.diff(sigmas) >= 0):
        raise ValueError(f"sigmas must decrease strictly to 0; got {sigmas.tolist()}.")
    if x0.shape != states.shape[1:]:
        raise ValueError(f"x0 must have the shape of one state, {states.shape[1:]}; got "
                         f"{x0.shape}.")
    return sigmas


def fkl_targets(states, x0, sigmas, *, target: str = "chord"):
    """Regression targets of every student step ``[S, B, ...]``.

    ``states [S, B, ...]``: the teacher's ODE states at the student levels ``sigmas[:-1]``
    (``states[0] = sigma_max z``); ``x0 [B, ...]``: the ODE end point; ``sigmas``: the S + 1
    student levels ending in 0. ``target='chord'`` (HiAR's default): step k regresses onto the
    chord from its state to the next checkpoint (the state at level k + 1, the end point for the
    last step), extended to sigma = 0; ``'end_point'``: every step onto ``x0``.
    """
    if target not in FKL_TARGETS:
        raise ValueError(f"unknown forward-KL target {target!r}; valid: "
                         f"{', '.join(FKL_TARGETS)}.")
    sigmas = _check_trajectory(states, x0, sigmas)
    if target == "end_point":
        return jnp.broadcast_to(x0, states.shape)
    nxt = jnp.concatenate([states[1:], x0[None]], axis=0)
    shape = (-1,) + (1,) * (states.ndim - 1)
    s = jnp.asarray(sigmas, jnp.float32)
    return chord_x0(states, nxt, s[:-1].reshape(shape), s[1:].reshape(shape))


def fkl_example(states, x0, sigmas, step, *, target: str = "chord"):
    """The regression pair of constrained step ``step`` (an int, possibly traced).

    Returns ``(x_in, sigma_in, x_target)``: the teacher's state at student level ``step``
    ``[B, ...]``, its noise level ``[B, T]`` per frame (for ``[B, T, H, W, C]`` clips), and the
    target of ``fkl_targets``. The student predicts x0 from ``(x_in, sigma_in)``; the loss is
    ``mean((prediction - stop_gradient(x_target))^2)``.
    """
    targets = fkl_targets(states, x0, sigmas, target=target)
    x_in = jnp.take(states, step, axis=0)
    x_target = jnp.take(targets, step, axis=0)
    sigma = jnp.take(jnp.asarray(np.asarray(sigmas, np.float32)), step)
    sigma_in = jnp.broadcast_to(sigma, x_in.shape[:2]).astype(jnp.float32)
    return x_in, sigma_in, x_target


def choose_constrained_step(key, num_constrained: int, num_steps: int):
    """One of the first ``num_constrained`` (K) student steps, uniformly (HiAR draws one per
    iteration for the whole batch; Table 3 ablates K = 1, 2, 4). Returns an int32 scalar."""
    if not 1 <= num_constrained <= num_steps:
        raise ValueError(f"the number of constrained steps K = {num_constrained} must lie in "
                         f"[1, {num_steps}] (the student's steps).")
    return jax.random.randint(key, (), 0, num_constrained, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------
# Timestep-shifted noise levels.

def shift_time(u, shift: float):
    """The timestep shift t' = shift u / (1 + (shift - 1) u) on flow time u in [0, 1]."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def _check_shift(shift, time_range):
    lo, hi = time_range
    if shift <= 0:
        raise ValueError(f"timestep shift must be positive; got {shift}.")
    if not 0 < lo < hi < 1:
        raise ValueError(f"flow time range must satisfy 0 < lo < hi < 1; got {time_range}.")


def shifted_sigmas(key, shape, *, shift: float = 5.0,
                   time_range: tuple[float, float] = FLOW_TIME_RANGE):
    """Noise levels of HiAR / Self-Forcing's timestep-shifted distribution, as EDM sigmas.

    Their released code draws an integer timestep uniformly in [0, 1000), shifts it on the
    flow time u = t / 1000 (``shift_time``), clamps it to ``time_range`` of the 1000 steps and
    noises the flow-matching way, x_s = (1 - s) x0 + s eps. Dividing by 1 - s gives the
    variance-exploding form x0 + sigma eps with sigma = s / (1 - s) = shift u / (1 - u). Here
    u ~ U[0, 1) (continuous), s = clip(shift_time(u), *time_range), sigma = s / (1 - s): median
    ``shift``, quantile q at ``shift q / (1 - q)`` inside the clamp, and point masses at the
    clamp's ends (shift 5: 9.3% at sigma = 49, the top of the default range).
    """
    _check_shift(shift, time_range)
    u = jax.random.uniform(key, shape, jnp.float32)
    s = jnp.clip(shift_time(u, shift), *time_range)
    return s / (1.0 - s)


@dataclasses.dataclass(frozen=True)
class ShiftedNoise:
    """``noise(key, n) -> sigma [n]`` from `shifted_sigmas` (the objective's noise distribution,
    shared by the distribution-matching loss and the critic)."""

    shift: float = 5.0
    time_range: tuple[float, float] = FLOW_TIME_RANGE

    def __post_init__(self):
        _check_shift(self.shift, self.time_range)

    def __call__(self, key, n: int):
        return shifted_sigmas(key, (n,), shift=self.shift, time_range=tuple(self.time_range))


def shifted_sigma_cdf(sigma, *, shift: float = 5.0,
                      time_range: tuple[float, float] = FLOW_TIME_RANGE):
    """P(sigma' <= sigma) for ``shifted_sigmas`` (numpy): sigma / (shift + sigma) inside the
    clamped range, 0 below its bottom, 1 from its top."""
    _check_shift(shift, time_range)
    sigma = np.asarray(sigma, np.float64)
    lo, hi = (t / (1.0 - t) for t in time_range)
    return np.where(sigma < lo, 0.0, np.where(sigma >= hi, 1.0, sigma / (shift + sigma)))
