"""Accuracy of the teacher samplers and the PF-ODE likelihood against closed forms.

With Gaussian data x_0 ~ N(m, diag(s^2)) the exact denoiser (tests/gaussian.py) stands in for a
perfectly trained teacher, so every error below is the sampler's or solver's own:

1. Heun (EDM Algorithm 1) against the exact probability-flow map: in x_hat = x / alpha,
   sigma_hat = sigma / alpha the ODE dx_hat/dsigma_hat = (x_hat - D) / sigma_hat is solved by
   x_hat(sigma) - m = (x_hat_T - m) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2); the sampler ends
   with D(x; sigma_min). Error: RMS over samples of (x - x_exact), relative to s, worst dimension,
   at 18 / 36 / 72 steps; the observed order is log2 of successive error ratios (2 for Heun).
2. Stochastic samplers (PC, Euler-Maruyama, EDM Algorithm 2): sample std / s per dimension and the
   largest |mean - m| / s from 10,000 samples (the std ratio's own noise is ~0.7%).
3. PF-ODE log-likelihood (scipy RK45, rtol = atol = 1e-5): |log p_model - log p_exact| per example
   in nats, with the N(0, sigma_T^2) prior (what `likelihood.py` reports) and with the prior
   swapped for the exact p_T (the solver's error alone), and the number of ODE evaluations.

Run on CPU (about a minute):
    PYTHONPATH=. python experiments/sampler_accuracy.py
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import likelihood, sampling, sde
from tests.gaussian import GaussianDenoiser

M = jnp.asarray([0.3, -1.0, 0.5])
S = jnp.asarray([0.5, 0.2, 1.5])
PROCESSES = {"EDM": sde.EDM(), "VE": sde.VESDE(), "VP": sde.VPSDE(), "sub-VP": sde.subVPSDE()}


def exact_flow(process, key, shape):
    """The exact PF-ODE image of the sampler's prior draw (same key split as the ODE samplers)."""
    lo, hi = process.scaled_sigma(jnp.asarray([process.eps, process.T]))
    alpha_T = process.marginal_coefs(jnp.asarray([process.T]))[0][0]
    x_hat_T = process.prior_sampling(jax.random.split(key)[0], shape) / alpha_T
    return M + (x_hat_T - M) * S ** 2 / (jnp.sqrt(S ** 2 + lo ** 2) * jnp.sqrt(S ** 2 + hi ** 2))


def heun_table(num_samples: int = 1024) -> list[str]:
    steps = (18, 36, 72)
    rows = ["| process | " + " | ".join(f"{n} steps ({2 * n - 1} NFE)" for n in steps)
            + " | order 18->36 | order 36->72 |", "|---|" + "---|" * (len(steps) + 2)]
    key, shape = jax.random.key(0), (num_samples, 3)
    for name, p in PROCESSES.items():
        denoiser = GaussianDenoiser(p, M, S)
        ref = exact_flow(p, key, shape)
        errs = []
        for n in steps:
            x, _ = jax.jit(lambda k: sampling.heun(denoiser, p, k, shape, num_steps=n))(key)
            errs.append(float(jnp.max(jnp.sqrt(jnp.mean((x - ref) ** 2, axis=0)) / S)))
        orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        rows.append(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errs) + " | "
                    + " | ".join(f"{o:.2f}" for o in orders) + " |")
    return rows


def stochastic_table(num_samples: int = 10_000) -> list[str]:
    runs = [
        ("PC (reverse diffusion + Langevin, snr 0.16)", "VE", "pc", dict(num_steps=500)),
        ("PC (reverse diffusion + Langevin, snr 0.16)", "VP", "pc", dict(num_steps=500)),
        ("Euler-Maruyama", "VP", "euler_maruyama", dict(num_steps=500)),
        ("Euler-Maruyama", "EDM", "euler_maruyama", dict(num_steps=500)),
        ("EDM stochastic (S_churn 20, S_min 0.05, S_max 50)", "EDM", "heun",
         dict(num_steps=128, S_churn=20., S_min=0.05, S_max=50., S_noise=1.)),
        ("Heun (deterministic)", "EDM", "heun", dict(num_steps=18)),
    ]
    rows = ["| sampler | process | NFE | std / s (per dim) | max abs(mean - m) / s |",
            "|---|---|---|---|---|"]
    for label, pname, name, options in runs:
        p = PROCESSES[pname]
        sample = sampling.get_sampler(name, **options)
        denoiser = GaussianDenoiser(p, M, S)
        x, nfe = jax.jit(lambda k: sample(denoiser, p, k, (num_samples, 3)))(jax.random.key(2))
        ratio = np.asarray(jnp.std(x, 0) / S)
        bias = float(jnp.max(jnp.abs(jnp.mean(x, 0) - M) / S))
        rows.append(f"| {label} | {pname} | {nfe} | " + ", ".join(f"{r:.3f}" for r in ratio)
                    + f" | {bias:.3f} |")
    return rows


def likelihood_table(num_examples: int = 16) -> list[str]:
    rows = ["| process | trace | mean abs error, N(0, sigma_T^2) prior (nats) | "
            "mean abs error, exact p_T (nats) | ODE evaluations |", "|---|---|---|---|---|"]
    for name, p in PROCESSES.items():
        g = GaussianDenoiser(p, M, S)
        x = g.sample(jax.random.key(0), num_examples)
        eps = likelihood.default_eps(p)
        exact = np.asarray(g.marginal_logp(x, jnp.full((num_examples,), eps)))
        for trace in ("exact", "rademacher"):
            logp, z, nfe = likelihood.log_likelihood(g, p, jax.random.key(1), x, hutchinson=trace)
            z = jnp.asarray(z, jnp.float32)
            t_end = jnp.full((num_examples,), p.T)
            swapped = logp - np.asarray(p.prior_logp(z)) + np.asarray(g.marginal_logp(z, t_end))
            rows.append(f"| {name} | {trace} | {np.mean(np.abs(logp - exact)):.2e} | "
                        f"{np.mean(np.abs(swapped - exact)):.2e} | {nfe} |")
    return rows


def main():
    t0 = time.time()
    print("## Sampler and likelihood accuracy (CPU, exact Gaussian denoiser)\n")
    fmt = lambda v: "(" + ", ".join(f"{float(a):g}" for a in v) + ")"
    print(f"Data N(m, diag(s^2)), m = {fmt(M)}, s = {fmt(S)}.\n")
    print("Heun vs the exact PF-ODE map: relative RMS error (worst dimension), 1,024 samples\n")
    print("\n".join(heun_table()))
    print("\nStochastic samplers: moments of 10,000 samples\n")
    print("\n".join(stochastic_table()))
    print("\nPF-ODE log-likelihood of 16 samples vs the exact log-density (RK45, tol 1e-5)\n")
    print("\n".join(likelihood_table()))
    print(f"\n({time.time() - t0:.0f} s on {jax.devices()[0].platform.upper()}, "
          f"jax {jax.__version__})")


if __name__ == "__main__":
    main()
