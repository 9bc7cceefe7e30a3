"""Multi-host start: a peer that never starts, or an unreachable coordinator, is reported within
the timeout, naming the coordinator address and the missing process ids."""
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from fdistill import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESS = """
import os, sys, time
from fdistill import errors, sharding
port, num, pid, timeout, flags = sys.argv[1:]
errors.cli_errors(sharding.initialize_distributed, f"127.0.0.1:{port}", int(num), int(pid),
                  timeout_s=float(timeout))
import jax
print("RESULT", jax.process_count(), jax.process_index(), flush=True)
# The coordinator (process 0) serves the others' backend start: every process stays until all
# have printed (flag files), then exits without the coordination service's shutdown handshake.
open(os.path.join(flags, f"done{pid}"), "w").close()
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not all(
        os.path.exists(os.path.join(flags, f"done{i}")) for i in range(int(num))):
    time.sleep(0.05)
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port, num, pid, timeout, flags="."):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", PROCESS, str(port), str(num), str(pid),
                             str(timeout), str(flags)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_peer_that_never_starts_is_named_within_the_timeout():
    port = free_port()
    t0 = time.monotonic()
    proc = start(port, 2, 0, 3)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 20
    assert proc.returncode == 1 and "RESULT" not in out
    first = err.strip().splitlines()[0]
    assert first.startswith(f"error: process 0 waited 3 s at the coordinator 127.0.0.1:{port}")
    assert "process ids [1] never connected" in first and "Traceback" not in err


def test_two_processes_meet_then_jax_distributed_starts(tmp_path):
    port = free_port()
    procs = [start(port, 2, i, 30, tmp_path) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-2000:]
        assert f"RESULT 2 {i}" in out


def test_unreachable_coordinator_is_named():
    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(sharding.DistributedInitError,
                       match=f"process 1 could not reach the coordinator {address}"):
        sharding.rendezvous(address, 2, 1, timeout_s=1.0)
    assert time.monotonic() - t0 < 5


def run_peers(address, num, ids):
    """Peers in threads; returns their errors (None where they were let through)."""
    errors = {}

    def peer(i, slot):
        try:
            sharding.rendezvous(address, num, i, timeout_s=10.0)
            errors[slot] = None
        except sharding.DistributedInitError as e:
            errors[slot] = str(e)

    threads = [threading.Thread(target=peer, args=(i, k)) for k, i in enumerate(ids)]
    for t in threads:
        t.start()
    return threads, errors


def test_coordinator_names_the_missing_ids_and_tells_the_peers():
    address = f"127.0.0.1:{free_port()}"
    threads, errors = run_peers(address, 4, [2])
    with pytest.raises(sharding.DistributedInitError, match=r"process ids \[1, 3\] never connected"):
        sharding.rendezvous(address, 4, 0, timeout_s=2.0)
    for t in threads:
        t.join()
    assert "gave up waiting: process ids 1,3 never connected" in errors[0]


def test_all_peers_let_through_and_duplicate_ids_refused():
    address = f"127.0.0.1:{free_port()}"
    threads, errors = run_peers(address, 3, [1, 2])
    sharding.rendezvous(address, 3, 0, timeout_s=10.0)
    for t in threads:
        t.join()
    assert errors == {0: None, 1: None}

    address = f"127.0.0.1:{free_port()}"
    threads, errors = run_peers(address, 3, [1, 1])
    with pytest.raises(sharding.DistributedInitError,
                       match="two processes were started with --process_id=1"):
        sharding.rendezvous(address, 3, 0, timeout_s=10.0)
    for t in threads:
        t.join()
    assert all("--process_id=1" in e for e in errors.values())


def test_bad_timeout_or_address_rejected():
    with pytest.raises(ValueError, match="--distributed_timeout"):
        sharding.initialize_distributed("127.0.0.1:1234", 2, 0, timeout_s=0)
    with pytest.raises(ValueError, match="not host:port"):
        sharding.rendezvous("localhost", 2, 1, timeout_s=1.0)
