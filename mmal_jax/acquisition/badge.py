"""BADGE (Ash et al. 2020) for unaligned multimodal data (paper 1, App. C.4).

A random modality m (or the one named by `modality`); its items are scored by
the gradient embedding of a "classifier" whose classes are the available
items y of the other modalities (the unannotated ones, inside the stream
buffer when `candidates` is given):

  p_x = softmax_y(t <z_x, z_y>),  yhat_x = argmax_y p_x,
  g_x = (p_x - e_{yhat_x}) (x) z_x          (a C x D vector, C = #classes)

then k-means++ seeding on g picks the budget (first pick: the largest
||g_x||, as BADGE's code does; then D^2 sampling). No g is ever built: with
e_i = e_{yhat_i},

  <g_i, g_j> = <p_i - e_i, p_j - e_j> <z_i, z_j>
  <p_i - e_i, p_j - e_j> = <p_i, p_j> - p_i[yhat_j] - p_j[yhat_i]
                           + [yhat_i = yhat_j]
  <p_i, p_j> = exp(LSE_y(t <z_i + z_j, z_y>) - lse_i - lse_j)
  ||g_i||^2 = (exp(LSE_y(2t <z_i, z_y>) - 2 lse_i) - 2 p_i[yhat_i] + 1)
              * ||z_i||^2

where lse_i = LSE_y(t <z_i, z_y>). So a distance to a new center is one
log-sum-exp over the classes per item: the inner product over the C classes
is computed one `(rows_per_block, block)` tile at a time, never as a
`(N, C)` softmax.

Cost: 2 passes over the N_m x C pairs to start (lse with the argmax, the
doubled-scale lse) and one per pick: about `2 (B + 2) N_m C D` flops,
quadratic in the pool by design (the paper's point against BADGE here).
Memory: the classes' embeddings replicated on every device (`C x D`), the
modality's rows split over the mesh, one tile. There are no sums across
devices (each item's log-sum-exp runs over the replicated classes in a fixed
chunk order) and the picks are exact collectives, so the result is the same
on any mesh. Blocks past the real rows and class chunks past the real
classes (size buckets) are skipped.

`t` is `logit_scale` (default 10, SigLIP's initial scale; pass the trained
model's `t` for its own softmax).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmal_jax import sharding
from mmal_jax.acquisition import kernels
from mmal_jax.acquisition import kmeans as kmeans_lib
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition import strategies
from mmal_jax.acquisition.kmeans import REPLICATED, ROWS
from mmal_jax.acquisition.layout import DEFAULT_BLOCK, PoolLayout, ShardedRows

Query = strategies.Query
# Class chunks up to which the log-sum-exp over the classes is unrolled.
_UNROLLED_CHUNKS = 8


def _logsumexp_over_classes(queries, classes: kernels.Operand, scale):
  """LSE_y(scale <q, z_y>) of each query row over the classes, with the
  best class and its logit; chunks of classes in a fixed order."""
  chunks = classes.values.reshape(-1, classes.chunk, classes.values.shape[-1])
  num_chunks = (classes.count + classes.chunk - 1) // classes.chunk

  def one_chunk(j, carry):
    lse, best, best_idx = carry
    index = j * classes.chunk + jnp.arange(classes.chunk, dtype=jnp.int32)
    logits = jnp.where(index[None, :] < classes.count, scale * kernels.dot(
        "qd,cd->qc", queries, chunks[j]),
                       -jnp.inf)
    idx = jnp.argmax(logits, axis=1)
    top = jnp.take_along_axis(logits, idx[:, None], axis=1)[:, 0]
    better = top > best  # Strict: the earlier class wins ties.
    return (jnp.logaddexp(lse, jax.nn.logsumexp(logits, axis=1)),
            jnp.where(better, top, best),
            jnp.where(better, index[idx], best_idx))

  q = queries.shape[0]
  init = (jnp.full((q,), -jnp.inf), jnp.full((q,), -jnp.inf),
          jnp.zeros((q,), jnp.int32))
  if chunks.shape[0] > _UNROLLED_CHUNKS:
    return jax.lax.fori_loop(0, num_chunks, one_chunk, init)
  # Few chunks: unrolled (a loop with a traced trip count is not, and cost
  # twice as much here), chunks past the real classes skipped.
  for j in range(chunks.shape[0]):
    init = jax.lax.cond(j < num_chunks, functools.partial(one_chunk, j),
                        lambda carry: carry, init)
  return init


def _row_statistics(x, classes: kernels.Operand, scale):
  """Per scaled row of a block: (lse, yhat, ||g||^2 / ||z||^2, z_yhat)."""
  lse, best, yhat = _logsumexp_over_classes(x, classes, scale)
  lse_double, _, _ = _logsumexp_over_classes(x, classes, 2. * scale)
  p_sq = jnp.exp(lse_double - 2. * lse)
  p_top = jnp.exp(best - lse)
  return (lse, yhat, jnp.maximum(p_sq - 2. * p_top + 1., 0.),
          classes.values[yhat])


def _sq_distances(x, x_sq, lse, yhat, spread, z_hat, center,
                  classes: kernels.Operand, scale):
  """||g_i - g_c||^2 of a block's scaled rows i to one center record c."""
  (z_c, c_sq), (lse_c, yhat_c, spread_c, z_hat_c) = center
  del z_hat_c
  pair_lse, _, _ = _logsumexp_over_classes(x + z_c[None, :], classes, scale)
  p_i_at_c = jnp.exp(
      scale * kernels.dot("rd,d->r", x, classes.values[yhat_c]) - lse)
  p_c_at_i = jnp.exp(scale * kernels.dot("rd,d->r", z_hat, z_c) - lse_c)
  class_inner = (jnp.exp(pair_lse - lse - lse_c) - p_i_at_c - p_c_at_i +
                 (yhat == yhat_c).astype(jnp.float32))
  inner = kernels.dot("rd,d->r", x, z_c) * class_inner
  return jnp.maximum(spread * x_sq + spread_c * c_sq - 2. * inner, 0.)


def _local_state(rows, scale, sq_norms, num_rows, classes, t, shape):
  """Inside `shard_map`: per-row statistics of the local blocks, the first
  row offset, the center-record fetcher and the distance pass."""
  blocks = layout_lib.local_blocks(rows, shape.rows_per_block)
  scaled = lambda x, s: x.astype(jnp.float32) * s[:, None]
  stats = layout_lib.map_blocks(
      lambda x, s: _row_statistics(scaled(x, s), classes, t), blocks, scale)
  offset = layout_lib.first_global_row(rows.shape[0])

  def record(index):
    flat = [a.reshape((-1,) + a.shape[2:]) for a in stats]
    return (kernels.fetch_rows(rows, scale, sq_norms, index, offset),
            tuple(kernels.fetch(a, index, offset) for a in flat))

  def sq_distance(center):
    # Every block, padding included: a loop bounded by the real blocks
    # (`kernels.over_real_blocks`) measured slower around the class loop.
    return layout_lib.map_blocks(
        lambda x, s, *a: _sq_distances(scaled(x, s), *a, center, classes, t),
        blocks, scale, sq_norms, *stats)

  return offset, stats[2] * sq_norms, record, sq_distance


def _traced_classes(values, count, chunk: int) -> kernels.Operand:
  """The classes inside a kernel (their host count is not known there)."""
  return kernels.Operand(values, count, -1, chunk)


@functools.partial(jax.jit, static_argnames=("shape", "class_chunk", "k"))
def _badge_kernel(rows, scale, sq_norms, num_rows, eligible, class_values,
                  num_classes, t, key, *, shape: PoolLayout, class_chunk: int,
                  k: int):
  def local(rows, scale, sq_norms, num_rows, eligible, class_values,
            num_classes, t, key):
    classes = _traced_classes(class_values, num_classes, class_chunk)
    offset, g_sq, record, sq_distance = _local_state(
        rows, scale, sq_norms, num_rows, classes, t, shape)
    return kmeans_lib.plusplus_local(k, key, eligible, offset,
                                     sq_distance=sq_distance,
                                     center_record=record, first_scores=g_sq)

  return jax.shard_map(
      local, mesh=shape.mesh,
      in_specs=(ROWS, ROWS, ROWS, REPLICATED, ROWS) + (REPLICATED,) * 4,
      out_specs=REPLICATED, check_vma=False)(
          rows, scale, sq_norms, num_rows, eligible, class_values,
          num_classes, t, key)


@functools.partial(jax.jit, static_argnames=("shape", "class_chunk"))
def _distance_kernel(rows, scale, sq_norms, num_rows, class_values,
                     num_classes, t, center, *, shape: PoolLayout,
                     class_chunk: int):
  def local(rows, scale, sq_norms, num_rows, class_values, num_classes, t,
            center):
    classes = _traced_classes(class_values, num_classes, class_chunk)
    _, _, record, sq_distance = _local_state(rows, scale, sq_norms, num_rows,
                                             classes, t, shape)
    return sq_distance(record(center))

  return jax.shard_map(
      local, mesh=shape.mesh,
      in_specs=(ROWS, ROWS, ROWS) + (REPLICATED,) * 5,
      out_specs=ROWS, check_vma=False)(
          rows, scale, sq_norms, num_rows, class_values, num_classes, t,
          center)


def _class_operand(classes, pool: ShardedRows, block: int) -> kernels.Operand:
  return kernels.host_operand(classes, pool, block=block, name="classes",
                              pool_has="the items have", normalize=False)


def gradient_sq_distances(queries, classes, centers, *,
                          logit_scale: float = 10.,
                          mesh: Mesh | None = None,
                          block: int = DEFAULT_BLOCK) -> np.ndarray:
  """||g_i - g_c||^2 between BADGE gradient embeddings, without building g.

  Args:
    queries: `(N, D)` item embeddings z (used as given).
    classes: `(C, D)` class embeddings (the other modality's items).
    centers: row indices c of `queries` (a few).
    logit_scale: t in p = softmax(t <z, z_y>).

  Returns:
    `(N, len(centers))` float32. Cost: `2 (len(centers) + 2) N C D` flops.
  """
  pool = layout_lib.shard_rows(queries, mesh, block=block, name="queries")
  operand = _class_operand(classes, pool, block)
  replicated = sharding.replicated(pool.layout.mesh)
  t = sharding.put_global(np.float32(logit_scale), replicated)
  return np.stack([kernels.to_host(_distance_kernel(
      pool.rows, pool.scale, pool.sq_norms, pool.num_rows, operand.values,
      operand.count, t, sharding.put_global(np.int32(c), replicated),
      shape=pool.layout.shape, class_chunk=operand.chunk), pool.layout)
                   for c in centers], axis=1)


def badge_sharded(pool: ShardedRows, eligible: jax.Array, classes, k: int, *,
                  seed: int, logit_scale: float = 10.,
                  block: int = DEFAULT_BLOCK) -> np.ndarray:
  """k-means++ on the gradient embeddings of a laid-out modality.

  Args:
    pool: the modality's embeddings (normalised through the pool's scale);
      eligible: blocked bool, the items that may be picked (k of them at
      least).
    classes: `(C, D)` class embeddings, C >= 1, or their `kernels.Operand`.
    k, seed, logit_scale, block: as `badge`.

  Returns:
    `(k,)` int64 distinct row indices in pick order. Compiled once per pool
    size bucket, class-count bucket and k. Cost: module docstring.
  """
  if not isinstance(classes, kernels.Operand):
    classes = _class_operand(classes, pool, block)
  replicated = sharding.replicated(pool.layout.mesh)
  picks = _badge_kernel(
      pool.rows, pool.scale, pool.sq_norms, pool.num_rows, eligible,
      classes.values, classes.count,
      sharding.put_global(np.float32(logit_scale), replicated),
      jax.random.PRNGKey(seed), shape=pool.layout.shape,
      class_chunk=classes.chunk, k=layout_lib.check_count(k, "k", 1))
  return np.asarray(picks, np.int64)


def badge(embeddings, annotated, *, budget: int, seed: int, candidates=None,
          modality: str = "random", logit_scale: float = 10.,
          metric: str = "euclidean", distances_on: str = "normalized",
          min_dist=None, feature_dtype=None,
          mesh: Mesh | None = None, block: int = DEFAULT_BLOCK,
          picks_per_pass: int = kernels.DEFAULT_PICKS_PER_PASS
          ) -> list[Query]:
  """BADGE (App. C.4): a random modality, k-means++ on gradient embeddings.

  The strategies' signature (`strategies` module docstring). `modality`:
  "random" (the paper's adaptation) or a modality name (e.g. "image" for
  the missing-data experiment); if it holds fewer available items than the
  budget, the rest comes from the next modality of the seeded order. The
  classes of modality m are the available items of every other modality;
  with none, every gradient is 0 and the picks are uniform. `metric`,
  `distances_on`, `min_dist`, `picks_per_pass` are accepted for a uniform
  interface and unused. Cost: module docstring, `O(B N_m C D)`.
  """
  del metric, distances_on, min_dist, picks_per_pass
  rnd, budget = strategies._start(  # pylint: disable=protected-access
      embeddings, annotated, candidates, budget=budget, metric="euclidean",
      mesh=mesh, block=block, feature_dtype=feature_dtype)
  rng = np.random.default_rng(seed)
  order = strategies._random_order(rnd, rng)  # pylint: disable=protected-access
  if modality != "random":
    if modality not in rnd.modalities:
      raise ValueError(f"modality must be 'random' or a modality name "
                       f"{list(rnd.modalities)}, got {modality!r}.")
    order = [modality] + [m for m in order if m != modality]
  queries = []
  allocate = strategies._allocate  # pylint: disable=protected-access
  plan = allocate(order, rnd, budget)
  for m, count in plan:
    others = [o for o in rnd.modalities if o != m]
    classes = np.concatenate([
        np.asarray(kernels.gather_rows(rnd.pools[o],
                                       np.flatnonzero(rnd.available[o])
                                       ).values)[:rnd.num_available(o)]
        for o in others])
    eligible = rnd.available_mask(m)
    if classes.shape[0] == 0:
      picks = rng.choice(np.flatnonzero(rnd.available[m]), count,
                         replace=False)
    else:
      picks = badge_sharded(rnd.pools[m], eligible, classes, count,
                            seed=int(rng.integers(2 ** 31)),
                            logit_scale=logit_scale, block=block)
    queries += [(m, int(i)) for i in picks]
  return queries
