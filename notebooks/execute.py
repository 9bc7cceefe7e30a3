"""Executes notebooks in place from this checkout, so they are committed with their outputs.

    python notebooks/execute.py divergence_weightings.ipynb [video_hiar.ipynb ...]

Runs each notebook headless (nbclient, the ``python3`` kernel) from ``notebooks/`` with the
checkout's root first on ``PYTHONPATH``, so the outputs come from this checkout's library even
when another copy of fdistill is installed; figures are stored as PNG (inline backend, the
notebook sets a modest DPI). Environment variables set by the caller (``FDISTILL_NOTEBOOK_FAST``
and the like) reach the notebook. The C++ runtimes' start-up log lines on stderr (TensorFlow's
oneDNN notice, absl's "log messages before InitializeLog") are dropped from the stored outputs;
everything the notebook prints stays.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# glog/absl lines ("I0000 00:00:... port.cc:153] ...") and absl's pre-initialisation warning.
_RUNTIME_LOG = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.]+:\d+\] |"
                          r"WARNING: All log messages before absl::InitializeLog\(\))")


def drop_runtime_logs(nb) -> None:
    """Removes the C++ runtimes' log lines from the notebook's stderr outputs (in place)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                lines = [l for l in out["text"].splitlines(keepends=True)
                         if not _RUNTIME_LOG.match(l)]
                if not "".join(lines).strip():
                    continue
                out["text"] = "".join(lines)
            kept.append(out)
        cell["outputs"] = kept


def execute(name: str, timeout: int = 3600, *, write: bool = True):
    import nbformat
    from nbclient import NotebookClient
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    path = os.path.join(HERE, name)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": HERE}}).execute()
    drop_runtime_logs(nb)
    if write:
        nbformat.write(nb, path)
    return nb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = p.parse_args(argv)
    for name in args.notebooks:
        t0 = time.time()
        execute(os.path.basename(name), args.timeout)
        print(f"{name}: executed in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
