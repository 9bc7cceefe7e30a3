"""The teacher's ODE pairs and the ODE-regression initialisation, against closed forms.

For data N(0, s^2 I) the exact EDM denoiser is D(x; sigma) = s^2 / (sigma^2 + s^2) x and the
PF-ODE dx/dsigma = (x - D) / sigma keeps x / sqrt(sigma^2 + s^2) constant: from x_T = sigma_max z
the state at level sigma is x_T sqrt(sigma^2 + s^2) / sqrt(sigma_max^2 + s^2).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdistill import ode_regression, sde, sharding, train

S = 0.7


class GaussianDenoiser(nnx.Module):
    """The exact denoiser of N(0, S^2 I) data (a scale parameter so that it can be trained)."""

    def __init__(self):
        self.process = sde.EDM(sigma_data=S)
        self.scale = nnx.Param(jnp.ones(()))

    def __call__(self, x, sigma, class_labels=None):
        sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
        out = self.scale[...] * S ** 2 / (sigma ** 2 + S ** 2) * x
        if class_labels is not None:                      # a label offset the pairs must carry
            out = out + class_labels[:, :1].reshape((-1,) + (1,) * (x.ndim - 1))
        return out


class OneStepMap(nnx.Module):
    """scale * the exact one-step ODE map from level sigma, x S / sqrt(sigma^2 + S^2)."""

    def __init__(self, scale: float):
        self.scale = nnx.Param(jnp.asarray(scale))

    def __call__(self, x, sigma, class_labels=None):
        return self.scale[...] * x * S / jnp.sqrt(sigma[:, None] ** 2 + S ** 2)


def _exact(x_T, sigma_max, sigma):
    return x_T * np.sqrt(sigma ** 2 + S ** 2) / np.sqrt(sigma_max ** 2 + S ** 2)


def test_pairs_follow_the_exact_ode_through_the_student_levels():
    sigmas = (80.0, 1.5, 0.0)                            # a two-step student
    pairs = ode_regression.teacher_pairs(GaussianDenoiser(), jax.random.key(0), 10, (3,), sigmas,
                                         substeps=40, batch_size=4)     # Heun error ~ 1e-3
    assert pairs["states"].shape == (10, 2, 3) and pairs["x0"].shape == (10, 3)
    assert "label" not in pairs
    x_T = pairs["states"][:, 0]
    assert np.std(x_T / 80.0) == pytest.approx(1.0, rel=0.5)      # sigma_max z
    np.testing.assert_allclose(pairs["states"][:, 1], _exact(x_T, 80.0, 1.5), rtol=2e-3)
    np.testing.assert_allclose(pairs["x0"], _exact(x_T, 80.0, 0.0), rtol=2e-3)


def test_class_conditional_pairs_carry_their_labels():
    pairs = ode_regression.teacher_pairs(GaussianDenoiser(), jax.random.key(1), 64, (2,),
                                         (80.0, 0.0), substeps=40, batch_size=32, num_classes=3)
    labels = pairs["label"]
    assert labels.shape == (64, 3) and np.all(labels.sum(1) == 1)
    assert set(np.argmax(labels, 1)) == {0, 1, 2}
    first = labels[:, 0] == 1                           # the label moved these end points
    unconditional = _exact(pairs["states"][:, 0], 80.0, 0.0)
    assert np.all(np.abs(pairs["x0"] - unconditional)[first] > 0.5)
    np.testing.assert_allclose(pairs["x0"][~first], unconditional[~first], rtol=1e-2)


def test_regression_loss_picks_each_examples_own_level():
    """The exact one-step ODE map from level sigma, x -> x S / sqrt(sigma^2 + S^2), has zero
    loss at every level only if each example is fed the state of the level it is scored at."""
    sigmas = (80.0, 1.5, 0.0)
    pairs = ode_regression.teacher_pairs(GaussianDenoiser(), jax.random.key(2), 64, (3,), sigmas,
                                         substeps=40, batch_size=64)
    exact_map = lambda x, s, y=None: x * S / jnp.sqrt(s[:, None] ** 2 + S ** 2)
    loss, _ = ode_regression.regression_loss(exact_map, jax.random.key(0), pairs, sigmas)
    assert float(loss) < 1e-5
    wrong = lambda x, s, y=None: x * S / jnp.sqrt(s[::-1, None] ** 2 + S ** 2)
    assert float(ode_regression.regression_loss(wrong, jax.random.key(0), pairs, sigmas)[0]) > 0.1


def test_initialise_regresses_once_and_is_reused(tmp_path):
    """A one-step map off by a factor 2 is regressed onto the teacher's ODE map (factor 1); the
    pairs and the result are kept, so a second call reads them instead of training again."""
    import ml_collections
    from configs.distill_base import optim
    teacher = GaussianDenoiser()
    pairs = ode_regression.load_or_draw_pairs(
        str(tmp_path / "ode_pairs.npz"),
        lambda: ode_regression.teacher_pairs(teacher, jax.random.key(3), 256, (2,), (80.0, 0.0),
                                             substeps=40))
    student = OneStepMap(2.0)
    dc = ml_collections.ConfigDict(dict(ode_init_steps=400, batch_size=64, log_every=100,
                                        ode_init_optim=optim(0.05, weight_decay=0.0,
                                                             grad_clip=0.0)))
    dc.ode_init_optim.decay_steps = 400
    loss = lambda m, k, b: ode_regression.regression_loss(m, k, b, (80.0, 0.0))
    mesh = sharding.make_mesh()
    out = ode_regression.initialise(student, pairs, loss, dc, str(tmp_path), mesh, seed=0)
    assert float(out.scale[...]) == pytest.approx(1.0, abs=0.01)
    again = ode_regression.load_or_draw_pairs(str(tmp_path / "ode_pairs.npz"), lambda: 1 / 0)
    np.testing.assert_array_equal(again["x0"], pairs["x0"])
    dc.ode_init_optim.lr = float("nan")                 # would poison a second training run
    with pytest.raises(ValueError, match="other ode_init_optim .*new directory"):
        ode_regression.initialise(student, pairs, loss, dc, str(tmp_path), mesh, seed=0)
    dc.ode_init_optim.lr = 0.05
    dc.ode_init_steps = 800                              # a longer run is not this one resumed
    with pytest.raises(ValueError, match="other ode_init_steps"):
        ode_regression.initialise(student, pairs, loss, dc, str(tmp_path), mesh, seed=0)
    dc.ode_init_steps = 400
    never = lambda m, k, b: 1 / 0                       # a second training run would call it
    out2 = ode_regression.initialise(student, pairs, never, dc, str(tmp_path), mesh, seed=0)
    assert float(out2.scale[...]) == float(out.scale[...])
    with pytest.raises(ValueError, match="holds 256 teacher pairs but distill.num_pairs is 512"):
        ode_regression.load_or_draw_pairs(str(tmp_path / "ode_pairs.npz"), lambda: 1 / 0, num=512)


def test_cosine_decay_reaches_zero():
    from configs.distill_base import optim
    o = optim(1e-2, weight_decay=0.0, grad_clip=0.0)
    o.decay_steps = 10
    tx = train.make_optimizer(o)
    p = {"w": jnp.zeros(())}
    s = tx.init(p)
    moves = []
    for _ in range(12):
        u, s = tx.update({"w": jnp.ones(())}, s, p)
        moves.append(abs(float(u["w"])))
    assert moves[1] == pytest.approx(1e-2, rel=1e-3) and moves[-1] < 1e-9
    assert all(a >= b for a, b in zip(moves[1:], moves[2:]))
