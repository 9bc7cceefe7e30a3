"""Teacher samplers: reverse-SDE Euler-Maruyama, predictor-corrector, PF-ODE Heun (EDM) and Euler.

Every sampler is a pure function

    sample(denoise_fn, process, key, shape, class_labels=None, **options) -> (x, nfe)

over a denoiser `denoise_fn(x_t, t, class_labels) -> x0_hat` (the Denoiser of fdistill.models, or
any callable) and a process of fdistill.sde; `nfe` is a python int, the network evaluations per
sample. The loops are `lax.fori_loop`s, so compile time does not grow with the number of steps;
wrap a sampler in `jax.jit` with `process` and `shape` closed over, the parameters as arguments:

    sample = get_sampler('heun', num_steps=18)
    draw = jax.jit(lambda state, key: sample(nnx.merge(graphdef, state), process, key, shape)[0])

The score is Tweedie's (alpha_t x0_hat - x_t) / sigma_t^2 (`SDE.score_from_denoised`).
"""
import dataclasses
import functools
import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fdistill.sde import EDM, SDE, bcast, karras_grid

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def nfe_per_call(denoise_fn: DenoiseFn) -> int:
    """Network evaluations per sample made by one call of denoise_fn (2 for classifier-free guidance)."""
    return getattr(denoise_fn, 'nfe_per_call', 1)


def _vec(t, x):
    return jnp.full((x.shape[0],), t, jnp.float32)


def _score_fn(denoise_fn, process, class_labels):
    def score_fn(x, t):
        return process.score_from_denoised(x, t, denoise_fn(x, t, class_labels))
    return score_fn


@dataclasses.dataclass(frozen=True)
class Guided:
    """Classifier-free guidance (Ho & Salimans 2022, in EDM/DMD2's convention):

        D_w(x, c) = D(x, null) + w (D(x, c) - D(x, null)),

    so w = 1 is the plain conditional denoiser and w = 0 the unconditional one (the null label is
    the all-zeros one-hot vector, as trained with label dropout). Both branches run as one call on a
    doubled batch; `nfe_per_call` counts them as two network evaluations per sample.
    """
    denoise_fn: DenoiseFn
    scale: float

    @property
    def nfe_per_call(self) -> int:
        return 2 * nfe_per_call(self.denoise_fn)

    def __call__(self, x_t, t, class_labels=None):
        if class_labels is None:
            raise ValueError("classifier-free guidance needs class_labels (one-hot [B, num_classes]); "
                             "for an unconditional model sample without `guided`")
        n = x_t.shape[0]
        x0 = self.denoise_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                             jnp.concatenate([class_labels, jnp.zeros_like(class_labels)]))
        cond, uncond = x0[:n], x0[n:]
        return uncond + self.scale * (cond - uncond)


def guided(denoise_fn: DenoiseFn, scale: float) -> Guided:
    """Classifier-free guided denoiser D(x, null) + scale (D(x, c) - D(x, null)); see `Guided`."""
    return Guided(denoise_fn, scale)


def euler_maruyama(denoise_fn: DenoiseFn, process: SDE, key, shape, class_labels=None, *,
                   num_steps: int | None = None, noise_removal: bool = True):
    """Euler-Maruyama on the reverse SDE (Score-SDE eq. 6) over `process.sampling_grid(num_steps)`.

    x_{i+1} = x_i + [f - g^2 score](x_i, t_i) dt_i + g(t_i) sqrt(|dt_i|) z_i, dt_i = t_{i+1} - t_i < 0,
    from the prior at T down to t = 0 (the grid is linspace(T, eps, n) then 0; Karras' for EDM).
    With noise_removal, return Tweedie's E[x_0 | x_eps] = D(x_eps, eps) of the last step instead of
    the last noisy iterate (Score-SDE's one-step denoising; no extra evaluation). nfe = num_steps
    (default process.N).
    """
    n = process.N if num_steps is None else num_steps
    ts = process.sampling_grid(n)
    init_key, key = jax.random.split(key)
    x = process.prior_sampling(init_key, shape)

    def step(i, carry):
        x, _ = carry
        t = _vec(ts[i], x)
        dt = ts[i + 1] - ts[i]
        x0_hat = denoise_fn(x, t, class_labels)
        drift, diffusion = process.sde(x, t)
        drift = drift - bcast(diffusion, x) ** 2 * process.score_from_denoised(x, t, x0_hat)
        z = process.noise(jax.random.fold_in(key, i), shape)
        x = x + drift * dt + bcast(diffusion, x) * jnp.sqrt(-dt) * z
        return x, x0_hat

    x, x0_hat = jax.lax.fori_loop(0, n, step, (x, x))
    return (x0_hat if noise_removal else x), n * nfe_per_call(denoise_fn)


def langevin_step(score_fn, process: SDE, key, x, t, snr: float):
    """One Langevin corrector step (Score-SDE Algorithm 4/5): eps = 2 alpha_i (snr ||z|| / ||s||)^2,
    x <- x + eps s + sqrt(2 eps) z; norms are averaged over the batch as in Score-SDE."""
    grad = score_fn(x, t)
    noise = process.noise(key, x.shape)
    grad_norm = jnp.mean(jnp.linalg.norm(grad.reshape(x.shape[0], -1), axis=-1))
    noise_norm = jnp.mean(jnp.linalg.norm(noise.reshape(x.shape[0], -1), axis=-1))
    step_size = 2 * process.langevin_alpha(t) * (snr * noise_norm / grad_norm) ** 2
    return x + bcast(step_size, x) * grad + bcast(jnp.sqrt(2 * step_size), x) * noise


def pc(denoise_fn: DenoiseFn, process: SDE, key, shape, class_labels=None, *, snr: float = 0.16,
       n_corrector: int = 1, num_steps: int | None = None, probability_flow: bool = False,
       noise_removal: bool = True):
    """Predictor-corrector (Score-SDE Algorithm 1): at each t of linspace(T, eps, N) (Karras for EDM),
    `n_corrector` Langevin corrector steps with signal-to-noise ratio `snr`, then the reverse-diffusion
    predictor x <- x - f_rev + G z with (f_rev, G) the reverse of `process.discretize`
    (SMLD for VE, DDPM for VP, Euler-Maruyama for sub-VP; Score-SDE App. E).

    num_steps overrides process.N (the discretisation follows it). With noise_removal, return
    Tweedie's D(x_eps, eps) from the last predictor evaluation. nfe = N (n_corrector + 1).
    """
    if n_corrector < 0:
        raise ValueError(f"pc: n_corrector (Langevin steps per predictor step) must be >= 0, "
                         f"got {n_corrector}")
    if num_steps is not None:
        process = dataclasses.replace(process, N=num_steps)
    n = process.N
    ts = process.sampling_grid(n)[:-1]
    score_fn = _score_fn(denoise_fn, process, class_labels)
    init_key, key = jax.random.split(key)
    x = process.prior_sampling(init_key, shape)

    def step(i, carry):
        x, _ = carry
        t = _vec(ts[i], x)
        keys = jax.random.split(jax.random.fold_in(key, i), n_corrector + 1)
        for j in range(n_corrector):
            x = langevin_step(score_fn, process, keys[j], x, t, snr)
        x0_hat = denoise_fn(x, t, class_labels)
        rsde = process.reverse(lambda x_, t_: process.score_from_denoised(x_, t_, x0_hat),
                               probability_flow)
        f, G = rsde.discretize(x, t)
        z = process.noise(keys[n_corrector], shape)
        return x - f + bcast(G, x) * z, x0_hat

    x, x0_hat = jax.lax.fori_loop(0, n, step, (x, x))
    return (x0_hat if noise_removal else x), n * (n_corrector + 1) * nfe_per_call(denoise_fn)


def _ode_grid(process: SDE, num_steps: int, rho: float):
    """Karras grid (EDM eq. 5) between the scaled noise levels sigma_t / alpha_t at eps and T."""
    if isinstance(process, EDM):
        return process.karras_sigmas(num_steps, rho)
    with jax.ensure_compile_time_eval():
        ends = process.scaled_sigma(jnp.asarray([process.eps, process.T], jnp.float32))
        return karras_grid(float(ends[0]), float(ends[1]), num_steps, rho)


def _scaled_denoiser(denoise_fn, process, class_labels):
    """D(x_hat; sigma) in EDM's scaled variable x_hat = x_t / alpha_t with sigma = sigma_t / alpha_t."""
    def denoise(x_hat, sigma):
        t = _vec(process.inverse_scaled_sigma(sigma), x_hat)
        alpha, _ = process.marginal_coefs(t)
        return denoise_fn(bcast(alpha, x_hat) * x_hat, t, class_labels)
    return denoise


def _ode_sampler(denoise_fn, process, key, shape, class_labels, num_steps, rho, second_order,
                 churn=None):
    sigmas = _ode_grid(process, num_steps, rho)
    denoise = _scaled_denoiser(denoise_fn, process, class_labels)
    alpha_T, _ = process.marginal_coefs(jnp.full((shape[0],), process.T, jnp.float32))
    init_key, key = jax.random.split(key)
    x = process.prior_sampling(init_key, shape)
    x = x / bcast(alpha_T, x)

    def raise_noise(i, x, s):
        """EDM Algorithm 2, lines 4-6: sigma_hat = (1 + gamma_i) sigma_i,
        x <- x + sqrt(sigma_hat^2 - sigma_i^2) S_noise z."""
        if churn is None:
            return x, s
        S_churn, S_min, S_max, S_noise = churn
        gamma = jnp.where((s >= S_min) & (s <= S_max), min(S_churn / num_steps, math.sqrt(2.) - 1.), 0.)
        z = process.noise(jax.random.fold_in(key, i), shape)
        # sqrt(sigma_hat^2 - sigma^2) written as sigma sqrt(gamma (2 + gamma)): never negative.
        return x + s * jnp.sqrt(gamma * (2. + gamma)) * S_noise * z, s * (1. + gamma)

    def step(i, x):
        x, s = raise_noise(i, x, sigmas[i])
        return ode_step(denoise, x, s, sigmas[i + 1], second_order=second_order)

    x = jax.lax.fori_loop(0, num_steps - 1, step, x)
    # Last step sigma_{n-1} -> 0 is Euler: x + (0 - s)(x - D)/s = D (EDM Algorithm 1, line 8).
    x, s = raise_noise(num_steps - 1, x, sigmas[num_steps - 1])
    x = denoise(x, s)
    nfe = (2 * num_steps - 1 if second_order else num_steps) * nfe_per_call(denoise_fn)
    return x, nfe


def ode_step(denoise, x, s, s_next, *, second_order: bool = True):
    """One step of EDM Algorithm 1 on dx/dsigma = (x - D(x; sigma)) / sigma from s to s_next:
    Euler, then Heun's correction when `second_order` (never for s_next = 0)."""
    d = (x - denoise(x, s)) / s
    x_next = x + (s_next - s) * d
    if second_order:
        d_next = (x_next - denoise(x_next, s_next)) / s_next
        x_next = x + (s_next - s) * 0.5 * (d + d_next)
    return x_next


def heun_trajectory(denoise, x, sigmas, *, record=()) -> tuple[jax.Array, list[jax.Array]]:
    """Heun (EDM Algorithm 1) from x at sigmas[0] along an explicit decreasing grid ending at 0
    (Euler for the last step to 0), with `denoise(x, sigma [B])` in EDM's space. Returns the end
    point and the states at the grid indices in `record` (e.g. a student's levels), in grid
    order. The steps between recorded states are `lax.fori_loop`s: compile time does not grow
    with the grid."""
    grid = np.asarray(sigmas, np.float32)
    num_heun = len(grid) - 1 - int(grid[-1] == 0)
    sig = jnp.asarray(grid)
    step = lambda i, y: ode_step(lambda z, t: denoise(z, _vec(t, z)), y, sig[i], sig[i + 1])
    kept, i = [], 0
    for stop in sorted({int(r) for r in record} | {num_heun}):
        x = jax.lax.fori_loop(i, stop, step, x) if stop > i else x
        if stop in record:
            kept.append(x)
        i = stop
    if num_heun < len(grid) - 1:
        x = ode_step(lambda z, t: denoise(z, _vec(t, z)), x, sig[-2], sig[-1],
                     second_order=False)
    return x, kept


def grid_nfe(sigmas) -> int:
    """Network evaluations of `heun_trajectory` on `sigmas`: 2 per step, 1 for a step to 0."""
    steps = len(sigmas) - 1
    return 2 * steps - sum(1 for s in list(sigmas)[1:] if float(s) == 0.0)


def heun(denoise_fn: DenoiseFn, process: SDE, key, shape, class_labels=None, *,
         num_steps: int = 18, rho: float = 7., S_churn: float = 0., S_min: float = 0.,
         S_max: float = float('inf'), S_noise: float = 1.):
    """EDM Algorithm 1: deterministic Heun on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

    Works in the scaled variable x / alpha_t with sigma = sigma_t / alpha_t (EDM eq. 4 and Table 1),
    so it serves EDM, VE, VP and sub-VP alike: each sigma of the rho-grid is mapped to its time by
    `process.inverse_scaled_sigma`. The last step (to sigma = 0) is Euler. nfe = 2 num_steps - 1
    (35 for 18 steps). S_churn > 0 gives EDM's stochastic sampler (Algorithm 2): before each step,
    sigma in [S_min, S_max] is raised to (1 + gamma) sigma, gamma = min(S_churn / num_steps, sqrt(2) - 1),
    by adding fresh noise scaled by S_noise (same nfe).
    """
    if num_steps < 1:
        raise ValueError(f"heun: num_steps must be >= 1, got {num_steps}")
    if S_churn < 0:
        raise ValueError(f"heun: S_churn must be >= 0 (0: deterministic), got {S_churn}")
    churn = (S_churn, S_min, S_max, S_noise) if S_churn > 0 else None
    return _ode_sampler(denoise_fn, process, key, shape, class_labels, num_steps, rho, True, churn)


def euler_ode(denoise_fn: DenoiseFn, process: SDE, key, shape, class_labels=None, *,
              num_steps: int = 18, rho: float = 7.):
    """First-order Euler on the probability-flow ODE over the same rho-grid as `heun`; nfe = num_steps."""
    if num_steps < 1:
        raise ValueError(f"euler_ode: num_steps must be >= 1, got {num_steps}")
    return _ode_sampler(denoise_fn, process, key, shape, class_labels, num_steps, rho, False)


SAMPLERS = {'euler_maruyama': euler_maruyama, 'pc': pc, 'heun': heun, 'euler_ode': euler_ode}


def sampler_nfe(name: str, process: SDE, *, num_steps: int | None = None, n_corrector: int = 1,
                guidance: float = 1.0, **_) -> int:
    """Network evaluations per sample of sampler `name` with these options, without running it
    (the counts each sampler returns; classifier-free guidance doubles them)."""
    n = process.N if num_steps is None else num_steps
    per_call = 1 if guidance == 1.0 else 2
    counts = {'heun': 2 * n - 1, 'euler_ode': n, 'euler_maruyama': n,
              'pc': n * (n_corrector + 1)}
    if name not in counts:
        raise ValueError(f"unknown sampler {name!r}; valid names: {sorted(SAMPLERS)}")
    return counts[name] * per_call


def random_class_labels(key, n: int, num_classes: int) -> jax.Array | None:
    """One-hot labels drawn uniformly at random (EDM's and the reference implementation's
    convention for sampling and evaluation), or None for an unconditional model."""
    if not num_classes:
        return None
    return jax.nn.one_hot(jax.random.randint(key, (n,), 0, num_classes), num_classes)


def _options(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]


def get_sampler(name: str, **options):
    """The sampler `name` with keyword `options` bound: sample(denoise_fn, process, key, shape,
    class_labels=None) -> (x, nfe).

    A config's sampling section holds the options of every sampler, so options that another sampler
    takes (e.g. `snr` for 'heun') are ignored; an option no sampler takes, or an unknown name,
    raises ValueError listing the valid ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {sorted(SAMPLERS)}")
    known = sorted({o for fn in SAMPLERS.values() for o in _options(fn)})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"no sampler has options {unknown}; valid options: {known} "
                         f"({name!r} takes {_options(SAMPLERS[name])})")
    fn = SAMPLERS[name]
    return functools.partial(fn, **{k: v for k, v in options.items() if k in _options(fn)})
