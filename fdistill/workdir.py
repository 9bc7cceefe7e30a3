"""What a run records in its workdir: the config it ran with (``config.json``).

Every mode writes ``<workdir>/config.json`` (the full config and the package version) before it
does any work, so that anything built on a run (a distillation on a teacher, sampling or
evaluating a checkpoint) reads the teacher's model, process and data from the run itself instead
of restating them.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections

CONFIG_FILE = "config.json"


def package_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("fdistill")
    except metadata.PackageNotFoundError:
        return "unknown"


def write_json(path: str, obj) -> None:
    """Writes ``obj`` as JSON atomically (a temporary file renamed over ``path``), so a reader
    never sees a truncated file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(workdir: str, config, *, mode: str) -> str:
    """Records ``config`` in ``<workdir>/config.json`` with the mode and package version (process
    0 only). Returns the path."""
    path = os.path.join(workdir, CONFIG_FILE)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_json(path, {"config": config.to_dict(), "mode": mode,
                          "fdistill_version": package_version()})
    return path


def _tuples(obj):
    """JSON lists back to the tuples ml_collections configs use (so overrides type-check)."""
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    return obj


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` recorded; FileNotFoundError naming the file otherwise."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir!r} is not a fdistill run directory (every mode records "
            f"its config there), or it was written by an older version.")
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the run directory is damaged.") from e
    return ml_collections.ConfigDict(_tuples(record["config"]))
