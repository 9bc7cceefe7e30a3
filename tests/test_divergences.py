"""The f / h catalogue: closed-form h against the autodiff derivation, conventions, bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import divergences

R = jnp.asarray(np.geomspace(0.05, 40.0, 97), jnp.float32)
ALPHAS = (-1.0, 0.5, 2.0, 3.0)


def _all():
    named = [divergences.get(n) for n in divergences.NAMES if n != "alpha"]
    return named + [divergences.get("alpha", alpha=a) for a in ALPHAS]


@pytest.mark.parametrize("div", _all(), ids=repr)
def test_named_h_equals_autodiff_of_f(div):
    derived = divergences.h_from_f(div.f)(R)
    np.testing.assert_allclose(derived, div.h(R), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("div", _all(), ids=repr)
def test_named_f_is_a_valid_generator(div):
    """f(1) = 0 and f convex: from_f's checks accept every named f, and its h is the table's."""
    assert abs(float(div.f(jnp.float32(1.0)))) < 1e-6
    custom = divergences.from_f(div.f, name=div.name)
    np.testing.assert_allclose(custom.h(R), div.h(R), rtol=2e-3, atol=1e-6)


def test_table_values():
    """Spot values of the paper's Table 1 (f and h = f'' r^2) at r = 3."""
    r = jnp.float32(3.0)
    expect = {"reverse_kl": 1.0, "softened_reverse_kl": 0.25, "jensen_shannon": 0.75,
              "squared_hellinger": np.sqrt(3.0) / 4, "forward_kl": 3.0, "jeffreys": 4.0,
              "neyman_chi2": 2.0 / 3.0, "pearson_chi2": 18.0}
    for name, value in expect.items():
        np.testing.assert_allclose(divergences.get(name).h(r), value, rtol=1e-6)
    np.testing.assert_allclose(divergences.get("alpha", alpha=0.5).h(r), np.sqrt(3.0), rtol=1e-6)


def _gauss_hermite_df(div, m_p, s_p, m_q, s_q, n=120):
    """D_f(p || q) = E_q[f(p/q)] for 1-D Gaussians by Gauss-Hermite quadrature (float64 numpy)."""
    u, w = np.polynomial.hermite.hermgauss(n)
    x = m_q + np.sqrt(2.0) * s_q * u
    log_p = -0.5 * ((x - m_p) / s_p) ** 2 - np.log(s_p)
    log_r = log_p - (-0.5 * ((x - m_q) / s_q) ** 2 - np.log(s_q))
    f = np.asarray(div.f(jnp.asarray(np.exp(log_r), jnp.float32)), np.float64)
    return float(np.sum(w * f) / np.sqrt(np.pi))


def test_f_convention_r_is_p_over_q():
    """D_f(p||q) = E_q[f(p/q)]: f = -log r is KL(q||p), f = r log r is KL(p||q); Hellinger too."""
    m_p, s_p, m_q, s_q = 0.7, 1.1, 0.0, 0.9

    def kl(m1, s1, m2, s2):  # KL(N1 || N2)
        return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5

    v = s_p**2 + s_q**2
    bc = np.sqrt(2 * s_p * s_q / v) * np.exp(-(m_p - m_q) ** 2 / (4 * v))   # Bhattacharyya
    expect = {"rkl": kl(m_q, s_q, m_p, s_p), "fkl": kl(m_p, s_p, m_q, s_q),
              "jeffreys": kl(m_q, s_q, m_p, s_p) + kl(m_p, s_p, m_q, s_q), "sh": 1.0 - bc}
    for name, value in expect.items():
        got = _gauss_hermite_df(divergences.get(name), m_p, s_p, m_q, s_q)
        np.testing.assert_allclose(got, value, rtol=2e-4, err_msg=name)


def test_aliases_and_equality():
    assert divergences.get("fkl") == divergences.get("forward_kl")
    assert divergences.get("js") == divergences.get("jensen_shannon")
    assert divergences.get("rkl") == divergences.get("dmd") == divergences.get("reverse_kl")
    assert divergences.get("alpha", alpha=0.5) == divergences.get("alpha", alpha=0.5)
    assert divergences.get("alpha", alpha=0.5) != divergences.get("alpha", alpha=2.0)
    for alias, name in divergences.ALIASES.items():
        assert divergences.get(alias).name == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        divergences.get("js").name = "x"


def test_traceable_under_jit_and_grad():
    div = divergences.get("js")
    np.testing.assert_allclose(jax.jit(div.h)(R), div.h(R), rtol=1e-6)
    custom = divergences.from_f(lambda r: r * jnp.log(r) - r + 1.0, name="kl_shifted")
    np.testing.assert_allclose(jax.jit(custom.h)(R), R, rtol=1e-4)   # f'' r^2 = r
    g = jax.grad(lambda r: jnp.sum(div.h(r)))(R)
    np.testing.assert_allclose(g, 1.0 / (R + 1.0) ** 2, rtol=1e-4)   # d/dr r/(r+1)


def test_from_f_keeps_shape_and_derives_any_h():
    custom = divergences.from_f(lambda r: (r - 1.0) ** 4 + (r - 1.0) ** 2, name="quartic")
    r = jnp.asarray([[0.5, 1.0], [2.0, 3.0]], jnp.float32)
    np.testing.assert_allclose(custom.h(r), (12.0 * (r - 1.0) ** 2 + 2.0) * r**2, rtol=1e-5)
    assert custom.h(r).shape == (2, 2)


def test_unknown_name_lists_every_name_and_alias():
    with pytest.raises(ValueError) as e:
        divergences.get("total_variation")
    msg = str(e.value)
    assert "'total_variation'" in msg
    for name in divergences.NAMES:
        assert name in msg
    for alias in divergences.ALIASES:
        assert alias in msg


def test_bad_parameters():
    with pytest.raises(ValueError, match="alpha"):
        divergences.get("alpha")
    with pytest.raises(ValueError, match="forward_kl"):
        divergences.get("alpha", alpha=1.0)
    with pytest.raises(ValueError, match="reverse_kl"):
        divergences.get("alpha", alpha=0.0)
    with pytest.raises(ValueError, match="takes no parameters"):
        divergences.get("js", alpha=0.5)
    with pytest.raises(ValueError, match="exactly one parameter"):
        divergences.get("alpha", alpha=0.5, beta=1.0)


def test_from_f_rejects_nonzero_f1():
    with pytest.raises(ValueError, match=r"f\(1\) must be 0"):
        divergences.from_f(lambda r: r * jnp.log(r) + 0.1)


def test_from_f_rejects_non_convex():
    with pytest.raises(ValueError, match="not convex"):
        divergences.from_f(lambda r: jnp.sqrt(r) - 1.0)          # concave everywhere
    with pytest.raises(ValueError, match="not convex"):
        divergences.from_f(lambda r: (r - 1.0) ** 3)              # concave for r < 1 only


def test_from_f_rejects_non_finite_curvature():
    """f undefined for r < 1/2 (sqrt of a negative): f'' is NaN on part of the grid."""
    with pytest.raises(ValueError, match="not finite"):
        divergences.from_f(lambda r: (r - 1.0) ** 2 * jnp.sqrt(r - 0.5))
