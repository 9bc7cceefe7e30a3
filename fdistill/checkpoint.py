"""Checkpoints: an orbax ``CheckpointManager`` with automatic resume and corrupt-checkpoint fallback.

A checkpoint holds one state pytree (pure dicts of arrays). ``restore_latest`` walks back from
the newest step: a checkpoint that fails to restore (truncated files, missing arrays, wrong shapes)
is reported by path and the previous one is tried, so a run killed mid-save resumes from the last
good state instead of crashing or silently starting over.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored."""


class Checkpointer:
    """Periodic saves (keep ``max_to_keep``), resume from the latest good checkpoint."""

    def __init__(self, directory: str, *, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, target):
        """Restores ``step`` into the structure, dtypes and shardings of ``target``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_latest(self, target):
        """Returns ``(step, state)`` of the newest restorable checkpoint, or ``(None, target)``."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, target)
            except Exception as e:  # orbax raises many types for truncated / mismatched files
                logging.warning("checkpoint %s is corrupt or incomplete (%s: %s); trying the "
                                "previous one", os.path.join(self.directory, str(step)),
                                type(e).__name__, str(e).splitlines()[0][:300])
        if self.all_steps():
            raise CheckpointError(f"no checkpoint in {self.directory} could be restored "
                                  f"(steps {self.all_steps()}); remove the directory to start over")
        return None, target

    def close(self) -> None:
        self.manager.close()

