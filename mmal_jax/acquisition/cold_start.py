"""Cold-start selectors (MMCSAL Stage 2 and its baselines), sharded.

Setting (the second paper, docs/algorithms.md "MMCSAL"): pairs are given,
labels are bought, nothing is labelled yet. A selector sees every pair's
representations, one `(N, D_m)` array per modality (row i of each = pair i),
and returns the pairs to label. One signature:

  fn(reps: dict[str, (N, D_m)], *, budget, seed, mesh=None,
     block=DEFAULT_BLOCK, **hparams) -> (budget,) int64 distinct indices

Representations are L2-normalised per modality and concatenated,
`r_i = r^1_i ⊕ ... ⊕ r^M_i` (every row has norm sqrt(M)). Selectors
(`SELECTORS`):
  random   uniform without replacement.
  kcenter  KGC: greedy k-center (Sener & Savarese) on the concatenation,
           `kernels.kcenter_greedy` (deterministic; `seed` unused).
  kmeans   K-means with B clusters (k-means++ seeding, `kmeans.py`), then
           each centroid in turn takes its nearest unused sample.
  activeft ActiveFT (Xie et al. 2023): B learnable centroids theta_j =
           theta^1_j ⊕ ... ⊕ theta^M_j, initialised from random samples,
           minimising D(R, Theta) - lambda_div R(Theta) with Adam (lr 1e-3,
           cosine decay, 300 iterations), tau = 0.07; then each centroid in
           turn takes its most similar unused sample. `travel` (below)
           replaces the fixed lr by one scaled to the pool.
  mmcsal   ActiveFT plus the alignment term: minimise
           D - lambda_div R - lambda_align A (eqs. 5-9; eq. 9 prints
           `+ lambda_align R`, a typo: the text maximises alignment A).
           lambda_align=0 is ActiveFT; the paper's MMCSAL-proto and
           MMCSAL-align ablations differ in the Stage-1 representations
           they are given (with / without prototypes), chosen by the
           experiment (`mmal_jax.mmcsal`), not here.

The objective, with cos^m_ij = cos(r^m_i, theta^m_j) and M modalities:
  D = -mean_i max_j sum_m cos^m_ij / (M tau)                       (eq. 6)
  R = -mean_j log sum_{k != j} exp(sum_m cos(th^m_j, th^m_k) / (M tau))  (7)
  A = mean_j log sum_k exp(cos(th^1_j, th^2_k) / tau)              (eq. 8)
(A averaged over modality pairs m < m' for M > 2; 0 for M = 1.) The paper's
equations, as ALGORITHMS.md specifies; ActiveFT's released code combines D
and R per sample instead. "Most similar" is sum_m cos^m (the paper's
smallest uni-modal distances).

Why the default selection barely moves, and `travel`. The centroids start
at B random pairs drawn by `np.random.default_rng(seed)`, the very pairs
`random` picks with that seed, and each ends by taking its most similar
unused pair, at first itself. Adam moves a coordinate by about lr per step
whatever the gradient's size, so 300 steps of lr 1e-3 under cosine decay
move a coordinate by at most ~0.15 (lr x iterations / 2) and a unit vector
by a few tenths; where pairs are farther apart than that (a small or sparse
pool) every centroid's nearest pair stays its initial one and the selection
is `random`'s. These are the paper's / ActiveFT's settings (ActiveFT's
pools are ImageNet-sized, where neighbours are close), so they stay the
default. `travel=T` instead sets lr = 2 T d / (sqrt(sum D_m) iterations),
d the median distance between two random pairs of the pool (the pool's
scale, estimated on up to 4096 sampled pairs): a centroid moving steadily
along one direction (Adam: ~lr per coordinate per step, sum D_m
coordinates, the cosine schedule averaging lr / 2) can cover about T times
that distance, so centroids can leave their initial pair and reach the
dense, diverse, aligned regions the objective asks for, on any pool.

Sharding: the pool rows are laid out over the mesh by `layout.shard_rows`.
D's gradient needs, per centroid, the sum of the rows it wins: one pass over
row blocks, each block's `(rows_per_block, B)` similarities and its
`(B, sum D_m)` one-hot sums, added in `kmeans.tree_sum`'s fixed tree. R and A
are `B x B`: computed in chunks of `theta_chunk` centroid rows, the chunks
spread over the devices the same way, each chunk's value and gradient
(autodiff of that chunk's terms) added in the same kind of tree. So the
optimisation, and the picks, are bit-identical on any device count, and
memory is `O(N sum D_m / devices + rows_per_block * B + theta_chunk * B +
B sum D_m * log(chunks per device))`. `batch_rows` bounds the work per
iteration on huge pools as ActiveFT does on ImageNet (a random subset of
about that many rows per iteration, whole blocks of a shuffled pool).
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from mmal_jax import sharding
from mmal_jax.acquisition import kernels
from mmal_jax.acquisition import kmeans as kmeans_lib
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition.kmeans import AXIS, REPLICATED, ROWS
from mmal_jax.acquisition.layout import DEFAULT_BLOCK, PoolLayout, ShardedRows

_INT_MAX = np.iinfo(np.int32).max
# Candidates gathered per centroid in one pass of `nearest_unused`.
_CANDIDATES = 64


def check_reps(reps) -> dict[str, np.ndarray]:
  """Validates `{modality: (N, D_m)}` representations (same N); values are
  checked finite where they are laid out (`layout.shard_rows`)."""
  if not isinstance(reps, Mapping) or not reps:
    raise ValueError(f"reps must be a non-empty dict modality -> (N, D) "
                     f"array, got {type(reps).__name__}.")
  out = {}
  for m, r in reps.items():
    out[m] = np.asarray(layout_lib.as_feature_array(r, f"reps[{m!r}]"),
                        np.float32)
  sizes = {m: r.shape[0] for m, r in out.items()}
  if len(set(sizes.values())) != 1 or 0 in sizes.values():
    raise ValueError(f"Every modality needs the same number N >= 1 of rows "
                     f"(row i = pair i), got {sizes}.")
  return out


def concat_normalized(reps) -> np.ndarray:
  """`(N, sum D_m)` float32: each modality L2-normalised, then concatenated."""
  reps = check_reps(reps)
  return np.concatenate(
      [r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
       for r in reps.values()], axis=1).astype(np.float32)


def check_budget(budget, num_rows: int) -> int:
  return kmeans_lib.check_pick_count(budget, num_rows, "budget", "pairs")


def lay_out(x, mesh: Mesh | None, block: int) -> ShardedRows:
  """The concatenated representations laid out as given (no normalisation:
  each modality part is already unit norm)."""
  return layout_lib.shard_rows(x, mesh, block=block, name="reps")


# --------------------------------------------------------------------------
# Each centroid takes its most similar unused row.


def _best_k(values, index, k: int):
  """The k best candidates of each query (row), by (value desc, index asc)."""
  neg, index = jax.lax.sort((-values, index), dimension=1, num_keys=2)
  return -neg[:, :k], index[:, :k]


@functools.partial(jax.jit, static_argnames=("shape", "k"))
def _top_k_kernel(rows, scale, num_rows, open_rows, queries, *,
                  shape: PoolLayout, k: int):
  """(Q, k) largest <query, scaled row> over open rows, global indices."""
  rows_per_block = shape.rows_per_block
  k_block = min(k, rows_per_block)

  def local(rows, scale, num_rows, open_rows, queries):
    offset = layout_lib.first_global_row(rows.shape[0])
    blocks = layout_lib.local_blocks(rows, rows_per_block)

    def one_block(j, carry):
      sims = kernels.dot("qd,rd->qr", queries, blocks[j].astype(jnp.float32))
      sims = jnp.where(open_rows[j][None, :], sims * scale[j][None, :],
                       -jnp.inf)
      values, index = jax.lax.top_k(sims, k_block)
      index = offset + j * rows_per_block + index.astype(jnp.int32)
      return _best_k(jnp.concatenate([carry[0], values], axis=1),
                     jnp.concatenate([carry[1], index], axis=1), k)

    q = queries.shape[0]
    init = (jnp.full((q, k), -jnp.inf), jnp.full((q, k), _INT_MAX, jnp.int32))
    values, index = jax.lax.fori_loop(
        0, kernels.num_local_blocks(num_rows, shape), one_block, init)
    all_values = jax.lax.all_gather(values, AXIS, axis=1, tiled=True)
    all_index = jax.lax.all_gather(index, AXIS, axis=1, tiled=True)
    return _best_k(all_values, all_index, k)

  return jax.shard_map(
      local, mesh=shape.mesh,
      in_specs=(ROWS, ROWS, REPLICATED, ROWS, REPLICATED),
      out_specs=(REPLICATED, REPLICATED), check_vma=False)(
          rows, scale, num_rows, open_rows, queries)


def nearest_unused(pool: ShardedRows, queries, eligible=None) -> np.ndarray:
  """Query j = 0, 1, ... in turn takes the eligible row it is most similar
  to (largest inner product) that no earlier query took.

  Args:
    pool: laid-out rows (`N`).
    queries: `(Q, D)` (centroids); Q <= eligible rows.
    eligible: optional `(N,)` bool.

  Returns:
    `(Q,)` int64 distinct row indices. Exactly the sequential greedy: one
    pass gathers each query's 64 best rows; a query whose candidates were all
    taken triggers another pass for the rest (rare). Ties: smaller index.
    Cost: `O(Q N D)` flops per pass, memory `O(Q * (64 + rows_per_block))`.
  """
  n = pool.layout.num_rows
  closed = (np.zeros(n, np.bool_) if eligible is None
            else ~np.asarray(eligible, np.bool_))
  queries = np.asarray(queries, np.float32)
  num_queries = queries.shape[0]
  check_budget(num_queries, int((~closed).sum()))
  k = min(_CANDIDATES, int((~closed).sum()))
  if not np.isfinite(queries).all():
    raise ValueError("queries hold NaN or inf.")
  queries = sharding.put_global(queries,
                                sharding.replicated(pool.layout.mesh))
  picks = np.full(num_queries, -1, np.int64)
  j = 0
  while j < num_queries:
    start = j
    values, index = _top_k_kernel(
        pool.rows, pool.scale, pool.num_rows,
        layout_lib.shard_mask(~closed, pool.layout), queries,
        shape=pool.layout.shape, k=k)
    values, index = np.asarray(values), np.asarray(index)
    while j < num_queries:
      free = [i for v, i in zip(values[j], index[j])
              if v > -np.inf and not closed[i]]
      if not free:
        if j == start:  # Cannot happen with finite queries and free rows.
          raise RuntimeError(f"nearest_unused found no free row for query "
                             f"{j}.")
        break  # All of query j's candidates were taken: next pass.
      picks[j] = free[0]
      closed[free[0]] = True
      j += 1
  return picks


# --------------------------------------------------------------------------
# ActiveFT / MMCSAL centroid optimisation.


# Arithmetic in the differentiated code multiplies by reciprocals and never
# divides an array by a broadcast: XLA may rewrite such a division into a
# multiplication by the reciprocal in one program and not in another, which
# would make results depend on the mesh.


@jax.custom_jvp
def _normalize_halves(theta):
  """theta (B, M, D) with each modality's part L2-normalised; zero parts
  (padding centroids) stay zero, with zero gradient."""
  return theta * _inverse_norm(theta)


def _inverse_norm(theta):
  sq = jnp.sum(theta * theta, axis=-1, keepdims=True)
  positive = sq > 0
  return jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, sq, 1.)), 0.)


@_normalize_halves.defjvp
def _normalize_halves_jvp(primals, tangents):
  (theta,), (dtheta,) = primals, tangents
  inverse = _inverse_norm(theta)
  unit = theta * inverse
  return unit, inverse * (
      dtheta - unit * jnp.sum(unit * dtheta, axis=-1, keepdims=True))


def _spread_terms(theta, first_row, *, chunk, budget, tau, lambda_div,
                  lambda_align):
  """-lambda_div R - lambda_align A restricted to centroid rows
  [first_row, first_row + chunk) (their share of the means over j)."""
  num_modalities = theta.shape[1]
  tn = _normalize_halves(theta)
  rows = jax.lax.dynamic_slice_in_dim(tn, first_row, chunk)
  j = first_row + jnp.arange(chunk)
  k = jnp.arange(theta.shape[0])
  row_ok = j < budget
  col_ok = (k < budget)[None, :]
  value = 0.
  if lambda_div and budget > 1:
    intra = kernels.dot("jmd,kmd->jk", rows, tn) * (
        1. / (num_modalities * tau))
    intra = jnp.where(col_ok & (j[:, None] != k[None, :]), intra, -jnp.inf)
    lse = jax.nn.logsumexp(intra, axis=1)
    value += (lambda_div / budget) * jnp.sum(jnp.where(row_ok, lse, 0.))
  pairs = list(itertools.combinations(range(num_modalities), 2))
  if lambda_align and pairs:
    align = 0.
    for a, b in pairs:
      cross = kernels.dot("jd,kd->jk", rows[:, a], tn[:, b]) * (1. / tau)
      align += jax.nn.logsumexp(jnp.where(col_ok, cross, -jnp.inf), axis=1)
    value -= (lambda_align / (budget * len(pairs))) * jnp.sum(
        jnp.where(row_ok, align, 0.))
  return value


def _statistics(*, shape: PoolLayout, budget, padded_budget, chunk,
                keep_prob, tau, lambda_div, lambda_align):
  """`(rows, scale, num_rows, valid, theta, key) -> (wins, used, best,
  spread, spread_grad)`.

  One iteration's sharded sums, replicated: `wins` (B_pad, sum D_m) the sum
  of the rows each centroid wins, `used` the rows counted, `best` the sum of
  their best similarities (so D = -best / (used M tau)), and the value and
  gradient of -lambda_div R - lambda_align A.
  """
  num_chunks = padded_budget // chunk
  chunks_per_device = layout_lib.next_pow2(-(-num_chunks // shape.mesh.size))
  theta_ok = jnp.arange(padded_budget) < budget

  def statistics(rows, scale, num_rows, valid, theta, key):
    tn = _normalize_halves(theta).reshape(padded_budget, -1)
    blocks = layout_lib.local_blocks(rows, shape.rows_per_block)
    offset_blocks = shape.blocks_per_device * jax.lax.axis_index(AXIS)

    def block_stats(j):
      x = blocks[j].astype(jnp.float32) * scale[j][:, None]
      sims = jnp.where(theta_ok[None, :], kernels.dot("rd,bd->rb", x, tn),
                       -jnp.inf)
      wins = jnp.argmax(sims, axis=1)
      best = jnp.max(sims, axis=1)
      ok = valid[j]
      one_hot = ((wins[:, None] == jnp.arange(padded_budget)[None, :]) &
                 ok[:, None]).astype(jnp.float32)
      return (kernels.dot("rb,rd->bd", one_hot, x),
              jnp.sum(ok.astype(jnp.float32)),
              jnp.sum(jnp.where(ok, best, 0.)))

    def sampled_block_stats(j):
      keep = jax.random.bernoulli(
          jax.random.fold_in(key, offset_blocks + j), keep_prob)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(block_stats, j))
      return jax.lax.cond(keep, block_stats, lambda _: zeros, j)

    wins, used, best = kmeans_lib.tree_sum(
        block_stats if keep_prob >= 1 else sampled_block_stats,
        shape.blocks_per_device,
        kmeans_lib.num_units(num_rows, shape.rows_per_block))
    spread = functools.partial(
        _spread_terms, chunk=chunk, budget=budget, tau=tau,
        lambda_div=lambda_div, lambda_align=lambda_align)
    first_chunk = jax.lax.axis_index(AXIS) * chunks_per_device
    value, grad = kmeans_lib.tree_sum(
        lambda c: jax.value_and_grad(spread)(theta,
                                             (first_chunk + c) * chunk),
        chunks_per_device, num_chunks)
    return wins, used, best, value, grad

  return jax.shard_map(
      statistics, mesh=shape.mesh,
      in_specs=(ROWS, ROWS, REPLICATED, ROWS, REPLICATED, REPLICATED),
      out_specs=REPLICATED, check_vma=False)


@functools.partial(jax.jit, static_argnames=(
    "shape", "budget", "iterations", "chunk", "keep_prob", "lr", "tau",
    "lambda_div", "lambda_align"))
def _optimize_kernel(rows, scale, num_rows, valid, theta0, key, *, shape,
                     budget, iterations, chunk, keep_prob, lr, tau,
                     lambda_div, lambda_align):
  padded_budget, num_modalities, _ = theta0.shape
  sharded_statistics = _statistics(
      shape=shape, budget=budget,
      padded_budget=padded_budget, chunk=chunk, keep_prob=keep_prob, tau=tau,
      lambda_div=lambda_div, lambda_align=lambda_align)
  optimizer = optax.adam(optax.cosine_decay_schedule(lr, iterations))

  def distribution_gap(theta, wins, used):
    """D for fixed winners: -(1 / (n M tau)) sum_j <wins_j, theta_j / |.|>."""
    tn = _normalize_halves(theta).reshape(padded_budget, -1)
    scale = jnp.reciprocal(jnp.maximum(used, 1.) * (num_modalities * tau))
    return -scale * jnp.sum(wins * tn)

  def step(carry, t):
    theta, opt_state = carry
    # The barrier keeps the update's arithmetic out of the kernel's fusions.
    wins, used, _, spread_value, spread_grad = jax.lax.optimization_barrier(
        sharded_statistics(rows, scale, num_rows, valid, theta,
                           jax.random.fold_in(key, t)))
    gap, gap_grad = jax.value_and_grad(distribution_gap)(theta, wins, used)
    updates, opt_state = optimizer.update(gap_grad + spread_grad, opt_state)
    return (optax.apply_updates(theta, updates), opt_state), gap + spread_value

  (theta, _), losses = jax.lax.scan(step, (theta0, optimizer.init(theta0)),
                                    jnp.arange(iterations))
  return theta, losses


def _check_hparams(iterations, lr, tau, batch_rows, theta_chunk, travel=None):
  for name, value in (("iterations", iterations), ("theta_chunk", theta_chunk)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  for name, value in (("lr", lr), ("tau", tau)):
    if not value > 0:
      raise ValueError(f"{name} must be > 0, got {value!r}.")
  if travel is not None and not travel > 0:
    raise ValueError(f"travel must be > 0 or None, got {travel!r}.")
  if batch_rows is not None and (not isinstance(batch_rows, (int, np.integer))
                                 or batch_rows < 1):
    raise ValueError(f"batch_rows must be a positive integer or None, got "
                     f"{batch_rows!r}.")


def pool_scale(x: np.ndarray, seed: int, samples: int = 4096) -> float:
  """The median Euclidean distance between two different random rows of `x`
  `(N, D)`, estimated on `min(samples, N (N - 1))` sampled pairs (seeded).
  Cost: `O(samples D)`."""
  n = len(x)
  if n < 2:
    return 0.
  rng = np.random.default_rng([seed, 1])
  i = rng.integers(0, n, samples)
  j = (i + rng.integers(1, n, samples)) % n  # Never i itself.
  return float(np.median(np.linalg.norm(x[i] - x[j], axis=1)))


def travel_lr(x: np.ndarray, travel: float, iterations: int,
              seed: int) -> float:
  """The Adam lr under which a centroid can cover about `travel` times the
  pool's scale (`pool_scale`) over `iterations` cosine-decayed steps:
  2 travel d / (sqrt(D) iterations) (module docstring)."""
  return (2. * travel * pool_scale(x, seed)
          / (np.sqrt(x.shape[1]) * iterations))


def optimize_centroids(reps, *, budget: int, seed: int,
                       mesh: Mesh | None = None, block: int = DEFAULT_BLOCK,
                       lambda_div: float = 1., lambda_align: float = 1.,
                       tau: float = 0.07, iterations: int = 300,
                       lr: float = 1e-3, batch_rows: int | None = 100_000,
                       theta_chunk: int = 256, travel: float | None = None):
  """ActiveFT / MMCSAL Stage 2 optimisation (see the module docstring).

  Args:
    reps: `{m: (N, D_m)}`; budget: B centroids; seed: initial samples
      (uniform without replacement), row sampling and shuffling.
    lambda_div, lambda_align, tau: the objective's weights and temperature.
    iterations, lr: Adam steps, with a cosine decay of lr to 0.
    travel: None (default: `lr` as given, the paper's setting), or T > 0:
      lr = `travel_lr(x, T, iterations, seed)` instead, scaled to the pool so
      that the selection moves also on small pools (module docstring).
    batch_rows: about this many rows per iteration (whole blocks of the
      shuffled pool drawn at random, as ActiveFT's ImageNet sampling); None or
      >= N: every row, every iteration.
    theta_chunk: centroid rows per chunk of the `B x B` terms.
    mesh, block: rows sharded over `mesh` in blocks of at most `block`.

  Returns:
    (pool, order, theta, losses): the laid-out concatenated rows (in `order`,
    a permutation of the N pairs when rows are sampled, else None), the
    optimised `(B, M, D)` centroids (modality parts normalised), and the
    `(iterations,)` objective before each step.
    Cost per iteration: `4 N B sum D_m` flops for D (similarities and one-hot
    sums, over the rows used), `~3 (M + pairs) B^2 D` for R and A.
  """
  reps = check_reps(reps)
  x = concat_normalized(reps)
  n = x.shape[0]
  budget = check_budget(budget, n)
  _check_hparams(iterations, lr, tau, batch_rows, theta_chunk, travel)
  if travel is not None:
    lr = travel_lr(x, travel, iterations, seed)
  dims = {r.shape[1] for r in reps.values()}
  if len(dims) != 1:
    raise ValueError(f"The centroid objective compares modalities: every "
                     f"modality needs the same dimension, got "
                     f"{ {m: r.shape[1] for m, r in reps.items()} }.")
  dim, num_modalities = dims.pop(), len(reps)
  rng = np.random.default_rng(seed)
  keep_prob = 1. if batch_rows is None else min(1., batch_rows / n)
  order = rng.permutation(n) if keep_prob < 1 else None
  pool = lay_out(x if order is None else x[order], mesh, block)
  chunk = min(theta_chunk, layout_lib.next_pow2(budget))
  padded_budget = -(-budget // chunk) * chunk
  init = rng.choice(n, budget, replace=False)
  theta0 = np.zeros((padded_budget, num_modalities, dim), np.float32)
  theta0[:budget] = x[init].reshape(budget, num_modalities, dim)
  theta, losses = _optimize_kernel(
      pool.rows, pool.scale, pool.num_rows,
      kmeans_lib.eligible_mask(None, pool.layout, "valid")[0],
      sharding.put_global(theta0, sharding.replicated(pool.layout.mesh)),
      jax.random.PRNGKey(seed), shape=pool.layout.shape, budget=budget,
      iterations=int(iterations), chunk=chunk, keep_prob=float(keep_prob),
      lr=float(lr), tau=float(tau), lambda_div=float(lambda_div),
      lambda_align=float(lambda_align))
  theta = np.asarray(_normalize_halves(theta))[:budget]
  return pool, order, theta, np.asarray(losses)


# --------------------------------------------------------------------------
# Selectors.


def random_selector(reps, *, budget: int, seed: int, mesh: Mesh | None = None,
                    block: int = DEFAULT_BLOCK) -> np.ndarray:
  """Uniform without replacement. `mesh`, `block` unused. Cost: O(N)."""
  del mesh, block
  n = next(iter(check_reps(reps).values())).shape[0]
  return np.random.default_rng(seed).choice(
      n, check_budget(budget, n), replace=False).astype(np.int64)


def kcenter(reps, *, budget: int, seed: int, mesh: Mesh | None = None,
            block: int = DEFAULT_BLOCK,
            picks_per_pass: int = kernels.DEFAULT_PICKS_PER_PASS
            ) -> np.ndarray:
  """KGC: greedy k-center on the concatenation, first pick the row farthest
  from the mean (`kernels.kcenter_greedy`). Deterministic: `seed` unused.
  Cost: `O(B N sum D_m)` flops in as few as B / picks_per_pass passes."""
  del seed
  x = concat_normalized(reps)
  budget = check_budget(budget, x.shape[0])
  return np.asarray(kernels.kcenter_greedy(
      x, budget, mesh=mesh, block=block, picks_per_pass=picks_per_pass),
                    np.int64)


def kmeans_selector(reps, *, budget: int, seed: int, mesh: Mesh | None = None,
                    block: int = DEFAULT_BLOCK, max_iters: int = 100,
                    tol: float = 0.) -> np.ndarray:
  """K-means (B clusters, k-means++ seeding with `seed`) on the
  concatenation; centroid j in turn takes its nearest unused row (nearest in
  Euclidean distance = largest inner product, all rows having norm sqrt(M)).
  Cost: `O(B N sum D_m)` flops per Lloyd step (at most `max_iters`)."""
  x = concat_normalized(reps)
  budget = check_budget(budget, x.shape[0])
  pool = lay_out(x, mesh, block)
  seeds = kmeans_lib.kmeans_plusplus_sharded(pool, budget, seed=seed)
  result = kmeans_lib.kmeans_sharded(pool, x[seeds], max_iters=max_iters,
                                     tol=tol)
  return nearest_unused(pool, result.centroids)


def mmcsal(reps, *, budget: int, seed: int, mesh: Mesh | None = None,
           block: int = DEFAULT_BLOCK, lambda_div: float = 1.,
           lambda_align: float = 1., tau: float = 0.07,
           iterations: int = 300, lr: float = 1e-3,
           batch_rows: int | None = 100_000,
           theta_chunk: int = 256, travel: float | None = None) -> np.ndarray:
  """MMCSAL Stage 2: optimise B centroids (`optimize_centroids`), then
  centroid j in turn takes its most similar unused pair. `lambda_align=0`
  is ActiveFT; `travel` scales lr to the pool (module docstring). Cost:
  `iterations` x (`4 N B sum D_m` + `O(B^2 D)`) flops."""
  pool, order, theta, _ = optimize_centroids(
      reps, budget=budget, seed=seed, mesh=mesh, block=block,
      lambda_div=lambda_div, lambda_align=lambda_align, tau=tau,
      iterations=iterations, lr=lr, batch_rows=batch_rows,
      theta_chunk=theta_chunk, travel=travel)
  picks = nearest_unused(pool, theta.reshape(theta.shape[0], -1))
  return picks if order is None else order[picks].astype(np.int64)


activeft = functools.partial(mmcsal, lambda_align=0.)
activeft.__doc__ = """ActiveFT on the concatenated representations: `mmcsal`
with lambda_align = 0 (same signature and cost)."""


class _Registry(dict):
  """A dict whose missing keys raise an error listing the known ones."""

  def __missing__(self, name):
    raise KeyError(f"Unknown cold-start selector {name!r}; expected one of "
                   f"{sorted(self)}.")


SELECTORS: dict[str, Callable[..., np.ndarray]] = _Registry(
    random=random_selector, kcenter=kcenter, kmeans=kmeans_selector,
    activeft=activeft, mmcsal=mmcsal)


# --------------------------------------------------------------------------
# The unaligned loop's cold start.

SPLITS = ("seed", "even")


def cold_start_queries(embeddings, *, budget: int, selector: str, seed: int,
                       mesh: Mesh | None = None, split: str = "seed",
                       **hparams) -> list[tuple[str, int]]:
  """The first round of the unaligned loop, chosen by a cold-start selector.

  Unaligned items have no pairs, so a selector cannot see concatenated
  representations: it runs on one modality's embeddings at a time, as a
  single-modality `reps` (`mmcsal` then has no alignment term and equals
  `activeft`).
    split="seed": all of the budget in one modality, drawn with `seed`
      (today's cold-start rule: a random modality); if it holds fewer items
      than the budget, the rest comes from the next modality of the seeded
      order.
    split="even": the budget split evenly over the modalities (the remainder
      to the first ones of the seeded order), each share capped by its
      modality's size, the excess moving on.

  Args:
    embeddings: `{m: (N_m, D)}` the items the round may query (indices are
      rows of these arrays).
    budget, seed, mesh: as for the selectors; selector: a `SELECTORS` name;
    hparams: passed to the selector.

  Returns:
    `budget` distinct `(modality, index)` queries. Cost: the selector's, on
    each modality that gets a share.
  """
  if not isinstance(embeddings, Mapping) or not embeddings:
    raise ValueError("embeddings must be a non-empty dict modality -> "
                     "(N_m, D) array.")
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  fn = SELECTORS[selector]
  sizes = {m: int(np.shape(z)[0]) for m, z in embeddings.items()}
  budget = check_budget(budget, sum(sizes.values()))
  modalities = list(embeddings)
  order = [modalities[i] for i in
           np.random.default_rng(seed).permutation(len(modalities))]
  if split == "seed":
    wanted = {m: 0 for m in order}
    wanted[order[0]] = budget
  else:
    wanted = {m: budget // len(order) + (i < budget % len(order))
              for i, m in enumerate(order)}
  shares, excess = {}, 0
  for m in order:  # Cap each share by the modality's size, pass the excess on.
    shares[m] = min(sizes[m], wanted[m])
    excess += wanted[m] - shares[m]
  for m in order:
    extra = min(excess, sizes[m] - shares[m])
    shares[m] += extra
    excess -= extra
  queries = []
  for m in order:
    if shares[m]:
      picks = fn({m: embeddings[m]}, budget=shares[m], seed=seed, mesh=mesh,
                 **hparams)
      queries += [(m, int(i)) for i in picks]
  return queries


def with_cold_start(strategy: Callable[..., list[tuple[str, int]]],
                    selector: str) -> Callable[..., list[tuple[str, int]]]:
  """`strategy` whose cold-start round is chosen by a cold-start selector.

  Args:
    strategy: an acquisition strategy (`strategies` module signature).
    selector: a `SELECTORS` name, or "" for `strategy` unchanged (its own
      cold start: a random modality).

  Returns:
    A function with the strategies' signature. On a round where nothing is
    annotated it returns `cold_start_queries` (split="seed": the seed's
    modality first) over the available items (the candidates, when given),
    with the selector's default hyper-parameters; on any other round, and
    for the strategy's own hyper-parameters, it is `strategy`. Cost: the
    selector's on the first round, the strategy's after.

  Raises:
    KeyError: an unknown selector (listing the known ones).
  """
  if not selector:
    return strategy
  SELECTORS[selector]  # pylint: disable=pointless-statement

  @functools.wraps(strategy)
  def acquire(embeddings, annotated, *, budget: int, seed: int,
              candidates=None, mesh: Mesh | None = None,
              block: int = DEFAULT_BLOCK, **hparams):
    if not isinstance(annotated, Mapping) or any(
        np.asarray(a).any() for a in annotated.values()):
      return strategy(embeddings, annotated, budget=budget, seed=seed,
                      candidates=candidates, mesh=mesh, block=block,
                      **hparams)
    items = {m: (np.arange(np.shape(a)[0]) if candidates is None
                 else np.flatnonzero(candidates[m]))
             for m, a in annotated.items()}
    picked = cold_start_queries(
        {m: np.asarray(embeddings[m])[items[m]] for m in items},
        budget=budget, selector=selector, seed=seed, mesh=mesh, block=block)
    return [(m, int(items[m][i])) for m, i in picked]

  return acquire
