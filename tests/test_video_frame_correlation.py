"""Video distillation of a teacher trained with frame-correlated noise
(``process.frame_correlation`` = rho): every noise draw goes through the teacher's process
(``EDM.noise``), rho = 0 is exactly the standard normal of before, the students' noise has the
teacher's covariance C = (1 - rho) I + rho 1 1^T across a clip's frames, and the
distribution-matching gradient uses the true score difference C^-1 (x0_teacher - x0_fake) /
sigma^2 (closed form against Gaussians)."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdistill import main, objective, ode_regression, sde, validation
from fdistill.video import hiar

RHO = 0.5


def _corr(rho, t):
    return (1 - rho) * np.eye(t) + rho * np.ones((t, t))


def _frames(z):
    """``[..., T, H, W, C]`` -> rows of T frames (one row per clip and pixel)."""
    return np.moveaxis(np.asarray(z), -4, -1).reshape(-1, z.shape[-4])


# ---------------------------------------------------------------------------------------------
# rho = 0: exactly the draws of before.

def test_noise_with_rho_zero_is_exactly_the_standard_normal():
    """With rho = 0 the helper is ``jax.random.normal`` of the same key, bit for bit: the
    process noise, the students' rollout noise (drawn for all steps at once as before), the
    objective's x_t; and C^-1 is the identity (the very array)."""
    p, key, shape = sde.EDM(), jax.random.key(7), (3, 4, 2, 2, 1)
    np.testing.assert_array_equal(p.noise(key, shape), jax.random.normal(key, shape))
    np.testing.assert_array_equal(hiar.draw_noise(key, 3, shape, p),
                                  jax.random.normal(key, (3, *shape), jnp.float32))
    x, sigma = jnp.ones(shape), jnp.asarray([0.5, 2.0, 9.0])
    np.testing.assert_array_equal(
        objective.add_noise(key, x, sigma, p),
        x + sde.bcast(sigma, x) * jax.random.normal(key, x.shape, x.dtype))
    v = jnp.arange(24.0).reshape(1, 4, 3, 2, 1)
    assert p.noise_precision(v) is v


# ---------------------------------------------------------------------------------------------
# rho > 0: the covariance of every draw.

def test_noise_precision_is_the_inverse_frame_covariance():
    t, p = 5, sde.EDM(frame_correlation=0.3)
    v = jax.random.normal(jax.random.key(0), (3, t, 2, 2, 1))
    want = np.einsum("st,btxyc->bsxyc", np.linalg.inv(_corr(0.3, t)), np.asarray(v))
    np.testing.assert_allclose(p.noise_precision(v), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"clips \[B, T, H, W, C\]"):
        p.noise_precision(jnp.ones((3, 4)))


class _GaussianTeacher(nnx.Module):
    """The exact denoiser of N(0, s^2 I) clips under noise sigma^2 C (per frame-mean / rest)."""

    def __init__(self, process, s=0.5):
        self.process, self.s = process, s

    def __call__(self, x, sigma, labels=None):
        t, rho, s2 = x.shape[1], self.process.frame_correlation, self.s ** 2
        mean = jnp.mean(x, axis=1, keepdims=True)
        v = sde.bcast(sigma, x) ** 2
        return s2 * (mean / (s2 + v * (1 - rho + t * rho)) + (x - mean) / (s2 + v * (1 - rho)))


def test_students_of_a_correlated_teacher_draw_correlated_noise():
    """rho = 0.5: the rollout noise (every step, initial and re-noising) and the ODE pairs'
    starting noise have the teacher's covariance across frames (off-diagonal rho, the closed
    form of sqrt(rho) mixing), independent between steps and between pixels."""
    t, p = 4, sde.EDM(frame_correlation=RHO)
    noise = np.asarray(hiar.draw_noise(jax.random.key(1), 3, (3000, t, 4, 4, 1), p))
    for j in range(3):
        np.testing.assert_allclose(np.cov(_frames(noise[j]), rowvar=False), _corr(RHO, t),
                                   atol=0.03)
    across_steps = np.corrcoef(noise[0, :, 0].ravel(), noise[1, :, 0].ravel())[0, 1]
    assert abs(across_steps) < 0.03
    across_pixels = np.corrcoef(noise[0, :, :, 0, 0].ravel(), noise[0, :, :, 1, 0].ravel())[0, 1]
    assert abs(across_pixels) < 0.03

    pairs = ode_regression.teacher_pairs(_GaussianTeacher(p), jax.random.key(2), 2048,
                                         (t, 4, 4, 1), (80.0, 1.0, 0.0), substeps=64,
                                         batch_size=1024)
    z = pairs["states"][:, 0] / p.sigma_max
    np.testing.assert_allclose(np.cov(_frames(z), rowvar=False), _corr(RHO, t), atol=0.04)
    # The exact teacher maps the correlated prior to the data N(0, s^2 I): whitened frames.
    np.testing.assert_allclose(np.cov(_frames(pairs["x0"]), rowvar=False), 0.25 * np.eye(t),
                               atol=0.02)


# ---------------------------------------------------------------------------------------------
# The distribution-matching gradient against the closed form.

T, SIGMA = 4, 0.6
MU_P = np.asarray([0.5, -0.3, 0.2, 0.8], np.float32)
S_P = 0.8
THETA0 = (jnp.zeros(T, jnp.float32), jnp.asarray(0.0, jnp.float32))   # q0 = N(0, I)


def _cov_t(s, rho):
    return s ** 2 * np.eye(T) + SIGMA ** 2 * _corr(rho, T)


def _x0(mean, s, rho):
    """The exact EDM denoiser of N(mean, s^2 I) clips [B, T, 1, 1, 1] at SIGMA under noise
    SIGMA^2 C: mean + s^2 (s^2 I + SIGMA^2 C)^-1 (x - mean)."""
    gain = jnp.asarray(s ** 2 * np.linalg.inv(_cov_t(s, rho)), jnp.float32)
    mean = jnp.asarray(mean, jnp.float32)

    def denoise(x_t):
        flat = x_t.reshape(x_t.shape[0], T)
        return (mean + (flat - mean) @ gain.T).reshape(x_t.shape)
    return denoise


def _log_gaussian(x, mean, cov):
    prec, (_, logdet) = jnp.asarray(np.linalg.inv(cov)), np.linalg.slogdet(cov)
    d = x.reshape(x.shape[0], T) - mean
    return -0.5 * (jnp.einsum("bi,ij,bj->b", d, prec, d) + logdet + T * np.log(2 * np.pi))


class _Affine:
    """The student q0 = N(m, exp(log_s)^2 I) as a generator: x = m + exp(log_s) z."""
    num_evaluations = 1

    def training_sample(self, student, key, batch):
        return student(jax.random.normal(key, batch["x"].shape))

    sample = training_sample


def _kl(m1, c1, m2, c2):
    """KL(N(m1, c1) || N(m2, c2))."""
    p2 = jnp.linalg.inv(c2)
    d = m2 - m1
    return 0.5 * (jnp.trace(p2 @ c1) + d @ p2 @ d - T + jnp.linalg.slogdet(c2)[1]
                  - jnp.linalg.slogdet(c1)[1])


class _NoPrecision(sde.EDM):
    """The same noise, with the score read as if it were independent per frame."""

    def noise_precision(self, v):
        return v


def _mc_grad(div, process, rho, chunks=16, n=4000):
    m0, ls0 = THETA0
    s0 = 1.0
    x0_p, x0_q = _x0(MU_P, S_P, rho), _x0(np.zeros(T), s0, rho)
    cov_p, cov_q = _cov_t(S_P, rho), _cov_t(s0, rho)

    def teacher(x_t, sigma, labels=None, return_features=False):
        return (x0_p(x_t), {0: x_t}) if return_features else x0_p(x_t)

    def fake(x_t, sigma, labels=None, return_features=False):
        return (x0_q(x_t), {0: x_t}) if return_features else x0_q(x_t)

    def disc(feats):
        x = feats[0]
        return (_log_gaussian(x, MU_P, cov_p) - _log_gaussian(x, np.zeros(T), cov_q))[:, None]

    obj = objective.FDivergenceObjective(
        divergence=div, generator=_Affine(),
        noise=objective.GridNoise(np.asarray([SIGMA], np.float32), (0, 0)), process=process,
        gan_weight=0.0, logit_clip=60.0, r_min=1e-30, r_max=1e30, normalize_r=False,
        normalize_h=False, normalize_dm=False)
    batch = {"x": jnp.zeros((n, T, 1, 1, 1), jnp.float32)}

    def grad(key):
        def loss(theta):
            m, ls = theta
            student = lambda z: m.reshape(1, T, 1, 1, 1) + jnp.exp(ls) * z
            return obj.student_loss(student, teacher, fake, disc, key, batch, jnp.ones((10,)))[0]
        return jax.grad(loss)((m0, ls0))

    g = jax.jit(jax.vmap(grad))(jax.random.split(jax.random.key(3), chunks))
    flat = jnp.concatenate([g[0], g[1][:, None]], axis=1)
    return np.asarray(flat.mean(0)), np.asarray(flat.std(0) / np.sqrt(chunks))


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl"])
def test_dm_gradient_is_the_divergence_gradient_with_correlated_noise(name):
    """Gaussian teacher N(mu_p, s_p^2 I) and student N(m, s^2 I) clips of T = 4 frames, noised
    with SIGMA^2 C (rho = 0.5), exact denoisers and exact log-ratio: the student loss's
    gradient is SIGMA^2 grad D_f(p_t || q_t) / dim (reverse KL: KL(q_t || p_t); forward KL:
    KL(p_t || q_t); both in closed form), which needs the score difference
    C^-1 (x0_teacher - x0_fake) / SIGMA^2. Reading it as (x0_teacher - x0_fake) / SIGMA^2 (the
    per-frame independent score) misses the closed form by many standard errors."""
    from fdistill import divergences
    div = divergences.get(name)
    c = SIGMA ** 2 * _corr(RHO, T)

    def d_f(theta):
        m, ls = theta
        cq = jnp.exp(2 * ls) * jnp.eye(T) + c
        cp = jnp.asarray(_cov_t(S_P, RHO), jnp.float32)
        if name == "reverse_kl":
            return _kl(m, cq, jnp.asarray(MU_P), cp)
        return _kl(jnp.asarray(MU_P), cp, m, cq)

    g = jax.grad(d_f)(THETA0)
    truth = SIGMA ** 2 * np.concatenate([np.asarray(g[0]), [float(g[1])]]) / T
    mean, se = _mc_grad(div, sde.EDM(frame_correlation=RHO), RHO)
    assert np.all(np.abs(truth) > 1e-3)
    assert np.all(se < 0.1 * np.abs(truth)), (se, truth)
    np.testing.assert_array_less(np.abs(mean - truth), 4.5 * se + 1e-4)
    wrong, wrong_se = _mc_grad(div, _NoPrecision(frame_correlation=RHO), RHO)
    assert np.max(np.abs(wrong - truth) / (wrong_se + 1e-6)) > 20


# ---------------------------------------------------------------------------------------------
# Every noise draw of a distillation goes through the teacher's process.

def test_distilling_a_correlated_teacher_draws_all_noise_from_its_process(tmp_path,
                                                                          monkeypatch):
    """A tiny rho = 0.5 teacher is trained, then distilled (ODE pairs, ODE initialisation,
    JS + GAN + R1 + forward-KL regulariser, the student's rollouts): with `EDM.noise` wrapped
    and `jax.random.normal` refusing calls from outside it (network initialisation aside), every
    noise draw is the teacher's process noise with rho = 0.5 (the ODE pairs' starting noise,
    the rollouts' [S * B, T, ...] noise, x_t of the DM loss, the critic's fake and real x_t and
    R1's perturbation), and the distillation runs to its report."""
    from tests.test_video_distill import tiny_config
    c = tiny_config()
    c.process.frame_correlation = RHO
    teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
    main.run(c, teacher_dir, "train")

    calls, outside, depth = [], [], [0]
    normal, noise = jax.random.normal, sde.EDM.noise

    def recording_noise(self, key, shape):
        calls.append((self.frame_correlation, tuple(shape)))
        depth[0] += 1
        try:
            return noise(self, key, shape)
        finally:
            depth[0] -= 1

    def guarded_normal(*args, **kwargs):
        if not depth[0]:
            caller = sys._getframe(1).f_code.co_filename
            if os.sep + os.path.join("fdistill", "models") + os.sep not in caller:
                outside.append(caller)
        return normal(*args, **kwargs)

    monkeypatch.setattr(sde.EDM, "noise", recording_noise)
    monkeypatch.setattr(jax.random, "normal", guarded_normal)
    d = c.distill
    d.update(teacher_workdir=teacher_dir, ode_init_steps=2, fkl_weight=1.0,
             divergence="jensen_shannon", gan_weight=0.01, r1_weight=0.1)
    assert not validation.problems(c, "distill")
    out = main.run(c, student_dir, "distill")
    monkeypatch.undo()

    assert not outside, outside
    assert {rho for rho, _ in calls} == {RHO}
    shapes = {s for _, s in calls}
    t, size = c.data.num_frames, c.data.size
    clip = (t, size, size, 1)
    b, steps = d.batch_size, c.student.num_steps
    assert (64,) + clip in shapes                          # the ODE pairs' starting noise
    assert (steps * b,) + clip in shapes                   # rollouts (student and critic)
    assert (b,) + clip in shapes                           # DM, critic fake/real, R1 x_t
    n = c.eval.num_clips
    assert (steps * n,) + clip in shapes                   # the report's rollouts
    assert (steps * n, t * c.eval.rollout_factor, size, size, 1) in shapes
    assert np.isfinite(out["final/student/loss_dm"]) and np.isfinite(out["final/critic/r1"])
    assert np.isfinite(out["student/long/speed_ratio"])
