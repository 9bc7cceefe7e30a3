"""Notebooks run headless on CPU, top to bottom, with the library they document."""
import importlib.util
import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def _execute(name: str, monkeypatch, timeout: int = 900):
    """Runs the notebook from ``notebooks/`` on this checkout's library (its root first on the
    kernel's PYTHONPATH), so its install cell finds fdistill and does nothing."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    path = os.path.join(NOTEBOOKS, name)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()
    return nb


def _text(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(NOTEBOOKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_cells_and_badges_follow_setup_url():
    """setup.py's url is the one address: every notebook has an install cell and a README badge,
    both using it; set_repository_url rewrites both when the url changes."""
    urls = _script("set_repository_url")
    assert urls.disagreements() == []
    url, slug = urls.repository_url()
    assert url == f"https://github.com/{slug}"
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert urls.current_urls() == {url}
    moved = urls.rewrite(readme, "https://github.com/someone/fork", "someone/fork", "dev", {url})
    assert url not in moved and "published at `https://github.com/someone/fork`" in moved
    assert ("colab.research.google.com/github/someone/fork/blob/dev/notebooks/"
            "divergence_weightings.ipynb") in moved
    for name in ("divergence_weightings.ipynb", "video_hiar.ipynb"):
        nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert f'REPOSITORY = "{url}"' in first.source, name
        assert 'REPOSITORY = "https://github.com/someone/fork"' in urls.rewrite(
            first.source, "https://github.com/someone/fork", "someone/fork", "main")
        assert "sys.path.insert" not in "".join(c.source for c in nb.cells), name


def test_divergence_weightings_notebook(monkeypatch):
    """The divergence notebook: h(r) table, autodiff agreement, Fig. 4a variances, and a live toy
    distillation per divergence whose students cover the ring's modes."""
    monkeypatch.setenv("FDISTILL_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = _execute("divergence_weightings.ipynb", monkeypatch)
    text = _text(nb)
    assert "installing" not in text                 # the install cell found the checkout's fdistill
    assert "max relative difference" in text
    for line in text.splitlines():
        if "max relative difference" in line:
            assert float(line.split()[-1]) < 2e-3, line
    assert "teacher (Heun)" in text
    rows = [l.split("|") for l in text.splitlines() if l.strip().startswith(("rkl", "fkl", "js"))]
    assert len(rows) == 3
    for row in rows:
        assert float(row[2]) >= 0.75, row          # mode recall of each student


@pytest.mark.skipif(os.environ.get("FDISTILL_SLOW_TESTS", "0") != "1",
                    reason="~90 s of compilation that the video end-to-end test already covers; "
                           "run with FDISTILL_SLOW_TESTS=1")
def test_video_hiar_notebook(monkeypatch, tmp_path):
    """The video notebook in its smoke setting: teacher, the HiAR student distilled and rolled
    out to 4x the training length, the motion/drift table, a GIF."""
    monkeypatch.setenv("FDISTILL_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("FDISTILL_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = _execute("video_hiar.ipynb", monkeypatch)
    text = _text(nb)
    from configs.video import VARIANTS
    shown = ["hiar"]
    table = {l[:42].strip(): l[42:].split() for l in text.splitlines()
             if l[:42].strip() in VARIANTS}
    assert sorted(table) == sorted(shown), text
    for name, cells in table.items():
        values = [float(v) for v in cells]
        assert len(values) == 6 and all(np.isfinite(values)), (name, cells)
        assert 0.0 <= values[2] <= 1.0, (name, cells)            # dynamic degree is a fraction
    gifs = [f for f in os.listdir(tmp_path) if f.startswith("notebook_") and f.endswith(".gif")]
    assert len(gifs) == len(shown), gifs
