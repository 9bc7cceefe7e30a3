"""f-distill maths against closed forms: the gradient of D_f between Gaussians, DMD as
reverse-KL, the density ratio of a logistic discriminator, the normalisations of r and h, the
student sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdistill import divergences, objective, sde, student
from fdistill.models.denoiser import preconditioning

# A 1-D teacher p = N(MU_P, S_P^2) and a location-scale student x = m + exp(log_s) z at THETA0,
# compared at one noise level SIGMA. The variances are close enough that every weighting h(r) used
# below has finite Monte Carlo variance (E_q[r^4] and E_q[r^-2] finite).
MU_P, S_P, SIGMA, SIGMA_MAX = 0.5, 0.8, 0.6, 80.0
THETA0 = jnp.asarray([0.0, np.log(1.0)], jnp.float32)


def _log_normal(x, mean, var):
    return -0.5 * (x - mean) ** 2 / var - 0.5 * jnp.log(2 * jnp.pi * var)


def _gaussian_x0(mean, var):
    """The exact EDM denoiser of N(mean, var) at noise level SIGMA: E[x0 | x_t] (Tweedie)."""
    return lambda x_t: mean + var / (var + SIGMA**2) * (x_t - mean)


def _networks(theta0):
    """Exact stand-ins with the contract's call signatures: teacher and fake score are the exact
    denoisers of p and q_theta0, the discriminator's logit is the exact log p_t/q_t
    (features = x_t)."""
    m0, s0 = float(theta0[0]), float(jnp.exp(theta0[1]))
    vp, vq = S_P**2 + SIGMA**2, s0**2 + SIGMA**2
    x0_p, x0_q = _gaussian_x0(MU_P, S_P**2), _gaussian_x0(m0, s0**2)

    def teacher(x_t, sigma, labels=None, return_features=False):
        return (x0_p(x_t), {0: x_t}) if return_features else x0_p(x_t)

    def fake_score(x_t, sigma, labels=None, return_features=False):
        return (x0_q(x_t), {0: x_t}) if return_features else x0_q(x_t)

    def discriminator(feats):
        return _log_normal(feats[0], MU_P, vp) - _log_normal(feats[0], m0, vq)

    return teacher, fake_score, discriminator


def _student(theta):
    return lambda x_t, sigma, labels=None: theta[0] + jnp.exp(theta[1]) * x_t / SIGMA_MAX


def _exact_objective(div, *, normalize_h=False):
    """FDistill with exact networks, all normalisations and the GAN term off, r unclipped."""
    return objective.FDivergenceObjective(
        divergence=div, generator=student.FewStep((SIGMA_MAX,)),
        noise=objective.GridNoise(np.asarray([SIGMA], np.float32), (0, 0)), process=sde.EDM(),
        gan_weight=0.0, logit_clip=60.0, r_min=1e-30, r_max=1e30,
        normalize_r=False, normalize_h=normalize_h, normalize_dm=False)


_MC_CACHE = {}


def _mc_grad(objective, *, chunks=20, n=5000, seed=0):
    """Mean and standard error over `chunks` independent batches of grad_theta student_loss."""
    cache_key = (repr(objective.divergence), objective.normalize_h, seed)
    if cache_key not in _MC_CACHE:
        _MC_CACHE[cache_key] = _mc_grad_uncached(objective, chunks, n, seed)
    return _MC_CACHE[cache_key]


def _mc_grad_uncached(objective, chunks, n, seed):
    teacher, fake, disc = _networks(THETA0)
    batch = {"x": jnp.zeros((n, 1), jnp.float32)}

    def grad(key):
        return jax.grad(lambda th: objective.student_loss(
            _student(th), teacher, fake, disc, key, batch, jnp.ones((1,)))[0])(THETA0)

    g = jax.jit(jax.vmap(grad))(jax.random.split(jax.random.key(seed), chunks))
    return g.mean(0), g.std(0) / np.sqrt(chunks)


def _quadrature(div, theta):
    """D_f(p_t || q_theta,t) = int q_t f(p_t/q_t) dx and E_q_t[h(r)] (trapezoid on [-12, 12])."""
    x = jnp.linspace(-12.0, 12.0, 4801)
    vp, vq = S_P**2 + SIGMA**2, jnp.exp(2 * theta[1]) + SIGMA**2
    log_q = _log_normal(x, theta[0], vq)
    r = jnp.exp(_log_normal(x, MU_P, vp) - log_q)
    q = jnp.exp(log_q)
    return jnp.trapezoid(q * div.f(r), x), jnp.trapezoid(q * div.h(r), x)


GRAD_CASES = [divergences.get(n) for n in divergences.NAMES if n != "alpha"] + [
    divergences.get("alpha", alpha=a) for a in (-1.0, 0.5, 2.0)]


@pytest.mark.parametrize("div", GRAD_CASES, ids=repr)
def test_generator_gradient_is_the_f_divergence_gradient(div):
    """With exact scores and exact r, normalisations off:
    grad_theta L = sigma^2 grad_theta D_f(p_t || q_theta,t)   (paper Eq. 7; x0 = x_t + sigma^2 s),
    for the mean and the log-scale of the student, within 4.5 Monte Carlo standard errors."""
    mean, se = _mc_grad(_exact_objective(div))
    truth = SIGMA**2 * jax.grad(lambda th: _quadrature(div, th)[0])(THETA0)
    assert np.all(np.abs(truth) > 0.005)                     # a non-trivial gradient to match
    assert np.all(se < 0.1 * np.abs(truth)), (se, truth)   # and a sharp test of it
    np.testing.assert_array_less(np.abs(mean - truth), 4.5 * se + 1e-4)


@pytest.mark.parametrize("name", ["js", "pearson_chi2", "sh"])
def test_normalised_h_divides_gradient_by_mean_h(name):
    """With h / mean_batch(h): grad L ~= sigma^2 grad D_f / E_q[h(r)] (a positive rescaling)."""
    div = divergences.get(name)
    mean, se = _mc_grad(_exact_objective(div, normalize_h=True), seed=1)
    d_f, mean_h = _quadrature(div, THETA0)
    truth = SIGMA**2 * jax.grad(lambda th: _quadrature(div, th)[0])(THETA0) / mean_h
    assert abs(float(mean_h) - 1.0) > 0.05 or name == "sh"
    np.testing.assert_array_less(np.abs(mean - truth), 4.5 * se + 2e-3 * np.abs(truth))


def test_wrong_weighting_is_detected():
    """Sanity of the test above: forward-KL's gradient differs from reverse-KL's beyond MC error."""
    g_f, se_f = _mc_grad(_exact_objective(divergences.get("fkl")))
    g_r, se_r = _mc_grad(_exact_objective(divergences.get("rkl")))
    assert np.any(np.abs(g_f - g_r) > 10 * (se_f + se_r))


# ------------------------------------------------------------------------------------------------
# Reverse-KL is DMD.

def _random_dm_inputs(seed=0, shape=(6, 4, 4, 3)):
    k = jax.random.split(jax.random.key(seed), 4)
    x, x0_t, x0_f = (jax.random.normal(ki, shape) for ki in k[:3])
    logits = 3.0 * jax.random.normal(k[3], (shape[0], 2))
    return x, x0_t, x0_f, logits


def test_reverse_kl_is_the_dmd_update():
    """For reverse-KL, h = 1 whatever the discriminator says (before and after normalisation), and
    d loss / dx is DMD's (x0_fake - x0_teacher) / mean|x - x0_teacher| (over the dimension)."""
    x, x0_t, x0_f, logits = _random_dm_inputs()
    r = objective.density_ratio(logits)
    h = objective.f_weights(divergences.get("rkl"), r)
    np.testing.assert_array_equal(h, jnp.ones_like(r))
    grad = jax.grad(lambda x: objective.distribution_matching_loss(x, x0_t, x0_f, h).sum())(x)
    dim = x[0].size
    dmd = (x0_f - x0_t) / jnp.mean(jnp.abs(x - x0_t), axis=(1, 2, 3), keepdims=True) / dim
    np.testing.assert_allclose(grad, dmd, rtol=1e-5, atol=1e-8)
    h_fkl = objective.f_weights(divergences.get("fkl"), r)
    grad_fkl = jax.grad(lambda x: objective.distribution_matching_loss(x, x0_t, x0_f, h_fkl).sum())(x)
    np.testing.assert_allclose(grad_fkl, dmd * h_fkl[:, None, None, None], rtol=1e-5, atol=1e-8)


def test_dm_loss_value_and_unnormalised_gradient():
    x, x0_t, x0_f, _ = _random_dm_inputs(1)
    w = jnp.linspace(0.5, 2.0, x.shape[0])
    loss = objective.distribution_matching_loss(x, x0_t, x0_f, w, normalize=False)
    g = (x0_f - x0_t) * w[:, None, None, None]
    np.testing.assert_allclose(loss, 0.5 * jnp.mean(g**2, axis=(1, 2, 3)), rtol=1e-5)
    grad = jax.grad(lambda x: objective.distribution_matching_loss(
        x, x0_t, x0_f, w, normalize=False).sum())(x)
    np.testing.assert_allclose(grad, g / x[0].size, rtol=1e-5, atol=1e-8)
    # the weights and the targets carry no gradient
    dw = jax.grad(lambda w: objective.distribution_matching_loss(x, x0_t, x0_f, w).sum())(w)
    np.testing.assert_array_equal(dw, jnp.zeros_like(w))


# ------------------------------------------------------------------------------------------------
# The density ratio.

def test_logistic_discriminator_recovers_log_ratio():
    """A quadratic-logit discriminator trained with `discriminator_loss` on samples of
    p = N(1, 0.8^2) (real) and q = N(0, 1.2^2) (fake) learns logit = log p/q (a quadratic)."""
    kp, kq = jax.random.split(jax.random.key(0))
    real = 1.0 + 0.8 * jax.random.normal(kp, (40000,))
    fake = 1.2 * jax.random.normal(kq, (40000,))

    def logit(w, x):
        return (w[0] * x**2 + w[1] * x + w[2])[:, None]

    def loss(w):
        return objective.discriminator_loss(logit(w, fake), logit(w, real)).mean()

    tx = optax.adam(0.05)

    @jax.jit
    def step(carry, _):
        w, opt = carry
        updates, opt = tx.update(jax.grad(loss)(w), opt)
        return (optax.apply_updates(w, updates), opt), None

    w0 = jnp.zeros(3)
    (w, _), _ = jax.lax.scan(step, (w0, tx.init(w0)), None, length=1500)
    x = jnp.linspace(-1.5, 2.5, 41)
    exact = _log_normal(x, 1.0, 0.64) - _log_normal(x, 0.0, 1.44)
    np.testing.assert_allclose(logit(w, x)[:, 0], exact, atol=0.1)
    r = objective.density_ratio(logit(w, x), r_min=1e-3, r_max=1e3)
    np.testing.assert_allclose(jnp.log(r), exact, atol=0.1)


def test_density_ratio_clamps_averages_and_stops_gradient():
    logits = jnp.asarray([[100.0, 100.0], [-100.0, -100.0], [np.log(2.0), np.log(8.0)],
                          [15.0, -15.0]])
    r = objective.density_ratio(logits)
    np.testing.assert_allclose(r, [20.0, 0.1, 4.0, 1.0], rtol=1e-6)   # exp(clamped mean of the logits)
    r_wide = objective.density_ratio(logits, logit_clip=10.0, r_min=1e-9, r_max=1e9)
    np.testing.assert_allclose(r_wide, [np.exp(10.0), np.exp(-10.0), 4.0, 1.0], rtol=1e-5)
    # the mean over heads is clamped, not each head: heads (30, 0) give exp(10), not exp(5)
    r_mean = objective.density_ratio(jnp.asarray([[30.0, 0.0]]), r_min=1e-9, r_max=1e9)
    np.testing.assert_allclose(r_mean, [np.exp(10.0)], rtol=1e-5)
    g = jax.grad(lambda l: objective.density_ratio(l).sum())(logits)
    np.testing.assert_array_equal(g, jnp.zeros_like(logits))


def test_noise_bins_are_linear_in_sigma():
    """10 bins of equal width in sigma over [sigma_min, sigma_max] (the reference's bins)."""
    sigma = jnp.asarray([0.002, 7.99, 8.01, 39.9, 40.1, 79.9, 80.0, 200.0])
    bins = objective.noise_bin(sigma, (0.0, 80.0), 10)
    np.testing.assert_array_equal(bins, [0, 0, 1, 4, 5, 9, 9, 9])
    grid = objective.karras_noise_grid(sde.EDM(), 1000)[2:999]
    counts = np.bincount(np.asarray(objective.noise_bin(jnp.asarray(grid), (0.002, 80.0), 10)),
                         minlength=10)
    assert counts[0] > 600 and counts.sum() == 997       # the Karras grid crowds low sigmas


def test_ratio_ema_and_binwise_normalisation():
    bins = jnp.asarray([0, 0, 1, 1, 1, 3])
    r = jnp.asarray([1.0, 3.0, 0.5, 1.0, 4.5, 7.0])
    ema = jnp.asarray([1.0, 2.0, 5.0, 1.5])
    # rate 0: the EMA is the batch mean per bin, and the normalised r has mean 1 in every bin seen
    new = objective.update_ratio_ema(ema, r, bins, 0.0)
    np.testing.assert_allclose(new, [2.0, 2.0, 5.0, 7.0], rtol=1e-6)   # bin 2 empty: kept
    rn = objective.normalize_ratio(r, bins, new)
    for b in (0, 1, 3):
        np.testing.assert_allclose(rn[bins == b].mean(), 1.0, rtol=1e-6)
    # rate 0.9: ema_b <- 0.9 ema_b + 0.1 mean_b
    new = objective.update_ratio_ema(ema, r, bins, 0.9)
    np.testing.assert_allclose(new, [1.1, 2.0, 5.0, 0.9 * 1.5 + 0.7], rtol=1e-6)


def test_h_batch_normalisation():
    r = jnp.asarray(np.geomspace(0.1, 20.0, 16), jnp.float32)
    for name in ("js", "fkl", "pearson", "sh", "neyman"):
        div = divergences.get(name)
        w = objective.f_weights(div, r)
        np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-5)
        np.testing.assert_allclose(w / w[0], div.h(r) / div.h(r)[0], rtol=1e-5)
        np.testing.assert_allclose(objective.f_weights(div, r, normalize=False), div.h(r), rtol=1e-6)


def test_student_loss_updates_the_ratio_ema():
    """Inside the student loss, r is normalised by the EMA of its own bin (rate 0: batch mean)."""
    div = divergences.get("fkl")
    obj = objective.FDivergenceObjective(
        divergence=div, generator=student.FewStep((SIGMA_MAX,)),
        noise=objective.GridNoise(np.asarray([0.3, 0.5, 0.8, 1.0], np.float32), (0, 3)),
        process=sde.EDM(sigma_min=0.002, sigma_max=1.6), ratio_bins=2, ratio_ema_rate=0.0,
        gan_weight=0.0)
    teacher, fake, disc = _networks(THETA0)
    batch = {"x": jnp.zeros((512, 1))}
    _, (metrics, ema) = obj.student_loss(_student(THETA0), teacher, fake, disc, jax.random.key(3),
                                         batch, obj.init_ratio_ema())
    assert ema.shape == (2,) and np.all(np.abs(np.asarray(ema) - 1.0) > 1e-3)
    np.testing.assert_allclose(metrics["student/h_max"] >= 1.0, True)


# ------------------------------------------------------------------------------------------------
# Noise levels, losses of the critic, the student sampler.

def test_noise_grid_is_the_karras_grid():
    edm = sde.EDM()
    sig = objective.karras_noise_grid(edm, 1000)
    i = np.arange(1000)
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    np.testing.assert_allclose(sig, (hi + i / 999 * (lo - hi)) ** 7, rtol=1e-4)
    with pytest.raises(ValueError, match="process.name='edm'"):
        objective.karras_noise_grid(sde.VPSDE(), 1000)


def test_fake_score_weighting():
    """'edm' weights the x0 error by EDM's lambda(sigma) = 1 / c_out^2; 'none' is plain MSE."""
    sigma = jnp.asarray([0.002, 0.1, 1.0, 80.0])
    c_out = preconditioning("edm", sigma, sigma, sigma_data=0.5)[1]
    make = lambda w: objective.FDivergenceObjective(
        divergence=divergences.get("js"), generator=student.FewStep((80.0,)),
        noise=objective.GridNoise(np.ones(4, np.float32), (0, 3)), process=sde.EDM(),
        fake_score_weighting=w)
    np.testing.assert_allclose(make("edm").fake_score_weight(sigma) * c_out**2, 1.0, rtol=1e-5)
    np.testing.assert_allclose(make("none").fake_score_weight(sigma), 1.0)
    with pytest.raises(ValueError, match="none, edm"):
        make("snr")


def test_gan_and_critic_losses():
    l = jnp.asarray([[0.0, 2.0], [-1.0, 1.0]])
    np.testing.assert_allclose(objective.gan_generator_loss(l),
                               [(np.log(2) + np.log1p(np.exp(-2.0))) / 2,
                                (np.log1p(np.e) + np.log1p(np.exp(-1.0))) / 2], rtol=1e-6)
    np.testing.assert_allclose(objective.discriminator_loss(l, -l),
                               2 * jnp.mean(jax.nn.softplus(l), -1), rtol=1e-6)
    np.testing.assert_allclose(objective.approximate_r1(l, l + 0.5), [0.25, 0.25], rtol=1e-6)


def test_few_step_student_sigmas():
    edm = sde.EDM()
    assert student.student_sigmas(edm, 1) == (80.0,)
    four = student.student_sigmas(edm, 4)
    assert len(four) == 4 and four[0] == pytest.approx(80.0) and all(np.diff(four) < 0)
    assert student.student_sigmas(edm, 2, (80.0, 1.0)) == (80.0, 1.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        student.student_sigmas(edm, 2, (1.0, 80.0))
    with pytest.raises(ValueError, match="strictly decreasing"):
        student.student_sigmas(edm, 4, (80.0, 1.0))


def test_generate_and_training_gradient_through_one_step():
    """G(x_t) = a x_t: the sampler chains with re-noising; the training sample carries gradient
    through the picked step only (DMD2's backward simulation), not through the detached chain."""
    sig = (80.0, 2.0, 0.5)
    key = jax.random.key(0)
    shape = (4096, 1)

    def student_of(a):
        return lambda x_t, sigma, labels=None: a * x_t

    a = 0.01
    x = student.generate(student_of(a), key, shape, sigmas=sig)
    # x = a(a(a 80 z0 + 2 e1) + 0.5 e2): std a sqrt(a^4 80^2 + a^2 4 + 0.25)
    std = a * np.sqrt(a**4 * 80**2 + a**2 * 4 + 0.25)
    np.testing.assert_allclose(float(x.std()), std, rtol=0.05)

    def total(a):
        return student.generate_for_training(student_of(a), key, shape, sigmas=sig).sum()

    out = student.generate_for_training(student_of(a), key, shape, sigmas=sig)
    grad = jax.grad(total)(a)
    np.testing.assert_allclose(grad, out.sum() / a, rtol=1e-4)   # d(a x_in)/da = x_in, x_in fixed


def test_classifier_free_guidance_on_the_teacher():
    obj = objective.FDivergenceObjective(
        divergence=divergences.get("js"), generator=student.FewStep((80.0,)),
        noise=objective.GridNoise(np.ones(4, np.float32), (0, 3)), process=sde.EDM(),
        guidance_scale=3.0)

    def teacher(x_t, sigma, labels, return_features=False):
        out = x_t if labels is None else x_t + labels.sum(-1, keepdims=True)
        return (out, {0: x_t}) if return_features else out

    x_t = jnp.zeros((2, 1))
    labels = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
    x0, feats = obj.teacher_x0(teacher, x_t, jnp.ones(2), labels, return_features=True)
    np.testing.assert_allclose(x0[:, 0], [3.0, 6.0])           # x0_u + 3 (x0_c - x0_u), x0_u = 0
    np.testing.assert_allclose(obj.teacher_x0(teacher, x_t, jnp.ones(2), None), x_t)


def test_bad_settings():
    make = lambda **kw: objective.FDivergenceObjective(
        divergence=divergences.get("js"), generator=student.FewStep((80.0,)),
        noise=objective.GridNoise(np.ones(4), (0, 3)), process=sde.EDM(), **kw)
    with pytest.raises(ValueError, match="teacher, fake_score"):
        make(feature_source="x")
    with pytest.raises(ValueError, match="index_range"):
        objective.GridNoise(np.ones(4), (2, 998))
