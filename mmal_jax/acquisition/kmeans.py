"""K-means (Lloyd) and k-means++ over a row-sharded pool, the same on any mesh.

Rows are laid out in fixed-size blocks over the mesh as in `layout`, with one
more rule: every device holds a power-of-two number of blocks
(`tree_layout`). Sums over rows (cluster sums and counts, inertia, any
gradient summed over samples) are then added in one fixed binary tree over
the global block index (`tree_sum`): each device adds its blocks as the
aligned subtree they form, and the devices' partial sums are combined by the
top of the same tree (`all_reduce_in_order`). Padding blocks, skipped with
`lax.cond`, contribute exact zeros, so the tree over 1 device's blocks and
over 8 devices' blocks is the same tree: results are bit-identical on any
device count (float addition is commutative, not associative: the order is
what must not change). Selections (k-means++ picks) are max/min collectives.

Memory: a pool takes at most twice its size (power-of-two padding per device,
never computed on); a Lloyd step holds one `(rows_per_block, C)` distance tile
and `log2(blocks per device) + 1` partial `(C, D)` sums per device. No
`(N, N)` or `(N, C)` array exists.

k-means++ (Arthur & Vassilvitskii 2007): the first center is drawn uniformly
(or is the row with the largest score, e.g. BADGE's gradient norm), each next
one with probability proportional to the squared distance to its nearest
center (D^2 sampling). Sampling is an argmax of `log d^2 + Gumbel noise`
(Gumbel-max trick) with the noise a function of (seed, step, global block):
an exact collective and independent of the device count. `plusplus_local` is
the generic form (distances given by a function of a fetched center record),
which BADGE uses on gradient embeddings it never materialises.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from mmal_jax import sharding
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition.layout import DEFAULT_BLOCK, PoolLayout, ShardedRows

AXIS = sharding.ROW_AXES
ROWS = P(AXIS)
REPLICATED = P()
_INT_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------
# Layout and ordered sums.


def tree_layout(num_rows: int, mesh: Mesh, block: int = DEFAULT_BLOCK
                ) -> PoolLayout:
  """`layout.pool_layout`'s blocking with a power of two of blocks per device.

  Rows per block are `pool_layout`'s (they depend on `num_rows` and `block`
  only); blocks per device = next_pow2(ceil(real blocks / devices)).
  """
  base = layout_lib.pool_layout(num_rows, mesh, block)
  per_device = layout_lib.next_pow2(-(-num_blocks_with_rows(base) // mesh.size))
  return PoolLayout(num_rows, base.rows_per_block, per_device * mesh.size,
                    mesh)


def num_blocks_with_rows(pool_layout: PoolLayout) -> int:
  """Blocks holding at least one real row (the rest are padding)."""
  return max(1, -(-pool_layout.num_rows // pool_layout.rows_per_block))


@functools.partial(jax.jit, static_argnames=("pool_layout",))
def _pad_and_shard(x, *, pool_layout: PoolLayout):
  x = jnp.pad(x, ((0, pool_layout.padded_rows - x.shape[0]), (0, 0)))
  rows = x.reshape(pool_layout.num_blocks, pool_layout.rows_per_block, -1)

  def one_block(block):
    stored = block.astype(jnp.float32)
    return block, jnp.sum(stored * stored, axis=1)

  return jax.shard_map(lambda r: layout_lib.map_blocks(one_block, r),
                       mesh=pool_layout.mesh, in_specs=ROWS,
                       out_specs=(ROWS, ROWS))(rows)


def shard_tree_rows(x, mesh: Mesh | None = None, *,
                    block: int = DEFAULT_BLOCK, name: str = "x"
                    ) -> ShardedRows:
  """Pads and shards `(N, D)` rows in `tree_layout` (rows used as given).

  Raises ValueError / TypeError for a wrong rank or dtype, NaN or inf.
  Cost: one pass over `x` plus the host-to-device copy.
  """
  x = layout_lib.as_feature_array(x, name)
  if not bool(jnp.isfinite(jnp.asarray(x)).all()):
    layout_lib.raise_non_finite(x, name)
  pool_layout = tree_layout(x.shape[0], layout_lib.resolve_mesh(mesh), block)
  rows, sq_norms = _pad_and_shard(jnp.asarray(x), pool_layout=pool_layout)
  return ShardedRows(pool_layout, rows, sq_norms)


def row_mask(mask, pool_layout: PoolLayout, name: str = "mask") -> jax.Array:
  """`(N,)` bool (None: all True) -> blocked and sharded, padding False."""
  if mask is None:
    mask = np.ones(pool_layout.num_rows, np.bool_)
  return layout_lib.shard_mask(np.asarray(mask), pool_layout, name)


def _pairwise(x):
  """Sum over axis 0 as a binary tree (padded with zeros to a power of two)."""
  while x.shape[0] > 1:
    if x.shape[0] % 2:
      x = jnp.concatenate([x, jnp.zeros_like(x[:1])])
    x = x[0::2] + x[1::2]
  return x[0]


def all_reduce_in_order(x):
  """Inside `shard_map` over `ROW_AXES`: the sum over devices of `x`, in the
  binary tree over device indices (padded to a power of two), on every device.

  A reduce-scatter + all-gather with a fixed order: each device sums one
  1/n-th of the elements over all devices. Memory and traffic O(x.size), like
  a ring all-reduce. Bit-identical wherever it runs.
  """
  n = jax.lax.axis_size(AXIS)
  if n == 1:
    return x
  flat = x.reshape(-1)
  per = -(-flat.shape[0] // n)
  parts = jnp.pad(flat, (0, per * n - flat.shape[0])).reshape(n, per)
  parts = jax.lax.all_to_all(parts, AXIS, 0, 0, tiled=True)  # row d: device d
  summed = jax.lax.all_gather(_pairwise(parts), AXIS, tiled=True)
  return summed[:flat.shape[0]].reshape(x.shape)


def tree_sum(fn: Callable[[jax.Array], Any], num_local: int, num_units: int):
  """Inside `shard_map`: the sum over global units of `fn(local index)`.

  Device d owns units `d * num_local + j`, j < `num_local` (a power of two);
  units >= `num_units` are skipped (zeros). The local units are added as the
  aligned subtree they form in the binary tree over all units (a binary
  counter over `scan`, `log2(num_local) + 1` partial sums), then combined
  over devices by `all_reduce_in_order`: the same tree, hence the same bits,
  on any device count. `fn` returns a pytree of arrays; so does this.
  """
  if num_local & (num_local - 1):
    raise ValueError(f"tree_sum needs a power of two of units per device, got "
                     f"{num_local}.")
  first = jax.lax.axis_index(AXIS) * num_local
  levels = num_local.bit_length() - 1
  shapes = jax.eval_shape(fn, jnp.int32(0))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(stack, j):
    # A unit index XLA may not treat as a constant (a one-unit scan on one
    # device would be): the unit's computation must compile the same way on
    # every mesh.
    j = jax.lax.optimization_barrier(j)
    value = jax.lax.cond(first + j < num_units, fn, lambda _: zeros, j)
    active = jnp.bool_(True)
    for level in range(levels + 1):
      bit = (j >> level) & 1 if level < levels else 0
      merge, store = active & (bit == 1), active & (bit == 0)
      left = jax.tree.map(lambda s, level=level: s[level], stack)
      stack = jax.tree.map(
          lambda s, v, level=level: s.at[level].set(
              jnp.where(store, v, s[level])), stack, value)
      value = jax.tree.map(lambda a, b: jnp.where(merge, a + b, b), left,
                           value)
      active = merge
    return stack, None

  stack = jax.tree.map(lambda z: jnp.zeros((levels + 1,) + z.shape, z.dtype),
                       zeros)
  stack, _ = jax.lax.scan(body, stack, jnp.arange(num_local, dtype=jnp.int32))
  return jax.tree.map(lambda s: all_reduce_in_order(s[levels]), stack)


# --------------------------------------------------------------------------
# Exact selections inside shard_map.


def row_offset(rows) -> jax.Array:
  """Global index of this device's first row (rows: local `(bpd, rpb, ...)`)."""
  return (jax.lax.axis_index(AXIS).astype(jnp.int32) * rows.shape[0] *
          rows.shape[1])


def global_argmax(values, offset):
  """(value, global index) of the largest of every device's `values`.

  Ties go to the smallest global index. max/min collectives only: exact.
  """
  flat = values.reshape(-1)
  local = jnp.argmax(flat).astype(jnp.int32)
  best = jax.lax.pmax(flat[local], AXIS)
  index = jax.lax.pmin(jnp.where(flat[local] == best, offset + local,
                                 _INT_MAX), AXIS)
  return best, index


def fetch(local_rows, index, offset):
  """Row `index` (global) of a row-sharded `(bpd, rpb, ...)` array, on every
  device. The owner contributes the row, the others exact zeros."""
  flat = local_rows.reshape((-1,) + local_rows.shape[2:])
  local = index - offset
  owner = (local >= 0) & (local < flat.shape[0])
  row = flat[jnp.clip(local, 0, flat.shape[0] - 1)]
  return jax.lax.psum(jnp.where(owner, row, jnp.zeros_like(row)), AXIS)


def _block_noise(key, offset, num_local: int, rows_per_block: int):
  """Gumbel noise `(bpd, rpb)`, a function of (key, global block) only."""
  first_block = offset // rows_per_block
  return layout_lib.map_blocks(
      lambda b: jax.random.gumbel(jax.random.fold_in(key, b),
                                  (rows_per_block,)),
      first_block + jnp.arange(num_local, dtype=jnp.int32))


def sampling_noise(key, step: int, num_rows: int, rows_per_block: int
                   ) -> np.ndarray:
  """The Gumbel noise k-means++ step `step` adds to row log-weights, `(N,)`.

  For references that redo the sampling outside the kernels (tests).
  """
  blocks = -(-num_rows // rows_per_block)
  noise = [jax.random.gumbel(jax.random.fold_in(jax.random.fold_in(key, step),
                                                b), (rows_per_block,))
           for b in range(blocks)]
  return np.concatenate([np.asarray(n) for n in noise])[:num_rows]


def plusplus_local(k: int, key, eligible, offset, *,
                   sq_distance: Callable[[Any], jax.Array],
                   center_record: Callable[[jax.Array], Any],
                   first_scores=None) -> jax.Array:
  """k-means++ seeding inside `shard_map`, distances given as functions.

  Args:
    k: number of picks (<= eligible rows; the caller checks).
    key: PRNG key, replicated.
    eligible: local `(bpd, rpb)` bool, rows that may be picked.
    offset: `row_offset` of the local rows.
    sq_distance: center record -> local `(bpd, rpb)` squared distances of
      every row to that center.
    center_record: global row index -> the replicated record of that row
      that `sq_distance` takes (e.g. the row itself, via `fetch`).
    first_scores: optional local `(bpd, rpb)`: the first pick is the eligible
      row with the largest score; None: uniform at random.

  Returns:
    `(k,)` int32 global row indices, distinct. Step t draws row i with
    probability d_i^2 / sum d^2 over unpicked eligible rows (uniformly among
    them if every d is 0) via argmax(log d^2 + Gumbel). Cost: k passes of
    `sq_distance` over the local rows.
  """
  num_local, rows_per_block = eligible.shape
  flat_index = offset + jnp.arange(num_local * rows_per_block,
                                   dtype=jnp.int32).reshape(eligible.shape)

  def draw(step, log_weights, open_rows):
    fallback = jnp.where(open_rows, 0., -jnp.inf)
    none_left = jax.lax.pmax(jnp.max(log_weights), AXIS) == -jnp.inf
    log_weights = jnp.where(none_left, fallback, log_weights)
    noise = _block_noise(jax.random.fold_in(key, step), offset, num_local,
                         rows_per_block)
    return global_argmax(jnp.where(open_rows, log_weights + noise, -jnp.inf),
                         offset)[1]

  if first_scores is None:
    first = draw(0, jnp.where(eligible, 0., -jnp.inf), eligible)
  else:
    first = global_argmax(jnp.where(eligible, first_scores, -jnp.inf),
                          offset)[1]

  def add(index, state):
    picks, count, dist, open_rows = state
    dist = jnp.minimum(dist, sq_distance(center_record(index)))
    open_rows = open_rows & (flat_index != index)
    return picks.at[count].set(index), count + 1, dist, open_rows

  state = add(first, (jnp.zeros((k,), jnp.int32), 0,
                      jnp.full(eligible.shape, jnp.inf), eligible))

  def step(t, state):
    _, _, dist, open_rows = state
    d2 = jnp.maximum(dist, 0.)
    log_weights = jnp.where(open_rows & (d2 > 0), jnp.log(d2), -jnp.inf)
    return add(draw(t, log_weights, open_rows), state)

  picks, *_ = jax.lax.fori_loop(1, k, step, state)
  return picks


# --------------------------------------------------------------------------
# Explicit rows: k-means++ and Lloyd.


def _sq_distance_rows(rows, sq_norms, center):
  """Local `(bpd, rpb)` ||x - c||^2 of rows to one center (c, ||c||^2)."""
  c, c_sq = center
  return layout_lib.map_blocks(
      lambda x, x_sq: jnp.maximum(
          x_sq + c_sq - 2. * jnp.einsum("rd,d->r", x, c.astype(x.dtype),
                                        preferred_element_type=jnp.float32),
          0.), rows, sq_norms)


@functools.partial(jax.jit, static_argnames=("mesh", "k"))
def _plusplus_kernel(rows, sq_norms, eligible, key, *, mesh, k):
  def local(rows, sq_norms, eligible, key):
    offset = row_offset(rows)
    record = lambda i: (fetch(rows, i, offset).astype(jnp.float32),
                        fetch(sq_norms, i, offset))
    return plusplus_local(
        k, key, eligible, offset,
        sq_distance=functools.partial(_sq_distance_rows, rows, sq_norms),
        center_record=record)

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(ROWS, ROWS, ROWS, REPLICATED),
                       out_specs=REPLICATED, check_vma=False)(
                           rows, sq_norms, eligible, key)


def _check_k(k, available: int, what: str = "k") -> int:
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise ValueError(f"{what} must be a positive integer, got {k!r}.")
  if k > available:
    raise ValueError(f"{what}={k} is larger than the {available} rows to "
                     f"choose from.")
  return int(k)


def kmeans_plusplus_sharded(pool: ShardedRows, k: int, *, seed: int,
                            eligible=None) -> np.ndarray:
  """k-means++ seeding (D^2 sampling) of `k` rows of a pool in `tree_layout`.

  Args:
    pool: from `shard_tree_rows` (any `ShardedRows` works: no sums here).
    k: number of seeds, at most the eligible rows.
    seed: the draw; same seed, same picks, on any mesh.
    eligible: optional `(N,)` bool, rows that may be picked.

  Returns:
    `(k,)` int64 distinct row indices in pick order. Cost: k passes over the
    pool, `O(k N D)` flops.
  """
  mask = row_mask(eligible, pool.layout, "eligible")
  available = (pool.layout.num_rows if eligible is None
               else int(np.asarray(eligible).sum()))
  k = _check_k(k, available)
  picks = _plusplus_kernel(pool.rows, pool.sq_norms, mask,
                           jax.random.PRNGKey(seed), mesh=pool.layout.mesh,
                           k=k)
  return np.asarray(picks, np.int64)


def kmeans_plusplus(x, k: int, *, seed: int = 0, eligible=None,
                    mesh: Mesh | None = None,
                    block: int = DEFAULT_BLOCK) -> np.ndarray:
  """k-means++ seeding of `k` rows of `(N, D)` `x`: `(k,)` distinct indices.

  See `kmeans_plusplus_sharded`. Cost: `O(k N D)` flops, k passes over x.
  """
  return kmeans_plusplus_sharded(shard_tree_rows(x, mesh, block=block), k,
                                 seed=seed, eligible=eligible)


@dataclasses.dataclass(frozen=True)
class KMeansResult:
  """centroids `(C, D)` float32, labels `(N,)` int64 (-1 for rows left out),
  inertia (sum of squared distances to the nearest centroid), iterations."""
  centroids: np.ndarray
  labels: np.ndarray
  inertia: float
  iterations: int


def _assign(x, centroids):
  """Nearest centroid of each row of a block (ties: smaller index) and
  ||c||^2 - 2<x, c> for it."""
  c_sq = jnp.sum(centroids * centroids, axis=1)
  score = c_sq[None, :] - 2. * jnp.einsum(
      "rd,cd->rc", x, centroids.astype(x.dtype),
      preferred_element_type=jnp.float32)
  labels = jnp.argmin(score, axis=1)
  return labels, jnp.take_along_axis(score, labels[:, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("mesh", "num_units",
                                             "max_iters"))
def _lloyd_kernel(rows, sq_norms, valid, centroids, tol, *, mesh, num_units,
                  max_iters):
  num_clusters = centroids.shape[0]

  def local(rows, sq_norms, valid, centroids, tol):
    def stats(c, j):
      labels, score = _assign(rows[j], c)
      ok = valid[j]
      one_hot = ((labels[:, None] == jnp.arange(num_clusters)[None, :])
                 & ok[:, None]).astype(jnp.float32)
      sums = jnp.einsum("rc,rd->cd", one_hot, rows[j].astype(jnp.float32))
      inertia = jnp.sum(jnp.where(ok, jnp.maximum(sq_norms[j] + score, 0.),
                                  0.))
      return sums, one_hot.sum(axis=0), inertia

    def update(state):
      c, it, _ = state
      sums, counts, _ = tree_sum(functools.partial(stats, c), rows.shape[0],
                                 num_units)
      # Multiplies by 1 / count: a division by a broadcast may compile
      # differently on different meshes (see cold_start).
      new = jnp.where(counts[:, None] > 0,
                      sums * jnp.reciprocal(jnp.maximum(counts, 1.))[:, None],
                      c)
      return new, it + 1, jnp.sum((new - c) ** 2)

    c, iters, _ = jax.lax.while_loop(
        lambda s: (s[1] < max_iters) & (s[2] > tol), update,
        (centroids, jnp.int32(0), jnp.float32(jnp.inf)))
    labels = layout_lib.map_blocks(lambda x: _assign(x, c)[0], rows)
    _, _, inertia = tree_sum(functools.partial(stats, c), rows.shape[0],
                             num_units)
    return c, labels.astype(jnp.int32), inertia, iters

  return jax.shard_map(
      local, mesh=mesh, in_specs=(ROWS, ROWS, ROWS, REPLICATED, REPLICATED),
      out_specs=(REPLICATED, ROWS, REPLICATED, REPLICATED), check_vma=False)(
          rows, sq_norms, valid, centroids, tol)


def kmeans_sharded(pool: ShardedRows, init, *, valid=None,
                   max_iters: int = 100, tol: float = 0.) -> KMeansResult:
  """Lloyd's K-means from `init` centroids on a pool in `tree_layout`.

  Args:
    pool: from `shard_tree_rows`.
    init: `(C, D)` initial centroids.
    valid: optional `(N,)` bool: rows that take part (others get label -1).
    max_iters: most Lloyd steps.
    tol: stop once sum ||c_new - c||^2 <= tol (0: once no centroid moves,
      i.e. the assignments are stable: scikit-learn's strict convergence).

  Returns:
    `KMeansResult`. A cluster that empties keeps its centroid (scikit-learn
    instead moves it to a far point). Ties go to the smaller centroid index.
    Cost per step: `2 N C D` flops for the distances and `2 N C D` for the
    cluster sums (a one-hot product, deterministic where scatter-adds are
    not); memory `O(rows_per_block * C)` per tile.
  """
  init = np.asarray(init, np.float32)
  if init.ndim != 2 or init.shape[1] != pool.dim or init.shape[0] < 1:
    raise ValueError(f"init must be (C, {pool.dim}) centroids, got "
                     f"{init.shape}.")
  if not np.isfinite(init).all():
    raise ValueError("init centroids hold NaN or inf.")
  if not isinstance(max_iters, (int, np.integer)) or max_iters < 1:
    raise ValueError(f"max_iters must be a positive integer, got "
                     f"{max_iters!r}.")
  mesh = pool.layout.mesh
  mask = row_mask(valid, pool.layout, "valid")
  c, labels, inertia, iters = _lloyd_kernel(
      pool.rows, pool.sq_norms, mask,
      jax.device_put(init, sharding.replicated(mesh)), jnp.float32(tol),
      mesh=mesh, num_units=num_blocks_with_rows(pool.layout),
      max_iters=int(max_iters))
  labels = np.asarray(labels).reshape(-1)[:pool.layout.num_rows].astype(
      np.int64)
  if valid is not None:
    labels = np.where(np.asarray(valid), labels, -1)
  return KMeansResult(np.asarray(c), labels, float(inertia), int(iters))


def kmeans(x, num_clusters: int, *, seed: int = 0, init=None, valid=None,
           max_iters: int = 100, tol: float = 0., mesh: Mesh | None = None,
           block: int = DEFAULT_BLOCK) -> KMeansResult:
  """K-means of `(N, D)` rows `x` into `num_clusters` clusters, sharded.

  Initialised with `init` `(C, D)` centroids if given, else k-means++
  seeding with `seed` (`kmeans_plusplus_sharded`). Rows are used as given.
  See `kmeans_sharded` for the rest. Cost: `O(C N D)` flops for the seeding
  and per Lloyd step; identical results on any device count.
  """
  pool = shard_tree_rows(x, mesh, block=block)
  if init is None:
    available = (pool.layout.num_rows if valid is None
                 else int(np.asarray(valid).sum()))
    num_clusters = _check_k(num_clusters, available, "num_clusters")
    picks = kmeans_plusplus_sharded(pool, num_clusters, seed=seed,
                                    eligible=valid)
    init = np.asarray(x, np.float32)[picks]
  elif np.shape(init)[0] != num_clusters:
    raise ValueError(f"init has {np.shape(init)[0]} centroids, "
                     f"num_clusters={num_clusters}.")
  return kmeans_sharded(pool, init, valid=valid, max_iters=max_iters, tol=tol)
