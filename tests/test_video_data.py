"""Bouncing-square data and the video metrics: determinism, exact centroids, drift, GIFs."""
import numpy as np
import pytest
from PIL import Image

from fdistill.data.video import BouncingSquares, get_video_dataset, render_squares
from fdistill.video import metrics


def test_batches_are_deterministic_random_access_and_sliced_by_process():
    ds = BouncingSquares(global_batch_size=8, seed=3)
    a, b = ds.batch(5), ds.batch(5)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], ds.batch(6)["x"])
    assert a["x"].shape == (8, *ds.shape) == (8, 8, 16, 16, 1) and a["x"].dtype == np.float32
    assert a["x"].min() == -1.0 and a["x"].max() == 1.0
    parts = [BouncingSquares(global_batch_size=8, seed=3, process_index=i,
                             process_count=2).batch(5)["x"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), a["x"])
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        BouncingSquares(global_batch_size=8, process_count=3)


def test_centroid_tracking_is_exact_and_speed_matches_the_velocity_law():
    ds = BouncingSquares(global_batch_size=512, size=64, square=4.0, num_frames=4, seed=1)
    x, c = ds.batch(0)["x"], ds.centres(0)
    np.testing.assert_allclose(metrics.centroids(x), c, atol=1e-5)
    speeds = metrics.clip_speeds(x)
    np.testing.assert_allclose(speeds, np.linalg.norm(np.diff(c, axis=1), axis=-1).mean(1),
                               atol=1e-5)
    assert np.all(speeds <= ds.speed_max + 1e-5)
    assert abs(speeds.mean() - ds.mean_speed) < 0.05       # walls are rare on a 64 px canvas


def test_squares_bounce_inside_the_canvas():
    ds = BouncingSquares(global_batch_size=64, num_frames=40, seed=2)
    c = ds.centres(0)
    half = ds.square / 2
    assert c.min() >= half - 1e-9 and c.max() <= ds.size - half + 1e-9
    np.testing.assert_allclose(ds.batch(0)["x"].sum(axis=(2, 3, 4)),
                               (2 * ds.square ** 2 - ds.size ** 2), rtol=1e-5)


def test_shape_error_and_drift():
    ds = BouncingSquares(global_batch_size=16, seed=4)
    long = ds.batch(0, num_frames=32)["x"]
    assert np.abs(metrics.shape_error(long)).max() < 1e-10
    flat = metrics.drift(long, 8)
    assert abs(flat["slope"]) < 1e-10 and len(flat["per_segment"]) == 4
    rng = np.random.default_rng(0)
    decay = long + rng.normal(size=long.shape) * np.repeat(np.arange(4) * 0.1, 8)[None, :, None,
                                                                                   None, None]
    assert metrics.drift(decay, 8)["slope"] > 1e-3
    with pytest.raises(ValueError, match="at least two whole segments"):
        metrics.drift(long, 32)


def test_motion_stats_of_static_clips_and_dynamic_degree():
    still = render_squares(np.full((4, 6, 2), 8.0), size=16, square=4.0)
    stats = metrics.motion_stats(still)
    assert stats["speed"] == 0 and stats["frame_diff"] == 0 and stats["dynamic"] == 0
    ds = BouncingSquares(global_batch_size=64, speed_min=1.0, speed_max=1.5, seed=5)
    assert metrics.dynamic_degree(ds.batch(0)["x"], threshold=0.25) == 1.0


def test_gif_and_config_factory(tmp_path):
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(name="video", num_frames=6, size=16))
    ds = get_video_dataset(cfg, global_batch_size=3)
    path = metrics.save_gif(str(tmp_path / "a.gif"), ds.batch(0)["x"], scale=2)
    gif = Image.open(path)
    assert gif.n_frames == 6 and gif.size == (2 * (3 * 17 - 1), 32)
    with pytest.raises(ValueError, match="expects config.data.name == 'video'"):
        get_video_dataset(ml_collections.ConfigDict(dict(name="toy")), global_batch_size=2)
