"""Sample grids in TensorBoard: written during training, read back from the event file."""
import glob
import io

import numpy as np
from PIL import Image

from fdistill import modes
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
