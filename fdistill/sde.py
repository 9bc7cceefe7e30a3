"""Forward diffusion processes: Score-SDE's VE, VP and sub-VP SDEs and EDM's parametrisation.

Every process has Gaussian marginals x_t = alpha(t) x_0 + sigma(t) eps (`marginal_coefs`) and is
the SDE dx = f(x, t) dt + g(t) dw (`sde`); its reverse-time SDE and probability-flow ODE are
(Song et al. 2021, arXiv 2011.13456, eqs. 6 and 13)

    dx = [f - g^2 grad log p_t(x)] dt + g dw_bar,        dx/dt = f - 1/2 g^2 grad log p_t(x).

EDM (Karras et al. 2022, arXiv 2206.00364) is the VE SDE whose time is the noise level itself:
alpha = 1, sigma(t) = t, g(t)^2 = d sigma^2/dt = 2t, so the ODE is dx/dsigma = -sigma * score.

Pure maths: arrays in, arrays out. `x` is [B, ...], `t` is [B]. Processes are frozen dataclasses
(hashable, so they can be closed over or passed as static arguments to `jax.jit`).
"""
import abc
import dataclasses
import math
import numbers
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


def bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape a per-example [B] array to broadcast against x [B, ...]."""
    v = jnp.asarray(v)
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def sum_except_batch(x: jax.Array) -> jax.Array:
    """Sum over all axes but the first: [B, ...] -> [B]."""
    return jnp.sum(jnp.reshape(x, (x.shape[0], -1)), axis=-1)


def gaussian_logp(z: jax.Array, std) -> jax.Array:
    """log N(z; 0, std^2 I) per example, [B]."""
    dim = math.prod(z.shape[1:])
    return -0.5 * dim * jnp.log(2 * jnp.pi * std ** 2) - sum_except_batch(z ** 2) / (2 * std ** 2)


def karras_grid(sigma_min: float, sigma_max: float, n: int, rho: float = 7.) -> jax.Array:
    """EDM eq. 5: n noise levels from sigma_max down to sigma_min, uniform in sigma^(1/rho), then 0.

    Returns n + 1 values (the final 0 is the clean sample)."""
    if n < 1:
        raise ValueError(f"karras grid needs n >= 1 steps, got n={n}")
    ramp = np.linspace(0., 1., n) if n > 1 else np.zeros((1,))
    lo, hi = float(sigma_min) ** (1. / rho), float(sigma_max) ** (1. / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho  # float64, so the endpoints are exact
    return jnp.asarray(np.append(sigmas, 0.), jnp.float32)


class SDE(abc.ABC):
    """A diffusion process with Gaussian marginals x_t = alpha(t) x_0 + sigma(t) eps, t in [0, T].

    Subclasses set `T` (end time), `eps` (the smallest time sampled; Score-SDE's sampling eps) and
    `N` (discretisation steps), and implement the methods marked abstract.
    """
    T: ClassVar[float] = 1.
    eps: ClassVar[float] = 1e-3
    N: int

    @abc.abstractmethod
    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(drift f(x, t) [B, ...], diffusion g(t) [B])."""

    @abc.abstractmethod
    def marginal_coefs(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha_t, sigma_t), each [B]: x_t = alpha_t x_0 + sigma_t eps."""

    @abc.abstractmethod
    def prior_sampling(self, key: jax.Array, shape) -> jax.Array:
        """A sample of the prior p_T, the process' marginal at T with the data term dropped."""

    @abc.abstractmethod
    def prior_logp(self, z: jax.Array) -> jax.Array:
        """log p_T(z) per example [B]."""

    def noise(self, key: jax.Array, shape) -> jax.Array:
        """The forward process' unit noise (standard normal); every sampler draws through it."""
        return jax.random.normal(key, shape)

    def noise_precision(self, v: jax.Array) -> jax.Array:
        """C^-1 v for the covariance C of `noise` (the identity here). A score read off a
        denoiser D at level sigma is -C^-1 (x - D) / sigma^2 (Tweedie with noise N(0, sigma^2 C));
        `score_from_denoised` leaves C^-1 out (it is what the samplers' drift needs)."""
        return v

    @abc.abstractmethod
    def inverse_scaled_sigma(self, sigma: jax.Array) -> jax.Array:
        """The time t at which sigma_t / alpha_t = sigma (EDM Table 1's sigma^-1)."""

    def marginal_prob(self, x0: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean [B, ...] and std [B] of p_0t(x_t | x_0)."""
        alpha, sigma = self.marginal_coefs(t)
        return bcast(alpha, x0) * x0, sigma

    def scaled_sigma(self, t: jax.Array) -> jax.Array:
        """sigma_t / alpha_t: the noise level of x_t / alpha_t (EDM's sigma(t) with s(t) = alpha_t)."""
        alpha, sigma = self.marginal_coefs(t)
        return sigma / alpha

    def score_from_denoised(self, x_t: jax.Array, t: jax.Array, x0_hat: jax.Array) -> jax.Array:
        """Tweedie: grad log p_t(x_t) = (alpha_t E[x_0 | x_t] - x_t) / sigma_t^2."""
        alpha, sigma = self.marginal_coefs(t)
        return (bcast(alpha, x_t) * x0_hat - x_t) / bcast(sigma, x_t) ** 2

    def discretize(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Euler-Maruyama: x_{i+1} = x_i + f dt + g sqrt(dt) z with dt = T / N; returns (f dt, g sqrt(dt))."""
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def langevin_alpha(self, t: jax.Array) -> jax.Array:
        """alpha_i of the Langevin corrector's step size (Score-SDE Algorithm 4/5): 1 unless VP-type."""
        return jnp.ones_like(jnp.asarray(t, jnp.float32))

    def sampling_grid(self, n: int) -> jax.Array:
        """n times from T down to eps, then 0 (n + 1 values): Score-SDE's uniform sampling grid."""
        if n < 1:
            raise ValueError(f"sampling grid needs n >= 1 steps, got n={n}")
        return jnp.concatenate([jnp.linspace(self.T, self.eps, n), jnp.zeros((1,))]).astype(jnp.float32)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (eq. 6) or, with probability_flow, the probability-flow ODE (eq. 13)."""
        return ReverseSDE(self, score_fn, probability_flow)

    def _index(self, t: jax.Array) -> jax.Array:
        """Score-SDE's index i = floor(t (N - 1) / T) of the discrete step at t, with 5e-4 of slack so
        that float32 round-off on the sampling grid linspace(T, eps, N) cannot drop an index."""
        i = jnp.floor(jnp.asarray(t, jnp.float32) * (self.N - 1) / self.T + 5e-4)
        return jnp.clip(i, 0, self.N - 1).astype(jnp.int32)

    def _check_N(self):
        if not (isinstance(self.N, numbers.Integral) and self.N >= 1):
            raise ValueError(f"{type(self).__name__}: N must be a positive int, got N={self.N!r}")
        object.__setattr__(self, 'N', int(self.N))


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
    """Reverse-time SDE of `forward` given score_fn(x, t) (Score-SDE eq. 6), or its PF-ODE (eq. 13)."""
    forward: SDE
    score_fn: ScoreFn
    probability_flow: bool = False

    @property
    def T(self):
        return self.forward.T

    @property
    def N(self):
        return self.forward.N

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(f - g^2 score, g), or (f - g^2 score / 2, 0) for the probability-flow ODE."""
        drift, diffusion = self.forward.sde(x, t)
        scale = 0.5 if self.probability_flow else 1.
        drift = drift - bcast(diffusion, x) ** 2 * self.score_fn(x, t) * scale
        return drift, jnp.zeros_like(diffusion) if self.probability_flow else diffusion

    def discretize(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Reverse of the forward discretisation (Score-SDE App. E, reverse diffusion):
        (f - G^2 score, G), or (f - G^2 score / 2, 0) for the probability flow."""
        f, G = self.forward.discretize(x, t)
        scale = 0.5 if self.probability_flow else 1.
        rev_f = f - bcast(G, x) ** 2 * self.score_fn(x, t) * scale
        return rev_f, jnp.zeros_like(G) if self.probability_flow else G


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
    """Variance exploding SDE (Score-SDE Sec. 3.4, App. B): sigma(t) = sigma_min (sigma_max / sigma_min)^t,
    dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw; discretised as SMLD (NCSN)."""
    sigma_min: float = 0.01
    sigma_max: float = 50.
    N: int = 1000
    eps: ClassVar[float] = 1e-5

    def __post_init__(self):
        self._check_N()
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    @property
    def discrete_sigmas(self) -> jax.Array:
        """SMLD's N geometric noise levels from sigma_min to sigma_max."""
        return jnp.exp(jnp.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N))

    def sde(self, x, t):
        diffusion = self.sigma(t) * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))
        return jnp.zeros_like(x), diffusion

    def marginal_coefs(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.ones_like(t), self.sigma(t)

    def prior_sampling(self, key, shape):
        return jax.random.normal(key, shape) * self.sigma_max

    def prior_logp(self, z):
        return gaussian_logp(z, self.sigma_max)

    def inverse_scaled_sigma(self, sigma):
        return jnp.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def discretize(self, x, t):
        """SMLD (Score-SDE App. B and E): x_{i-1} = x_i + sqrt(sigma_i^2 - sigma_{i-1}^2) z, no drift."""
        i = self._index(t)
        sigmas = self.discrete_sigmas
        adjacent = jnp.where(i == 0, 0., sigmas[jnp.maximum(i - 1, 0)])
        return jnp.zeros_like(x), jnp.sqrt(sigmas[i] ** 2 - adjacent ** 2)


@dataclasses.dataclass(frozen=True)
class VPSDE(SDE):
    """Variance preserving SDE (Score-SDE Sec. 3.4, App. B): beta(t) = beta_min + t (beta_max - beta_min),
    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw; discretised as DDPM."""
    beta_min: float = 0.1
    beta_max: float = 20.
    N: int = 1000

    def __post_init__(self):
        self._check_N()
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError(f"{type(self).__name__} needs 0 < beta_min <= beta_max, "
                             f"got {self.beta_min}, {self.beta_max}")
        if self.beta_max / self.N >= 1:
            raise ValueError(f"{type(self).__name__}: the DDPM discretisation needs beta_max / N < 1, got "
                             f"beta_max={self.beta_max}, N={self.N}; use N > {self.beta_max:g}")

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t):
        """log alpha_t = -1/2 int_0^t beta(s) ds (Score-SDE App. B)."""
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    @property
    def discrete_betas(self) -> jax.Array:
        """DDPM's beta_i = beta(i / (N-1)) / N, i = 0..N-1."""
        return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

    def sde(self, x, t):
        beta = self.beta(t)
        return -0.5 * bcast(beta, x) * x, jnp.sqrt(beta)

    def marginal_coefs(self, t):
        lmc = self.log_mean_coeff(jnp.asarray(t, jnp.float32))
        return jnp.exp(lmc), jnp.sqrt(-jnp.expm1(2 * lmc))

    def prior_sampling(self, key, shape):
        return jax.random.normal(key, shape)

    def prior_logp(self, z):
        return gaussian_logp(z, 1.)

    def inverse_scaled_sigma(self, sigma):
        # sigma^2 = exp(int beta) - 1, int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2.
        return self._t_from_integral(jnp.log1p(sigma ** 2))

    def _t_from_integral(self, c):
        """Solve beta_min t + (beta_max - beta_min) t^2 / 2 = c for t >= 0 (cancellation-free root)."""
        b0, db = self.beta_min, self.beta_max - self.beta_min
        return 2 * c / (b0 + jnp.sqrt(b0 ** 2 + 2 * db * c))

    def discretize(self, x, t):
        """DDPM (Score-SDE App. B and E): x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z; returns (f, G)."""
        beta = self.discrete_betas[self._index(t)]
        return (bcast(jnp.sqrt(1. - beta), x) - 1.) * x, jnp.sqrt(beta)

    def langevin_alpha(self, t):
        """alpha_i = 1 - beta_i (Score-SDE Algorithm 5)."""
        return 1. - self.discrete_betas[self._index(t)]


@dataclasses.dataclass(frozen=True)
class subVPSDE(VPSDE):
    """sub-VP SDE (Score-SDE Sec. 3.4): dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw.

    Marginal std 1 - exp(int_0^t -beta), below the VP one; discretised by Euler-Maruyama. The Langevin
    corrector uses the VP alpha_i = 1 - beta_i of the same beta schedule."""

    def sde(self, x, t):
        beta = self.beta(t)
        discount = -jnp.expm1(4 * self.log_mean_coeff(t))
        return -0.5 * bcast(beta, x) * x, jnp.sqrt(beta * discount)

    def marginal_coefs(self, t):
        lmc = self.log_mean_coeff(jnp.asarray(t, jnp.float32))
        return jnp.exp(lmc), -jnp.expm1(2 * lmc)

    def inverse_scaled_sigma(self, sigma):
        # sigma_t / alpha_t = exp(-lmc) - exp(lmc) = 2 sinh(int beta / 2).
        return self._t_from_integral(2 * jnp.arcsinh(sigma / 2))

    def discretize(self, x, t):
        return SDE.discretize(self, x, t)


@dataclasses.dataclass(frozen=True)
class EDM(SDE):
    """EDM (Karras et al. 2022): alpha = 1, sigma(t) = t on [sigma_min, sigma_max], i.e. dx = sqrt(2t) dw.

    `loss_weight` is EDM Table 1's lambda(sigma) (its preconditioning lives with the networks,
    `fdistill.models.denoiser.preconditioning`), `sample_training_sigma` its log-normal training
    distribution, `karras_sigmas` its rho-schedule (eq. 5). `N` is the number of steps of the
    stochastic samplers (Euler-Maruyama, predictor-corrector) on the Karras grid."""
    sigma_min: float = 0.002
    sigma_max: float = 80.
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    rho: float = 7.
    N: int = 1000
    frame_correlation: float = 0.

    def __post_init__(self):
        self._check_N()
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not 0 <= self.frame_correlation < 1:
            raise ValueError(f"EDM needs 0 <= frame_correlation < 1, got {self.frame_correlation}")
        if not (self.sigma_data > 0 and self.P_std > 0 and self.rho > 0):
            raise ValueError(f"EDM needs sigma_data, P_std, rho > 0, got {self.sigma_data}, "
                             f"{self.P_std}, {self.rho}")

    @property
    def T(self):
        return float(self.sigma_max)

    @property
    def eps(self):
        return float(self.sigma_min)

    def sde(self, x, t):
        return jnp.zeros_like(x), jnp.sqrt(2 * jnp.asarray(t, jnp.float32))

    def marginal_coefs(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.ones_like(t), t

    def noise(self, key, shape) -> jax.Array:
        """Unit-variance noise of ``shape``. With ``frame_correlation`` rho > 0 (clips
        ``[B, T, H, W, C]``) each frame's noise is sqrt(rho) times one draw shared by the clip's
        frames plus sqrt(1 - rho) times its own: frames correlate by rho. For any such fixed
        noise covariance C the probability-flow ODE keeps its form dx/dsigma = (x - D) / sigma,
        and ``score_from_denoised`` is C times the score: the drift that the reverse SDE and
        Langevin steps need when their noise is drawn here."""
        rho = self.frame_correlation
        if not rho:
            return jax.random.normal(key, shape)
        if len(shape) != 5:
            raise ValueError(f"frame_correlation needs clips [B, T, H, W, C]; got shape {shape}")
        k_shared, k_own = jax.random.split(key)
        shared = jax.random.normal(k_shared, (shape[0], 1) + tuple(shape[2:]))
        return math.sqrt(rho) * shared + math.sqrt(1 - rho) * jax.random.normal(k_own, shape)

    def noise_precision(self, v):
        """C^-1 v for the frame covariance C = (1 - rho) I + rho 1 1^T of `noise` (per clip and
        pixel, over the frames of ``v [B, T, ...]``): the frame mean divided by C's eigenvalue
        along it, 1 - rho + T rho, the rest by 1 - rho. ``v`` itself when rho = 0."""
        rho = self.frame_correlation
        if not rho:
            return v
        if v.ndim != 5:
            raise ValueError(f"frame_correlation needs clips [B, T, H, W, C]; got shape {v.shape}")
        t = v.shape[1]
        mean = jnp.mean(v, axis=1, keepdims=True)
        return (v - mean) / (1 - rho) + mean / (1 - rho + t * rho)

    def prior_sampling(self, key, shape):
        return self.noise(key, shape) * self.sigma_max

    def prior_logp(self, z):
        rho = self.frame_correlation
        if not rho:
            return gaussian_logp(z, self.sigma_max)
        # Per clip and pixel, frames ~ N(0, sigma_max^2 C), C = (1 - rho) I + rho 1 1^T.
        t = z.shape[1]
        s2 = self.sigma_max ** 2
        top = 1 - rho + t * rho                              # eigenvalue along the frame mean
        quad = jnp.sum(z * self.noise_precision(z), axis=1) / s2
        logdet = t * math.log(s2) + (t - 1) * math.log(1 - rho) + math.log(top)
        per_pixel = -0.5 * (quad + logdet + t * math.log(2 * math.pi))
        return jnp.sum(per_pixel.reshape(z.shape[0], -1), axis=-1)

    def inverse_scaled_sigma(self, sigma):
        return sigma

    def loss_weight(self, sigma):
        """EDM Table 1: lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def sample_training_sigma(self, key, n: int) -> jax.Array:
        """EDM Table 1: ln(sigma) ~ N(P_mean, P_std^2); returns [n]."""
        return jnp.exp(self.P_mean + self.P_std * jax.random.normal(key, (n,)))

    def karras_sigmas(self, n: int, rho: float | None = None) -> jax.Array:
        """EDM eq. 5: n levels from sigma_max to sigma_min uniform in sigma^(1/rho), then 0 (n + 1 values).
        rho defaults to the process' rho (7)."""
        return karras_grid(self.sigma_min, self.sigma_max, n, self.rho if rho is None else rho)

    def sampling_grid(self, n: int) -> jax.Array:
        return self.karras_sigmas(n)

    def discretize(self, x, t):
        """SMLD-style step on the N-step Karras grid, sigma_i -> sigma_{i+1} (0 after sigma_min):
        f = 0, G = sqrt(sigma_i^2 - sigma_{i+1}^2)."""
        lo, hi = self.sigma_min ** (1. / self.rho), self.sigma_max ** (1. / self.rho)
        u = (jnp.asarray(t, jnp.float32) ** (1. / self.rho) - hi) / (lo - hi) * max(self.N - 1, 1)
        i = jnp.clip(jnp.round(u), 0, self.N - 1)
        nxt = jnp.where(i >= self.N - 1, 0., (hi + (i + 1) / max(self.N - 1, 1) * (lo - hi)) ** self.rho)
        return jnp.zeros_like(x), jnp.sqrt(jnp.maximum(t ** 2 - nxt ** 2, 0.))


PROCESSES = {'vesde': VESDE, 'vpsde': VPSDE, 'subvpsde': subVPSDE, 'edm': EDM}


def sde_from_config(config) -> SDE:
    """Build a process from `config.process`: `name` in PROCESSES, constructor arguments read from the
    fields of the same names. One config holds the fields of every process (sigma_* and beta_*), so
    fields the chosen process does not take are ignored."""
    fields = dict(config.items())
    name = fields.pop('name', None)
    if name not in PROCESSES:
        raise ValueError(f"unknown process name {name!r}; valid names: {sorted(PROCESSES)}")
    cls = PROCESSES[name]
    return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields})
