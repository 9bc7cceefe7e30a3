"""The network formulations that experiments/bench_distill.py times against each other
(experiments/xla_cpu_variants.py) compute the library's outputs and gradients to float
tolerance, so their speed ratios compare equal work."""
import os

import jax
import numpy as np
import pytest

from experiments import xla_cpu_variants
from tests.test_fast_layers import outputs_and_grads, tiny  # noqa: F401 (a fixture)

FORMULATIONS = [name for name, v in xla_cpu_variants.VARIANTS.items()
                if v.patches and name != 'teacher_batched']


@pytest.mark.skipif(os.environ.get("FDISTILL_SLOW_TESTS", "0") != "1",
                    reason="benchmark formulations (~1.5 min of CPU): run with FDISTILL_SLOW_TESTS=1 "
                           "before timing them")
@pytest.mark.parametrize('name', FORMULATIONS)
def test_variant_gives_the_library_outputs_and_gradients(name, tiny):
    net, inputs, (out, grads) = tiny
    with xla_cpu_variants.get_variant(name).applied():
        v_out, v_grads = outputs_and_grads(net, *inputs)
    np.testing.assert_allclose(v_out, out, rtol=2e-5, atol=2e-5 * float(np.abs(out).max()))
    for g, r in zip(jax.tree.leaves(v_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()) + 1e-7)


def test_group_norm_equals_its_batch_concatenated_formulation():
    """The statistics stacked after the batch axis give exactly the numbers of the earlier
    formulation that concatenated them along it (outputs and input gradient)."""
    from fdistill.models import layers
    gn = layers.GroupNorm(64)
    gn.weight[...] = jax.numpy.linspace(0.5, 1.5, 64)
    gn.bias[...] = jax.numpy.linspace(-1., 1., 64)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 64)) * 3 + 1
    w = jax.random.normal(jax.random.key(2), x.shape)
    for call in (layers.GroupNorm.__call__, xla_cpu_variants.group_norm_batch_concat):
        out, grad = jax.jit(jax.value_and_grad(lambda x: jax.numpy.sum(call(gn, x) * w)))(x)
        if call is layers.GroupNorm.__call__:
            ref = (out, grad)
    np.testing.assert_array_equal(out, ref[0])
    np.testing.assert_allclose(grad, ref[1], rtol=1e-6, atol=1e-7)
