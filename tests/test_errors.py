"""The command line's error handling: the project's own errors print one message and exit 1; the
traceback only with verbose; errors from inside libraries keep their traceback."""
import os
import subprocess
import sys

import numpy as np
import pytest

from fdistill import checkpoint, errors, sharding, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fails_with(exc):
    def fn():
        raise exc
    return fn


def run_cli(fn, *args, verbose=False):
    with pytest.raises(SystemExit) as exit_:
        errors.cli_errors(fn, *args, verbose=verbose)
    return exit_.value.code


def test_project_errors_print_the_message_alone(capsys):
    assert run_cli(fails_with(errors.ConfigError("config.optim.lr = nan: must be finite"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: config.optim.lr = nan: must be finite\n")
    assert "Traceback" not in err and "--verbose" in err
    # ValueError / FileNotFoundError raised by a line of the package.
    assert run_cli(sharding.param_shardings, {}, None, "zero3") == 1
    assert "error: unknown parameter sharding 'zero3'; valid: replicated, fsdp" in \
        capsys.readouterr().err
    assert run_cli(workdir.read_config, "/nonexistent/run") == 1
    assert "config.json not found" in capsys.readouterr().err
    assert run_cli(fails_with(checkpoint.CheckpointError("no checkpoint could be restored"))) == 1


def test_the_train_loops_nonfinite_error_is_a_user_error(capsys):
    from fdistill import train
    record = {"nonfinite": {"step": np.int32(3), "values": {"train/loss": np.float32(np.nan)}}}
    assert run_cli(train.check_finite, record) == 1
    assert capsys.readouterr().err.startswith("error: non-finite values at step 3: train/loss=nan")


def test_verbose_and_library_errors_keep_the_traceback():
    with pytest.raises(errors.ConfigError):
        errors.cli_errors(fails_with(errors.ConfigError("bad")), verbose=True)
    # Raised inside numpy, not by the package: a bug or a surprise, not a message for the user.
    with pytest.raises(ValueError, match="reshape"):
        errors.cli_errors(np.reshape, np.zeros(3), (2,))
    with pytest.raises(KeyError):
        errors.cli_errors(fails_with(KeyError("x")))
    assert errors.is_user_error(ValueError("from a test")) is False


SCRIPT = """
import sys
import jax.numpy as jnp
from fdistill import checkpoint, errors
directory = sys.argv[1]
with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(1, {"w": jnp.zeros((3, 4))})
    errors.cli_errors(ckpt.restore_latest, {"w": jnp.zeros((3, 6))})
"""


def test_failed_restore_prints_one_message_and_no_secondary_tracebacks(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: checkpoint {tmp_path}/1 does not fit")
    assert "w: checkpoint shape (3, 4), expected (3, 6)" in r.stderr
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr
