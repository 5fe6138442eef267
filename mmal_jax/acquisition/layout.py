"""How a pool of item rows is laid out over the device mesh.

A pool of `N` rows of dimension `D` is stored as `(num_blocks, rows_per_block,
D)`, blocks split over the mesh's data axis. Two rules make every kernel return
the same result on 1 and on 8 devices:

* `rows_per_block` depends on `N` and `block` only, never on the device count,
  and padding goes at the end, so block `b` always holds rows
  `[b * rows_per_block, (b + 1) * rows_per_block)`;
* kernels only ever run fixed-shape tile computations on whole blocks, so each
  tile sees identical inputs on any mesh and XLA computes it identically.

Padding rows are zero and masked out; the number of blocks is rounded up to a
multiple of the device count.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmal_jax import sharding

DEFAULT_BLOCK = 1024
# Pools smaller than this many blocks use smaller blocks, so that small pools
# are not padded to a whole large block per device.
_MIN_BLOCKS = 64
_MIN_ROWS_PER_BLOCK = 8
_STORAGE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def next_pow2(n: int) -> int:
  """Smallest power of two >= n (n >= 1)."""
  return 1 << max(0, math.ceil(math.log2(max(1, n))))


def check_block(block: int) -> int:
  """Validates a tile edge length: a whole number >= 8."""
  if not isinstance(block, (int, np.integer)) or block < _MIN_ROWS_PER_BLOCK:
    raise ValueError(
        f"block must be an integer >= {_MIN_ROWS_PER_BLOCK}, got {block!r}.")
  return int(block)


@dataclasses.dataclass(frozen=True)
class PoolLayout:
  """Row blocking of a pool of `num_rows` rows over `mesh`."""
  num_rows: int
  rows_per_block: int
  num_blocks: int
  mesh: Mesh

  @property
  def padded_rows(self) -> int:
    return self.num_blocks * self.rows_per_block

  @property
  def blocks_per_device(self) -> int:
    return self.num_blocks // self.mesh.size


def pool_layout(num_rows: int, mesh: Mesh, block: int = DEFAULT_BLOCK
                ) -> PoolLayout:
  """The block layout of `num_rows` rows: blocks of at most `block` rows."""
  block = check_block(block)
  rows_per_block = min(
      block, max(_MIN_ROWS_PER_BLOCK, next_pow2(-(-num_rows // _MIN_BLOCKS))))
  num_blocks = -(-max(num_rows, 1) // rows_per_block)
  num_blocks = -(-num_blocks // mesh.size) * mesh.size
  return PoolLayout(num_rows, rows_per_block, num_blocks, mesh)


@dataclasses.dataclass(frozen=True)
class ShardedRows:
  """A pool laid out for the kernels.

  Attributes:
    layout: the row blocking.
    rows: `(num_blocks, rows_per_block, D)` features in their storage dtype
      (float32, bfloat16 or float16), blocks sharded over the mesh.
    sq_norms: `(num_blocks, rows_per_block)` float32 squared L2 norms.
  """
  layout: PoolLayout
  rows: jax.Array
  sq_norms: jax.Array

  @property
  def dim(self) -> int:
    return self.rows.shape[-1]


def as_feature_array(x, name: str = "x"):
  """Checks `x` is a 2-D floating array; float64 becomes float32.

  Returns a numpy or jax array (whatever came in) in a storage dtype.
  """
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D (num_items, dim), got shape "
                     f"{tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must hold floating-point features, got dtype "
                    f"{x.dtype}.")
  if x.dtype not in _STORAGE_DTYPES:
    x = x.astype(np.float32)
  return x


def resolve_mesh(mesh: Mesh | None) -> Mesh:
  """`mesh` itself, or the default 1-D mesh over all devices."""
  return sharding.make_mesh() if mesh is None else mesh


def map_blocks(fn, *blocked):
  """Applies `fn` to one `(rows_per_block, ...)` block at a time.

  Row-wise reductions of a fixed-shape block are computed the same way
  whatever the number of blocks; batched forms over all blocks at once are
  not (XLA may vectorise them differently), so kernels go through this.
  """
  return jax.lax.map(lambda args: fn(*args), blocked)


@functools.partial(jax.jit, static_argnames=("layout", "normalize", "dtype"))
def _pad_and_shard(x, *, layout: PoolLayout, normalize: bool, dtype):
  x = x.astype(jnp.float32)
  finite = jnp.isfinite(x).all()
  x = jnp.pad(x, ((0, layout.padded_rows - x.shape[0]), (0, 0)))
  rows = x.reshape(layout.num_blocks, layout.rows_per_block, x.shape[1])

  def one_block(block):
    if normalize:
      norms = jnp.sqrt(jnp.sum(block * block, axis=1, keepdims=True))
      block = block / jnp.maximum(norms, 1e-12)
    block = block.astype(dtype)
    stored = block.astype(jnp.float32)
    return block, jnp.sum(stored * stored, axis=1)

  spec = sharding.row_spec()
  rows, sq_norms = jax.shard_map(
      lambda r: map_blocks(one_block, r), mesh=layout.mesh, in_specs=spec,
      out_specs=(spec, spec))(rows)
  return rows, sq_norms, finite


def shard_rows(x, mesh: Mesh | None = None, *, block: int = DEFAULT_BLOCK,
               normalize: bool = False, dtype=None, name: str = "x"
               ) -> ShardedRows:
  """Pads, optionally L2-normalises, and shards a `(N, D)` pool.

  Args:
    x: `(N, D)` floating features (numpy or jax). N may be 0.
    mesh: 1-D mesh; default: all devices.
    block: largest rows per block (tile edge).
    normalize: divide each row by its L2 norm (zero rows stay zero).
    dtype: storage dtype (default: x's own; float64 is stored as float32).
    name: how errors refer to `x`.

  Returns:
    The `ShardedRows`. Cost: one pass over `x` plus the host-to-device copy.

  Raises:
    ValueError: wrong rank, or NaN/inf values.
    TypeError: non-floating dtype.
  """
  x = as_feature_array(x, name)
  layout = pool_layout(x.shape[0], resolve_mesh(mesh), block)
  dtype = jnp.dtype(x.dtype if dtype is None else dtype)
  if dtype not in _STORAGE_DTYPES:
    raise TypeError(f"feature storage dtype must be float32, bfloat16 or "
                    f"float16, got {dtype}.")
  rows, sq_norms, finite = _pad_and_shard(
      x, layout=layout, normalize=normalize, dtype=dtype)
  if not bool(finite):
    raise_non_finite(x, name)
  return ShardedRows(layout, rows, sq_norms)


def raise_non_finite(x, name: str):
  """Raises the ValueError for a feature array holding NaN or inf values."""
  bad = np.flatnonzero(~np.isfinite(np.asarray(x, np.float32)).all(axis=1))
  raise ValueError(f"{name} has NaN or inf values in {bad.size} row(s), "
                   f"first at row {bad[0]}.")


def shard_mask(mask, layout: PoolLayout, name: str = "mask") -> jax.Array:
  """`(N,)` bool mask -> `(num_blocks, rows_per_block)` sharded, padding False."""
  mask = np.asarray(mask)
  if mask.shape != (layout.num_rows,):
    raise ValueError(f"{name} must have shape ({layout.num_rows},), got "
                     f"{mask.shape}.")
  if mask.dtype != np.bool_:
    raise TypeError(f"{name} must be a bool array, got dtype {mask.dtype}.")
  padded = np.zeros(layout.padded_rows, np.bool_)
  padded[:layout.num_rows] = mask
  return sharding.put_global(
      padded.reshape(layout.num_blocks, layout.rows_per_block),
      sharding.row_sharding(layout.mesh))
