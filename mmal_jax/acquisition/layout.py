"""How a pool of item rows is laid out over the device mesh.

A pool of `N` rows of dimension `D` is stored as one `(padded_rows, D)` array
split by rows over every device of the 2-D mesh (`sharding.row_sharding`);
the kernels view each device's part as `(blocks_per_device, rows_per_block,
D)` blocks. Two rules make every kernel return the same result on any number
of devices and any mesh shape:

* `rows_per_block` depends on `N` and `block` only, never on the mesh, and
  padding goes at the end, so block `b` always holds rows
  `[b * rows_per_block, (b + 1) * rows_per_block)`;
* kernels only ever run fixed-shape tile computations on whole blocks, so each
  tile sees identical inputs on any mesh and XLA computes it identically.

Shapes are bucketed so that a new pool size does not recompile the kernels:
`rows_per_block` and the number of blocks (a power of two per device) are the
same for every `N` in `(2^j, 2^(j+1)]`. The real row count travels as a
traced scalar; padding rows are masked out. A power of two of blocks per
device also makes each device's blocks one aligned subtree of the binary tree
over all blocks, which ordered sums (`kmeans.tree_sum`) rely on; on a
power-of-two mesh the number of blocks is simply a power of two.

L2 normalisation is never materialised: a pool keeps its rows as given and a
per-row `scale` (1 / ||x||, or 1), which the kernels apply to the products,
so laying out a pool that is already a row-sharded `jax.Array` in this layout
copies nothing (see `shard_rows`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from mmal_jax import sharding

AUTO = "auto"
# `block="auto"`: chosen per backend and device memory by `auto_tiling`.
DEFAULT_BLOCK = AUTO
# Pools smaller than this many blocks use smaller blocks, so that small pools
# are not padded to a whole large block per device.
_MIN_BLOCKS = 64
_MIN_ROWS_PER_BLOCK = 8
_STORAGE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Host arrays go to the devices in pieces of at most this many bytes, so a
# host pool never exists twice on the host.
_PUT_CHUNK_BYTES = 64 << 20


def next_pow2(n: int) -> int:
  """Smallest power of two >= n (n >= 1)."""
  return 1 << max(0, math.ceil(math.log2(max(1, n))))


def check_count(value, name: str, minimum: int = 0) -> int:
  """`value` as an int if it is a whole number >= minimum (bools rejected)."""
  if (isinstance(value, (bool, np.bool_)) or
      not isinstance(value, (int, np.integer)) or value < minimum):
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    raise ValueError(f"{name} must be {kind}, got {value!r}.")
  return int(value)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Kernel defaults of a backend: tile edge and greedy picks per pass."""
  block: int
  picks_per_pass: int


# Tuned on a 2-core CPU (README's acquisition benchmark): larger tiles
# spill the caches; 16 exact picks per pass amortise a pool read there.
CPU_TILING = Tiling(block=1024, picks_per_pass=16)
# GPU/TPU: a min/top-2 reduction over a small tile costs a round trip of the
# tile through HBM per product; 8192-wide tiles ran 3.6-4.4x faster than
# 1024 on an H200 (issue 16's table). Larger gained nothing there.
ACCELERATOR_MAX_BLOCK = 8192
# GPU/TPU: a greedy pass is a read of the pool; 2 N D p flops per pass stay
# under the read time while p is below the chip's flop:byte balance (~300 for
# bf16 on H100/H200, ~250 on TPU v5e), so 64 picks per pass cost about one
# read each 64 picks (4 x 64 candidates fit any block of >= 512 rows).
ACCELERATOR_PICKS_PER_PASS = 64
# At most this fraction of a device's memory for one tile's working set.
_TILE_MEMORY_FRACTION = 1 / 16
# Live float32 (block x block) arrays per tile: product, scores, mask.
_LIVE_TILES = 3


def auto_tiling(backend: str, device_memory_bytes: int | None,
                num_rows: int, dim: int, dtype) -> Tiling:
  """The default tile edge and greedy picks per pass for a pool.

  Args:
    backend: "cpu", "gpu", "tpu" (`jax.Device.platform`; others count as
      accelerators).
    device_memory_bytes: one device's memory (None: unknown, no bound).
    num_rows, dim, dtype: the pool (N, D and storage dtype).

  Returns:
    CPU: `CPU_TILING` (today's tuned values). GPU/TPU: the largest power of
    two <= `ACCELERATOR_MAX_BLOCK` (and <= the pool's next power of two,
    >= 1024 unless the pool is smaller) whose working set, 3 float32
    `block x block` tiles plus a `block x D` row block and operand chunk,
    fits in 1/16 of the device's memory; `ACCELERATOR_PICKS_PER_PASS`
    picks per pass. Pure: O(log block).
  """
  if backend == "cpu":
    return CPU_TILING
  itemsize = jnp.dtype(dtype).itemsize
  budget = (math.inf if device_memory_bytes is None
            else device_memory_bytes * _TILE_MEMORY_FRACTION)
  block = min(ACCELERATOR_MAX_BLOCK,
              max(_MIN_ROWS_PER_BLOCK, next_pow2(num_rows)))
  working_set = lambda b: _LIVE_TILES * b * b * 4 + 2 * b * dim * itemsize
  while block > CPU_TILING.block and working_set(block) > budget:
    block //= 2
  return Tiling(block, ACCELERATOR_PICKS_PER_PASS)


def device_tiling(mesh: Mesh, num_rows: int, dim: int, dtype) -> Tiling:
  """`auto_tiling` for the devices of `mesh` (the first device's platform
  and memory limit, as the runtime reports it)."""
  device = mesh.devices.flat[0]
  try:
    memory = (device.memory_stats() or {}).get("bytes_limit")
  except (NotImplementedError, RuntimeError, AttributeError):
    memory = None
  return auto_tiling(device.platform, memory, num_rows, dim, dtype)


def check_block(block) -> int | str:
  """Validates a tile edge length: a whole number >= 8, or "auto"."""
  if isinstance(block, str) and block == AUTO:
    return block
  return check_count(block, "block", _MIN_ROWS_PER_BLOCK)


def resolve_block(block, mesh: Mesh, num_rows: int, dim: int, dtype) -> int:
  """`block` itself, or for "auto" `device_tiling(...).block`."""
  block = check_block(block)
  if block == AUTO:
    return device_tiling(mesh, num_rows, dim, dtype).block
  return block


def pow2_capacity(n: int, block: int) -> tuple[int, int]:
  """(chunk, num_chunks) that hold `n` small-operand rows (centers, queries).

  chunk = min(block, next_pow2(n)) and num_chunks is a power of two, so the
  padded size stays the same for every n in a power-of-two bucket.
  """
  chunk = min(block, max(_MIN_ROWS_PER_BLOCK, next_pow2(n)))
  return chunk, next_pow2(-(-max(n, 1) // chunk))


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

  @property
  def shape(self) -> "PoolLayout":
    """This layout without its row count: what compiled kernels depend on."""
    return dataclasses.replace(self, num_rows=-1)


def pool_layout(num_rows: int, mesh: Mesh, block: int | str = DEFAULT_BLOCK,
                dim: int = 0, dtype=jnp.float32) -> PoolLayout:
  """The block layout of `num_rows` rows: blocks of at most `block` rows,
  a power of two of them on each device ("auto": `resolve_block` for a
  `(num_rows, dim)` pool of `dtype`)."""
  block = resolve_block(block, mesh, num_rows, dim, dtype)
  rows_per_block = min(
      block, max(_MIN_ROWS_PER_BLOCK, next_pow2(-(-num_rows // _MIN_BLOCKS))))
  num_blocks = next_pow2(-(-max(num_rows, 1) // rows_per_block))
  per_device = next_pow2(-(-num_blocks // mesh.size))
  return PoolLayout(num_rows, rows_per_block, per_device * mesh.size, mesh)


@dataclasses.dataclass(frozen=True)
class ShardedRows:
  """A pool laid out for the kernels.

  Attributes:
    layout: the row blocking.
    rows: `(padded_rows, D)` features as stored (float32, bfloat16 or
      float16), split by rows over the mesh; padding rows are finite.
    scale: `(num_blocks, rows_per_block)` float32 factor of each row: 1 / its
      L2 norm for a normalised pool, else 1; 0 on padding rows.
    sq_norms: `(num_blocks, rows_per_block)` float32 squared L2 norms of the
      scaled rows.
    num_rows: replicated int32 scalar, `layout.num_rows` (a traced kernel
      argument, so that pools of one size bucket share compiled kernels).
  """
  layout: PoolLayout
  rows: jax.Array
  scale: jax.Array
  sq_norms: jax.Array
  num_rows: jax.Array

  @property
  def dim(self) -> int:
    return self.rows.shape[-1]


def as_feature_array(x, name: str = "x"):
  """Checks `x` is a 2-D floating array.

  Returns a numpy or jax array (whatever came in; lists become numpy), not
  converted: storage dtypes are chosen by `shard_rows`.
  """
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D (num_items, dim), got shape "
                     f"{tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must hold floating-point features, got dtype "
                    f"{x.dtype}.")
  return x


def storage_dtype(x_dtype, dtype=None):
  """The dtype a pool is stored in: `dtype`, else x's own (float64 -> float32)."""
  if dtype is None:
    dtype = x_dtype if jnp.dtype(x_dtype) in _STORAGE_DTYPES else jnp.float32
  dtype = jnp.dtype(dtype)
  if dtype not in _STORAGE_DTYPES:
    raise TypeError(f"feature storage dtype must be float32, bfloat16 or "
                    f"float16, got {dtype}.")
  return dtype


def resolve_mesh(mesh: Mesh | None) -> Mesh:
  """`mesh` itself, or the default mesh over all devices."""
  return sharding.make_mesh() if mesh is None else mesh


def map_blocks(fn, *blocked):
  """Applies `fn` to one `(rows_per_block, ...)` block at a time.

  Row-wise reductions of a fixed-shape block are computed the same way
  whatever the number of blocks; batched forms over all blocks at once are
  not (XLA may vectorise them differently), so kernels go through this.
  """
  return jax.lax.map(lambda args: fn(*args), blocked)


def local_blocks(rows: jax.Array, rows_per_block: int) -> jax.Array:
  """A device's `(local_rows, D)` rows as `(blocks, rows_per_block, D)`."""
  return rows.reshape(-1, rows_per_block, rows.shape[-1])


def first_global_row(num_local_rows: int) -> jax.Array:
  """Global index of this device's first row (inside `shard_map` over rows)."""
  return (jax.lax.axis_index(sharding.ROW_AXES).astype(jnp.int32) *
          num_local_rows)


def _is_row_sharded(x: jax.Array, mesh: Mesh) -> bool:
  want = sharding.row_sharding(mesh)
  try:
    return x.sharding.is_equivalent_to(want, x.ndim)
  except (AttributeError, ValueError, TypeError):
    return False


@functools.partial(jax.jit, static_argnames=("shape", "dtype"),
                   donate_argnums=0)
def _write_chunk(rows, chunk, offset, *, shape: PoolLayout, dtype):
  """rows[offset:offset + len(chunk)] = chunk, on the device that owns them."""
  spec = sharding.row_spec()

  def local(rows, chunk, offset):
    start = offset - first_global_row(rows.shape[0])
    owner = (start >= 0) & (start < rows.shape[0])
    start = jnp.clip(start, 0, rows.shape[0] - chunk.shape[0])
    old = jax.lax.dynamic_slice_in_dim(rows, start, chunk.shape[0])
    new = jnp.where(owner, chunk.astype(dtype), old)
    return jax.lax.dynamic_update_slice_in_dim(rows, new, start, 0)

  return jax.shard_map(local, mesh=shape.mesh, in_specs=(spec, P(), P()),
                       out_specs=spec, check_vma=False)(rows, chunk, offset)


@functools.partial(jax.jit, static_argnames=("shape", "dim", "dtype"))
def _zeros(*, shape: PoolLayout, dim: int, dtype):
  return jax.lax.with_sharding_constraint(
      jnp.zeros((shape.padded_rows, dim), dtype),
      sharding.row_sharding(shape.mesh))


def _chunk_rows(pool: PoolLayout, dim: int, itemsize: int) -> int:
  """Rows per host-to-device piece: whole blocks within one device's rows."""
  per_device = pool.blocks_per_device
  blocks = max(1, min(per_device,
                      _PUT_CHUNK_BYTES // (pool.rows_per_block * dim *
                                           itemsize)))
  while per_device % blocks:
    blocks -= 1
  return blocks * pool.rows_per_block


def _put_host_rows(x: np.ndarray, pool: PoolLayout, dtype) -> jax.Array:
  """A host `(N, D)` array as `(padded_rows, D)` row-sharded device rows.

  Written piece by piece into a zero buffer, so besides `x` the host holds at
  most one piece (and, on a CPU backend, the device rows themselves).
  """
  dim = x.shape[1]
  rows = _zeros(shape=pool.shape, dim=dim, dtype=dtype)
  step = _chunk_rows(pool, dim, np.dtype(x.dtype).itemsize)
  replicated = sharding.replicated(pool.mesh)
  for start in range(0, x.shape[0], step):
    piece = x[start:start + step]
    if piece.shape[0] < step:
      piece = np.concatenate(
          [piece, np.zeros((step - piece.shape[0], dim), piece.dtype)])
    if piece.dtype == np.float64:
      piece = piece.astype(np.float32)
    rows = _write_chunk(rows, sharding.put_global(piece, replicated),
                        sharding.put_global(np.int32(start), replicated),
                        shape=pool.shape, dtype=dtype)
    rows.block_until_ready()  # One piece in flight at a time.
  return rows


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _relayout(x, num_rows, *, shape: PoolLayout, dtype):
  """A device `(M, D)` array (M >= num_rows) as zero-padded laid-out rows."""
  x = x[:shape.padded_rows].astype(dtype)
  x = jnp.pad(x, ((0, shape.padded_rows - x.shape[0]), (0, 0)))
  keep = jnp.arange(shape.padded_rows) < num_rows
  x = jnp.where(keep[:, None], x, jnp.zeros((), dtype))
  return jax.lax.with_sharding_constraint(x, sharding.row_sharding(shape.mesh))


@functools.partial(jax.jit, static_argnames=("shape", "normalize"))
def _row_stats(rows, num_rows, *, shape: PoolLayout, normalize: bool):
  """Per-row scale and squared norm, and where non-finite values sit.

  Returns (scale, sq_norms, bad rows among the real ones, first such row,
  whether any padding row is non-finite).
  """
  spec = sharding.row_spec()

  def local(rows, num_rows):
    first = first_global_row(rows.shape[0])
    blocks = local_blocks(rows, shape.rows_per_block)
    index = first + jnp.arange(rows.shape[0], dtype=jnp.int32).reshape(
        blocks.shape[:2])

    def one_block(block, idx):
      x = block.astype(jnp.float32)
      sq = jnp.sum(x * x, axis=1)
      real = idx < num_rows
      scale = (1.0 / jnp.maximum(jnp.sqrt(sq), 1e-12) if normalize
               else jnp.ones_like(sq))
      scale = jnp.where(real, scale, 0.0)
      scaled = x * scale[:, None]
      finite = jnp.isfinite(x).all(axis=1)
      return scale, jnp.sum(scaled * scaled, axis=1), finite

    scale, sq, finite = map_blocks(one_block, blocks, index)
    real = index < num_rows
    bad = ~finite & real
    num_bad = jax.lax.psum(bad.sum(dtype=jnp.int32), sharding.ROW_AXES)
    first_bad = jax.lax.pmin(
        jnp.min(jnp.where(bad, index, jnp.iinfo(jnp.int32).max)),
        sharding.ROW_AXES)
    bad_padding = jax.lax.pmax((~finite & ~real).any(), sharding.ROW_AXES)
    return scale, jnp.where(real, sq, 0.0), num_bad, first_bad, bad_padding

  return jax.shard_map(local, mesh=shape.mesh, in_specs=(spec, P()),
                       out_specs=(spec, spec, P(), P(), P()),
                       check_vma=False)(rows, num_rows)


def shard_rows(x, mesh: Mesh | None = None, *,
               block: int | str = DEFAULT_BLOCK,
               normalize: bool = False, dtype=None, name: str = "x",
               num_rows: int | None = None) -> ShardedRows:
  """Lays a `(N, D)` pool out on the mesh; optionally L2-normalised.

  Inputs taken as they are, without any copy: a `jax.Array` of shape
  `(pool_layout(num_rows, mesh, block).padded_rows, D)`, sharded
  `sharding.row_sharding(mesh)` (rows split over every device of the mesh,
  in the mesh's row-major device order), in the storage dtype (`dtype`, or its
  own when that is float32, bfloat16 or float16), whose first `num_rows` rows
  are the pool and whose other rows are finite (zeros). Such an array may span
  several processes; it is never gathered to a host. This is what a streamed
  embedding pass should produce.

  Any other input is copied once into that form: a host numpy array piece by
  piece (64 MB at a time, float64 converted per piece), a `jax.Array` of
  another shape, sharding or dtype by one jitted re-layout on the devices
  (its first `num_rows` rows are the pool).

  Normalisation is not materialised: the result holds the rows as given and
  a per-row scale that the kernels apply.

  Args:
    x: `(M, D)` floating features (numpy or jax). M may be 0.
    mesh: the device mesh; default: all devices.
    block: largest rows per block (tile edge), or "auto" (`auto_tiling`).
    normalize: scale each row by 1 / its L2 norm (zero rows stay zero).
    dtype: storage dtype (default: x's own; float64 is stored as float32).
    name: how errors refer to `x`.
    num_rows: number of real rows N <= M (default M); only for a `jax.Array`.

  Returns:
    The `ShardedRows`. Cost: one pass over the pool (norms, finite check),
    plus the copy for inputs not already laid out.

  Raises:
    ValueError: wrong rank, NaN/inf values, bad `num_rows`.
    TypeError: non-floating dtype.
  """
  x = as_feature_array(x, name)
  mesh = resolve_mesh(mesh)
  dtype = storage_dtype(x.dtype, dtype)
  if num_rows is None:
    num_rows = x.shape[0]
  elif not isinstance(x, jax.Array):
    raise ValueError(f"num_rows is only for a laid-out jax.Array; give "
                     f"{name} as its first {num_rows} rows instead.")
  num_rows = check_count(num_rows, "num_rows")
  if num_rows > x.shape[0]:
    raise ValueError(f"num_rows={num_rows} exceeds the {x.shape[0]} rows of "
                     f"{name}.")
  pool = pool_layout(num_rows, mesh, block, x.shape[1], dtype)
  if not isinstance(x, jax.Array):
    rows = _put_host_rows(np.asarray(x), pool, dtype)
  elif (x.shape[0] == pool.padded_rows and x.dtype == dtype and
        _is_row_sharded(x, mesh)):
    rows = x
  else:
    rows = _relayout(x, np.int32(num_rows), shape=pool.shape, dtype=dtype)
  count = sharding.put_global(np.int32(num_rows), sharding.replicated(mesh))
  scale, sq_norms, num_bad, first_bad, bad_padding = _row_stats(
      rows, count, shape=pool.shape, normalize=bool(normalize))
  if int(num_bad):
    raise ValueError(f"{name} has NaN or inf values in {int(num_bad)} "
                     f"row(s), first at row {int(first_bad)}.")
  if bool(bad_padding):
    raise ValueError(f"{name} has NaN or inf values in its padding rows "
                     f"(rows {num_rows} and on); a laid-out pool's padding "
                     f"rows must be finite, e.g. zeros.")
  return ShardedRows(pool, rows, scale, sq_norms, count)


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


def row_vector(values, layout: PoolLayout, fill: float) -> jax.Array:
  """`(N,)` host values -> `(num_blocks, rows_per_block)` float32, sharded."""
  padded = np.full(layout.padded_rows, fill, np.float32)
  padded[:layout.num_rows] = np.asarray(values, np.float32)
  return sharding.put_global(
      padded.reshape(layout.num_blocks, layout.rows_per_block),
      sharding.row_sharding(layout.mesh))
