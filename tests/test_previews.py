"""Sample grids in TensorBoard: written during training, read back from the event file."""
import glob
import io
import os

import jax
import numpy as np
import pytest
from PIL import Image

from fdistill import modes, monitor
from tests.tiny import tiny_toy_config


def _images(workdir: str) -> dict[str, list[tuple[int, np.ndarray]]]:
    from tensorboard.backend.event_processing import event_accumulator
    files = glob.glob(f"{workdir}/events.out.tfevents.*")
    assert files, f"no event file in {workdir}"
    acc = event_accumulator.EventAccumulator(files[0], size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        for event in acc.Tensors(tag):
            values = event.tensor_proto.string_val
            if len(values) < 3:                   # scalars are not image summaries
                continue
            image = np.asarray(Image.open(io.BytesIO(values[2])))
            out.setdefault(tag, []).append((event.step, image))
    return out


def test_teacher_training_logs_sample_grids_from_a_fixed_noise(tmp_path):
    """With preview_every = 2, the toy teacher logs a density plot of the EMA teacher's samples at
    steps 2 and 4; the same weights give the same picture (one fixed noise)."""
    c = tiny_toy_config(num_steps=4, log_every=2, preview_every=2)
    out = modes.train_teacher(c, str(tmp_path))
    images = _images(str(tmp_path))
    steps = [s for s, _ in images["samples/teacher_ema"]]
    assert steps == [2, 4]
    picture = images["samples/teacher_ema"][-1][1]
    assert picture.shape[:2] == (160, 160) and picture.min() < 255 and picture.max() == 255
    model, _ = modes.load_teacher(c, str(tmp_path))
    draw, _ = modes.teacher_sampler(c, model, 256)
    preview = modes.sample_preview(c, draw, lambda st: st["ema"], name="p", n=256)
    first, second = preview(out["state"])["p"], preview(out["state"])["p"]
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[..., 0], picture[..., 0] if picture.ndim == 3 else picture)


def test_panels_carry_their_titles():
    """Each quickstart panel is titled in a white band above it (dark text pixels there only)."""
    import pytest
    from fdistill import monitor
    grey = np.full((40, 50), 200, np.uint8)
    row = monitor.panel_row([grey, grey], titles=["truth", "student, fkl\n1 NFE"], gap=4)
    band = row[:row.shape[0] - 40]
    assert row.shape == (band.shape[0] + 40, 104)
    assert (band[:, :50] < 128).any() and (band[:, 54:] < 128).any()     # text in both bands
    assert (row[band.shape[0]:, :50] == 200).all()                         # the panel untouched
    with pytest.raises(ValueError, match="2 titles for 1 panels"):
        monitor.panel_row([grey], titles=["a", "b"])


def test_titled_panel_differs_only_in_its_title_band():
    """A titled panel is its untitled self under a white band holding dark text; grey and RGB,
    in rows and in grids."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (30, 60), dtype=np.uint8)
    rgb = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)
    for image in (grey, rgb):
        plain = monitor.panel_row([image])
        titled = monitor.panel_row([image], titles=["teacher, heun\n35 NFE"])
        band = titled.shape[0] - plain.shape[0]
        assert band > 0 and titled.shape[1:] == plain.shape[1:]
        np.testing.assert_array_equal(titled[band:], plain)          # the image pixels kept
        np.testing.assert_array_equal(plain, image)
        assert (titled[:band] < 100).any() and (titled[:band] > 250).mean() > 0.7
    mixed = monitor.panel_grid([grey, rgb, grey[:20]], titles=["a", "b", "c"], ncols=2, gap=3)
    row1 = monitor.panel_row([grey, rgb], titles=["a", "b"], gap=3)
    assert mixed.shape[2] == 3 and mixed.shape[1] == row1.shape[1]
    np.testing.assert_array_equal(mixed[:row1.shape[0]], row1)
    assert (mixed[row1.shape[0]:row1.shape[0] + 3] == 255).all()     # the gap between rows
    with pytest.raises(ValueError, match="HxW, HxWx1 or HxWx3"):
        monitor.panel_row([np.zeros((4, 4, 2), np.uint8)])


def test_sample_pictures_read_back_from_the_event_file(tmp_path):
    """Each kind of preview goes through TensorBoard unchanged: an image grid (small images
    enlarged by whole pixels), a video strip (a row of frames per clip) and a toy density plot."""
    rng = np.random.default_rng(1)
    digits = rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
    clips = rng.uniform(-1, 1, (3, 4, 16, 16, 1)).astype(np.float32)
    points = rng.normal(size=(256, 2)).astype(np.float32)
    pictures = {"samples/image": monitor.sample_picture(digits, kind="image"),
                "samples/video": monitor.sample_picture(clips, kind="video"),
                "samples/toy": monitor.sample_picture(points, kind="toy", extent=3.0)}
    grid = monitor.image_grid(digits)                                   # 37 x 37: enlarged x4
    np.testing.assert_array_equal(pictures["samples/image"], monitor.enlarge(grid, 4))
    strip = monitor.video_strip(clips)                                  # 3 clips x 4 frames
    assert strip.shape == (3 * 17 + 1, 4 * 17 + 1, 1)
    np.testing.assert_array_equal(pictures["samples/video"], monitor.enlarge(strip, 3))
    assert min(pictures["samples/video"].shape[:2]) >= 128
    mon = monitor.Monitor(str(tmp_path), total_steps=10)
    mon.images(5, pictures)
    mon.close()
    logged = _images(str(tmp_path))
    for tag, picture in pictures.items():
        (step, image), = logged[tag]
        assert step == 5
        image = image if image.ndim == 3 else image[..., None]
        np.testing.assert_array_equal(image[..., :1], picture)


def test_video_preview_is_a_strip_from_a_fixed_noise():
    """sample_preview on a video config: a strip of frames, the same noise and labels at every
    call (so the picture changes with the weights alone)."""
    from configs import video_quick
    from fdistill import data
    c = video_quick.get_config()
    shape = (4,) + data.example_shape(c.data)
    keys = []

    def draw(params, key, labels):
        keys.append(np.asarray(jax.random.key_data(key)))
        return np.tanh(params * jax.random.normal(key, shape))

    preview = modes.sample_preview(c, draw, lambda st: st["w"], name="samples/student_ema", n=4)
    a = preview({"w": np.float32(1.0)})["samples/student_ema"]
    b = preview({"w": np.float32(1.0)})["samples/student_ema"]
    c2 = preview({"w": np.float32(2.0)})["samples/student_ema"]
    np.testing.assert_array_equal(keys[0], keys[1])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c2)
    t, r, _, channels = shape[1:]
    scale = -(-128 // (4 * (r + 1) + 1))
    assert a.shape == ((4 * (r + 1) + 1) * scale, (t * (r + 1) + 1) * scale, channels)


@pytest.mark.skipif(os.environ.get("FDISTILL_SLOW_TESTS", "0") != "1",
                    reason="compiles a toy distillation (101 s at load 13 on the shared 2-core "
                           "CPU); the preview path of train.fit is covered by the teacher test; "
                           "run with FDISTILL_SLOW_TESTS=1")
def test_distillation_logs_student_sample_grids(tmp_path):
    """A toy distillation with preview_every = 2 logs the EMA student's density plot at steps 2
    and 4 of 4 (the teacher: 2 tiny training steps)."""
    from configs import distill_toy
    teacher_dir = str(tmp_path / "teacher")
    modes.train_teacher(tiny_toy_config(num_steps=2, log_every=2), teacher_dir)
    c = distill_toy.get_config()
    d = c.distill
    d.teacher_workdir = teacher_dir
    d.batch_size = 16
    d.num_steps, d.log_every, d.ckpt_every, d.preview_every = 4, 2, 4, 2
    d.ode_init_steps = 0
    d.num_eval_samples = d.eval_batch_size = 64
    out = str(tmp_path / "student")
    modes.distill(c, out)
    images = _images(out)
    steps = [s for s, _ in images["samples/student_ema"]]
    assert steps == [2, 4]
    picture = images["samples/student_ema"][-1][1]
    assert picture.shape[:2] == (160, 160) and picture.min() < 255
