"""Sharded acquisition kernels: nearest-center distances, greedy k-center, top-2 margins.

Each kernel runs under `shard_map` over the 2-D mesh of `mmal_jax.sharding`,
pool rows split over every device (see `layout`). Small operands (centers,
queries) are replicated, and every pairwise quantity is computed one
`(rows_per_block, chunk)` tile at a time, so no `(N, N)` or `(Q, N)` array
ever exists. Each tile is one matrix product followed by max/min reductions
that XLA fuses with it (no per-tile argmax: it runs at a third of the rate of
the product on CPU); cross-device steps are max / min / selections, and sums in
which every device but one adds exact zeros, so results are bit-identical on
any number of devices and any mesh shape.

Shapes are bucketed (see `layout`): pool blocks, center chunks, query chunks
and pick buffers are powers of two, and the real counts (`N`, `C`, `Q`, `k`)
are traced scalars bounding the loops, so a new size within a power-of-two
bucket reuses the compiled kernels and padding costs no compute.

Distances (`metric`):
  euclidean: ||x - c||, via ||x||^2 + ||c||^2 - 2<x, c> on the matrix units,
    then recomputed exactly for the nearest center;
  cosine: 1 - <x, c> / (||x|| ||c||), sklearn's `cosine_distances`.
Features may be stored in float32, bfloat16 or float16 (the products' operand
dtype); products accumulate in float32 (see `dot`). Float32 pools compute at
float32 accuracy on every backend, so their picks are the same on CPU, GPU and
TPU; bfloat16/float16 pools are their own, faster mode.

The public functions here take plain `(N, D)` arrays and return numpy arrays;
the `*_sharded` forms take already laid-out `ShardedRows` so that strategies
lay a pool out once per round.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from mmal_jax import sharding
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition import pallas_kernels
from mmal_jax.acquisition import tile_math
from mmal_jax.acquisition.layout import DEFAULT_BLOCK, PoolLayout, ShardedRows

METRICS = ("euclidean", "cosine")
_AXIS = sharding.ROW_AXES
_ROWS = P(_AXIS)
_REPLICATED = P()
_INT_MAX = np.iinfo(np.int32).max


def check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise ValueError(f"Unknown metric {metric!r}; expected one of {METRICS}.")
  return metric


def dot(subscripts: str, a, b) -> jax.Array:
  """`jnp.einsum(subscripts, a, b)` for the acquisition kernels: float32
  result, precision from the operands' dtype (`tile_math.product_precision`).
  Same shapes and flops as the einsum."""
  return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32,
                    precision=tile_math.product_precision(
                        jnp.result_type(a, b)))


def _distances(dots, x_sq, c_sq, metric):
  """Distances from inner products of (scaled) vectors, broadcasting norms."""
  if metric == "cosine":
    return 1.0 - dots
  return jnp.sqrt(jnp.maximum(x_sq + c_sq - 2.0 * dots, 0.0))


def _shard_map(fn, mesh, in_specs, out_specs):
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


def _platform(shape: PoolLayout) -> str:
  """The platform of the devices a layout's mesh holds ("cpu", "gpu", ...)."""
  return shape.mesh.devices.flat[0].platform


def num_local_blocks(num_rows, shape: PoolLayout):
  """How many of this device's blocks hold real rows (inside shard_map)."""
  first_block = (jax.lax.axis_index(_AXIS).astype(jnp.int32) *
                 shape.blocks_per_device)
  real_blocks = (num_rows + shape.rows_per_block - 1) // shape.rows_per_block
  return jnp.clip(real_blocks - first_block, 0, shape.blocks_per_device)


def over_real_blocks(fn, num_real, fill, *blocked):
  """Stacks fn(block...) over the first `num_real` local blocks; `fill` after.

  The blocks past the real rows (size bucketing) cost nothing.
  """
  out = jnp.full(blocked[0].shape[:2], fill, jnp.float32)

  def body(b, out):
    args = [jax.lax.dynamic_index_in_dim(x, b, keepdims=False)
            for x in blocked]
    return jax.lax.dynamic_update_index_in_dim(out, fn(*args), b, 0)

  return jax.lax.fori_loop(0, num_real, body, out)


# --------------------------------------------------------------------------
# Small replicated operands (centers, queries).


@dataclasses.dataclass(frozen=True)
class Operand:
  """A small `(n, D)` operand, padded to a power-of-two bucket and replicated.

  Attributes:
    values: `(chunk * num_chunks, D)` float32 (already scaled), zero past n.
    count: replicated int32 scalar n (traced by the kernels).
    size: n on the host.
    chunk: rows per tile.
  """
  values: jax.Array
  count: jax.Array
  size: int
  chunk: int


def host_operand(x, pool: ShardedRows, *, block: int | str, name: str,
                 pool_has: str, normalize: bool) -> Operand:
  """A user's `(n, D)` array as an `Operand` for kernels over `pool`.

  Checks the dimension and finite values; normalises rows when asked.
  Cost: one host pass over `x`.
  """
  x = layout_lib.as_feature_array(x, name)
  if x.shape[1] != pool.dim:
    raise ValueError(f"{name} have dimension {x.shape[1]}, {pool_has} "
                     f"{pool.dim}.")
  x = np.asarray(x, np.float32)
  block = pool_block(block, pool)
  bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
  if bad.size:
    raise ValueError(f"{name} has NaN or inf values in {bad.size} row(s), "
                     f"first at row {bad[0]}.")
  if normalize:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True),
                       np.float32(1e-12))
  n = x.shape[0]
  chunk, num_chunks = layout_lib.pow2_capacity(n, block)
  padded = np.zeros((chunk * num_chunks, x.shape[1]), np.float32)
  padded[:n] = x
  replicated = sharding.replicated(pool.layout.mesh)
  return Operand(sharding.put_global(padded, replicated),
                 sharding.put_global(np.int32(n), replicated), n, chunk)


def pool_block(block, pool: ShardedRows) -> int:
  """The tile edge for operands of `pool`: `block`, or for "auto" the one
  `layout.device_tiling` chose for the pool."""
  return layout_lib.resolve_block(block, pool.layout.mesh,
                                  pool.layout.num_rows, pool.dim,
                                  pool.rows.dtype)


def gather_rows(pool: ShardedRows, indices, *,
                block: int | str = DEFAULT_BLOCK) -> Operand:
  """Rows `indices` of a laid-out pool (scaled), as an `Operand`."""
  indices = np.asarray(indices, np.int64).reshape(-1)
  n = indices.size
  block = pool_block(block, pool)
  chunk, num_chunks = layout_lib.pow2_capacity(n, block)
  padded = np.zeros(chunk * num_chunks, np.int32)
  padded[:n] = indices
  replicated = sharding.replicated(pool.layout.mesh)
  count = sharding.put_global(np.int32(n), replicated)
  values = _gather(pool.rows, pool.scale, sharding.put_global(padded,
                                                              replicated),
                   count, shape=pool.layout.shape)
  return Operand(values, count, n, chunk)


@functools.partial(jax.jit, static_argnames=("shape",))
def _gather(rows, scale, indices, count, *, shape: PoolLayout):
  taken = rows[indices].astype(jnp.float32) * scale.reshape(-1)[indices, None]
  taken = jnp.where((jnp.arange(indices.shape[0]) < count)[:, None], taken, 0.)
  return jax.lax.with_sharding_constraint(taken,
                                          sharding.replicated(shape.mesh))


def to_host(blocked: jax.Array, pool_layout: PoolLayout) -> np.ndarray:
  """`(num_blocks, rows_per_block)` sharded -> the first `num_rows` on the host."""
  full = _replicate(blocked, shape=pool_layout.shape)
  return np.asarray(full).reshape(-1)[:pool_layout.num_rows]


@functools.partial(jax.jit, static_argnames=("shape",))
def _replicate(blocked, *, shape: PoolLayout):
  return jax.lax.with_sharding_constraint(blocked,
                                          sharding.replicated(shape.mesh))


# --------------------------------------------------------------------------
# Nearest-center distances.


@functools.partial(jax.jit,
                   static_argnames=("shape", "metric", "center_chunk", "impl"))
def _min_distance_kernel(rows, scale, num_rows, centers, num_centers, *,
                         shape, metric, center_chunk, impl="xla"):
  """(blocks, rb) distance of every row to its nearest center (+inf if none)."""
  dim = rows.shape[-1]
  dtype = rows.dtype
  c_sq = dot("cd,cd->c", centers, centers)
  valid = jnp.arange(centers.shape[0]) < num_centers
  # The tile's score is a * <x, c> - bias, largest for the nearest center:
  # 2<x^, c> - ||c||^2 (euclidean) or <x, c> (cosine); -inf when invalid.
  bias = jnp.where(valid, c_sq if metric == "euclidean" else 0., jnp.inf)
  num_chunks = (num_centers + center_chunk - 1) // center_chunk
  chunks = (centers.astype(dtype).reshape(-1, center_chunk, dim),
            bias.reshape(-1, center_chunk))

  def finish(centers, x, x_scale, best, best_idx):
    """A block's distances from its best scores and their centers."""
    if metric == "euclidean":
      # ||x||^2 + ||c||^2 - 2<x,c> cancels badly for close pairs: recompute
      # the distance to the chosen center directly (exact 0 for duplicates).
      diff = x.astype(jnp.float32) * x_scale[:, None] - centers[best_idx]
      dist = jnp.sqrt(jnp.sum(diff * diff, axis=1))
    else:
      dist = 1. - x_scale * best
    return jnp.where(best > -jnp.inf, dist, jnp.inf)

  def local_pallas(rows, scale, num_rows, centers, chunks):
    factor = (2. * scale if metric == "euclidean" else jnp.ones_like(scale))
    centers_flat = chunks[0].reshape(-1, dim)
    best, best_idx = pallas_kernels.nearest(
        rows, factor.reshape(-1), centers_flat, chunks[1].reshape(-1),
        **pallas_kernels.plan(_platform(shape), rows.shape[0],
                              centers_flat.shape[0], dim,
                              shape.rows_per_block, center_chunk))
    blocks = layout_lib.local_blocks(rows, shape.rows_per_block)
    return over_real_blocks(functools.partial(finish, centers),
                            num_local_blocks(num_rows, shape),
                            jnp.inf, blocks, scale,
                            best.reshape(scale.shape),
                            best_idx.reshape(scale.shape))

  def local(rows, scale, num_rows, centers, chunks):
    def one_block(x, x_scale):
      factor = (2. * x_scale if metric == "euclidean"
                else jnp.ones_like(x_scale))[:, None]

      def one_chunk(j, carry):
        best, best_idx = carry
        c, c_bias = (jax.lax.dynamic_index_in_dim(a, j, keepdims=False)
                     for a in chunks)
        dots = dot("rd,cd->rc", x, c)
        score = factor * dots - c_bias[None, :]
        top = jnp.max(score, axis=1)
        idx = jnp.min(jnp.where(score == top[:, None],
                                jnp.arange(center_chunk, dtype=jnp.int32),
                                _INT_MAX), axis=1)
        better = top > best  # Strict: the earlier center wins ties.
        return (jnp.where(better, top, best),
                jnp.where(better, idx + j * center_chunk, best_idx))

      best, best_idx = jax.lax.fori_loop(
          0, num_chunks, one_chunk,
          (jnp.full(x.shape[:1], -jnp.inf, jnp.float32),
           jnp.zeros(x.shape[:1], jnp.int32)))
      return finish(centers, x, x_scale, best, best_idx)

    blocks = layout_lib.local_blocks(rows, shape.rows_per_block)
    return over_real_blocks(one_block, num_local_blocks(num_rows, shape),
                             jnp.inf, blocks, scale)

  return _shard_map(local if impl == "xla" else local_pallas, shape.mesh,
                    (_ROWS, _ROWS, _REPLICATED, _REPLICATED, _REPLICATED),
                    _ROWS)(rows, scale, num_rows, centers, chunks)


def min_distance_sharded(pool: ShardedRows, centers: Operand, *,
                         metric: str = "euclidean", impl: str = "xla"
                         ) -> jax.Array:
  """Distance of each pool row to its nearest center, in the pool's layout.

  Args:
    pool: the laid-out pool, `N` rows.
    centers: the centers (`host_operand` / `gather_rows`), C may be 0; scaled
      like the pool (normalised for a normalised pool).
    metric: "euclidean" or "cosine".
    impl: "xla" (every backend), or "pallas": `pallas_kernels.nearest`, the
      reduction fused into the product's epilogue, in the backend's form
      (`pallas_kernels.plan`; interpreted on CPU; not yet timed on a
      GPU/TPU), over every local block, padding included.

  Returns:
    `(num_blocks, rows_per_block)` float32, sharded like the pool; +inf where
    no center exists and on padding rows. Cost: `2 N C D` flops, one pass
    over the pool per chunk of centers; tiles `rows_per_block x chunk`.
  """
  check_metric(metric)
  return _min_distance_kernel(
      pool.rows, pool.scale, pool.num_rows, centers.values, centers.count,
      shape=pool.layout.shape, metric=metric,
      center_chunk=centers.chunk, impl=check_impl(impl))


def min_distance(x, centers, *, metric: str = "euclidean",
                 mesh: Mesh | None = None,
                 block: int | str = DEFAULT_BLOCK,
                 impl: str = "xla") -> np.ndarray:
  """Distance of each row of `x` to its nearest row of `centers`.

  Args:
    x: `(N, D)` floating array (numpy, or jax; see `layout.shard_rows`).
    centers: `(C, D)` floating array; C may be 0.
    metric: "euclidean" (||x - c||) or "cosine" (sklearn's
      `cosine_distances`: rows are normalised first).
    mesh: the device mesh (default: all devices); rows of `x` are split over it.
    block: tile edge; no more than `block x block` distances exist at once;
      "auto" (default): `layout.auto_tiling`'s for the backend and memory.
    impl: "xla" or "pallas" (see `min_distance_sharded`).

  Returns:
    `(N,)` float32 numpy, +inf everywhere if `centers` is empty. Cost:
    `2 N C D` flops, memory `O((N + C) D / devices + block^2)`.
  """
  check_metric(metric)
  cosine = metric == "cosine"
  pool = layout_lib.shard_rows(x, mesh, block=block, normalize=cosine)
  centers = host_operand(centers, pool, block=block, name="centers",
                         pool_has="the pool has", normalize=cosine)
  return to_host(min_distance_sharded(pool, centers, metric=metric, impl=impl),
                 pool.layout)


def covering_radius(x, centers, *, metric: str = "euclidean",
                    mesh: Mesh | None = None,
                    block: int | str = DEFAULT_BLOCK) -> float:
  """max_i min_c d(x_i, c): how far the worst-covered row is from `centers`.

  Same arguments and cost as `min_distance`; +inf if `centers` is empty,
  -inf if `x` is empty.
  """
  dist = min_distance(x, centers, metric=metric, mesh=mesh, block=block)
  return float(np.max(dist, initial=-np.inf))


# --------------------------------------------------------------------------
# Greedy k-center.


def global_argmax(values, row_offset):
  """(value, global index) of the largest local value over the mesh.

  Ties go to the smallest global index. Only max/min collectives: exact.
  """
  flat = values.reshape(-1)
  local_idx = jnp.argmax(flat).astype(jnp.int32)
  local_val = flat[local_idx]
  best_val = jax.lax.pmax(local_val, _AXIS)
  best_idx = jax.lax.pmin(
      jnp.where(local_val == best_val, row_offset + local_idx, _INT_MAX), _AXIS)
  return best_val, best_idx


def fetch(local, global_idx, row_offset):
  """Rows `global_idx` (any shape) of a row-sharded array, on every device.

  Inside `shard_map`: `local` is this device's `(local_rows, ...)` part. The
  owner of each row contributes it, every other device exact zeros: exact.
  """
  pos = global_idx - row_offset
  owner = (pos >= 0) & (pos < local.shape[0])
  taken = local[jnp.clip(pos, 0, local.shape[0] - 1)]
  owner = owner.reshape(owner.shape + (1,) * (taken.ndim - owner.ndim))
  return jax.lax.psum(jnp.where(owner, taken, jnp.zeros_like(taken)), _AXIS)


def fetch_rows(rows, scale, sq_norms, global_idx, row_offset):
  """Scaled rows `global_idx` in float32 and their squared norms, on every
  device (inside `shard_map`; `scale`, `sq_norms` blocked)."""
  vecs = (fetch(rows, global_idx, row_offset).astype(jnp.float32) *
          fetch(scale.reshape(-1), global_idx, row_offset)[..., None])
  return vecs, fetch(sq_norms.reshape(-1), global_idx, row_offset)


def _top_candidates(dist, row_offset, count: int):
  """The `count` largest distances over the mesh and their global indices,
  ordered by (distance desc, index asc). Exact: selections only."""
  values, idx = jax.lax.top_k(dist.reshape(-1), count)
  values = jax.lax.all_gather(values, _AXIS, tiled=True)
  idx = jax.lax.all_gather(idx.astype(jnp.int32) + row_offset, _AXIS,
                           tiled=True)
  neg, idx = jax.lax.sort((-values, idx), num_keys=2)
  return -neg[:count], idx[:count]


def _mark_picked(dist, picked, row_offset):
  """dist with the rows `picked` (global indices, -1 = none) set to -inf."""
  flat = dist.reshape(-1)
  local = picked - row_offset
  local = jnp.where((picked >= 0) & (local >= 0) & (local < flat.shape[0]),
                    local, flat.shape[0])
  return flat.at[local].set(-jnp.inf, mode="drop").reshape(dist.shape)


def _segments(num_blocks: int, min_blocks: int = 8) -> list[tuple[int, int]]:
  """Static block ranges: the first half, then halving pieces down to
  `min_blocks`, so that skipping pieces past the real rows leaves at most
  `min_blocks` padding blocks computed."""
  segments, start, size = [], 0, max(1, num_blocks // 2)
  while start < num_blocks:
    size = min(max(size, min_blocks), num_blocks - start)
    segments.append((start, start + size))
    start, size = start + size, size // 2
  return segments


def _pool_distances(blocks, scale, sq_norms, num_real, vecs, vec_sq, valid,
                    metric):
  """(blocks, rb) distance of each row to its nearest of `vecs` (valid ones).

  A few large products over runs of blocks (the pass is bound by memory
  bandwidth, which a loop over single blocks would lose to per-step
  overhead); runs wholly past the real rows are skipped (+inf).
  """
  vecs = vecs.astype(blocks.dtype)

  def run(x, x_scale, x_sq):
    dots = dot("brd,pd->brp", x, vecs) * x_scale[..., None]
    dist = _distances(dots, x_sq[..., None], vec_sq, metric)
    return jnp.min(jnp.where(valid, dist, jnp.inf), axis=-1)

  out = []
  for start, stop in _segments(blocks.shape[0]):
    # The whole arrays go into the branch and are sliced there: slices
    # passed as operands would each be copied out of the pool first.
    out.append(jax.lax.cond(
        num_real > start,
        lambda a, start=start, stop=stop: run(*(x[start:stop] for x in a)),
        lambda a, start=start, stop=stop: jnp.full(
            (stop - start,) + a[1].shape[1:], jnp.inf, jnp.float32),
        (blocks, scale, sq_norms)))
  return jnp.concatenate(out)


@functools.partial(jax.jit, static_argnames=("shape", "metric", "capacity",
                                             "first_replaces", "batch"))
def _greedy_kernel(rows, scale, sq_norms, num_rows, dist, k, *, shape, metric,
                   capacity, first_replaces, batch):
  """k greedy farthest-point picks, up to `batch` per pass over the pool.

  dist = -inf marks rows never to pick. A pass takes the rows with the
  largest distances as candidates (ordered by distance, then index) and the
  next row's (distance, index) as a bound: every other row's distance is at
  most that and only decreases. Picks are made greedily among the candidates,
  updating their distances to each new center, for as long as the best one
  still beats the bound: each such pick is the pool's farthest row, i.e.
  exactly the pick of one-pass-per-pick greedy. One pass over the pool then
  folds every new center in. batch=1 is the plain one-pass-per-pick loop.

  Every pass with a finite farthest distance makes at least one pick, and
  there are at most k passes, so the loop ends on any input; slots left
  unpicked (NaN distances) hold -1. Returns `(capacity,)` int32.
  """
  num_candidates = 1 if batch == 1 else min(4 * batch,
                                            shape.rows_per_block - 1)

  def local(rows, scale, sq_norms, num_rows, dist, k):
    row_offset = layout_lib.first_global_row(rows.shape[0])
    blocks = layout_lib.local_blocks(rows, shape.rows_per_block)
    num_real = num_local_blocks(num_rows, shape)
    picks = jnp.full((capacity,), -1, jnp.int32)
    count = jnp.int32(0)

    def fold_in(dist, vecs, vec_sq, valid, picked):
      new = _pool_distances(blocks, scale, sq_norms, num_real, vecs, vec_sq,
                            valid, metric)
      return _mark_picked(jnp.where(dist == -jnp.inf, -jnp.inf,
                                    jnp.minimum(dist, new)), picked,
                          row_offset)

    if first_replaces:  # The first center replaces the distances to the mean.
      value, first = global_argmax(dist, row_offset)
      vec, vec_sq = fetch_rows(rows, scale, sq_norms, first[None],
                                row_offset)
      ok = value > -jnp.inf
      dist = fold_in(jnp.where(dist == -jnp.inf, -jnp.inf, jnp.inf), vec,
                     vec_sq, ok[None], jnp.where(ok, first, -1)[None])
      picks = picks.at[0].set(jnp.where(ok & (k > 0), first, -1))
      count = (ok & (k > 0)).astype(jnp.int32)

    def one_pass(carry):
      dist, picks, count, passes = carry
      if batch == 1:
        values, idx = global_argmax(dist, row_offset)
        values, idx = values[None], idx[None]
        bound_val, bound_idx = jnp.inf, _INT_MAX
      else:
        values, idx = _top_candidates(dist, row_offset, num_candidates + 1)
        bound_val, bound_idx = values[-1], idx[-1]
        values, idx = values[:-1], idx[:-1]
      vecs, vec_sq = fetch_rows(rows, scale, sq_norms, idx, row_offset)

      def pick(j, state):
        current, chosen, going = state
        top = jnp.max(current)
        b = jnp.argmin(jnp.where(current == top, idx, _INT_MAX))
        beats = (top > bound_val) | ((top == bound_val) & (idx[b] < bound_idx))
        accept = (going & (top > -jnp.inf) & (count + j < k) &
                  ((j == 0) | beats))
        to_b = _distances(dot("cd,d->c", vecs, vecs[b]), vec_sq,
                          vec_sq[b], metric)
        current = jnp.where(accept, jnp.minimum(current, to_b).at[b].set(
            -jnp.inf), current)
        return current, chosen.at[j].set(jnp.where(accept, b, -1)), accept

      _, chosen, _ = jax.lax.fori_loop(
          0, batch, pick, (values, jnp.full((batch,), -1, jnp.int32), True))
      valid = chosen >= 0
      slot = jnp.maximum(chosen, 0)
      picked = jnp.where(valid, idx[slot], -1)
      dist = fold_in(dist, vecs[slot], vec_sq[slot], valid, picked)
      at = jnp.where(valid, count + jnp.arange(batch), capacity)
      return (dist, picks.at[at].set(picked, mode="drop"),
              count + valid.sum(dtype=jnp.int32), passes + 1)

    _, picks, _, _ = jax.lax.while_loop(
        lambda c: (c[2] < k) & (c[3] < k), one_pass,
        (dist, picks, count, jnp.int32(0)))
    return picks

  return _shard_map(local, shape.mesh,
                    (_ROWS, _ROWS, _ROWS, _REPLICATED, _ROWS, _REPLICATED),
                    _REPLICATED)(rows, scale, sq_norms, num_rows, dist, k)


@functools.partial(jax.jit, static_argnames=("shape", "metric"))
def _distance_to_mean_kernel(rows, scale, sq_norms, eligible, *, shape,
                             metric):
  """Distance of each eligible row to the mean of the eligible rows (-inf elsewhere).

  The mean is summed block by block in a fixed order (block sums are
  all-gathered, then added sequentially; padding blocks add exact zeros), so
  it is the same on every mesh.
  """

  def local(rows, scale, sq_norms, eligible):
    blocks = layout_lib.local_blocks(rows, shape.rows_per_block)
    local_sums = layout_lib.map_blocks(
        lambda x, s, keep: jnp.where(keep[:, None],
                                     x.astype(jnp.float32) * s[:, None],
                                     0.).sum(axis=0), blocks, scale, eligible)
    block_sums = jax.lax.all_gather(local_sums, _AXIS, tiled=True)
    total = jax.lax.fori_loop(0, block_sums.shape[0],
                              lambda b, acc: acc + block_sums[b],
                              jnp.zeros(rows.shape[-1], jnp.float32))
    count = jax.lax.psum(eligible.sum(), _AXIS)
    mean = total / jnp.maximum(count, 1).astype(jnp.float32)
    dots = dot("brd,d->br", blocks.astype(jnp.float32), mean) * scale
    dist = _distances(dots, sq_norms, jnp.sum(mean * mean), metric)
    return jnp.where(eligible, dist, -jnp.inf)

  return _shard_map(local, shape.mesh, (_ROWS, _ROWS, _ROWS, _ROWS), _ROWS)(
      rows, scale, sq_norms, eligible)


# "auto": `layout.auto_tiling`'s choice for the backend (16 on CPU).
DEFAULT_PICKS_PER_PASS = layout_lib.AUTO


def check_picks_per_pass(picks_per_pass) -> int | str:
  """A positive whole number, or "auto"."""
  if isinstance(picks_per_pass, str) and picks_per_pass == layout_lib.AUTO:
    return picks_per_pass
  return layout_lib.check_count(picks_per_pass, "picks_per_pass", 1)


def resolve_picks_per_pass(picks_per_pass, pool: ShardedRows) -> int:
  """`picks_per_pass`, or for "auto" `layout.device_tiling`'s choice."""
  picks_per_pass = check_picks_per_pass(picks_per_pass)
  if picks_per_pass == layout_lib.AUTO:
    return layout_lib.device_tiling(pool.layout.mesh, pool.layout.num_rows,
                                    pool.dim, pool.rows.dtype).picks_per_pass
  return picks_per_pass


def kcenter_greedy_sharded(pool: ShardedRows, k: int, *, eligible: jax.Array,
                           init_dist: jax.Array | None,
                           metric: str = "euclidean",
                           picks_per_pass: int | str = DEFAULT_PICKS_PER_PASS
                           ) -> np.ndarray:
  """Greedy k-center (Algorithm 2) on a laid-out pool.

  Args:
    pool: the laid-out pool.
    k: number of picks, 0 <= k <= number of eligible rows (caller checks).
    eligible: `(num_blocks, rows_per_block)` bool, rows that may be picked and
      must be covered.
    init_dist: `(num_blocks, rows_per_block)` distance of each row to the
      existing centers, or None when there are none: then the first pick is the
      eligible row farthest from the mean of the eligible rows.
    metric: "euclidean" or "cosine".
    picks_per_pass: most picks made per pass over the pool (see
      `_greedy_kernel`: each is the pick plain greedy would make); 1 = one
      pass per pick; "auto": `layout.auto_tiling`'s for the backend.

  Returns:
    `(k,)` int32 numpy global row indices in pick order (ties: smallest
    index). Compiled once per power-of-two bucket of k. Cost: between
    k / picks_per_pass and k passes over the pool, each `2 N D
    picks_per_pass` flops: memory-bandwidth bound for small picks_per_pass,
    compute bound for large.

  Raises:
    ValueError: the distances hold NaN (a corrupt `init_dist`), so fewer
      than k rows could be picked.
  """
  check_metric(metric)
  picks_per_pass = resolve_picks_per_pass(picks_per_pass, pool)
  if k == 0:
    return np.zeros((0,), np.int32)
  capacity = layout_lib.next_pow2(k)
  shape = pool.layout.shape
  if init_dist is None:
    dist = _distance_to_mean_kernel(pool.rows, pool.scale, pool.sq_norms,
                                    eligible, shape=shape, metric=metric)
  else:
    dist = _masked(init_dist, eligible)
  picks = _greedy_kernel(
      pool.rows, pool.scale, pool.sq_norms, pool.num_rows, dist,
      sharding.put_global(np.int32(k), sharding.replicated(shape.mesh)),
      shape=shape, metric=metric, capacity=capacity,
      first_replaces=init_dist is None, batch=min(picks_per_pass, capacity))
  picks = np.asarray(picks)[:k]
  if (picks < 0).any():
    raise ValueError(f"greedy k-center made only {int((picks >= 0).sum())} "
                     f"of {k} picks: the distances hold NaN.")
  return picks


@jax.jit
def _masked(dist, eligible):
  return jnp.where(eligible, dist, -jnp.inf)


def check_mask(mask, n: int, name: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.shape != (n,):
    raise ValueError(f"{name} must have shape ({n},), got {mask.shape}.")
  if mask.dtype != np.bool_:
    raise TypeError(f"{name} must be a bool array, got dtype {mask.dtype}.")
  return mask


def kcenter_greedy(x, k: int, *, selected=None, metric: str = "euclidean",
                   mesh: Mesh | None = None, block: int | str = DEFAULT_BLOCK,
                   picks_per_pass: int | str = DEFAULT_PICKS_PER_PASS
                   ) -> np.ndarray:
  """Greedy k-center (Sener & Savarese 2018), Algorithm 2 of the spec.

  Repeats k times: pick the row farthest from its nearest center (ties: the
  smallest index), make it a center.

  Args:
    x: `(N, D)` floating features (euclidean: used as given; cosine: rows
      normalised, as sklearn's `cosine_distances`).
    k: number of picks, at most the number of unselected rows.
    selected: optional `(N,)` bool mask of rows that already count as centers;
      they are never returned. With none selected, the first pick is the row
      farthest from the mean of `x`.
    metric: "euclidean" or "cosine".
    mesh, block: as in `min_distance`.
    picks_per_pass: up to this many picks per pass over `x`, each the one
      the one-pass-per-pick algorithm makes (1: that algorithm).

  Returns:
    `(k,)` int32 numpy picks in order. Cost: `2 N |selected| D` for the
    initial distances plus `2 k N D` for the picks, in as few as
    k / picks_per_pass passes over `x`.
  """
  check_metric(metric)
  k = layout_lib.check_count(k, "k")
  picks_per_pass = check_picks_per_pass(picks_per_pass)
  pool = layout_lib.shard_rows(x, mesh, block=block,
                               normalize=metric == "cosine")
  n = pool.layout.num_rows
  selected = (np.zeros(n, np.bool_) if selected is None
              else check_mask(selected, n, "selected"))
  available = n - int(selected.sum())
  if k > available:
    raise ValueError(f"k={k} is larger than the {available} unselected rows "
                     f"of x.")
  eligible = layout_lib.shard_mask(~selected, pool.layout)
  init_dist = None
  if selected.any():
    init_dist = min_distance_sharded(
        pool, gather_rows(pool, np.flatnonzero(selected), block=block),
        metric=metric)
  return kcenter_greedy_sharded(pool, k, eligible=eligible, init_dist=init_dist,
                                metric=metric, picks_per_pass=picks_per_pass)


# --------------------------------------------------------------------------
# Top-2 similarity margins.


IMPLS = ("xla", "pallas")


def check_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"Unknown impl {impl!r}; expected one of {IMPLS}.")
  return impl


def _merge_top2(top1, top2):
  """Merges each device's top-2 over the mesh with max/min only (inside
  `shard_map`): the global second best is the global best again if two
  devices hold it, else the best of the others' bests and the holder's own
  second best."""
  best = jax.lax.pmax(top1, _AXIS)
  holders = jax.lax.psum((top1 == best).astype(jnp.int32), _AXIS)
  runner_up = jax.lax.pmax(jnp.where(top1 == best, top2, top1), _AXIS)
  return best, jnp.where(holders >= 2, best, runner_up)


@functools.partial(jax.jit, static_argnames=("shape", "query_chunk", "impl"))
def _top2_kernel(queries, num_queries, rows, scale, key_valid, num_rows, *,
                 shape, query_chunk, impl="xla"):
  """(Qp,) top-1 and top-2 inner products of each query over the valid keys."""
  dim = queries.shape[-1]
  chunks = queries.astype(rows.dtype).reshape(-1, query_chunk, dim)
  num_chunks = (num_queries + query_chunk - 1) // query_chunk

  def local_pallas(chunks, rows, scale, key_valid, num_rows):
    del num_rows  # Padding keys are invalid: they add -inf only.
    queries = chunks.reshape(-1, dim)
    top1, top2 = pallas_kernels.top2(
        queries, rows, scale.reshape(-1), key_valid.reshape(-1),
        **pallas_kernels.plan(_platform(shape), queries.shape[0],
                              rows.shape[0], dim, query_chunk,
                              shape.rows_per_block))
    return _merge_top2(top1, top2)

  def local(chunks, rows, scale, key_valid, num_rows):
    blocks = layout_lib.local_blocks(rows, shape.rows_per_block)
    num_real = num_local_blocks(num_rows, shape)

    def one_query_chunk(i, out):
      q = jax.lax.dynamic_index_in_dim(chunks, i, keepdims=False)

      def one_key_block(b, carry):
        k, k_scale, k_valid = (jax.lax.dynamic_index_in_dim(a, b,
                                                            keepdims=False)
                               for a in (blocks, scale, key_valid))
        sims = dot("qd,rd->qr", q, k)
        sims = jnp.where(k_valid[None, :], sims * k_scale[None, :], -jnp.inf)
        return tile_math.top2_update(*carry, sims)

      init = jnp.full((2, query_chunk), -jnp.inf, jnp.float32)
      top = jax.lax.fori_loop(0, num_real, one_key_block, (init[0], init[1]))
      return jax.lax.dynamic_update_index_in_dim(out, jnp.stack(top), i, 1)

    out = jnp.full((2, chunks.shape[0], query_chunk), -jnp.inf, jnp.float32)
    top1, top2 = jax.lax.fori_loop(0, num_chunks, one_query_chunk, out)
    return _merge_top2(top1.reshape(-1), top2.reshape(-1))

  return _shard_map(local if impl == "xla" else local_pallas, shape.mesh,
                    (_REPLICATED, _ROWS, _ROWS, _ROWS, _REPLICATED),
                    (_REPLICATED, _REPLICATED))(
                        chunks, rows, scale, key_valid, num_rows)


def top2_margin_sharded(queries: Operand, keys: ShardedRows,
                        key_valid: jax.Array, *, impl: str = "xla"
                        ) -> jax.Array:
  """Top-1 minus top-2 inner product of each query over the valid keys.

  Args:
    queries: the queries (`host_operand` / `gather_rows`), scaled like keys.
    keys: the laid-out keys, `N` rows.
    key_valid: `(num_blocks, rows_per_block)` bool, keys that count.
    impl: "xla" (every backend), or "pallas": `pallas_kernels.top2`, the
      reduction fused into the product's epilogue, in the backend's form
      (`pallas_kernels.plan`; interpreted on CPU; not yet timed on a
      GPU/TPU), over every local block, padding included.

  Returns:
    `(Qp,)` float32 replicated, Qp >= Q the padded query count; margins >= 0
    (0 for tied best keys), +inf where fewer than two keys are valid. Cost:
    `2 Q N D` flops; tiles `chunk x rows_per_block`.
  """
  top1, top2 = _top2_kernel(
      queries.values, queries.count, keys.rows, keys.scale, key_valid,
      keys.num_rows, shape=keys.layout.shape, query_chunk=queries.chunk,
      impl=check_impl(impl))
  return _margins(top1, top2)


@jax.jit
def _margins(top1, top2):
  return jnp.where(top2 == -jnp.inf, jnp.inf, top1 - top2)


def top2_margin(queries, keys, *, key_mask=None, mesh: Mesh | None = None,
                block: int | str = DEFAULT_BLOCK, impl: str = "xla"
                ) -> np.ndarray:
  """For each query, top-1 minus top-2 of its inner products with the keys.

  Args:
    queries: `(Q, D)` floating array.
    keys: `(N, D)` floating array; rows are split over the mesh.
    key_mask: optional `(N,)` bool; False keys are ignored.
    mesh, block: as in `min_distance`.
    impl: "xla" or "pallas" (see `top2_margin_sharded`).

  Returns:
    `(Q,)` float32 numpy margins (>= 0; 0 for tied best keys), +inf where
    fewer than two keys are valid. Cost: `2 Q N D` flops, memory
    `O((Q + N / devices) D + block^2)`.
  """
  keys = layout_lib.shard_rows(keys, mesh, block=block, name="keys")
  n = keys.layout.num_rows
  key_mask = (np.ones(n, np.bool_) if key_mask is None
              else check_mask(key_mask, n, "key_mask"))
  queries = host_operand(queries, keys, block=block, name="queries",
                         pool_has="keys have", normalize=False)
  margins = top2_margin_sharded(
      queries, keys, layout_lib.shard_mask(key_mask, keys.layout), impl=impl)
  return np.asarray(margins)[:queries.size]
