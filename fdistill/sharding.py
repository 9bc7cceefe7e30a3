"""Meshes, shardings and multi-host set-up: JAX's SPMD runtime is the whole distribution layer.

One jitted step runs unchanged on 1 CPU, 8 GPUs or a multi-host TPU pod: the batch is sharded
along the mesh axis ``data`` and the parameters are either replicated (data parallel) or sharded
along the same axis (``fsdp``: each array split along its largest divisible dimension; XLA
inserts the all-gathers and reduce-scatters).
"""
from __future__ import annotations

import math
import os
import socket
import time

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fdistill.errors import ConfigError, FdistillError

DATA_AXIS = "data"
CPU_DEVICES_ENV = "FDISTILL_CPU_DEVICES"
PARAM_SHARDINGS = ("replicated", "fsdp")


DEFAULT_DISTRIBUTED_TIMEOUT_S = 30
_HELLO = "fdistill-rendezvous"


class DistributedInitError(FdistillError):
    """The processes of a multi-host run did not all connect to the coordinator in time."""


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: list[int] | None = None, *,
                           timeout_s: float = DEFAULT_DISTRIBUTED_TIMEOUT_S) -> None:
    """Starts ``jax.distributed`` for a multi-host run, giving up after ``timeout_s`` seconds.

    With no arguments JAX auto-detects the cluster where it can (Cloud TPU, SLURM, Open MPI,
    Kubernetes); on a plain set of machines pass the coordinator ``host:port``, the number of
    processes and this process' id. Call before any other JAX call.

    With an explicit coordinator, every process first meets at the coordinator's port
    (``rendezvous``): a peer that never starts or a wrong address is then reported as a
    ``DistributedInitError`` naming the address and the missing process ids.
    """
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ConfigError(f"distributed timeout = {timeout_s!r}: must be a finite number of "
                          f"seconds > 0 (--distributed_timeout)")
    if coordinator_address and num_processes and num_processes > 1 and process_id is not None:
        rendezvous(coordinator_address, int(num_processes), int(process_id), timeout_s)
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, local_device_ids=local_device_ids)
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None},
                               initialization_timeout=max(1, math.ceil(timeout_s)))


# Why a hand-written rendezvous: when a process does not register in time, jax.distributed
# terminates the process from C++ (a fatal log saying "another task died"), so no Python error
# can be caught and nothing names the missing process. Meeting first over a plain socket on the
# coordinator's port (closed again before JAX binds it) turns that into a message.

def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"coordinator address {address!r} is not host:port "
                          f"(--coordinator_address)")
    return host.strip("[]"), int(port)


def _send(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall(f"{line}\n".encode())
    except OSError:  # that peer is gone; it reports its own failure
        pass


def _recv_line(conn: socket.socket, deadline: float) -> str | None:
    """One newline-terminated line, or None on timeout / closed connection."""
    data = b""
    while not data.endswith(b"\n") and len(data) < 1024:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(1024)
        except (socket.timeout, OSError):
            return None
        if not chunk:
            return None
        data += chunk
    return data.decode(errors="replace").strip()


def rendezvous(coordinator_address: str, num_processes: int, process_id: int,
               timeout_s: float) -> None:
    """Waits until all ``num_processes`` processes reached the coordinator (process 0), or
    raises ``DistributedInitError`` naming the address and the missing process ids."""
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id={process_id} must be in [0, {num_processes}) for "
                          f"--num_processes={num_processes}")
    host, port = _host_port(coordinator_address)
    if process_id == 0:
        _serve(coordinator_address, port, num_processes, timeout_s)
    else:
        _join(coordinator_address, host, port, num_processes, process_id, timeout_s)


def _serve(address: str, port: int, num_processes: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        if socket.has_dualstack_ipv6():
            server = socket.create_server(("", port), family=socket.AF_INET6,
                                          dualstack_ipv6=True)
        else:
            server = socket.create_server(("", port))
    except OSError as e:
        raise DistributedInitError(
            f"process 0 cannot listen on port {port} of the coordinator {address}: {e}. Is "
            f"another run using that port? Choose another --coordinator_address port.") from e
    peers: dict[int, socket.socket] = {}
    try:
        with server:
            while len(peers) < num_processes - 1:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                server.settimeout(remaining)
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    break
                hello = (_recv_line(conn, min(deadline, time.monotonic() + 5.0)) or "").split()
                if len(hello) != 3 or hello[0] != _HELLO or not all(h.isdigit()
                                                                    for h in hello[1:]):
                    conn.close()  # not one of ours
                    continue
                pid, count = int(hello[1]), int(hello[2])
                problem = None
                if count != num_processes:
                    problem = (f"process {pid} was started with --num_processes={count}, "
                               f"process 0 with --num_processes={num_processes}")
                elif pid in peers or not 0 < pid < num_processes:
                    problem = (f"two processes were started with --process_id={pid}"
                               if pid in peers else
                               f"--process_id={pid} is outside [1, {num_processes})")
                if problem:
                    for c in (conn, *peers.values()):
                        _send(c, f"error {problem}")
                    conn.close()
                    raise DistributedInitError(f"multi-host start at coordinator {address}: "
                                               f"{problem}.")
                peers[pid] = conn
            missing = sorted(set(range(1, num_processes)) - set(peers))
            if missing:
                for c in peers.values():
                    _send(c, f"missing {','.join(map(str, missing))}")
                raise DistributedInitError(
                    f"process 0 waited {timeout_s:g} s at the coordinator {address} for the "
                    f"other {num_processes - 1} process(es); process ids {missing} never "
                    f"connected. Start them with --coordinator_address={address} "
                    f"--num_processes={num_processes} --process_id=<id>, or give them longer "
                    f"with --distributed_timeout.")
            for c in peers.values():
                _send(c, "go")
            for c in peers.values():  # let each peer close first (its side keeps TIME_WAIT)
                _recv_line(c, time.monotonic() + 2.0)
    finally:
        for c in peers.values():
            c.close()


def _join(address: str, host: str, port: int, num_processes: int, process_id: int,
          timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = socket.create_connection((host, port),
                                            timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedInitError(
                    f"process {process_id} could not reach the coordinator {address} (process 0) "
                    f"within {timeout_s:g} s ({e}). Start process 0 with "
                    f"--coordinator_address={address} --num_processes={num_processes} "
                    f"--process_id=0, check the address and port, or give it longer with "
                    f"--distributed_timeout.") from None
            time.sleep(0.2)
    with conn:
        conn.sendall(f"{_HELLO} {process_id} {num_processes}\n".encode())
        # The coordinator decides by its own deadline, at most timeout_s after this connection.
        reply = _recv_line(conn, time.monotonic() + timeout_s + 5.0)
    if reply == "go":
        return
    if reply and reply.startswith("missing "):
        raise DistributedInitError(
            f"the coordinator {address} gave up waiting: process ids {reply.split()[1]} never "
            f"connected (this is process {process_id}).")
    if reply and reply.startswith("error "):
        raise DistributedInitError(f"multi-host start at coordinator {address}: {reply[6:]}.")
    raise DistributedInitError(
        f"process {process_id} reached {address} but no fdistill coordinator answered there "
        f"within {timeout_s:g} s; check --coordinator_address.")


def cpu_devices_from_env() -> int | None:
    """The CPU device count that ``$FDISTILL_CPU_DEVICES`` asks for (0: one per core), or None
    when it is unset."""
    value = os.environ.get(CPU_DEVICES_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ConfigError(f"{CPU_DEVICES_ENV}={value!r}: must be an integer >= 0 (0: one per core)")
    return int(value)


def resolve_cpu_devices(requested: int, batch_sizes=(), *, cores: int | None = None,
                        multi_process: bool = False) -> int:
    """The CPU device count for ``requested`` (``--cpu_devices``, ``$FDISTILL_CPU_DEVICES`` or the
    config's ``cpu_devices``): a positive count as is; 0 means one device per core this process
    may run on (``os.sched_getaffinity``), lowered to the largest count that divides every
    ``batch_sizes`` entry (the batches the run's steps shard, which need equal shares), and 1
    in a ``multi_process`` run (each process' devices then come from the launcher)."""
    if not (isinstance(requested, int) and requested >= 0):
        raise ConfigError(f"cpu devices = {requested!r}: must be an integer >= 0 (0: one per core; "
                          f"--cpu_devices or config.cpu_devices)")
    if requested > 0:
        return requested
    if multi_process:
        return 1
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(n for n in range(1, max(cores, 1) + 1)
               if all(int(b) % n == 0 for b in batch_sizes))


def set_cpu_devices(n: int) -> None:
    """Splits this host's CPU into ``n`` JAX devices (``jax_num_cpu_devices``); call before any
    JAX operation. The batch is then sharded over them like over accelerators, and each device's
    share of a step runs as its own program on its own thread, so XLA:CPU's single-threaded
    elementwise loops and layout copies run on ``n`` cores at once (benchmark network, batch 16,
    2 cores: DSM step 0.65-0.77x, distillation iterations 0.68-0.72x the wall time of one
    device). The results equal one device's to float tolerance; the batch must be a multiple of
    ``n``. No effect on the accelerators of a GPU or TPU run."""
    if not (isinstance(n, int) and n >= 1):
        raise ConfigError(f"cpu devices = {n!r}: must be an integer >= 1 (--cpu_devices)")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:
        raise ConfigError(f"cannot split the CPU into {n} devices after JAX has started its "
                          f"backends (an earlier JAX operation); call set_cpu_devices first") from e


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes, axis ``data``.

    Axes are ``Auto`` so plain ``jax.jit`` with ``NamedSharding`` inputs lets XLA propagate
    shardings (no sharding-in-types annotations needed inside the networks).
    """
    devices = np.asarray(jax.devices())
    return Mesh(devices, (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def local_mesh(devices=None) -> Mesh:
    """A 1-D ``data`` mesh over this process' own devices (or ``devices``): sampling and
    evaluation, where each process draws and scores its own samples."""
    devices = np.asarray(jax.local_devices() if devices is None else list(devices))
    return Mesh(devices, (DATA_AXIS,), axis_types=(AxisType.Auto,))


class SplitBatch:
    """``jax.jit(fn)`` for a function of one batch (a sampler, a feature network) that splits the
    batch over this process' devices when it has several (``--cpu_devices=2``, several GPUs):
    the arguments at ``batch_argnums`` (leading axis the batch; None passes through) and every
    output (each must lead with the batch) are sharded along ``data``, the other arguments
    (parameters, keys) replicated, so each device computes its share of the batch and XLA
    propagates the split through the sampler's loop. Random draws inside ``fn`` do not depend on
    the split (partitionable threefry), so the results equal one device's to float tolerance.
    One device, or a batch size the devices do not divide, gives plain ``jax.jit(fn)``.
    ``mesh``: the mesh, or None when not split; ``devices``: defaults to this process' own."""

    def __init__(self, fn, batch_size: int, batch_argnums=(), *, devices=None):
        self._device = None if devices is None else list(devices)[0]
        devices = jax.local_devices() if devices is None else list(devices)
        self.batch_size, self.batch_argnums = int(batch_size), frozenset(batch_argnums)
        self.mesh = (local_mesh(devices) if len(devices) > 1 and self.batch_size % len(devices) == 0
                     else None)
        self._jit = (jax.jit(fn) if self.mesh is None
                     else jax.jit(fn, out_shardings=batch_sharding(self.mesh)))
        self._replicated: dict[int, tuple] = {}

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.devices.size

    def place(self, *args) -> tuple:
        """The arguments on the mesh: batch arguments split, the others replicated. The last
        replicated copy of each argument is kept while its arrays are the same objects, so the
        same parameters passed batch after batch are copied to the devices once."""
        if self.mesh is None:
            return args if self._device is None else jax.device_put(args, self._device)
        rep, bat = replicated(self.mesh), batch_sharding(self.mesh)
        out = []
        for i, a in enumerate(args):
            if i in self.batch_argnums:
                out.append(jax.device_put(a, bat))
                continue
            leaves, kept = jax.tree.leaves(a), self._replicated.get(i)
            if kept is None or len(kept[0]) != len(leaves) or any(
                    x is not y for x, y in zip(kept[0], leaves)):   # same (immutable) arrays
                kept = self._replicated[i] = (leaves, jax.device_put(a, rep))
            out.append(kept[1])
        return tuple(out)

    def __call__(self, *args):
        return self._jit(*self.place(*args))

    def lower(self, *args):
        return self._jit.lower(*self.place(*args))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Raises before anything compiles when the batch cannot be split evenly."""
    n = mesh.devices.size
    if global_batch_size % n:
        on_cpu = getattr(mesh.devices.flat[0], "platform", None) == "cpu"
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {n} devices of the "
            f"mesh; set --config.training.batch_size to a multiple of {n}"
            + (" or use fewer CPU devices (--cpu_devices)." if on_cpu else "."))
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{jax.process_count()} processes.")


def global_batch(local_batch, mesh: Mesh):
    """Assembles each process' slice of the batch into global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


def _fsdp_spec(shape, n: int) -> P:
    """Shards the largest dimension divisible by ``n``; small or indivisible arrays replicate."""
    dims = [d for d in np.argsort(shape)[::-1] if shape[d] % n == 0 and shape[d] >= n]
    if n == 1 or not dims or int(np.prod(shape)) < 2 ** 14:
        return P()
    spec = [None] * len(shape)
    spec[dims[0]] = DATA_AXIS
    return P(*spec)


def param_shardings(tree, mesh: Mesh, mode: str = "replicated"):
    """Shardings for a pytree of parameters (or optimizer / EMA state shaped like them)."""
    if mode not in PARAM_SHARDINGS:
        raise ValueError(f"unknown parameter sharding {mode!r}; valid: {', '.join(PARAM_SHARDINGS)}")
    n = mesh.devices.size
    if mode == "replicated":
        return jax.tree.map(lambda _: replicated(mesh), tree)
    return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(np.shape(x), n)), tree)


def to_host(tree):
    """Global arrays as numpy on every process: replicated ones from the local copy, sharded ones
    gathered across processes."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def local_copy(tree):
    """A training state's (possibly multi-host, sharded) arrays as arrays on this process'
    default device, so that evaluation samples locally and reads its samples back."""
    return jax.device_put(to_host(tree))
