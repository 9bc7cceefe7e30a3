"""Meshes, shardings and multi-host set-up: JAX's SPMD runtime is the whole distribution layer.

One jitted step runs unchanged on 1 CPU, 8 GPUs or a multi-host TPU pod: the batch is sharded
along the mesh axis ``data`` and the parameters are either replicated (data parallel) or sharded
along the same axis (``fsdp``: each array split along its largest divisible dimension; XLA
inserts the all-gathers and reduce-scatters).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
PARAM_SHARDINGS = ("replicated", "fsdp")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: list[int] | None = None) -> None:
    """Starts ``jax.distributed`` for a multi-host run.

    With no arguments JAX auto-detects the cluster where it can (Cloud TPU, SLURM, Open MPI,
    Kubernetes); on a plain set of machines pass the coordinator ``host:port``, the number of
    processes and this process' id. Call before any other JAX call.
    """
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, local_device_ids=local_device_ids)
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})


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


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Raises before anything compiles when the batch cannot be split evenly."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {n} devices of the "
            f"mesh; set --config.training.batch_size to a multiple of {n}.")
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
