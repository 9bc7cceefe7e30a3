"""The figures the experiments write next to their tables (README Results), on given rows."""
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from fdistill import monitor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(name: str):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digits_rows():
    rows = [{"model": "real digits (another draw)", "kind": "data", "nfe": 0}]
    rows += [{"model": f"teacher (heun, {s} steps)", "kind": "teacher", "sampler": "heun",
              "nfe": 2 * s - 1} for s in (18, 9, 5, 3)]
    rows += [{"model": "teacher (euler_maruyama, 100 steps)", "kind": "teacher",
              "sampler": "euler_maruyama", "nfe": 100}]
    rows += [{"model": f"student/{name}", "kind": "student", "nfe": 1}
             for name in ("ode_init", "rkl", "fkl", "js")]
    fds = [7.8, 7.4, 9.1, 25.0, 179.8, 7.5, 10.0, 9.0, 9.3, 9.2]
    for row, fd in zip(rows, fds):
        row.update(fd_digits=fd, accuracy_digits=0.95)
    return rows


def test_digits_figures_titled_samples_and_fd_against_nfe(tmp_path):
    """digits_fdistill.py writes a grid of titled sample panels (one per table row, images
    enlarged 3x and untouched below their titles) and the fd_digits-against-NFE plot."""
    digits = _experiment("digits_fdistill")
    rows = _digits_rows()
    rng = np.random.default_rng(0)
    panels = [(row, rng.uniform(-1, 1, (40, 8, 8, 1)).astype(np.float32)) for row in rows]
    paths = digits.write_figures(rows, panels, [str(tmp_path / "a"), str(tmp_path / "b")])
    assert sorted(os.path.relpath(p, tmp_path) for p in paths) == [
        "a/digits_fd_nfe.png", "a/digits_samples.png", "b/digits_fd_nfe.png",
        "b/digits_samples.png"]
    grid = np.asarray(Image.open(tmp_path / "a" / "digits_samples.png"))
    np.testing.assert_array_equal(grid, digits.samples_figure(panels))
    first = monitor.enlarge(monitor.image_grid(panels[0][1][:36], ncols=6), 3)
    plain = monitor.panel_row([first])
    titled = monitor.panel_row([first], titles=["real digits\n(another draw)\nFD 7.8 acc 0.95"])
    band = titled.shape[0] - plain.shape[0]
    np.testing.assert_array_equal(grid[:titled.shape[0], :titled.shape[1]], titled)
    np.testing.assert_array_equal(grid[band:band + first.shape[0], :first.shape[1]],
                                  first[..., 0])
    assert grid.shape[1] == 5 * first.shape[1] + 4 * 4          # 5 panels a row, 4 px gaps
    plot = Image.open(tmp_path / "a" / "digits_fd_nfe.png")
    assert plot.size == (600, 400)
    assert np.asarray(plot.convert("L")).std() > 10            # not blank


def test_digits_targets_compare_each_student_with_the_teachers_heun_rows():
    """The digits targets: at or below the 17-NFE Heun teacher (9.1), within 1.25x of the 35-NFE
    one (7.4 -> 9.25); the Euler-Maruyama and real-digits rows take no part; single draws never
    resolve the comparison."""
    met = _experiment("digits_fdistill").targets(_digits_rows())
    unresolved = {"resolved_17": False}
    assert met == {"student/ode_init": {"meets_17": False, "within_35": False, **unresolved},
                   "student/rkl": {"meets_17": True, "within_35": True, **unresolved},
                   "student/fkl": {"meets_17": False, "within_35": False, **unresolved},
                   "student/js": {"meets_17": False, "within_35": True, **unresolved}}


def test_digits_targets_resolve_a_paired_gap_of_more_than_two_standard_errors():
    """With draws, the 17-NFE comparison is resolved when the per-draw differences' mean exceeds
    twice its standard error: a gap of 0.2 with differences of std 0.1 over 5 draws (se 0.045)
    resolves, the same gap with differences of std 0.3 (se 0.134) and unpaired counts do not."""
    digits = _experiment("digits_fdistill")
    unit = np.array([-2.0, -1.0, 0.0, 1.0, 2.0]) / np.std([-2, -1, 0, 1, 2], ddof=1)
    base = np.array([3.0, 3.8, 3.2, 3.6, 3.4])

    def row(model, kind, nfe, draws):
        return {"model": model, "kind": kind, "sampler": "heun", "nfe": nfe,
                "fd_digits": float(np.mean(draws)), "fd_digits_draws": list(draws)}

    rows = [row("t35", "teacher", 35, base - 0.8), row("t17", "teacher", 17, base),
            row("student/a", "student", 1, base - 0.2 + 0.1 * unit),
            row("student/b", "student", 1, base - 0.2 + 0.3 * unit),
            row("student/c", "student", 1, (base + 0.2)[:4])]
    met = digits.targets(rows)
    assert met["student/a"] == {"meets_17": True, "within_35": True, "resolved_17": True}
    assert met["student/b"] == {"meets_17": True, "within_35": True, "resolved_17": False}
    assert met["student/c"] == {"meets_17": False, "within_35": False, "resolved_17": False}


def test_toy_divergence_figure_titles_each_panel_with_its_metrics(tmp_path):
    """toy_divergences.py's per-toy figure: one density panel per model, each under a title that
    names it and gives its precision, recall and mode-weight TV."""
    toy_divergences = _experiment("toy_divergences")
    from configs import toy
    config = toy.get_config()
    x = np.random.default_rng(0).normal(0, 0.05, (512, 2)) + np.array([2.0, 0.0])
    row = {"precision": 0.951, "recall": 1.0, "mode_tv": 0.0234}
    image, title = toy_divergences.panel(config, x, "student, fkl\n1 NFE", row)
    assert title == "student, fkl\n1 NFE\nP 0.95 R 1.00 TV 0.023"
    np.testing.assert_array_equal(image, monitor.density_image(x, extent=3.7))
    truth = toy_divergences.panel(config, x, "truth: ring8")
    toy_divergences.save_figure([truth, (image, title)], str(tmp_path / "toy_ring8.png"))
    got = np.asarray(Image.open(tmp_path / "toy_ring8.png"))
    np.testing.assert_array_equal(
        got, monitor.panel_row([truth[0], image], titles=["truth: ring8", title]))
    assert (image < 255).sum() > 0 and image.shape == (160, 160)
    with pytest.raises(ValueError, match="4 lines"):
        monitor.panel_row([image], titles=["a\nb\nc\nd"])


def test_video_rollouts_figure_is_one_titled_filmstrip_per_model(tmp_path):
    """video_hiar.py's figure: per model, its first clip's frames (every other one) side by side,
    under a title naming the model with its speed ratio and shape error."""
    video_hiar = _experiment("video_hiar")
    rng = np.random.default_rng(0)
    clips = [rng.uniform(-1, 1, (2, 8, 16, 16, 1)).astype(np.float32) for _ in range(3)]
    rows = [None, {"speed_ratio": 1.234, "shape_error": 0.0456}, None]
    entries = list(zip(("data", "teacher (Heun)", "student"), rows, clips))
    path = video_hiar.rollouts_figure(entries, str(tmp_path / "f" / "video_rollouts.png"))
    got = np.asarray(Image.open(path))
    strips = [video_hiar.filmstrip(c[0], stride=2) for c in clips]
    assert strips[0].shape[:2] == (3 * 17 + 3, 3 * (4 * 17 + 1))     # 4 frames of 16 px, 1-px gaps
    np.testing.assert_array_equal(strips[0][3:51, 3:51, 0],
                                  monitor.enlarge(monitor.image_grid(clips[0][0, :1]), 3)[3:51, 3:51, 0])
    want = monitor.panel_grid(strips, titles=["data", "teacher (Heun)\nspeed ratio 1.23, shape "
                                              "err 0.046", "student"], ncols=1)
    np.testing.assert_array_equal(got, want[..., 0] if want.ndim == 3 and want.shape[-1] == 1
                                  else want)


def test_video_paired_table_differences_rows_seed_by_seed():
    """video_hiar.py's paired table: each row minus the w/o-FKL row per seed, mean and standard
    error of those differences (not of the rows), n/a where a row lacks the column."""
    video_hiar = _experiment("video_hiar")
    base = video_hiar.PAIRED_BASE
    cols = dict.fromkeys(video_hiar.PAIRED_COLUMNS, 1.0)
    ref = [{**cols, "speed_ratio": v} for v in (1.0, 2.0, 3.0)]
    hiar = [{**cols, "speed_ratio": v} for v in (0.9, 1.7, 2.8)]      # differences -0.1, -0.3, -0.2
    teacher = [{"speed_ratio": v} for v in (1.0, 2.0, 3.5)]
    text = video_hiar.paired_table({"data": ref[:1], base: ref, "hiar": hiar, "teacher": teacher})
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith(f"| row - {base} (paired by seed) |")
    se = np.std([-0.1, -0.3, -0.2], ddof=1) / np.sqrt(3)                # 0.0577
    assert lines[2] == (f"| hiar | -0.200 +- {se:.3f} | +0.000 +- 0.000 | +0.000 +- 0.000 | "
                        "+0.000 +- 0.000 |")
    assert lines[3].startswith("| teacher | +0.167 +- ") and lines[3].endswith("| n/a | n/a | n/a |")
    assert video_hiar.paired_table({base: ref[:1], "hiar": hiar[:1]}) == ""


def test_video_gif_frames_carry_their_title(tmp_path):
    """Every frame of a titled sample GIF is the untitled frame under the title's band."""
    from fdistill.video import metrics
    clips = np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 8, 1)).astype(np.float32)
    plain = Image.open(metrics.save_gif(str(tmp_path / "a.gif"), clips))
    titled = Image.open(metrics.save_gif(str(tmp_path / "b.gif"), clips,
                                         title="teacher, heun, 35 NFE"))
    assert titled.n_frames == plain.n_frames == 3
    for i in range(3):
        plain.seek(i)
        titled.seek(i)
        frame = np.asarray(plain.convert("L"))
        want = monitor.panel_row([frame], titles=["teacher, heun, 35 NFE"])
        np.testing.assert_array_equal(np.asarray(titled.convert("L")), want)
