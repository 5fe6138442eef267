"""The device mesh shared by acquisition and training.

Everything in mmal_jax runs over one 2-D `jax.sharding.Mesh` with axes
`("data", "fsdp")` (`MESH_AXES`). Rows, i.e. pool items (acquisition) and
batch examples (training), are split over *every* device: over both axes,
`ROW_AXES`. Parameters and optimizer state may additionally be split over
`"fsdp"` (fully-sharded data parallelism, see `models`/`train_step`); with
`fsdp=1` (the default) they are replicated and the mesh is plain data
parallelism.

The linear order of devices along `ROW_AXES` is the mesh's row-major order, so
a row block lands at the same position of that order on a 1x8, 2x4 or 8x1
mesh: the acquisition kernels give identical results on every mesh shape.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# Rows (pool items, batch examples) are split over both axes: every device.
ROW_AXES = MESH_AXES


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1
               ) -> tuple[int, int]:
  """Resolves `(data, fsdp)` sizes, one of which may be -1 ("the rest").

  Raises ValueError naming the sizes when they do not multiply to
  `num_devices`.
  """
  sizes = [data, fsdp]
  for name, size in zip(MESH_AXES, sizes):
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
        size != -1 and size < 1):
      raise ValueError(f"mesh {name} size must be a positive integer or -1, "
                       f"got {size!r}.")
  if sizes.count(-1) > 1:
    raise ValueError("At most one of the mesh sizes (data, fsdp) may be -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"A mesh with {known} along the fixed axis cannot "
                       f"split {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if sizes[0] * sizes[1] != num_devices:
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} = "
                     f"{sizes[0] * sizes[1]} devices, but there are "
                     f"{num_devices}.")
  return int(sizes[0]), int(sizes[1])


def make_mesh(devices: Sequence[jax.Device] | None = None, *, data: int = -1,
              fsdp: int = 1) -> Mesh:
  """A `(data, fsdp)` mesh over `devices` (default: all devices of all hosts).

  Sizes may use -1 for "the rest" (`data=-1, fsdp=1` is plain data
  parallelism). The device grid comes from `mesh_utils.create_device_mesh`,
  which respects the TPU / GPU interconnect topology.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device.")
  shape = mesh_shape(len(devices), data, fsdp)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices,
                                         allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    # A subset of a slice's devices has no topology to respect.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def row_spec() -> P:
  """PartitionSpec splitting the leading axis over every device."""
  return P(ROW_AXES)


def row_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading axis of an array over every device."""
  return NamedSharding(mesh, row_spec())


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


def to_host(x) -> np.ndarray:
  """A global `jax.Array` (possibly spanning several hosts) or host array as
  a numpy array held in full by every process. Cost: one all-gather over
  processes when the array is not fully addressable, else one copy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def is_main_process() -> bool:
  """True on the process that writes files (process 0 of a multi-host job)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches this point (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (a barrier too).

  For a decision one process takes alone (process 0 checks and locks the
  workdir) that every process must follow: stopping only there would leave
  the others waiting at their next collective. Cost: one all-gather of a
  byte per process; none on one process.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.array([flag], np.int32))
  return bool(np.any(flags))


# Parameters and optimizer state (FSDP). big_vision leaves arrays of up to
# 4 MiB replicated: 2**20 float32 elements; counted in elements so that a
# parameter and its (possibly bfloat16) Adam moments always shard alike.
FSDP_MIN_ELEMENTS = 2 ** 20


def fsdp_spec(shape: Sequence[int], fsdp_size: int, *,
              min_elements: int = FSDP_MIN_ELEMENTS) -> P:
  """big_vision's `fsdp` rule: split the largest dimension `fsdp_size` divides.

  Returns `P()` (replicated) for `fsdp_size` 1, arrays with fewer than
  `min_elements` elements, and shapes none of whose dimensions `fsdp_size`
  divides; else a spec with `FSDP_AXIS` on that dimension (the first of equal
  largest ones). Depends on the shape only, so a parameter and its optimizer
  moments get the same spec. Pure Python, no devices needed.
  """
  shape = tuple(int(d) for d in shape)
  if fsdp_size == 1 or int(np.prod(shape)) < min_elements:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % fsdp_size == 0:
      return P(*[FSDP_AXIS if i == dim else None for i in range(len(shape))])
  return P()


def param_shardings(tree, mesh: Mesh, *,
                    min_elements: int = FSDP_MIN_ELEMENTS):
  """`NamedSharding`s on `mesh` for a tree of arrays or ShapeDtypeStructs.

  Every leaf gets `fsdp_spec` over the mesh's `"fsdp"` axis (replicated over
  `"data"`): parameters, optimizer moments and scalars alike, so it applies
  to a whole train state.
  """
  size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, size,
                                              min_elements=min_elements)),
      tree)


def bytes_per_device(tree, fsdp_size: int, *,
                     min_elements: int = FSDP_MIN_ELEMENTS) -> int:
  """Bytes one device holds of a tree of arrays / ShapeDtypeStructs when each
  leaf is laid out by `fsdp_spec` over an `fsdp_size` axis (from shapes only:
  no devices or allocation, so any `fsdp_size` can be asked)."""
  total = 0
  for x in jax.tree.leaves(tree):
    nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    sharded = any(fsdp_spec(x.shape, fsdp_size, min_elements=min_elements))
    total += nbytes // fsdp_size if sharded else nbytes
  return total
