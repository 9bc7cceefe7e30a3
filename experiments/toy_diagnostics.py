"""Why one-step students fall short on the 2-D toys: the density ratio, h and the modes, measured.

The toys have exact densities. At noise level sigma the teacher's marginal p_t is a known Gaussian
mixture (the modes convolved with N(0, sigma^2 I)); the student's q_t is estimated from its own
samples by a Gaussian kernel density estimate of bandwidth sigma, which is unbiased for q
convolved with N(0, sigma^2 I), i.e. for q_t. During a toy distillation (configs/distill_toy.py
plus --set overrides, built by `modes.build_distillation` and stepped by `Distillation.step`)
this script logs, every --every iterations:

* the EMA student's toy metrics (recall, precision, mode_tv, KL(q||p), fdistill.evaluation.toy)
  and the raw student's precision and KL(q||p);
* score: at fixed noise levels, how the estimated distribution-matching direction
  x0_fake - x0_teacher (fake score and teacher networks) tracks the true x0_q - x0_p (the KDE's
  posterior mean E_q[x0 | x_t] over the student's samples, the mixture's exact E_p[x0 | x_t]);
  `fake_cos` compares it with x0_q - x0_teacher (the fake score's own error), `teacher_err` is the
  teacher's error |x0_teacher - x0_p| relative to |x0_q - x0_p|;
* ratio: at the same noise levels, how the discriminator's log r (the mean over heads, before
  any clipping) tracks the true log(p_t / q_t) on fresh noised student samples (correlation, RMS
  error, bias), with the KDE's own noise (two independent reference sets) to show where the truth
  is itself reliable;
* h: on a batch noised exactly as in training, the weights h the student step uses (logit clamp,
  r clip, bin normalisation with the state's ratio EMA, batch normalisation) against the weights
  the true ratio would give (same clipping, the batch's own bin means), their effective sample
  size (sum h)^2 / (B sum h^2), the share of the gradient weight that goes to sigma < 0.1, 0.1-1
  and > 1, the share of small-sigma weight per mode, and the share that goes to samples off every
  mode (farther than 3 std: the blur that precision and KL(q||p) count);
* modes: the mass the raw student puts on each mode (true responsibilities), to see which it
  loses and when.

With --ratio=oracle the student step replaces the discriminator's r by the true ratio (exact p_t,
KDE q_t from an independent batch of --oracle_ref fresh samples of the current student, no
gradient): what the student would do if the ratio were estimated perfectly. The critic steps are
unchanged (the discriminator still trains and is still diagnosed). The oracle's logits are
constants, so the GAN term of the student loss has no gradient there: compare an oracle run with
a discriminator run at --set distill.gan_weight=0.0 (configs/distill_toy.py has 0.1).

The student starts, as in the recipe, from the ODE-regression initialisation
(`distill.init_workdir`, else <teacher>/../toy_diag/init_seed<seed>, made there once);
`--set distill.ode_init_steps=0` starts it from the teacher's weights.

Usage (a teacher is trained with configs/toy.py into --teacher if it has no config.json; the toy
is the teacher's; ~1 s per iteration on a busy 2-core CPU, plus ~10-30 s per diagnosis):

    PYTHONPATH=. python experiments/toy_diagnostics.py --teacher=runs/toy --divergence=fkl \
        --set distill.num_steps=1000 --every=250
    PYTHONPATH=. python experiments/toy_diagnostics.py --teacher=runs/toy --divergence=fkl \
        --ratio=oracle --set distill.num_steps=1000 distill.gan_weight=0.0

Measured before the recipe had its ODE-regression initialisation (ring8, the then 128-wide
teacher of configs/toy.py, students from the teacher's weights, forward-KL, 1,000 iterations, step
1000; single runs on a shared 2-core CPU): with the discriminator (gan_weight 0.1) seeds 0 / 1 reach EMA
recall 1.0 / 1.0, precision 0.56 / 0.64, KL(q||p) 17.0 / 13.6; its h is much flatter than the
true ratio's (ESS 0.84 / 0.91 of the batch against 0.33 / 0.38, corr of log h 0.58 / 0.54). With
gan_weight 0 (seed 0) the discriminator run gets precision 0.20, KL(q||p) 40.2 and the oracle
ratio 0.08, 43.8: a perfect ratio does not remove the blur; the GAN term does most of it.

Each diagnosis prints one line per quantity (numbers per sigma in DIAG_SIGMAS order); the whole
log goes to --out (default <teacher>/../toy_diag/diag_<div>_<ratio>_seed<seed>.json).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import distill_toy, toy
from fdistill import data, modes, sharding
from fdistill import main as cli
from fdistill import objective as objective_lib
from fdistill.evaluation import toy as toy_eval

DIAG_SIGMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
SIGMA_SPLITS = (0.1, 1.0)


def parse_overrides(pairs) -> dict:
    """['distill.num_steps=500', ...] -> {'distill.num_steps': 500, ...} (Python literals)."""
    out = {}
    for pair in pairs or ():
        key, _, value = pair.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def make_config(args):
    c = distill_toy.get_config()
    c.seed = args.seed
    c.distill.divergence = args.divergence
    c.distill.teacher_workdir = args.teacher
    c.update_from_flattened_dict(parse_overrides(args.set))
    return c


def ensure_teacher(args) -> None:
    """Trains configs/toy.py (toy --toy) into --teacher unless a run is recorded there."""
    if os.path.isfile(os.path.join(args.teacher, "config.json")):
        return
    tc = toy.get_config()
    tc.data.toy = args.toy
    cli.run(tc, args.teacher, "train")


# ------------------------------------------------------------------------------------------------
# The true density ratio.

def kde_log_density(x_t, sigma, ref):
    """log of the Gaussian KDE (bandwidth sigma per query point) of the 2-D samples `ref` at x_t.

    x_t [B, 2], sigma [B], ref [N, 2]: unbiased for q * N(0, sigma^2 I) at x_t when ref ~ q
    (the density, not its log: log of the KDE is biased low by about var / 2 of the relative
    error, which two independent reference sets measure).
    """
    d2 = jnp.sum((x_t[:, None, :] - ref[None, :, :]) ** 2, axis=-1)
    s2 = sigma[:, None] ** 2
    return (jax.scipy.special.logsumexp(-0.5 * d2 / s2, axis=1) - jnp.log(ref.shape[0])
            - jnp.log(2 * jnp.pi * sigma ** 2))


def kde_posterior_mean(x_t, sigma, ref):
    """E_q[x0 | x_t] under the KDE: the samples `ref` weighted by N(x_t; x0, sigma^2 I)."""
    w = jax.nn.softmax(-0.5 * jnp.sum((x_t[:, None] - ref[None]) ** 2, -1)
                       / sigma[:, None] ** 2, axis=1)
    return w @ ref


def true_log_ratio(mixture, x_t, sigma, ref):
    """log p_t(x_t) - log q_t(x_t): exact teacher marginal, KDE of the student's samples."""
    return mixture.marginal_log_prob(x_t, 1.0, sigma) - kde_log_density(x_t, sigma, ref)


# ------------------------------------------------------------------------------------------------
# The oracle: the student step with the true ratio in place of the discriminator's.

def use_oracle_ratio(distillation, mixture, num_ref: int = 4096):
    """Replaces `distillation.student_step` by one whose "discriminator" returns the true log
    ratio (exact p_t, KDE of `num_ref` fresh samples of the current student, no gradient).

    No library hook is needed: the objective calls `teacher(x_t, sigma, labels,
    return_features=True)` and `discriminator(features)`, so the teacher is wrapped to hand
    (x_t, sigma) over as its "features". Needs `feature_source='teacher'` and no guidance. The
    rest of the step is `Distillation._student_step`'s (optimiser, EMA, finite-value guard). The
    GAN term sees constant logits, hence contributes no gradient.
    """
    obj = distillation.objective
    if obj.feature_source != "teacher" or obj.guidance_scale != 1.0:
        raise ValueError("--ratio=oracle needs distill.feature_source='teacher' and no guidance")
    d = distillation

    def student_step(state, teacher_params, batch, key):
        key = jax.random.fold_in(key, state["step"])
        base_teacher = d.denoiser(teacher_params)
        fake = d.denoiser(state["fake_score"])
        shape = (num_ref,) + batch["x"].shape[1:]
        ref = jax.lax.stop_gradient(obj.generator.sample(
            d.denoiser(state["student"]), jax.random.fold_in(key, 12345),
            {"x": jnp.zeros(shape, jnp.float32), "label": None}))

        def teacher(x_t, sigma, labels=None, return_features=False):
            out = base_teacher(x_t, sigma, labels)
            return (out, {"x_t": x_t, "sigma": sigma}) if return_features else out

        def oracle(feats):
            return jax.lax.stop_gradient(
                true_log_ratio(mixture, feats["x_t"], feats["sigma"], ref))[:, None]

        def loss_fn(params):
            return obj.student_loss(d.denoiser(params), teacher, fake, oracle, key, batch,
                                    state["ratio_ema"])

        return d.student_update(state, loss_fn)

    d.student_step = jax.jit(
        student_step, donate_argnums=0,
        in_shardings=(d.state_sharding, d.teacher_sharding, sharding.batch_sharding(d.mesh),
                      sharding.replicated(d.mesh)),
        out_shardings=(d.state_sharding, sharding.replicated(d.mesh)))
    return d


# ------------------------------------------------------------------------------------------------
# h as the student step computes it.

def weights(objective, log_r, sigma, ratio_ema=None):
    """h from log r as `FDivergenceObjective.student_loss` computes it: logit clamp, r clip, r over
    its noise bin's mean (EMA'd from `ratio_ema` at the objective's rate; None: the batch's own
    bin means), h = f''(r) r^2 over its batch mean. log_r [B] -> h [B] (numpy)."""
    obj = objective
    r = objective_lib.density_ratio(jnp.asarray(log_r)[:, None], logit_clip=obj.logit_clip,
                                    r_min=obj.r_min, r_max=obj.r_max)
    if obj.normalize_r:
        bins = objective_lib.noise_bin(sigma, (obj.process.sigma_min, obj.process.sigma_max),
                                       obj.ratio_bins)
        rate = 0.0 if ratio_ema is None else obj.ratio_ema_rate
        ema = obj.init_ratio_ema() if ratio_ema is None else ratio_ema
        r = objective_lib.normalize_ratio(r, bins, objective_lib.update_ratio_ema(ema, r, bins,
                                                                                  rate))
    return np.asarray(objective_lib.f_weights(obj.divergence, r, normalize=obj.normalize_h))


def ess(h) -> float:
    """Effective sample size of weights h as a fraction of the batch: (sum h)^2 / (B sum h^2)."""
    h = np.asarray(h, np.float64)
    return float(h.sum() ** 2 / (len(h) * np.sum(h ** 2)))


# ------------------------------------------------------------------------------------------------
# Diagnostics of one state.

def _corr(a, b) -> float:
    """Pearson correlation; nan when either side is constant (e.g. the truth all at a clamp)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.corrcoef(a, b)[0, 1])


class Diagnostics:
    def __init__(self, config, distillation, mixture, *, num_samples: int = 4096,
                 num_ref: int = 8192):
        self.config, self.d, self.mixture = config, distillation, mixture
        self.n, self.num_ref = num_samples, num_ref
        self.draw = modes.student_draw(config, distillation, num_samples)
        self.draw_ref = modes.student_draw(config, distillation, num_ref)
        d, obj = distillation, distillation.objective

        @jax.jit
        def logits_fn(disc_params, teacher_params, fake_params, x_t, sigma):
            """The discriminator's logits [B, heads] on the features the objective uses."""
            if obj.feature_source == "teacher":
                feats = obj.teacher_x0(d.denoiser(teacher_params), x_t, sigma, None,
                                       return_features=True)[1]
            else:
                feats = d.denoiser(fake_params)(x_t, sigma, None, return_features=True)[1]
            return d.discriminator(disc_params)(feats)

        @jax.jit
        def directions_fn(fake_params, teacher_params, x_t, sigma, ref):
            """(x0_fake - x0_teacher) and its truth (x0_q - x0_p): E_q[x0 | x_t] is the KDE's
            posterior mean over the reference samples, E_p[x0 | x_t] the mixture's exact one."""
            x0_q = kde_posterior_mean(x_t, sigma, ref)
            x0_p = mixture.denoise(x_t, 1.0, sigma)
            x0_t = obj.teacher_x0(d.denoiser(teacher_params), x_t, sigma, None)
            x0_f = d.denoiser(fake_params)(x_t, sigma, None)
            return x0_f - x0_t, x0_q - x0_p, x0_q - x0_t, x0_t - x0_p

        @jax.jit
        def truth_fn(x_t, sigma, ref1, ref2):
            log_p = mixture.marginal_log_prob(x_t, 1.0, sigma)
            return (log_p - kde_log_density(x_t, sigma, ref1),
                    log_p - kde_log_density(x_t, sigma, ref2))

        @jax.jit
        def training_noise(key, x):
            k_sigma, k_eps = jax.random.split(key)
            sigma = obj.noise(k_sigma, x.shape[0])
            return objective_lib.add_noise(k_eps, x, sigma, obj.process), sigma

        self.logits_fn, self.truth_fn, self.training_noise = logits_fn, truth_fn, training_noise
        self.directions_fn = directions_fn

    def __call__(self, state, teacher_params, key) -> dict:
        k_x, k_r1, k_r2, k_noise, k_train = jax.random.split(key, 5)
        local = sharding.local_copy
        student, ema = local(state["student"]), local(state["student_ema"])
        disc, fake = local(state["disc"]), local(state["fake_score"])
        x = np.asarray(self.draw(student, k_x, None))
        x_ema = np.asarray(self.draw(ema, k_x, None))
        ref1 = self.draw_ref(student, k_r1, None)
        ref2 = self.draw_ref(student, k_r2, None)
        out = {"ema": modes.toy_metrics(self.config, x_ema),
               "student": modes.toy_metrics(self.config, x),
               "mode_mass": toy_eval.mode_mass(self.mixture, x).round(4).tolist()}
        norm = lambda v: np.linalg.norm(v, axis=-1)
        cos = lambda a, b: float(np.mean(np.sum(a * b, -1) / (norm(a) * norm(b) + 1e-30)))
        obj = self.d.objective
        lo = max(-obj.logit_clip, float(np.log(obj.r_min)))
        hi = min(obj.logit_clip, float(np.log(obj.r_max)))
        clip = lambda v: np.clip(v, lo, hi)
        ratio = {}
        for j, s in enumerate(DIAG_SIGMAS):
            sigma = jnp.full((self.n,), s, jnp.float32)
            x_t = x + s * np.asarray(jax.random.normal(jax.random.fold_in(k_noise, j), x.shape))
            logit = np.asarray(self.logits_fn(disc, teacher_params, fake, x_t, sigma)).mean(-1)
            t1, t2 = (np.asarray(v) for v in self.truth_fn(x_t, sigma, ref1, ref2))
            ok = np.isfinite(t1) & np.isfinite(t2)
            truth = 0.5 * (t1 + t2)
            est, true, vs_teacher, teacher_err = (np.asarray(v) for v in self.directions_fn(
                fake, teacher_params, x_t, sigma, ref1))
            ratio[str(s)] = {
                "dm_cos": cos(est, true),
                "dm_norm_ratio": float(np.median(norm(est) / (norm(true) + 1e-30))),
                "fake_cos": cos(est, vs_teacher),
                "teacher_err": float(np.sqrt(np.mean(norm(teacher_err) ** 2)
                                             / np.mean(norm(true) ** 2))),
                "corr": _corr(logit[ok], truth[ok]),
                "rmse": float(np.sqrt(np.mean((logit[ok] - truth[ok]) ** 2))),
                "bias": float(np.mean(logit[ok] - truth[ok])),
                # as r enters h: both clamped to [log r_min, log r_max]
                "rmse_clipped": float(np.sqrt(np.mean((clip(logit[ok]) - clip(truth[ok])) ** 2))),
                "corr_clipped": _corr(clip(logit[ok]), clip(truth[ok])),
                "true_sd": float(np.std(truth[ok])),
                "kde_noise": float(np.sqrt(np.mean((t1[ok] - t2[ok]) ** 2) / 2)),
            }
        out["ratio"] = ratio
        # h on a batch noised as in training
        x_t, sigma = self.training_noise(k_train, jnp.asarray(x))
        logit = np.asarray(self.logits_fn(disc, teacher_params, fake, x_t, sigma)).mean(-1)
        t1, _ = self.truth_fn(x_t, sigma, ref1, ref2)
        h_hat = weights(obj, logit, sigma, local(state["ratio_ema"]))
        h_true = weights(obj, jnp.nan_to_num(t1, nan=0.0), sigma)
        sig = np.asarray(sigma)
        split = np.digitize(sig, SIGMA_SPLITS)
        means = np.asarray(self.mixture.means)
        dist_all = np.linalg.norm(x[:, None, :] - means[None], axis=-1)
        nearest = np.argmin(dist_all, axis=1)
        off = dist_all.min(axis=1) > 3 * self.mixture.std   # off every mode: precision misses
        small = sig < SIGMA_SPLITS[0]
        k = self.mixture.num_modes

        def share(h, groups_of, groups):
            tot = h.sum()
            return [round(float(h[groups_of == g].sum() / tot), 4) for g in range(groups)]

        def log_corr(a, b):
            la, lb = np.log(a), np.log(b)
            return float(np.corrcoef(la, lb)[0, 1]) if la.std() > 0 and lb.std() > 0 else 1.0

        q = lambda h: [round(float(v), 3) for v in np.quantile(h, (0.05, 0.5, 0.95))]
        out["h"] = {
            "ess": ess(h_hat), "ess_true": ess(h_true),
            "corr_log_h": log_corr(h_hat, h_true),
            "quantiles": q(h_hat), "quantiles_true": q(h_true),
            "max": float(h_hat.max()), "max_true": float(h_true.max()),
            "share_by_sigma": share(h_hat, split, len(SIGMA_SPLITS) + 1),
            "share_by_sigma_true": share(h_true, split, len(SIGMA_SPLITS) + 1),
            "small_sigma_share_by_mode": share(h_hat[small], nearest[small], k),
            "small_sigma_share_by_mode_true": share(h_true[small], nearest[small], k),
            "sample_share_by_mode": share(np.ones(small.sum()), nearest[small], k),
            # samples off every mode (> 3 std): their share of the batch and, at sigma < 0.1
            # where the gradient pulls them onto a mode, their share of h
            "off_mode_samples": float(off[small].mean()),
            "off_mode_h_share": float(h_hat[small & off].sum() / h_hat[small].sum()),
            "off_mode_h_share_true": float(h_true[small & off].sum() / h_true[small].sum()),
        }
        return out


def report(step, d) -> str:
    e, r, h, st = d["ema"], d["ratio"], d["h"], d["student"]
    per_sigma = lambda key, fmt: "/".join(format(r[str(s)][key], fmt) for s in DIAG_SIGMAS)
    pair = lambda a, b: "/".join(f"{v:.2f}" for v in a) + " (" + "/".join(
        f"{v:.2f}" for v in b) + ")"
    return "\n".join([
        f"step {step}  EMA: recall {e['recall']:.3f} precision {e['precision']:.3f} "
        f"mode_tv {e['mode_tv']:.3f} kl_qp {e['kl_qp']:.2f} kl_pq {e['kl_pq']:.2f}   raw: recall "
        f"{st['recall']:.3f} precision {st['precision']:.3f} kl_qp {st['kl_qp']:.2f}",
        "  modes (raw)  " + " ".join(f"{v:.3f}" for v in d["mode_mass"]),
        f"  log r vs truth   corr {per_sigma('corr', '.2f')}   rmse {per_sigma('rmse', '.2f')}"
        f"   bias {per_sigma('bias', '+.2f')}",
        f"  clamped to [log r_min, log r_max]  corr {per_sigma('corr_clipped', '.2f')}   rmse "
        f"{per_sigma('rmse_clipped', '.2f')}",
        f"  truth            sd {per_sigma('true_sd', '.2f')}   kde noise "
        f"{per_sigma('kde_noise', '.2f')}",
        f"  dm direction     cos {per_sigma('dm_cos', '.2f')}   |est|/|true| "
        f"{per_sigma('dm_norm_ratio', '.2f')}   fake_cos {per_sigma('fake_cos', '.2f')}   "
        f"teacher_err {per_sigma('teacher_err', '.2f')}",
        f"  h (true-ratio h) ess {h['ess']:.2f} ({h['ess_true']:.2f})  corr log h "
        f"{h['corr_log_h']:.2f}  q05/50/95 " + pair(h["quantiles"], h["quantiles_true"])
        + f"  max {h['max']:.2f} ({h['max_true']:.2f})",
        "  h share sigma <0.1/0.1-1/>1 " + pair(h["share_by_sigma"], h["share_by_sigma_true"])
        + f"   off-mode: samples {h['off_mode_samples']:.2f} h {h['off_mode_h_share']:.2f} "
        f"({h['off_mode_h_share_true']:.2f})",
        "  h share by mode (sigma<0.1) " + pair(h["small_sigma_share_by_mode"],
                                                 h["small_sigma_share_by_mode_true"])
        + "  samples " + "/".join(f"{v:.2f}" for v in h["sample_share_by_mode"]),
    ])


LEGEND = (f"per-sigma columns at sigma = {'/'.join(str(s) for s in DIAG_SIGMAS)}. log r vs "
          "truth: the discriminator's mean logit against the true log(p_t/q_t) (exact p_t, KDE "
          "q_t) on noised raw-student samples, raw and with both clamped as r is before it "
          "enters h; truth sd: spread of the true log ratio; kde "
          "noise: RMS difference of two independent KDEs / sqrt 2. dm direction: x0_fake - "
          "x0_teacher against the true x0_q - x0_p. h: the student step's weights on a batch "
          "noised as in training, (in brackets) the true ratio's; ess = effective sample size "
          "/ B; off-mode = samples farther than 3 std from every mode, at sigma < 0.1.")


def run(args) -> dict:
    ensure_teacher(args)
    config, teacher, _ = modes.teacher_of(make_config(args))
    mixture = data.toy.get_toy(config.data)
    mesh = sharding.make_mesh()
    student = None
    if config.distill.ode_init_steps:   # the recipe's start: the shared ODE-regression init
        init_dir = config.distill.get("init_workdir", "") or os.path.join(
            os.path.dirname(os.path.abspath(args.teacher)), "toy_diag", f"init_seed{args.seed}")
        student = modes.regression_init(config, teacher, init_dir, mesh)
    distillation = modes.build_distillation(config, teacher, mesh, student=student)
    if args.ratio == "oracle":
        use_oracle_ratio(distillation, mixture, args.oracle_ref)
    ds = modes.dataset(config, config.distill.batch_size)
    k = int(config.data.get("num_classes", 0))
    diag = Diagnostics(config, distillation, mixture, num_samples=args.num_samples,
                       num_ref=args.num_ref)
    state = distillation.initial_state
    num_steps = int(config.distill.num_steps)
    log = []
    t0 = time.time()
    for i in range(num_steps + 1):
        if i % args.every == 0 or i == num_steps:
            t_diag = time.time()
            d = diag(state, distillation.teacher_params, jax.random.fold_in(jax.random.key(99), i))
            d["seconds"] = time.time() - t0
            d["diag_seconds"] = time.time() - t_diag
            log.append({"step": i, **d})
            print(report(i, d), flush=True)
        if i < num_steps:
            batch = modes.with_one_hot_labels(ds.batch(i), k)
            state, _ = distillation.step(state, i, sharding.global_batch(batch, mesh))
    return {"config": config.to_dict(), "ratio": args.ratio, "log": log}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/toy_diag/teacher",
                   help="teacher workdir (trained with configs/toy.py if it has no config.json)")
    p.add_argument("--toy", default="ring8", help="toy of a teacher trained here")
    p.add_argument("--divergence", default="fkl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", choices=("discriminator", "oracle"), default="discriminator")
    p.add_argument("--oracle_ref", type=int, default=4096,
                   help="student samples per oracle step's KDE")
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--num_samples", type=int, default=4096)
    p.add_argument("--num_ref", type=int, default=8192, help="KDE reference samples")
    p.add_argument("--set", nargs="*", help="config overrides, e.g. distill.num_steps=1000")
    p.add_argument("--out", default="", help="JSON log")
    args = p.parse_args(argv)
    print(LEGEND, flush=True)
    out = run(args)
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(args.teacher)), "toy_diag",
                                    f"diag_{args.divergence}_{args.ratio}_seed{args.seed}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=float)
    print(f"log: {path}")


if __name__ == "__main__":
    main()
