"""What a run records in its workdir: the config it ran with (``config.json``), and who is
writing there (``fdistill.lock``).

Every mode writes ``<workdir>/config.json`` (the full config and the package version) before it
does any work, so that anything built on a run (a distillation on a teacher, sampling or
evaluating a checkpoint) reads the teacher's model, process and data from the run itself instead
of restating them. A checkpoint that does not fit the current config is explained from that
record (``explain_mismatch``). One run at a time writes into a workdir (``lock``).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import logging
import os
import socket
import sys
import time

import jax
import ml_collections

from fdistill.errors import ConfigError, FdistillError

CONFIG_FILE = "config.json"


def package_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("fdistill")
    except metadata.PackageNotFoundError:
        return "unknown"


def write_json(path: str, obj, *, default=None) -> None:
    """Writes ``obj`` as JSON atomically (a temporary file renamed over ``path``), so a reader
    never sees a truncated file. ``default``: as in ``json.dump``, for non-JSON values."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(workdir: str, config, *, mode: str) -> str:
    """Records ``config`` in ``<workdir>/config.json`` with the mode and package version (process
    0 only). Returns the path."""
    path = os.path.join(workdir, CONFIG_FILE)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_json(path, {"config": _strict_json(config.to_dict()), "mode": mode,
                          "fdistill_version": package_version()})
    return path


# Non-finite floats (e.g. sampling.S_max = inf) as strings, so that config.json is strict JSON
# (jq and other strict parsers refuse Python's bare Infinity / NaN); read_config turns them back.
_NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _strict_json(obj):
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    return obj


def _tuples(obj):
    """JSON lists back to the tuples ml_collections configs use (so overrides type-check), and
    the non-finite floats written as strings back to floats."""
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    if isinstance(obj, str) and obj in _NON_FINITE:
        return _NON_FINITE[obj]
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


# ---- the config a checkpoint was written with ---------------------------------------------------

def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = _tuples(v)
    return out


def config_differences(recorded, current) -> list[str]:
    """One line per field where ``recorded`` and ``current`` (configs or dicts) differ, e.g.
    ``model.hidden: 256 recorded, 128 now``, sorted by field."""
    recorded = _flat(recorded.to_dict() if hasattr(recorded, "to_dict") else dict(recorded))
    current = _flat(current.to_dict() if hasattr(current, "to_dict") else dict(current))
    lines = []
    for key in sorted(recorded.keys() | current.keys()):
        if key not in current:
            lines.append(f"{key}: {recorded[key]!r} recorded, absent now")
        elif key not in recorded:
            lines.append(f"{key}: absent in the record, {current[key]!r} now")
        elif recorded[key] != current[key]:
            lines.append(f"{key}: {recorded[key]!r} recorded, {current[key]!r} now")
    return lines


def explain_mismatch(workdir: str, config, *, max_lines: int = 20) -> str:
    """For a checkpoint that does not fit ``config``: the fields where ``config`` differs from the
    one recorded in ``<workdir>/config.json`` ('' when there is no readable record or no
    difference)."""
    try:
        recorded = read_config(workdir)
    except (FileNotFoundError, ValueError):
        return ""
    lines = config_differences(recorded, config)
    if not lines:
        return ""
    shown = lines[:max_lines] + ([f"... and {len(lines) - max_lines} more"]
                                 if len(lines) > max_lines else [])
    return (f"\nThe config differs from the one recorded in "
            f"{os.path.join(workdir, CONFIG_FILE)}:\n  " + "\n  ".join(shown))


def check_not_teacher_workdir(workdir: str, teacher_workdir: str) -> None:
    """Refuses to distil into the teacher's own workdir (the student's checkpoints would land among
    the teacher's)."""
    if teacher_workdir and os.path.realpath(workdir) == os.path.realpath(teacher_workdir):
        raise ConfigError(
            f"--workdir={workdir} is the teacher's own workdir (config.distill.teacher_workdir="
            f"{teacher_workdir}): the student's checkpoints and config.json would mix with the "
            f"teacher's. Give the student its own --workdir.")


# ---- one writer per workdir ---------------------------------------------------------------------

LOCK_FILE = "fdistill.lock"


class WorkdirLockedError(FdistillError):
    """Another run holds the workdir's lock."""


class WorkdirLock:
    """An exclusive lock on a workdir: ``<workdir>/fdistill.lock`` holding the PID, host, start
    time and mode of its holder.

    The lock is an ``flock`` on that file, so the kernel releases it when the holder dies however
    it dies; a lock file left by a dead holder on this host is then taken over with a warning.
    On a filesystem without ``flock`` the file's existence is the lock and a holder is stale when
    it ran on this host and its PID is no longer alive. A holder on another host cannot be checked
    from here, so its lock file is never taken over.
    """

    def __init__(self, workdir: str, *, mode: str = ""):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self.mode = mode
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "mode": self.mode,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}

    def acquire(self) -> None:
        """Takes the lock or raises ``WorkdirLockedError`` naming the holder (never waits)."""
        os.makedirs(self.workdir, exist_ok=True)
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refusal(_read_holder(self.path, wait=1.0)) from None
            except OSError:  # no flock on this filesystem (some FUSE / NFS nolock mounts)
                os.close(fd)
                self._acquire_exclusive_create()
                return
            if not _same_file(fd, self.path):  # the file was released and replaced meanwhile
                os.close(fd)
                continue
            previous = _parse(os.pread(fd, 1 << 16, 0))
            if previous and previous.get("host") != socket.gethostname():
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise self._refusal(previous, other_host=True)
            if previous:
                self._warn_stale(previous)
            _write_record(fd, self.record())
            self._fd = fd

    def _acquire_exclusive_create(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path, wait=1.0)
                if holder and holder.get("host") == socket.gethostname() \
                        and not _pid_alive(holder.get("pid")):
                    self._warn_stale(holder)
                    os.remove(self.path)
                    continue
                raise self._refusal(holder, other_host=bool(holder) and
                                    holder.get("host") != socket.gethostname()) from None
            _write_record(fd, self.record())
            self._fd = fd
            return
        raise self._refusal(_read_holder(self.path, wait=0.0))

    def _warn_stale(self, holder: dict) -> None:
        logging.warning("taking over the lock of %s from PID %s on host %s (started %s), which is "
                        "no longer running", self.workdir, holder.get("pid"), holder.get("host"),
                        holder.get("started"))

    def _refusal(self, holder: dict | None, *, other_host: bool = False) -> WorkdirLockedError:
        who = "another process"
        if holder:
            who = (f"PID {holder.get('pid')} on host {holder.get('host')}, started "
                   f"{holder.get('started')}" + (f", mode {holder['mode']}"
                                                  if holder.get("mode") else ""))
        fix = "Wait for that run to finish or stop it, or use another --workdir."
        if other_host:
            fix = (f"Its host cannot be checked from here: if that run has stopped, remove "
                   f"{self.path}; otherwise wait for it, or use another --workdir.")
        return WorkdirLockedError(f"{self.workdir} is in use by another fdistill run ({who}; "
                                  f"lock file {self.path}). {fix}")

    def release(self) -> None:
        """Removes the lock file and releases the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                os.remove(self.path)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def lock(workdir: str, *, mode: str = "", primary: bool | None = None):
    """``with lock(workdir, mode=...):`` one writer per workdir. Only the primary process
    (process 0 by default) of a multi-host run takes it; the others get a lock that does nothing.
    """
    if primary is None:
        primary = jax.process_index() == 0
    return WorkdirLock(workdir, mode=mode) if primary else contextlib.nullcontext()


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _parse(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _read_holder(path: str, *, wait: float) -> dict | None:
    """The holder's record; a holder between creating and writing the file gets ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(path, "rb") as f:
                record = _parse(f.read())
        except FileNotFoundError:
            record = None
        if record or time.monotonic() >= deadline:
            return record
        time.sleep(0.05)


def _write_record(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
