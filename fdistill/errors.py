"""User-facing errors: the command line prints their message alone, the traceback only on request.

An error is the user's to fix when the project raised it on purpose: any ``FdistillError``, or a
``ValueError`` / ``OSError`` / ``FloatingPointError`` raised from a line of the ``fdistill``
package itself (a bad config value, a missing file, a non-finite loss). The same types raised
inside a library (jax, orbax, tensorstore) are bugs or surprises and keep their traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PROJECT_TYPES = (ValueError, OSError, FloatingPointError)
EXIT_CODE = 1


class FdistillError(Exception):
    """An error whose message names the problem and its fix (printed without a traceback)."""


class ConfigError(FdistillError, ValueError):
    """A config value that cannot work, named by its field (e.g. ``config.optim.lr``)."""


def raised_by_project(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is a line of the fdistill package."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return os.path.commonpath([path, _PACKAGE_DIR]) == _PACKAGE_DIR


def is_user_error(error: BaseException) -> bool:
    """``FdistillError``, or a builtin error type with a message raised by the project itself."""
    if isinstance(error, FdistillError):
        return True
    return isinstance(error, _PROJECT_TYPES) and bool(str(error)) and raised_by_project(error)


def cli_errors(fn: Callable[..., Any], *args, verbose: bool = False, **kwargs) -> Any:
    """Runs ``fn(*args, **kwargs)``; a user error prints ``error: <message>`` to stderr and exits
    with status 1 (``verbose``: the full traceback instead). Anything else propagates."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if verbose or not is_user_error(e):
            raise
        sys.stdout.flush()
        print(f"error: {e}\n(run again with --verbose for the traceback)", file=sys.stderr,
              flush=True)
        sys.exit(EXIT_CODE)
