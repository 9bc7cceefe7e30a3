"""Sampling and evaluation split their batch over this process' devices (``--cpu_devices=2``):
the teacher's sampler, the one-step student and the in-domain classifier's features give one
device's results, each device computing half of the batch (half the FLOPs of the one-device
program, XLA's count of the per-device program)."""
import numpy as np
import pytest

from tests.tiny import run_on_fake_devices

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
sys.path.insert(0, '.')
from configs import distill_digits
from fdistill import modes, sharding, train
from fdistill.evaluation import classifier
from tests.tiny import tiny_digits_config

assert jax.device_count() == DEVICES, jax.devices()
B = 8
t = tiny_digits_config()
t.sampling.sampler, t.sampling.num_steps = "heun", 3
teacher = modes.build_model(t, seed=3)
c = modes.resolve_config(distill_digits.get_config(), t)
c.distill.batch_size = B
dist = modes.build_distillation(c, teacher, sharding.make_mesh())
key = jax.random.key(5)
labels = modes.label_draws(t, key, B)(0)[0]
images = np.asarray(jax.random.uniform(jax.random.key(6), (B, 8, 8, 1), minval=-1, maxval=1))


def flops(lowered):
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def record(fn, args, split):
    out = fn(*args)
    first = out[0] if isinstance(out, tuple) else out
    return {"out": [np.asarray(o).tolist() for o in (out if isinstance(out, tuple) else (out,))],
            "devices": split.num_devices, "flops": flops(split.lower(*args)),
            "rows_per_shard": sorted({s.data.shape[0] for s in first.addressable_shards}),
            "shard_devices": len(first.sharding.device_set)}


graphdef, params, others = train.split(teacher)
heun = modes.TeacherSampler(t, graphdef, others, B)
student = modes.student_draw(c, dist, B)
clf = classifier.InDomainClassifier("digits", classifier.ConvNet((8, 8, 1), 10, rngs=nnx.Rngs(0)),
                                    (8, 8, 1), 0.0, batch_size=B)
result = {
    "teacher": record(heun, (params, key, labels), heun._draw),
    "student": record(student, (dist.teacher_params, key, labels), student),
    "classifier": record(clf._run, (clf.state, images), clf._run),
}
feats, _ = clf.features_and_logits(images[:5])          # a padded chunk still splits
result["classifier_padded"] = feats.tolist()
print("RESULT" + json.dumps(result))
"""


@pytest.fixture(scope="module")
def runs():
    return {n: run_on_fake_devices(SCRIPT.replace("DEVICES", str(n)), devices=n)
            for n in (1, 2)}


@pytest.mark.parametrize("name", ["teacher", "student", "classifier"])
def test_split_batch_matches_one_device_with_half_the_work(runs, name):
    one, two = runs[1][name], runs[2][name]
    assert one["devices"] == 1 and two["devices"] == 2
    assert two["shard_devices"] == 2 and two["rows_per_shard"] == [4]   # 8 rows, 4 per device
    assert one["rows_per_shard"] == [8]
    for a, b in zip(one["out"], two["out"]):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and np.all(np.isfinite(a))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(a).max()))
    # Each device's program does half of the one-device program's arithmetic.
    assert 0.45 < two["flops"] / one["flops"] < 0.55, (two["flops"], one["flops"])


def test_padded_classifier_chunk_matches(runs):
    np.testing.assert_allclose(np.asarray(runs[2]["classifier_padded"]),
                               np.asarray(runs[1]["classifier_padded"]), rtol=1e-4, atol=1e-5)
