"""Notebooks run headless on CPU, top to bottom, with the library they document."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def _execute(name: str, timeout: int = 900):
    path = os.path.join(NOTEBOOKS, name)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()
    return nb


def _text(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))


def test_divergence_weightings_notebook(monkeypatch):
    """The divergence notebook: h(r) table, autodiff agreement, Fig. 4a variances, and a live toy
    distillation per divergence whose students cover the ring's modes."""
    monkeypatch.setenv("FDISTILL_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = _execute("divergence_weightings.ipynb")
    text = _text(nb)
    assert "max relative difference" in text
    for line in text.splitlines():
        if "max relative difference" in line:
            assert float(line.split()[-1]) < 2e-3, line
    assert "teacher (Heun)" in text
    rows = [l.split("|") for l in text.splitlines() if l.strip().startswith(("rkl", "fkl", "js"))]
    assert len(rows) == 3
    for row in rows:
        assert float(row[2]) >= 0.75, row          # mode recall of each student
