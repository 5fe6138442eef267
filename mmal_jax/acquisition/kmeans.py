"""K-means (Lloyd) and k-means++ over a laid-out pool, the same on any mesh.

Pools are `layout.ShardedRows` (rows as given, or L2-normalised through the
per-row scale), whose blocks are a power of two on every device. Sums over
rows (cluster sums and counts, inertia, any gradient summed over samples) are
added in one fixed binary tree over the global block index (`tree_sum`):
each device adds its blocks as the aligned subtree they form, and the
devices' partial sums are combined by the top of the same tree
(`all_reduce_in_order`). Blocks past the real rows, skipped with `lax.cond`,
contribute exact zeros, so the tree over 1 device's blocks and over 8
devices' blocks is the same tree: results are bit-identical on any device
count and mesh shape (float addition is commutative, not associative: the
order is what must not change). Selections (k-means++ picks) are the exact
max/min collectives of `kernels`.

Memory: a Lloyd step holds one `(rows_per_block, C)` distance tile and
`log2(blocks per device) + 1` partial `(C, D)` sums per device. No `(N, N)`
or `(N, C)` array exists.

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
from mmal_jax.acquisition import kernels
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition.layout import DEFAULT_BLOCK, PoolLayout, ShardedRows

AXIS = sharding.ROW_AXES
ROWS = P(AXIS)
REPLICATED = P()


def check_pick_count(k, available: int, name: str = "k",
                     of: str = "rows to choose from") -> int:
  """`k` as an int if it is a whole number in [1, available]."""
  k = layout_lib.check_count(k, name, 1)
  if k > available:
    raise ValueError(f"{name}={k} is larger than the {available} {of}.")
  return k


def eligible_mask(mask, pool_layout: PoolLayout, name: str = "eligible"):
  """`(N,)` bool (None: every row) -> blocked and sharded, padding False;
  and how many rows it holds."""
  mask = (np.ones(pool_layout.num_rows, np.bool_) if mask is None
          else kernels.check_mask(mask, pool_layout.num_rows, name))
  return layout_lib.shard_mask(mask, pool_layout, name), int(mask.sum())


def num_units(num_rows, rows_per_block: int):
  """Blocks holding real rows (a traced count): the units of `tree_sum`."""
  return (num_rows + rows_per_block - 1) // rows_per_block


# --------------------------------------------------------------------------
# Ordered sums.


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
  units >= `num_units` (may be traced) are skipped (zeros). The local units
  are added as the aligned subtree they form in the binary tree over all
  units (a binary counter over `scan`, `log2(num_local) + 1` partial sums),
  then combined over devices by `all_reduce_in_order`: the same tree, hence
  the same bits, on any device count. `fn` returns a pytree of arrays; so
  does this.
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
# k-means++ seeding.


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
    offset: global index of the first local row
      (`layout.first_global_row`).
    sq_distance: center record -> local `(bpd, rpb)` squared distances of
      every row to that center.
    center_record: global row index -> the replicated record of that row
      that `sq_distance` takes (e.g. the row itself, `kernels.fetch_rows`).
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
    return kernels.global_argmax(
        jnp.where(open_rows, log_weights + noise, -jnp.inf), offset)[1]

  if first_scores is None:
    first = draw(0, jnp.where(eligible, 0., -jnp.inf), eligible)
  else:
    first = kernels.global_argmax(
        jnp.where(eligible, first_scores, -jnp.inf), offset)[1]

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


def _scaled_dots(x, x_scale, c):
  """<scaled row, c> for a block `(rpb, D)` (storage dtype) and c `(..., D)`
  float32; products in the storage dtype, accumulated in float32."""
  dots = kernels.dot("rd,...d->r...", x, c.astype(x.dtype))
  return dots * x_scale.reshape(x_scale.shape + (1,) * (dots.ndim - 1))


def _sq_distances(blocks, scale, sq_norms, num_real, center):
  """Local `(bpd, rpb)` ||x - c||^2 of the rows to one center (c, ||c||^2);
  0 on blocks past the real rows."""
  c, c_sq = center
  return kernels.over_real_blocks(
      lambda x, s, x_sq: jnp.maximum(
          x_sq + c_sq - 2. * _scaled_dots(x, s, c), 0.),
      num_real, 0., blocks, scale, sq_norms)


@functools.partial(jax.jit, static_argnames=("shape", "k"))
def _plusplus_kernel(rows, scale, sq_norms, num_rows, eligible, key, *,
                     shape: PoolLayout, k: int):
  def local(rows, scale, sq_norms, num_rows, eligible, key):
    offset = layout_lib.first_global_row(rows.shape[0])
    blocks = layout_lib.local_blocks(rows, shape.rows_per_block)
    num_real = kernels.num_local_blocks(num_rows, shape)
    return plusplus_local(
        k, key, eligible, offset,
        sq_distance=functools.partial(_sq_distances, blocks, scale, sq_norms,
                                      num_real),
        center_record=lambda i: kernels.fetch_rows(rows, scale, sq_norms, i,
                                                   offset))

  return jax.shard_map(
      local, mesh=shape.mesh,
      in_specs=(ROWS, ROWS, ROWS, REPLICATED, ROWS, REPLICATED),
      out_specs=REPLICATED, check_vma=False)(
          rows, scale, sq_norms, num_rows, eligible, key)


def kmeans_plusplus_sharded(pool: ShardedRows, k: int, *, seed: int,
                            eligible=None) -> np.ndarray:
  """k-means++ seeding (D^2 sampling) of `k` rows of a laid-out pool.

  Args:
    pool: from `layout.shard_rows` (distances between scaled rows).
    k: number of seeds, at most the eligible rows.
    seed: the draw; same seed, same picks, on any mesh.
    eligible: optional `(N,)` bool, rows that may be picked.

  Returns:
    `(k,)` int64 distinct row indices in pick order. Compiled once per pool
    size bucket and k. Cost: k passes over the pool, `2 k N D` flops.
  """
  mask, available = eligible_mask(eligible, pool.layout)
  k = check_pick_count(k, available)
  picks = _plusplus_kernel(pool.rows, pool.scale, pool.sq_norms,
                           pool.num_rows, mask, jax.random.PRNGKey(seed),
                           shape=pool.layout.shape, k=k)
  return np.asarray(picks, np.int64)


def kmeans_plusplus(x, k: int, *, seed: int = 0, eligible=None,
                    mesh: Mesh | None = None,
                    block: int = DEFAULT_BLOCK) -> np.ndarray:
  """k-means++ seeding of `k` rows of `(N, D)` `x`: `(k,)` distinct indices.

  See `kmeans_plusplus_sharded`. Cost: `O(k N D)` flops, k passes over x.
  """
  return kmeans_plusplus_sharded(layout_lib.shard_rows(x, mesh, block=block),
                                 k, seed=seed, eligible=eligible)


# --------------------------------------------------------------------------
# Lloyd.


@dataclasses.dataclass(frozen=True)
class KMeansResult:
  """centroids `(C, D)` float32, labels `(N,)` int64 (-1 for rows left out),
  inertia (sum of squared distances to the nearest centroid), iterations."""
  centroids: np.ndarray
  labels: np.ndarray
  inertia: float
  iterations: int


def _assign(x, x_scale, centroids):
  """Nearest centroid of each row of a block (ties: smaller index) and
  ||c||^2 - 2<x, c> for it."""
  c_sq = jnp.sum(centroids * centroids, axis=1)
  score = c_sq[None, :] - 2. * _scaled_dots(x, x_scale, centroids)
  labels = jnp.argmin(score, axis=1)
  return labels, jnp.take_along_axis(score, labels[:, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("shape", "max_iters"))
def _lloyd_kernel(rows, scale, sq_norms, num_rows, valid, centroids, tol, *,
                  shape: PoolLayout, max_iters: int):
  num_clusters = centroids.shape[0]

  def local(rows, scale, sq_norms, num_rows, valid, centroids, tol):
    blocks = layout_lib.local_blocks(rows, shape.rows_per_block)
    units = num_units(num_rows, shape.rows_per_block)

    def stats(c, j):
      x, x_scale = blocks[j], scale[j]
      labels, score = _assign(x, x_scale, c)
      ok = valid[j]
      one_hot = ((labels[:, None] == jnp.arange(num_clusters)[None, :])
                 & ok[:, None]).astype(jnp.float32)
      sums = kernels.dot("rc,rd->cd", one_hot,
                         x.astype(jnp.float32) * x_scale[:, None])
      inertia = jnp.sum(jnp.where(ok, jnp.maximum(sq_norms[j] + score, 0.),
                                  0.))
      return sums, one_hot.sum(axis=0), inertia

    def update(state):
      c, it, _ = state
      sums, counts, _ = tree_sum(functools.partial(stats, c), blocks.shape[0],
                                 units)
      # Multiplies by 1 / count: a division by a broadcast may compile
      # differently on different meshes (see cold_start).
      new = jnp.where(counts[:, None] > 0,
                      sums * jnp.reciprocal(jnp.maximum(counts, 1.))[:, None],
                      c)
      return new, it + 1, jnp.sum((new - c) ** 2)

    c, iters, _ = jax.lax.while_loop(
        lambda s: (s[1] < max_iters) & (s[2] > tol), update,
        (centroids, jnp.int32(0), jnp.float32(jnp.inf)))
    labels = layout_lib.map_blocks(lambda x, s: _assign(x, s, c)[0], blocks,
                                   scale)
    _, _, inertia = tree_sum(functools.partial(stats, c), blocks.shape[0],
                             units)
    return c, labels.astype(jnp.int32), inertia, iters

  return jax.shard_map(
      local, mesh=shape.mesh,
      in_specs=(ROWS, ROWS, ROWS, REPLICATED, ROWS, REPLICATED, REPLICATED),
      out_specs=(REPLICATED, ROWS, REPLICATED, REPLICATED), check_vma=False)(
          rows, scale, sq_norms, num_rows, valid, centroids, tol)


def kmeans_sharded(pool: ShardedRows, init, *, valid=None,
                   max_iters: int = 100, tol: float = 0.) -> KMeansResult:
  """Lloyd's K-means from `init` centroids on a laid-out pool.

  Args:
    pool: from `layout.shard_rows` (clusters of the scaled rows).
    init: `(C, D)` initial centroids.
    valid: optional `(N,)` bool: rows that take part (others get label -1).
    max_iters: most Lloyd steps.
    tol: stop once sum ||c_new - c||^2 <= tol (0: once no centroid moves,
      i.e. the assignments are stable: scikit-learn's strict convergence).

  Returns:
    `KMeansResult`. A cluster that empties keeps its centroid (scikit-learn
    instead moves it to a far point). Ties go to the smaller centroid index.
    Compiled once per pool size bucket and C. Cost per step: `2 N C D` flops
    for the distances and `2 N C D` for the cluster sums (a one-hot product,
    deterministic where scatter-adds are not); memory
    `O(rows_per_block * C)` per tile.
  """
  init = np.asarray(init, np.float32)
  if init.ndim != 2 or init.shape[1] != pool.dim or init.shape[0] < 1:
    raise ValueError(f"init must be (C, {pool.dim}) centroids, got "
                     f"{init.shape}.")
  if not np.isfinite(init).all():
    raise ValueError("init centroids hold NaN or inf.")
  max_iters = layout_lib.check_count(max_iters, "max_iters", 1)
  mesh = pool.layout.mesh
  mask, _ = eligible_mask(valid, pool.layout, "valid")
  c, labels, inertia, iters = _lloyd_kernel(
      pool.rows, pool.scale, pool.sq_norms, pool.num_rows, mask,
      sharding.put_global(init, sharding.replicated(mesh)),
      sharding.put_global(np.float32(tol), sharding.replicated(mesh)),
      shape=pool.layout.shape, max_iters=max_iters)
  labels = kernels.to_host(labels, pool.layout).astype(np.int64)
  if valid is not None:
    labels = np.where(np.asarray(valid), labels, -1)
  return KMeansResult(np.asarray(c), labels, float(inertia), int(iters))


def kmeans(x, num_clusters: int, *, seed: int = 0, init=None, valid=None,
           max_iters: int = 100, tol: float = 0., mesh: Mesh | None = None,
           block: int = DEFAULT_BLOCK) -> KMeansResult:
  """K-means of `(N, D)` rows `x` into `num_clusters` clusters, sharded.

  Initialised with `init` `(C, D)` centroids if given, else k-means++
  seeding with `seed` (`kmeans_plusplus_sharded`). Rows are used as given
  (`x` as `layout.shard_rows` takes it). See `kmeans_sharded` for the rest.
  Cost: `O(C N D)` flops for the seeding and per Lloyd step; identical
  results on any device count.
  """
  pool = layout_lib.shard_rows(x, mesh, block=block)
  if init is None:
    _, available = eligible_mask(valid, pool.layout, "valid")
    num_clusters = check_pick_count(num_clusters, available, "num_clusters")
    picks = kmeans_plusplus_sharded(pool, num_clusters, seed=seed,
                                    eligible=valid)
    init = np.asarray(kernels.gather_rows(pool, picks).values)[:num_clusters]
  elif np.shape(init)[0] != num_clusters:
    raise ValueError(f"init has {np.shape(init)[0]} centroids, "
                     f"num_clusters={num_clusters}.")
  return kmeans_sharded(pool, init, valid=valid, max_iters=max_iters, tol=tol)
