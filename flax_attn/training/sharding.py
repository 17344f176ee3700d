"""Devices, the mesh, multi-host start-up and global batches.

One code path for one CPU, fake CPU devices, a GPU and a TPU pod: a ``Mesh`` of all devices with
axes ``("data", "model")``; batches are sharded over ``data``, parameters and optimiser state are
replicated (the ``model`` axis, size 1 by default, is there for parameter sharding rules). Under
``jax.jit`` with a globally sharded batch every reduction over the batch, BatchNorm's mean and
variance included, is global: XLA inserts the cross-device collectives.

Each process loads only the rows of the global batch that live on its own devices
(:func:`process_rows`) and assembles the global array with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA",
    "MODEL",
    "batch_sharding",
    "initialize_distributed",
    "make_mesh",
    "process_rows",
    "replicated",
    "to_global",
]

DATA, MODEL = "data", "model"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Call ``jax.distributed.initialize`` when launched as one of several processes.

    The arguments fall back to the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. With ``auto=True`` (TPU pods, SLURM, ...) JAX
    detects them itself. Must run before anything touches a JAX backend. Returns whether
    distributed mode was initialised. On CPU the cross-process collectives use gloo.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if auto:
        jax.distributed.initialize()
        return True
    if coordinator_address is None or not num_processes or num_processes <= 1:
        return False
    if process_id is None:
        raise ValueError("initialize_distributed: several processes need a process id (JAX_PROCESS_ID)")
    # CPU processes exchange data through gloo; without it cross-process collectives fail.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def make_mesh(model_axis: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model_axis < 1 or n % model_axis:
        raise ValueError(f"make_mesh: model_axis={model_axis} must divide the number of devices {n}")
    shape = (n // model_axis, model_axis)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
        # Device kinds without a known physical topology: order by (process, id) so each process
        # owns a contiguous block of the batch.
        grid = np.array(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(shape)
    return Mesh(grid, (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ``data``, the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The contiguous rows of a ``global_batch`` that this process's devices hold."""
    data_size = mesh.shape[DATA]
    if global_batch % data_size:
        raise ValueError(
            f"global batch size {global_batch} must be divisible by the {data_size} devices on the '{DATA}' mesh axis"
        )
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in index_map.values()})
    start, stop = spans[0][0], spans[0][1]
    for lo, hi in spans[1:]:
        if lo != stop:
            raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {spans}")
        stop = hi
    return slice(start, stop)


def to_global(local: dict[str, np.ndarray], mesh: Mesh, global_batch: int) -> dict[str, jax.Array]:
    """Global arrays (batch-sharded over ``data``) from this process's rows ``local``."""
    sharding = batch_sharding(mesh)
    out: dict[str, Any] = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch, *v.shape[1:]))
    return out
