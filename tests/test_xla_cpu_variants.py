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
