"""Motion and drift metrics of long rollouts: tracking against the true centres, the data-derived
dynamic degree against the speed law, VBench's counting rule, speed ratios and drift slopes
against constructed rollouts whose trends are known."""
import numpy as np
import pytest

from fdistill.data.video import BouncingSquares, render_squares
from fdistill.video import metrics


def _data(n=256, frames=8, seed=0, **kw):
    ds = BouncingSquares(global_batch_size=n, num_frames=frames, seed=seed, **kw)
    return ds, ds.batch(0)["x"]


def test_tracking_is_exact_on_data_and_ignores_background_noise_and_fragments():
    ds, x = _data(n=128, frames=6, seed=1)
    np.testing.assert_allclose(metrics.centroids(x), ds.centres(0), atol=1e-5)
    clean = metrics.clip_speeds(x).mean()
    noisy = x + 0.05 * np.random.default_rng(0).normal(size=x.shape)
    np.testing.assert_allclose(metrics.clip_speeds(noisy).mean(), clean, rtol=0.01)
    # a frame split into a full square and a fainter fragment is tracked on the square
    frame = render_squares(np.array([[5.0, 6.0]]), size=16, square=4.0)
    frame = np.maximum(frame, render_squares(np.array([[12.0, 12.0]]), size=16, square=2.0))
    np.testing.assert_allclose(metrics.centroids(frame[None]), [[[5.0, 6.0]]], atol=1e-9)


def test_tracking_is_unbiased_on_faint_and_blurred_squares():
    """Model samples are fainter and softer than data: a half-intensity square in noise, and a
    square smeared by a 3x3 box filter (whose tails spill past the grown window), are tracked
    within 0.2 px of their true centres at the data's speed: excess speed in samples is motion,
    not tracking noise."""
    ds, x = _data(n=128, frames=6, seed=2)
    true = ds.centres(0)
    w = (x + 1.0) / 2.0
    faint = 2.0 * 0.5 * w - 1.0 + 0.05 * np.random.default_rng(1).normal(size=x.shape)
    assert np.abs(metrics.centroids(faint) - true).max() < 0.2
    np.testing.assert_allclose(metrics.clip_speeds(faint).mean(), metrics.clip_speeds(x).mean(),
                               rtol=0.02)
    padded = np.pad(w, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    box = sum(padded[:, :, i:i + 16, j:j + 16] for i in range(3) for j in range(3)) / 9.0
    inner = (true.min(-1) >= 3.0) & (true.max(-1) <= 13.0)     # the blur not cut by a wall
    blurred = 2.0 * box - 1.0
    assert np.abs(metrics.centroids(blurred) - true)[inner].max() < 0.2
    np.testing.assert_allclose(metrics.clip_speeds(blurred).mean(), metrics.clip_speeds(x).mean(),
                               rtol=0.02)


def test_threshold_is_the_data_lower_quartile_and_half_speed_scores_clearly_lower():
    # on a 40 px canvas walls are rare over 3 frames: pair displacement = speed ~ U[0.5, 1.5], quartile 0.75
    # (3-frame clips: the pairs of a clip share its speed, so clips, not pairs, count)
    _, data = _data(n=512, frames=3, size=40, seed=2)
    threshold = metrics.dynamic_threshold(data)
    assert abs(threshold - 0.75) < 0.05
    _, fresh = _data(n=512, frames=3, size=40, seed=3)
    _, half = _data(n=256, frames=3, size=40, seed=3, speed_min=0.25, speed_max=0.75)
    _, double = _data(n=256, frames=3, size=40, seed=3, speed_min=1.0, speed_max=3.0)
    # a clip of speed v is dynamic iff v > threshold: P(v > threshold) under each speed law
    assert abs(metrics.dynamic_degree(fresh, threshold) - (1.5 - threshold) / 1.0) < 0.05
    assert abs(metrics.dynamic_degree(half, threshold) - (0.75 - threshold) / 0.5) < 0.05
    assert metrics.dynamic_degree(half, threshold) < 0.15
    assert metrics.dynamic_degree(double, threshold) == 1.0
    still = render_squares(np.full((8, 8, 2), 20.0), size=40, square=4.0)
    assert metrics.dynamic_degree(still, threshold) == 0.0
    # the default 16 px canvas (walls shorten some pairs) keeps the separation
    _, small = _data(n=128, seed=4)
    _, small_half = _data(n=128, seed=5, speed_min=0.25, speed_max=0.75)
    thr = metrics.dynamic_threshold(small)
    assert metrics.dynamic_degree(small, thr) > 0.7 > 0.2 > metrics.dynamic_degree(small_half,
                                                                                    thr)


def test_vbench_counting_rule():
    # 8 frames = 7 pairs: dynamic when at least round(7 / 4) = 2 pairs move more than 1 px
    steps = np.zeros((3, 7))
    steps[1, 3] = 2.0                       # one fast pair: not dynamic
    steps[2, [1, 5]] = 2.0                  # two fast pairs: dynamic
    cols = 4.0 + np.concatenate([np.zeros((3, 1)), np.cumsum(steps, axis=1)], axis=1)
    centres = np.stack([np.full_like(cols, 8.0), cols], axis=-1)
    clips = render_squares(centres, size=16, square=4.0)
    np.testing.assert_array_equal(metrics.dynamic_flags(clips, 1.0), [False, False, True])
    np.testing.assert_array_equal(metrics.dynamic_flags(clips, 1.0, min_fraction=0.1),
                                  [False, True, True])


def test_evaluate_rollout_on_data_and_half_speed_data():
    _, data = _data(seed=6)
    ds, long = _data(n=64, frames=32, seed=7)
    res = metrics.evaluate_rollout(long, data, 8)
    np.testing.assert_allclose(res["speed_ratio_per_segment"], 1.0, atol=0.08)
    assert len(res["dynamic_per_segment"]) == 4 and abs(res["dynamic"] - res["data/dynamic"]) < 0.1
    assert res["shape_error"] < 1e-10 and abs(res["drift/shape_error/slope"]) < 1e-10
    # the square's area never changes: intensity is exactly square^2 / size^2 in every segment
    np.testing.assert_allclose(res["intensity_per_segment"], 16 / 256, rtol=1e-6)
    assert abs(res["drift/intensity/change"]) < 1e-8 and res["drift"] < 0.02
    _, half = _data(n=64, frames=32, seed=7, speed_min=0.25, speed_max=0.75)
    slow = metrics.evaluate_rollout(half, data, 8)
    np.testing.assert_allclose(slow["speed_ratio"], 0.5, atol=0.05)
    assert slow["dynamic"] < 0.2 < 0.6 < res["dynamic"]


def test_drift_of_a_fading_noisier_rollout():
    _, data = _data(seed=8)
    _, long = _data(n=64, frames=40, seed=9)
    seg = np.repeat(np.arange(5), 8)                                   # segment of each frame
    alpha = 1.0 - 0.05 * seg                                           # square fades 20%
    faded = -1.0 + (long + 1.0) * alpha[None, :, None, None, None]
    res = metrics.evaluate_rollout(faded, data, 8)
    # intensity is alpha square^2 / size^2: change -0.2 relative to the data's, slope -0.05/seg
    np.testing.assert_allclose(res["drift/intensity/relative"], -0.2, rtol=1e-5)
    np.testing.assert_allclose(res["drift/intensity/slope"], -0.05 * 16 / 256, rtol=1e-5)
    assert res["drift/sharpness/slope"] < 0 and res["drift/shape_error/slope"] > 0
    # added noise of variance 0.01 s in segment s: shape error 0.01 s (tracking is unaffected)
    noise = np.random.default_rng(1).normal(size=long.shape) * np.sqrt(0.01 * seg)[None, :, None,
                                                                                  None, None]
    noisy = metrics.evaluate_rollout(long + noise, data, 8)
    np.testing.assert_allclose(noisy["drift/shape_error/slope"], 0.01, rtol=0.05)
    np.testing.assert_allclose(noisy["drift/shape_error/relative"],
                               0.04 / np.mean((data + 1.0) ** 2), rtol=0.05)
    assert noisy["drift"] > 0.1 > res["drift"] / 10


def test_evaluate_rollout_input_checks():
    _, data = _data(n=8, seed=10)
    _, long = _data(n=8, frames=24, seed=11)
    with pytest.raises(ValueError, match="shorter than 4x the training length 8"):
        metrics.evaluate_rollout(long, data, 8)
    _, long = _data(n=8, frames=36, seed=11)
    with pytest.raises(ValueError, match="no partial segment"):
        metrics.evaluate_rollout(long, data, 8)
    with pytest.raises(ValueError, match="must have the training length 6"):
        metrics.evaluate_rollout(long, data, 6)
    with pytest.raises(ValueError, match="quantile must lie in"):
        metrics.dynamic_threshold(data, quantile=1.0)
