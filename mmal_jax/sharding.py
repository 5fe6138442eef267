"""The device mesh shared by acquisition and training.

Everything in mmal_jax runs over one 1-D `jax.sharding.Mesh` whose single axis,
`DATA_AXIS`, splits items (acquisition) or examples (training) across all
devices of all hosts.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis `DATA_AXIS` over `devices` (default: all global devices)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device.")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def row_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading axis of an array over `DATA_AXIS`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy of an array on every device of `mesh`."""
  return NamedSharding(mesh, P())


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places a host array that every process holds in full as a global array.

  Works on one host and on many (each process copies only the shards its own
  devices hold). Cost: one host-to-device copy of the local shards.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def is_main_process() -> bool:
  """True on the process that writes files (process 0 of a multi-host job)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches this point (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
