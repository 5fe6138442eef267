"""Sharded acquisition kernels: nearest-center distances, greedy k-center, top-2 margins.

Each kernel runs under `shard_map` over the 1-D mesh of `mmal_jax.sharding`:
pool rows are split into fixed-size blocks over the devices (see `layout`),
small operands (centers, queries) are replicated, and every pairwise quantity
is computed one `(block, block)` tile at a time, so no `(N, N)` or `(Q, N)`
array ever exists. Cross-device steps are max / min / selections, and sums in
which every device but one adds exact zeros, so results are bit-identical on
any number of devices.

Distances (`metric`), on vectors used as given:
  euclidean: ||x - c||, via ||x||^2 + ||c||^2 - 2<x, c> on the matrix units;
  cosine:    1 - <x, c>.
Features may be stored in float32, bfloat16 or float16; products accumulate in
float32.

The public functions here take plain `(N, D)` arrays; the `*_sharded` forms
take already laid-out `ShardedRows` so that strategies lay a pool out once per
round.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from mmal_jax import sharding
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition.layout import DEFAULT_BLOCK, ShardedRows

METRICS = ("euclidean", "cosine")
_AXIS = sharding.ROW_AXES
_ROWS = P(_AXIS)
_REPLICATED = P()
_INT_MAX = np.iinfo(np.int32).max


def check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise ValueError(f"Unknown metric {metric!r}; expected one of {METRICS}.")
  return metric


def _distances(dots, x_sq, c_sq, metric):
  """Distances from inner products (float32), broadcasting x_sq against c_sq."""
  if metric == "cosine":
    return 1.0 - dots
  return jnp.sqrt(jnp.maximum(x_sq + c_sq - 2.0 * dots, 0.0))


def _replicated_operand(x, pool: ShardedRows, block: int, name: str,
                        pool_has: str) -> tuple[jax.Array, int, int]:
  """A small `(n, D)` operand (centers, queries) for the kernels.

  Checks it against `pool` (dimension, finite values), zero-pads it to whole
  chunks of min(block, next_pow2(n)) rows and replicates it over the mesh.
  Returns (padded array, n, chunk).
  """
  x = layout_lib.as_feature_array(x, name)
  if x.shape[1] != pool.dim:
    raise ValueError(f"{name} have dimension {x.shape[1]}, {pool_has} "
                     f"{pool.dim}.")
  n = x.shape[0]
  chunk = min(layout_lib.check_block(block), max(8, layout_lib.next_pow2(n)))
  padded = jnp.pad(jnp.asarray(x, jnp.float32),
                   ((0, -(-max(n, 1) // chunk) * chunk - n), (0, 0)))
  if not bool(jnp.isfinite(padded).all()):
    layout_lib.raise_non_finite(x, name)
  return (jax.device_put(padded.astype(pool.rows.dtype),
                         sharding.replicated(pool.layout.mesh)), n, chunk)


# --------------------------------------------------------------------------
# Nearest-center distances.


@functools.partial(jax.jit, static_argnames=("mesh", "metric", "center_chunk"))
def _min_distance_kernel(rows, sq_norms, centers, center_valid, *, mesh, metric,
                         center_chunk):
  """(blocks, rb) distance of every row to its nearest valid center (+inf if none)."""
  dim = rows.shape[-1]
  stored = centers.astype(jnp.float32)
  center_sq = jnp.einsum("cd,cd->c", stored, stored)
  num_chunks = centers.shape[0] // center_chunk
  chunks = (centers.reshape(num_chunks, center_chunk, dim),
            center_sq.reshape(num_chunks, center_chunk),
            center_valid.reshape(num_chunks, center_chunk),
            jnp.arange(num_chunks, dtype=jnp.int32) * center_chunk)

  def local(rows, sq_norms, centers, chunks):
    def one_block(x, x_sq):
      def one_chunk(carry, chunk):
        best, best_idx = carry
        c, c_sq, c_valid, offset = chunk
        dots = jnp.einsum("rd,cd->rc", x, c, preferred_element_type=jnp.float32)
        dist = jnp.where(c_valid[None, :],
                         _distances(dots, x_sq[:, None], c_sq[None, :], metric),
                         jnp.inf)
        idx = jnp.argmin(dist, axis=1)
        val = jnp.take_along_axis(dist, idx[:, None], axis=1)[:, 0]
        better = val < best  # Strict: the earlier center wins ties.
        return (jnp.where(better, val, best),
                jnp.where(better, idx.astype(jnp.int32) + offset, best_idx)), None

      init = (jnp.full(x.shape[:1], jnp.inf, jnp.float32),
              jnp.zeros(x.shape[:1], jnp.int32))
      (best, best_idx), _ = jax.lax.scan(one_chunk, init, chunks)
      if metric == "euclidean":
        # ||x||^2 + ||c||^2 - 2<x,c> cancels badly for close pairs: recompute
        # the distance to the chosen center directly (exact 0 for duplicates).
        diff = x.astype(jnp.float32) - centers[best_idx].astype(jnp.float32)
        exact = jnp.sqrt(jnp.sum(diff * diff, axis=1))
        best = jnp.where(jnp.isfinite(best), exact, jnp.inf)
      return best

    return layout_lib.map_blocks(one_block, rows, sq_norms)

  return jax.shard_map(
      local, mesh=mesh, in_specs=(_ROWS, _ROWS, _REPLICATED, _REPLICATED),
      out_specs=_ROWS, check_vma=False)(rows, sq_norms, centers, chunks)


def min_distance_sharded(pool: ShardedRows, centers, center_valid=None, *,
                         metric: str = "euclidean",
                         block: int = DEFAULT_BLOCK) -> jax.Array:
  """Distance of each pool row to its nearest center, in the pool's layout.

  Args:
    pool: the laid-out pool, `N` rows.
    centers: `(C, D)` centers (array or replicated jax array), C may be 0.
    center_valid: optional `(C,)` bool; invalid centers are ignored.
    metric: "euclidean" or "cosine".
    block: tile edge; at most `rows_per_block x block` distances exist at once.

  Returns:
    `(num_blocks, rows_per_block)` float32, sharded like the pool; +inf where
    no valid center exists, padding rows included. Cost: `O(N C D)` flops,
    one pass over the pool per chunk of `block` centers.
  """
  check_metric(metric)
  mesh = pool.layout.mesh
  centers, num_centers, chunk = _replicated_operand(centers, pool, block,
                                                    "centers", "the pool has")
  valid = np.zeros(centers.shape[0], np.bool_)
  valid[:num_centers] = True if center_valid is None else np.asarray(
      center_valid, np.bool_)
  return _min_distance_kernel(
      pool.rows, pool.sq_norms, centers,
      jax.device_put(valid, sharding.replicated(mesh)),
      mesh=mesh, metric=metric, center_chunk=chunk)


def unpad(blocked: jax.Array, pool_layout) -> jax.Array:
  """`(num_blocks, rows_per_block, ...)` -> the first `num_rows` rows, replicated."""
  return _unpad(blocked, num_rows=pool_layout.num_rows, mesh=pool_layout.mesh)


@functools.partial(jax.jit, static_argnames=("num_rows", "mesh"))
def _unpad(blocked, *, num_rows, mesh):
  flat = blocked.reshape((-1,) + blocked.shape[2:])[:num_rows]
  return jax.lax.with_sharding_constraint(flat, sharding.replicated(mesh))


def min_distance(x, centers, *, metric: str = "euclidean",
                 mesh: Mesh | None = None,
                 block: int = DEFAULT_BLOCK) -> jax.Array:
  """Distance of each row of `x` to its nearest row of `centers`.

  Args:
    x: `(N, D)` floating array (numpy or jax; float32/bfloat16/float16 kept,
      float64 stored as float32).
    centers: `(C, D)` floating array; C may be 0.
    metric: "euclidean" (||x - c||) or "cosine" (1 - <x, c>); vectors are used
      as given.
    mesh: 1-D mesh (default: all devices); rows of `x` are split over it.
    block: tile edge; no more than `block x block` distances exist at once.

  Returns:
    `(N,)` float32, +inf everywhere if `centers` is empty. Cost: `O(N C D)`
    flops, memory `O((N + C) D / devices + block^2)`.
  """
  pool = layout_lib.shard_rows(x, mesh, block=block)
  return unpad(min_distance_sharded(pool, centers, metric=metric, block=block),
               pool.layout)


def covering_radius(x, centers, *, metric: str = "euclidean",
                    mesh: Mesh | None = None,
                    block: int = DEFAULT_BLOCK) -> float:
  """max_i min_c d(x_i, c): how far the worst-covered row is from `centers`.

  Same arguments and cost as `min_distance`; +inf if `centers` is empty,
  -inf if `x` is empty.
  """
  dist = min_distance(x, centers, metric=metric, mesh=mesh, block=block)
  return float(jnp.max(dist, initial=-jnp.inf))


# --------------------------------------------------------------------------
# Greedy k-center.


def _global_argmax(values, row_offset):
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


def _fetch_rows(rows, sq_norms, global_idx, row_offset):
  """Rows `global_idx` (C,) and their squared norms, on every device."""
  flat_rows = rows.reshape(-1, rows.shape[-1])
  local = global_idx - row_offset
  owner = (local >= 0) & (local < flat_rows.shape[0])
  local = jnp.clip(local, 0, flat_rows.shape[0] - 1)
  vecs = jax.lax.psum(jnp.where(owner[:, None],
                                flat_rows[local].astype(jnp.float32), 0.),
                      _AXIS)
  sq = jax.lax.psum(jnp.where(owner, sq_norms.reshape(-1)[local], 0.), _AXIS)
  return vecs.astype(rows.dtype), sq


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


@functools.partial(jax.jit, static_argnames=("mesh", "metric", "k",
                                             "first_replaces", "batch"))
def _greedy_kernel(rows, sq_norms, dist, *, mesh, metric, k, first_replaces,
                   batch):
  """k greedy farthest-point picks, up to `batch` per pass over the pool.

  dist = -inf marks rows never to pick. A pass takes the rows with the
  largest distances as candidates (ordered by distance, then index) and the
  next row's (distance, index) as a bound: every other row's distance is at
  most that and only decreases. Picks are made greedily among the candidates,
  updating their distances to each new center, for as long as the best one
  still beats the bound: each such pick is the pool's farthest row, i.e.
  exactly the pick of one-pass-per-pick greedy. One pass over the pool then
  folds every new center in. batch=1 is the plain one-pass-per-pick loop.
  """
  num_candidates = 1 if batch == 1 else min(4 * batch, rows.shape[1] - 1)

  def local(rows, sq_norms, dist):
    row_offset = (jax.lax.axis_index(_AXIS).astype(jnp.int32) *
                  rows.shape[0] * rows.shape[1])
    picks = jnp.zeros((k,), jnp.int32)
    count = 0
    if first_replaces:  # The first center replaces the distances to the mean.
      _, first = _global_argmax(dist, row_offset)
      center, center_sq = _fetch_rows(rows, sq_norms, first[None], row_offset)
      new = _distances(
          jnp.einsum("brd,d->br", rows, center[0],
                     preferred_element_type=jnp.float32),
          sq_norms, center_sq[0], metric)
      dist = _mark_picked(jnp.where(dist == -jnp.inf, -jnp.inf, new),
                          first[None], row_offset)
      picks, count = picks.at[0].set(first), 1

    def one_pass(carry):
      dist, picks, count = carry
      if batch == 1:
        values, idx = _global_argmax(dist, row_offset)
        values, idx = values[None], idx[None]
        bound_val, bound_idx = jnp.inf, _INT_MAX
      else:
        values, idx = _top_candidates(dist, row_offset, num_candidates + 1)
        bound_val, bound_idx = values[-1], idx[-1]
        values, idx = values[:-1], idx[:-1]
      vecs, vec_sq = _fetch_rows(rows, sq_norms, idx, row_offset)

      def pick(j, state):
        current, chosen, going = state
        top = jnp.max(current)
        b = jnp.argmin(jnp.where(current == top, idx, _INT_MAX))
        beats = (top > bound_val) | ((top == bound_val) & (idx[b] < bound_idx))
        accept = (going & (top > -jnp.inf) & (count + j < k) &
                  ((j == 0) | beats))
        to_b = _distances(jnp.einsum("cd,d->c", vecs, vecs[b],
                                     preferred_element_type=jnp.float32),
                          vec_sq, vec_sq[b], metric)
        current = jnp.where(accept, jnp.minimum(current, to_b).at[b].set(
            -jnp.inf), current)
        return current, chosen.at[j].set(jnp.where(accept, b, -1)), accept

      _, chosen, _ = jax.lax.fori_loop(
          0, batch, pick, (values, jnp.full((batch,), -1, jnp.int32), True))
      valid = chosen >= 0
      slot = jnp.maximum(chosen, 0)
      dots = jnp.einsum("brd,pd->brp", rows, vecs[slot],
                        preferred_element_type=jnp.float32)
      new = jnp.min(jnp.where(valid, _distances(
          dots, sq_norms[..., None], vec_sq[slot], metric), jnp.inf), axis=-1)
      picked = jnp.where(valid, idx[slot], -1)
      dist = _mark_picked(jnp.where(dist == -jnp.inf, -jnp.inf,
                                    jnp.minimum(dist, new)), picked,
                          row_offset)
      at = jnp.where(valid, count + jnp.arange(batch), k)
      return dist, picks.at[at].set(picked, mode="drop"), count + valid.sum()

    _, picks, _ = jax.lax.while_loop(lambda c: c[2] < k, one_pass,
                                     (dist, picks, jnp.int32(count)))
    return picks

  return jax.shard_map(local, mesh=mesh, in_specs=(_ROWS, _ROWS, _ROWS),
                       out_specs=_REPLICATED, check_vma=False)(
                           rows, sq_norms, dist)


@functools.partial(jax.jit, static_argnames=("mesh", "metric"))
def _distance_to_mean_kernel(rows, sq_norms, eligible, *, mesh, metric):
  """Distance of each eligible row to the mean of the eligible rows (-inf elsewhere).

  The mean is summed block by block in a fixed order (block sums are
  all-gathered, then added sequentially; padding blocks add exact zeros), so
  it is the same on every mesh.
  """

  def local(rows, sq_norms, eligible):
    local_sums = layout_lib.map_blocks(
        lambda x, keep: jnp.where(keep[:, None], x.astype(jnp.float32),
                                  0.).sum(axis=0), rows, eligible)
    block_sums = jax.lax.all_gather(local_sums, _AXIS, tiled=True)
    total = jax.lax.fori_loop(0, block_sums.shape[0],
                              lambda b, acc: acc + block_sums[b],
                              jnp.zeros(rows.shape[-1], jnp.float32))
    count = jax.lax.psum(eligible.sum(), _AXIS)
    mean = total / jnp.maximum(count, 1).astype(jnp.float32)
    dots = jnp.einsum("brd,d->br", rows.astype(jnp.float32), mean)
    dist = _distances(dots, sq_norms, jnp.sum(mean * mean), metric)
    return jnp.where(eligible, dist, -jnp.inf)

  return jax.shard_map(local, mesh=mesh, in_specs=(_ROWS, _ROWS, _ROWS),
                       out_specs=_ROWS, check_vma=False)(
                           rows, sq_norms, eligible)


DEFAULT_PICKS_PER_PASS = 16


def _check_picks_per_pass(picks_per_pass) -> int:
  if (not isinstance(picks_per_pass, (int, np.integer)) or
      picks_per_pass < 1):
    raise ValueError(f"picks_per_pass must be a positive integer, got "
                     f"{picks_per_pass!r}.")
  return int(picks_per_pass)


def kcenter_greedy_sharded(pool: ShardedRows, k: int, *, eligible: jax.Array,
                           init_dist: jax.Array | None,
                           metric: str = "euclidean",
                           picks_per_pass: int = DEFAULT_PICKS_PER_PASS
                           ) -> jax.Array:
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
      pass per pick.

  Returns:
    `(k,)` int32 global row indices in pick order (ties: smallest index).
    Cost: between k / picks_per_pass and k passes over the pool, each
    `O(N D picks_per_pass)` flops: memory-bandwidth bound for small
    picks_per_pass, compute bound for large.
  """
  check_metric(metric)
  picks_per_pass = _check_picks_per_pass(picks_per_pass)
  mesh = pool.layout.mesh
  if k == 0:
    return jnp.zeros((0,), jnp.int32)
  if init_dist is None:
    dist = _distance_to_mean_kernel(pool.rows, pool.sq_norms, eligible,
                                    mesh=mesh, metric=metric)
  else:
    dist = jnp.where(eligible, init_dist, -jnp.inf)
  return _greedy_kernel(pool.rows, pool.sq_norms, dist, mesh=mesh,
                        metric=metric, k=int(k),
                        first_replaces=init_dist is None,
                        batch=min(picks_per_pass, int(k)))


def _check_mask(mask, n: int, name: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.shape != (n,):
    raise ValueError(f"{name} must have shape ({n},), got {mask.shape}.")
  if mask.dtype != np.bool_:
    raise TypeError(f"{name} must be a bool array, got dtype {mask.dtype}.")
  return mask


def kcenter_greedy(x, k: int, *, selected=None, metric: str = "euclidean",
                   mesh: Mesh | None = None, block: int = DEFAULT_BLOCK,
                   picks_per_pass: int = DEFAULT_PICKS_PER_PASS) -> jax.Array:
  """Greedy k-center (Sener & Savarese 2018), Algorithm 2 of the spec.

  Repeats k times: pick the row farthest from its nearest center (ties: the
  smallest index), make it a center.

  Args:
    x: `(N, D)` floating features, used as given.
    k: number of picks, at most the number of unselected rows.
    selected: optional `(N,)` bool mask of rows that already count as centers;
      they are never returned. With none selected, the first pick is the row
      farthest from the mean of `x`.
    metric: "euclidean" or "cosine".
    mesh, block: as in `min_distance`.
    picks_per_pass: up to this many picks per pass over `x`, each the one
      the one-pass-per-pick algorithm makes (1: that algorithm).

  Returns:
    `(k,)` int32 picks in order. Cost: `O(N |selected| D)` for the initial
    distances plus `O(k N D)` for the picks, in as few as
    k / picks_per_pass passes over `x`.
  """
  check_metric(metric)
  pool = layout_lib.shard_rows(x, mesh, block=block)
  n = pool.layout.num_rows
  selected = (np.zeros(n, np.bool_) if selected is None
              else _check_mask(selected, n, "selected"))
  available = n - int(selected.sum())
  if not isinstance(k, (int, np.integer)) or k < 0:
    raise ValueError(f"k must be a non-negative integer, got {k!r}.")
  if k > available:
    raise ValueError(f"k={k} is larger than the {available} unselected rows "
                     f"of x.")
  eligible = layout_lib.shard_mask(~selected, pool.layout)
  init_dist = None
  if selected.any():
    centers = np.flatnonzero(selected)
    init_dist = min_distance_sharded(
        pool, gather_rows(pool, centers), metric=metric, block=block)
  return kcenter_greedy_sharded(pool, k, eligible=eligible, init_dist=init_dist,
                                metric=metric, picks_per_pass=picks_per_pass)


def gather_rows(pool: ShardedRows, indices) -> jax.Array:
  """Rows `indices` of a laid-out pool, as a replicated `(len(indices), D)` array."""
  indices = np.asarray(indices, np.int32)
  return _gather(pool.rows, jax.device_put(indices,
                                           sharding.replicated(pool.layout.mesh)),
                 mesh=pool.layout.mesh)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _gather(rows, indices, *, mesh):
  taken = rows.reshape(-1, rows.shape[-1])[indices]
  return jax.lax.with_sharding_constraint(taken, sharding.replicated(mesh))


# --------------------------------------------------------------------------
# Top-2 similarity margins.


@functools.partial(jax.jit, static_argnames=("mesh", "query_chunk"))
def _top2_kernel(queries, keys, key_valid, *, mesh, query_chunk):
  """(Qp,) top-1 and top-2 inner products of each query over the valid keys."""
  dim = queries.shape[-1]

  def local(queries, keys, key_valid):
    def one_query_chunk(q):
      def one_key_block(carry, block):
        top1, top2 = carry
        k, k_valid = block
        sims = jnp.einsum("qd,rd->qr", q, k, preferred_element_type=jnp.float32)
        sims = jnp.where(k_valid[None, :], sims, -jnp.inf)
        first = jnp.argmax(sims, axis=1)
        block1 = jnp.take_along_axis(sims, first[:, None], axis=1)[:, 0]
        is_first = jnp.arange(sims.shape[1])[None, :] == first[:, None]
        block2 = jnp.max(jnp.where(is_first, -jnp.inf, sims), axis=1)
        return (jnp.maximum(top1, block1),
                jnp.maximum(jnp.minimum(top1, block1),
                            jnp.maximum(top2, block2))), None

      init = (jnp.full(q.shape[:1], -jnp.inf), jnp.full(q.shape[:1], -jnp.inf))
      (top1, top2), _ = jax.lax.scan(one_key_block, init, (keys, key_valid))
      return top1, top2

    top1, top2 = jax.lax.map(one_query_chunk,
                             queries.reshape(-1, query_chunk, dim))
    top1, top2 = top1.reshape(-1), top2.reshape(-1)
    # Merge over devices with max/min only: the global second best is the
    # global best again if two devices hold it, else the best of the others'
    # bests and the holder's own second best.
    best = jax.lax.pmax(top1, _AXIS)
    holders = jax.lax.psum((top1 == best).astype(jnp.int32), _AXIS)
    runner_up = jax.lax.pmax(jnp.where(top1 == best, top2, top1), _AXIS)
    return best, jnp.where(holders >= 2, best, runner_up)

  return jax.shard_map(local, mesh=mesh, in_specs=(_REPLICATED, _ROWS, _ROWS),
                       out_specs=(_REPLICATED, _REPLICATED), check_vma=False)(
                           queries, keys, key_valid)


def top2_margin_sharded(queries, keys: ShardedRows, key_valid: jax.Array, *,
                        block: int = DEFAULT_BLOCK) -> jax.Array:
  """Top-1 minus top-2 inner product of each query over the valid keys.

  Args:
    queries: `(Q, D)` array (replicated on every device).
    keys: the laid-out keys, `N` rows.
    key_valid: `(num_blocks, rows_per_block)` bool, keys that count.
    block: tile edge; at most `block x rows_per_block` similarities at once.

  Returns:
    `(Q,)` float32 margins >= 0, +inf where fewer than two keys are valid.
    Cost: `O(Q N D)` flops.
  """
  queries, num_queries, chunk = _replicated_operand(queries, keys, block,
                                                    "queries", "keys have")
  top1, top2 = _top2_kernel(queries, keys.rows, key_valid,
                            mesh=keys.layout.mesh, query_chunk=chunk)
  margin = jnp.where(top2 == -jnp.inf, jnp.inf, top1 - top2)
  return margin[:num_queries]


def top2_margin(queries, keys, *, key_mask=None, mesh: Mesh | None = None,
                block: int = DEFAULT_BLOCK) -> jax.Array:
  """For each query, top-1 minus top-2 of its inner products with the keys.

  Args:
    queries: `(Q, D)` floating array.
    keys: `(N, D)` floating array; rows are split over the mesh.
    key_mask: optional `(N,)` bool; False keys are ignored.
    mesh, block: as in `min_distance`.

  Returns:
    `(Q,)` float32 margins (>= 0; 0 for tied best keys), +inf where fewer than
    two keys are valid. Cost: `O(Q N D)` flops, memory
    `O((Q + N / devices) D + block^2)`.
  """
  keys = layout_lib.shard_rows(keys, mesh, block=block, name="keys")
  n = keys.layout.num_rows
  key_mask = (np.ones(n, np.bool_) if key_mask is None
              else _check_mask(key_mask, n, "key_mask"))
  return top2_margin_sharded(
      queries, keys, layout_lib.shard_mask(key_mask, keys.layout), block=block)
