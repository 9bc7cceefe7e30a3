"""Persistent compilation cache: a program is compiled once per machine, not once per run.

JAX's persistent cache stores each compiled XLA executable on disk, keyed by the program, the
jax/XLA version, the backend and the compile options; a rerun of the same step (the quickstart
again, a resumed run, the test suite) loads it instead of compiling for tens of seconds.

    from fdistill import compilation_cache
    compilation_cache.enable()            # ~/.cache/fdistill/jax, or $XDG_CACHE_HOME/fdistill/jax

The environment variable FDISTILL_COMPILATION_CACHE overrides the default: `0` / `off` / `false`
turns the cache off, a path puts it there. Entries are never evicted automatically; delete the
directory to reclaim the space. The key includes the device kind but not the host CPU's
instruction set, so do not share one directory between machines with different CPUs.
"""
from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

ENV_VAR = 'FDISTILL_COMPILATION_CACHE'
OFF = ('0', 'off', 'false', 'no')
# Every program is written, however quick its compile: a run also compiles dozens of small
# programs (initialisers, eager ops) whose compiles add up to seconds, and they are small on disk
# (the toy quickstart's 29 programs take 0.9 MB).
MIN_COMPILE_TIME_SECS = 0.0


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/fdistill/jax, or ~/.cache/fdistill/jax."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'fdistill', 'jax')


def enable(cache_dir: str | None = None, *,
           min_compile_time_secs: float = MIN_COMPILE_TIME_SECS) -> str | None:
    """Turns JAX's persistent compilation cache on and returns its directory, or None when
    FDISTILL_COMPILATION_CACHE turns it off. `cache_dir` (else the variable's path, else
    `default_cache_dir()`) is created if needed. Safe to call more than once and after programs
    were already compiled (later compilations use the cache)."""
    setting = os.environ.get(ENV_VAR, '').strip()
    if setting.lower() in OFF:
        disable()
        return None
    path = os.path.abspath(os.path.expanduser(cache_dir or setting or default_cache_dir()))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(f'Cannot create the compilation cache directory {path!r} ({e}); pass another '
                      f'directory or set {ENV_VAR}=0 to run without the cache.') from e
    jax.config.update('jax_enable_compilation_cache', True)
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', float(min_compile_time_secs))
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)   # any size
    jax_cache.reset_cache()   # re-read the settings even if something compiled before
    return path


def disable() -> None:
    """Turns the persistent cache off for this process."""
    jax.config.update('jax_enable_compilation_cache', False)
    jax_cache.reset_cache()


def is_enabled() -> bool:
    return bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)
