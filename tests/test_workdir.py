"""One writer per workdir (lock), config differences for mismatch messages, the teacher's workdir."""
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from fdistill import workdir as wd
from fdistill.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = """
import sys, time
from fdistill.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1], mode="train")
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def start_holder(directory):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_second_run_refused_quickly_then_stale_lock_taken_over(tmp_path, caplog):
    holder = start_holder(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(wd.WorkdirLockedError) as err:
            wd.WorkdirLock(str(tmp_path), mode="distill").acquire()
        assert time.monotonic() - t0 < 5
        message = str(err.value)
        assert f"PID {holder.pid} on host {socket.gethostname()}" in message
        assert "started" in message and "mode train" in message
        assert "another --workdir" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder left its lock file behind; the kernel released its flock.
    assert json.load(open(tmp_path / wd.LOCK_FILE))["pid"] == holder.pid
    with caplog.at_level(logging.WARNING):
        with wd.lock(str(tmp_path), mode="train", primary=True) as lock:
            assert json.load(open(lock.path))["pid"] == os.getpid()
    assert any(str(holder.pid) in r.getMessage() and "no longer running" in r.getMessage()
               for r in caplog.records)
    assert not (tmp_path / wd.LOCK_FILE).exists()


def test_lock_released_on_exit_and_on_error(tmp_path):
    with wd.lock(str(tmp_path), primary=True):
        with pytest.raises(wd.WorkdirLockedError, match=f"PID {os.getpid()}"):
            wd.WorkdirLock(str(tmp_path)).acquire()
    with pytest.raises(RuntimeError):
        with wd.lock(str(tmp_path), primary=True):
            raise RuntimeError("the run failed")
    assert not (tmp_path / wd.LOCK_FILE).exists()
    with wd.lock(str(tmp_path), primary=True):
        pass


def test_lock_file_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / wd.LOCK_FILE).write_text(json.dumps(
        {"pid": 4242, "host": "elsewhere-node-7", "started": "2025-01-01 00:00:00 UTC"}))
    with pytest.raises(wd.WorkdirLockedError) as err:
        wd.WorkdirLock(str(tmp_path)).acquire()
    message = str(err.value)
    assert "PID 4242 on host elsewhere-node-7" in message and "remove" in message
    assert (tmp_path / wd.LOCK_FILE).exists()


def test_without_flock_pid_and_host_decide(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(wd.fcntl, "flock", no_flock)
    path = tmp_path / wd.LOCK_FILE
    host = socket.gethostname()
    # A live holder on this host (the test process' parent) is refused.
    path.write_text(json.dumps({"pid": os.getppid(), "host": host, "started": "earlier"}))
    with pytest.raises(wd.WorkdirLockedError, match=f"PID {os.getppid()} on host {host}"):
        wd.WorkdirLock(str(tmp_path)).acquire()
    # A dead one is taken over.
    pid = dead_pid()
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "earlier"}))
    with caplog.at_level(logging.WARNING):
        with wd.WorkdirLock(str(tmp_path)):
            assert json.loads(path.read_text())["pid"] == os.getpid()
            with pytest.raises(wd.WorkdirLockedError, match=f"PID {os.getpid()}"):
                wd.WorkdirLock(str(tmp_path)).acquire()
    assert any(f"PID {pid}" in r.getMessage() for r in caplog.records)
    assert not path.exists()


def test_only_the_primary_process_locks(tmp_path):
    with wd.lock(str(tmp_path), primary=False):
        assert not (tmp_path / wd.LOCK_FILE).exists()


def config(hidden=256, lr=1e-3):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(name="mlp", hidden=hidden, channel_mult=(1, 2)))
    c.optim = ml_collections.ConfigDict(dict(lr=lr))
    return c


def test_config_differences_name_each_field():
    recorded, current = config(), config(hidden=128)
    current.model.channel_mult = (1, 2, 2)
    current.extra = 3
    assert wd.config_differences(recorded, current) == [
        "extra: absent in the record, 3 now",
        "model.channel_mult: (1, 2) recorded, (1, 2, 2) now",
        "model.hidden: 256 recorded, 128 now"]
    assert wd.config_differences(recorded, config()) == []


def test_explain_mismatch_reads_the_recorded_config(tmp_path):
    assert wd.explain_mismatch(str(tmp_path), config()) == ""  # no record
    wd.write_config(str(tmp_path), config(), mode="train")
    assert wd.explain_mismatch(str(tmp_path), config()) == ""
    text = wd.explain_mismatch(str(tmp_path), config(hidden=64, lr=2e-3))
    assert os.path.join(str(tmp_path), "config.json") in text
    assert "model.hidden: 256 recorded, 64 now" in text and "optim.lr: 0.001 recorded" in text


def test_distilling_into_the_teacher_workdir_refused(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="teacher's own workdir"):
        wd.check_not_teacher_workdir("teacher/", str(teacher))
    os.symlink(teacher, tmp_path / "alias")
    with pytest.raises(ConfigError, match="another|own --workdir"):
        wd.check_not_teacher_workdir(str(tmp_path / "alias"), "teacher")
    wd.check_not_teacher_workdir(str(tmp_path / "student"), str(teacher))
    wd.check_not_teacher_workdir(str(teacher / "student"), str(teacher))
    wd.check_not_teacher_workdir(str(teacher), "")


def test_results_written_atomically_and_a_damaged_file_replaced(tmp_path, caplog):
    from fdistill import monitor
    path = monitor.write_results(str(tmp_path), {"fid": np.float32(3.5), "steps": 10})
    assert json.load(open(path)) == {"fid": 3.5, "steps": 10}
    monitor.write_results(str(tmp_path), {"fid": 3.0, "kid": np.array([1, 2])})
    assert json.load(open(path)) == {"fid": 3.0, "kid": [1, 2], "steps": 10}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left
    with open(path, "w") as f:
        f.write('{"fid": 3.0, "st')  # truncated
    with caplog.at_level(logging.WARNING):
        monitor.write_results(str(tmp_path), {"precision": 0.5})
    assert json.load(open(path)) == {"precision": 0.5}
    assert open(f"{path}.invalid").read() == '{"fid": 3.0, "st'
    assert any("not valid results JSON" in r.getMessage() for r in caplog.records)


def test_config_json_is_strict_json_and_reads_back_non_finite_values(tmp_path):
    """config.json holds no bare Infinity / NaN (strict parsers such as jq refuse them): the
    default sampling.S_max = inf and any non-finite value are written as strings and read back
    as the same floats; a tuple stays a tuple."""
    from configs import video_quick
    config = video_quick.get_config()
    config.sampling.S_min = float("-inf")
    config.process.sigma_data = float("nan")
    path = wd.write_config(str(tmp_path), config, mode="train")

    def refuse(name):
        raise ValueError(f"bare {name} in config.json")

    with open(path) as f:
        json.loads(f.read(), parse_constant=refuse)
    back = wd.read_config(str(tmp_path))
    assert back.sampling.S_max == float("inf") and back.sampling.S_min == float("-inf")
    assert np.isnan(back.process.sigma_data)
    assert back.model.to_dict() == config.model.to_dict()
    assert back.distill.index_range == tuple(config.distill.index_range)

