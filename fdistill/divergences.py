"""The f-divergence catalogue of f-distill (arXiv 2502.15681, Table 1).

D_f(p || q) = E_q[f(p/q)] with f convex and f(1) = 0; r = p_t / q_theta,t is the ratio of the
teacher's noised marginal to the student's. The distillation gradient (paper Eq. 7)
weights every sample by

    h(r) = f''(r) r^2,

so a divergence is fully described by the pair (f, h). Named divergences carry h in closed form;
`from_f` derives h for any user f by differentiating f twice with JAX.

    >>> div = get('js')
    >>> div.h(jnp.array([1.0]))        # r / (r + 1)
    Array([0.5], dtype=float32)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Divergence:
    """An f-divergence: `f(r)` and its weighting `h(r) = f''(r) r^2`, elementwise, jax-traceable.

    `params` records the family parameters (e.g. `(('alpha', 0.5),)`) for display and equality.
    """

    name: str
    f: Callable[[Array], Array]
    h: Callable[[Array], Array]
    params: tuple[tuple[str, float], ...] = ()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"Divergence({self.name}{', ' + params if params else ''})"


# --- f and h of the named divergences (Table 1 of the paper) ---------------------

def _reverse_kl_f(r):
    return -jnp.log(r)


def _reverse_kl_h(r):
    return jnp.ones_like(r)


def _softened_reverse_kl_f(r):
    return (r + 1.0) * jnp.log(0.5 + 0.5 / r)


def _softened_reverse_kl_h(r):
    return 1.0 / (r + 1.0)


def _jensen_shannon_f(r):
    return r * jnp.log(r) - (r + 1.0) * jnp.log((r + 1.0) / 2.0)


def _jensen_shannon_h(r):
    return r / (r + 1.0)


def _squared_hellinger_f(r):
    return 1.0 - jnp.sqrt(r)


def _squared_hellinger_h(r):
    return jnp.sqrt(r) / 4.0


def _forward_kl_f(r):
    return r * jnp.log(r)


def _forward_kl_h(r):
    return r


def _jeffreys_f(r):
    return (r - 1.0) * jnp.log(r)


def _jeffreys_h(r):
    return r + 1.0


def _neyman_chi2_f(r):
    return (1.0 - r) ** 2 / r


def _neyman_chi2_h(r):
    return 2.0 / r


def _pearson_chi2_f(r):
    return (r - 1.0) ** 2


def _pearson_chi2_h(r):
    return 2.0 * r**2


def _alpha_f(r, alpha):
    return (r**alpha - 1.0 - alpha * (r - 1.0)) / (alpha * (alpha - 1.0))


def _alpha_h(r, alpha):
    return r**alpha


_NAMED = {
    "reverse_kl": (_reverse_kl_f, _reverse_kl_h),
    "softened_reverse_kl": (_softened_reverse_kl_f, _softened_reverse_kl_h),
    "jensen_shannon": (_jensen_shannon_f, _jensen_shannon_h),
    "squared_hellinger": (_squared_hellinger_f, _squared_hellinger_h),
    "forward_kl": (_forward_kl_f, _forward_kl_h),
    "jeffreys": (_jeffreys_f, _jeffreys_h),
    "neyman_chi2": (_neyman_chi2_f, _neyman_chi2_h),
    "pearson_chi2": (_pearson_chi2_f, _pearson_chi2_h),
}

ALIASES = {
    "rkl": "reverse_kl",
    "dmd": "reverse_kl",
    "srkl": "softened_reverse_kl",
    "sf": "softened_reverse_kl",       # the reference implementation's name (h = 1 / (1 + r))
    "js": "jensen_shannon",
    "sh": "squared_hellinger",
    "hellinger": "squared_hellinger",
    "fkl": "forward_kl",
    "kl": "forward_kl",
    "jf": "jeffreys",
    "neyman": "neyman_chi2",
    "pearson": "pearson_chi2",
}

NAMES = tuple(_NAMED) + ("alpha",)


def _valid_names() -> str:
    aliases = ", ".join(f"{a} -> {n}" for a, n in ALIASES.items())
    return f"names: {', '.join(NAMES)}; aliases: {aliases}"


@functools.lru_cache(maxsize=None)
def _alpha(alpha: float) -> Divergence:
    return Divergence(
        "alpha",
        functools.partial(_alpha_f, alpha=alpha),
        functools.partial(_alpha_h, alpha=alpha),
        (("alpha", alpha),),
    )


def get(name: str, **params) -> Divergence:
    """The named divergence (or alias); the alpha family takes `alpha=` (not 0 or 1).

    Raises ValueError for an unknown name (listing all names and aliases) or bad parameters.
    """
    canonical = ALIASES.get(name, name)
    if canonical == "alpha":
        unknown = set(params) - {"alpha"}
        if unknown or "alpha" not in params:
            raise ValueError(
                f"Divergence 'alpha' takes exactly one parameter `alpha` (got {sorted(params)}); "
                "e.g. divergences.get('alpha', alpha=0.5).")
        alpha = float(params["alpha"])
        if alpha in (0.0, 1.0):
            limit = "reverse_kl" if alpha == 0.0 else "forward_kl"
            raise ValueError(
                f"alpha={alpha} is a singular point of the alpha family (0/0 in f); its limit "
                f"has the same weighting h as '{limit}': use divergences.get('{limit}').")
        return _alpha(alpha)
    if canonical not in _NAMED:
        raise ValueError(f"Unknown divergence {name!r}. Valid {_valid_names()}.")
    if params:
        raise ValueError(f"Divergence {canonical!r} takes no parameters, got {sorted(params)}.")
    f, h = _NAMED[canonical]
    return Divergence(canonical, f, h)


def h_from_f(f: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """h(r) = f''(r) r^2 by differentiating a scalar f twice (elementwise over any array shape)."""
    f2 = jax.grad(jax.grad(lambda r: jnp.asarray(f(r), jnp.float32).reshape(())))
    f2 = jnp.vectorize(f2)

    def h(r):
        r = jnp.asarray(r, jnp.float32)
        return f2(r) * r**2

    return h


DEFAULT_R_GRID = np.geomspace(1e-2, 1e2, 401).astype(np.float32)


def from_f(f: Callable[[Array], Array], name: str = "custom", *, r_grid=None,
           tol: float = 1e-4) -> Divergence:
    """A Divergence from any user f (elementwise, jnp ops); h = f'' r^2 derived by autodiff.

    Checks numerically that f(1) = 0 and that f is convex on `r_grid` (default: 401 points
    log-spaced on [1e-2, 1e2], which covers the clipped ratios f-distill uses), i.e.
    f''(r) >= -tol * max(1, max |f''|). Raises ValueError naming the failing check and where.
    """
    r_grid = DEFAULT_R_GRID if r_grid is None else np.asarray(r_grid, np.float32)
    f1 = float(jnp.asarray(f(jnp.float32(1.0))))
    if not np.isfinite(f1) or abs(f1) > tol:
        raise ValueError(
            f"f(1) must be 0 for an f-divergence (D_f(p||p) = 0), got f(1) = {f1:.6g} for "
            f"{name!r}; subtract the constant: use f(r) - f(1).")
    h = h_from_f(f)
    f2 = np.asarray(h(jnp.asarray(r_grid))) / r_grid**2
    bad = ~np.isfinite(f2)
    if bad.any():
        raise ValueError(
            f"f''(r) of {name!r} is not finite at r = {r_grid[bad][:5].tolist()}; f must be twice "
            f"differentiable on the ratio grid [{r_grid.min():.3g}, {r_grid.max():.3g}].")
    scale = max(1.0, float(np.abs(f2).max()))
    concave = f2 < -tol * scale
    if concave.any():
        i = int(np.argmax(concave))
        raise ValueError(
            f"f of {name!r} is not convex: f''({r_grid[i]:.4g}) = {f2[i]:.4g} < 0 (and at "
            f"{int(concave.sum())} of {r_grid.size} grid points). An f-divergence needs a "
            f"convex f.")
    return Divergence(name, f, h)
