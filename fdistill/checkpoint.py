"""Checkpoints: an orbax ``CheckpointManager`` with checksums, verified resume and fallback.

A checkpoint holds one state pytree (pure dicts of arrays). After orbax commits a save, process 0
writes ``checksums.json`` into the step directory: the size and SHA-256 of every file orbax wrote.
Restoring first verifies those checksums, so a flipped bit or a truncated file is found before it
becomes NaN samples; ``restore_latest`` then falls back to the newest checkpoint that verifies,
and a later save of a damaged step replaces it.

A checkpoint whose structure or shapes differ from the state being restored is not damaged: it
was written with another config, and ``CheckpointMismatchError`` lists the differing leaves
instead of falling back.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fdistill import sharding
from fdistill.errors import ConfigError, FdistillError
from fdistill.workdir import write_json

MANIFEST = "checksums.json"
_OK, _DAMAGED, _UNVERIFIED = 0, 1, 2
_MAX_SHOWN = 12


class CheckpointError(FdistillError, RuntimeError):
    """No checkpoint in a directory could be restored."""


class CheckpointDamagedError(CheckpointError):
    """A checkpoint's files differ from the checksums recorded when it was written."""


class NonFiniteStateError(FdistillError, FloatingPointError):
    """A state with NaN or infinite values was about to be saved; nothing was written."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's structure or shapes do not fit the state it is restored into.

    ``differences`` lists one line per differing leaf (path, checkpoint shape, expected shape).
    """

    def __init__(self, message: str, *, directory: str, step: int, differences: list[str]):
        super().__init__(message)
        self.directory, self.step, self.differences = directory, step, differences


class Checkpointer:
    """Periodic saves (keep ``max_to_keep``), resume from the newest verified checkpoint.

    Use as a context manager (or call ``close``) so orbax's background threads stop cleanly.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3):
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, (int, np.integer)) \
                or max_to_keep < 1:
            raise ConfigError(
                f"keep_checkpoints = {max_to_keep!r}: must be an integer >= 1 (how many recent "
                f"checkpoints to keep; 0 would delete every checkpoint). Set "
                f"--config.training.keep_checkpoints (or --config.distill.keep_checkpoints) to 1 "
                f"or more.")
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(max_to_keep=int(max_to_keep), create=True,
                                                 enable_async_checkpointing=False))

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    # ---- saving ------------------------------------------------------------------------------

    def save(self, step: int, state, *, check_finite: bool = True) -> None:
        """Saves ``state`` as ``step`` (replacing an existing checkpoint of that step, e.g. a
        damaged one a resume fell back past), then records its checksums.

        ``check_finite``: raises ``NonFiniteStateError`` naming the non-finite leaves instead of
        writing them, so no checkpoint ever holds NaN or infinite parameters or optimiser state.
        """
        if check_finite:
            bad = nonfinite_leaves(state)
            if bad:
                shown = ", ".join(bad[:_MAX_SHOWN]) + (f" and {len(bad) - _MAX_SHOWN} more"
                                                      if len(bad) > _MAX_SHOWN else "")
                raise NonFiniteStateError(
                    f"refusing to write checkpoint {self.step_dir(step)}: non-finite values in "
                    f"{shown}. The existing checkpoints {self.all_steps()} are kept.")
        if step in self.all_steps():
            logging.warning("replacing checkpoint %s", self.step_dir(step))
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            _write_manifest(self.step_dir(step))

    # ---- restoring ---------------------------------------------------------------------------

    def verify(self, step: int) -> tuple[str, str]:
        """``('ok' | 'damaged' | 'unverified', reason)`` for the files of ``step`` against its
        checksums (computed on process 0 and shared, so every process decides alike)."""
        status, reason = _OK, ""
        if jax.process_index() == 0:
            status, reason = _check_manifest(self.step_dir(step))
        status = _broadcast(status)
        return ("ok", "damaged", "unverified")[status], reason

    def mismatches(self, step: int, target) -> list[str]:
        """The leaves where checkpoint ``step`` and ``target`` differ in presence or shape."""
        stored = self.manager.item_metadata(step)
        stored = _shapes(getattr(stored, "tree", stored))
        wanted = _shapes(target)
        lines = [f"{k}: in the checkpoint, not in the state being restored"
                 for k in sorted(stored.keys() - wanted.keys())]
        lines += [f"{k}: missing from the checkpoint"
                  for k in sorted(wanted.keys() - stored.keys())]
        lines += [f"{k}: checkpoint shape {stored[k]}, expected {wanted[k]}"
                  for k in sorted(stored.keys() & wanted.keys()) if stored[k] != wanted[k]]
        return lines

    def restore(self, step: int, target, *, verified: bool = False):
        """Restores ``step`` into the structure, dtypes and shardings of ``target``.

        Raises ``CheckpointDamagedError`` when its files fail their checksums and
        ``CheckpointMismatchError`` when its leaves do not fit ``target``. A checkpoint without
        checksums (older versions) is restored with a warning.
        """
        if not verified:
            status, reason = self.verify(step)
            if status == "damaged":
                raise CheckpointDamagedError(f"checkpoint {self.step_dir(step)} is damaged: "
                                             f"{reason}")
            if status == "unverified":
                logging.warning("checkpoint %s has no checksums (%s); restoring it unverified",
                                self.step_dir(step), reason)
        self._check_fits(step, target)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_latest(self, target):
        """Returns ``(step, state)`` of the newest restorable checkpoint, or ``(None, target)``.

        Checkpoints are tried newest first: a damaged one is reported and skipped; one without
        checksums (a run stopped between commit and checksums, or an older version) is used only
        when no verified one restores. A mismatch is raised at once: older checkpoints of the
        same run would not fit either.
        """
        steps = self.all_steps()
        unverified, failures = [], []
        for step in reversed(steps):
            status, reason = self.verify(step)
            if status == "damaged":
                failures.append(f"step {step}: {reason}")
                logging.warning("checkpoint %s is damaged (%s); trying the previous one",
                                self.step_dir(step), reason)
                continue
            if status == "unverified":
                unverified.append(step)
                logging.warning("checkpoint %s has no checksums (%s); trying the previous one",
                                self.step_dir(step), reason)
                continue
            restored = self._try_restore(step, target, failures)
            if restored is not None:
                return step, restored
        for step in unverified:
            logging.warning("no verified checkpoint restored; restoring %s unverified",
                            self.step_dir(step))
            restored = self._try_restore(step, target, failures)
            if restored is not None:
                return step, restored
        if steps:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be restored ("
                + "; ".join(failures) + "). The files were left in place; to start a new run "
                "instead, use another --workdir.")
        return None, target

    def _try_restore(self, step: int, target, failures: list[str]):
        try:
            return self.restore(step, target, verified=True)
        except CheckpointMismatchError:
            raise
        except Exception as e:  # orbax raises many types for truncated or unreadable files
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            failures.append(f"step {step}: {reason}")
            logging.warning("checkpoint %s could not be restored (%s); trying the previous one",
                            self.step_dir(step), reason)
            return None

    def _check_fits(self, step: int, target) -> None:
        """Compares metadata before reading arrays: a mismatched orbax restore fails deep in
        tensorstore and leaves its event-loop callbacks printing tracebacks."""
        try:
            lines = self.mismatches(step, target)
        except Exception as e:  # unreadable metadata: damage, not a mismatch
            raise CheckpointDamagedError(
                f"checkpoint {self.step_dir(step)} has unreadable metadata ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''})") from e
        if lines:
            shown = lines[:_MAX_SHOWN] + ([f"... and {len(lines) - _MAX_SHOWN} more"]
                                          if len(lines) > _MAX_SHOWN else [])
            raise CheckpointMismatchError(
                f"checkpoint {self.step_dir(step)} does not fit the state being restored: it was "
                f"written with a different model or config (the checkpoint itself is intact). "
                "Differing leaves:\n  " + "\n  ".join(shown) + "\nRun with the config it was "
                "written with, or use another --workdir for a new run.",
                directory=self.directory, step=step, differences=lines)

    def close(self) -> None:
        self.manager.close()


def nonfinite_leaves(tree) -> list[str]:
    """Paths (``params/w``) of the floating-point leaves of ``tree`` holding a NaN or infinity;
    one jitted reduction, so sharded multi-host arrays are checked where they live."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    floats = [(path, x) for path, x in flat if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not floats:
        return []
    finite = sharding.to_host(_all_finite([x for _, x in floats]))
    return [_path_name(path) for (path, _), ok in zip(floats, finite) if not ok]


@jax.jit
def _all_finite(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


# ---- checksums (orbax verifies no data it reads back; a flipped bit restores silently) ---------

def _files(step_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST and not rel.startswith(f"{MANIFEST}.tmp"):
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(step_dir: str) -> None:
    files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                   "sha256": _sha256(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
    write_json(os.path.join(step_dir, MANIFEST), {"algorithm": "sha256", "files": files})


def _check_manifest(step_dir: str) -> tuple[int, str]:
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return _UNVERIFIED, f"no {MANIFEST}"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return _DAMAGED, f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for rel, want in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return _DAMAGED, f"{rel} is missing"
        size = os.path.getsize(full)
        if size != want["size"]:
            return _DAMAGED, f"{rel} has {size} bytes, {want['size']} were written"
        if _sha256(full) != want["sha256"]:
            return _DAMAGED, f"{rel} differs from its checksum"
    return _OK, ""


def _broadcast(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree) -> dict[str, tuple]:
    """``{'params/layer/kernel': shape}`` for every leaf (orbax metadata or arrays)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))
            for path, leaf in leaves}


def _path_name(path) -> str:
    return "/".join(_key_name(k) for k in path)
