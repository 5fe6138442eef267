"""Acquisition strategies: MMAL (Algorithm 1) and the baselines of the paper.

Every strategy has one signature:

  fn(embeddings: dict[str, (N_m, D)], annotated: dict[str, bool (N_m,)], *,
     budget: int, seed: int, candidates: dict[str, bool (N_m,)] | None = None,
     **hparams) -> list[tuple[str, int]]

and returns exactly `budget` distinct queries `(modality, index)`, each
unannotated and, when `candidates` is given (the stream buffer), inside it.
Embeddings are L2-normalised (by the kernels, without a normalised copy). Any
number (>= 2) of modalities. An embedding is a host array `(N_m, D)` or a
`jax.Array`; a row-sharded `jax.Array` laid out as `layout.shard_rows`
describes (`N_m = len(annotated[m])` real rows first, then padding) is used
where it lies, never gathered to a host.

Hyper-parameters shared by all strategies:
  metric: "euclidean" (default) or "cosine" distance for coverage.
  distances_on: "normalized" (default) or "raw": the vectors the coverage
    distances (min-distance cache, k-center, the modality's radius) are
    computed on. "normalized": the L2-normalised embeddings, on which
    Euclidean distance sqrt(2 - 2 cos) is a monotone function of cosine
    distance, so both metrics rank alike and pick the same items. "raw": the
    embeddings as passed (the loop passes the towers' outputs before their
    normalisation), so Euclidean distance also sees their norms; cosine
    distance ignores norms and is the same either way. Margins (Step 3) are
    always between normalised embeddings (the towers' matching scores).
  min_dist: optional cache `{m: (N_m,)}`: distance of each item of m to its
    nearest annotated item of m, for these embeddings and annotations (see
    `build_min_distance_cache` / `update_min_distance_cache`). Without it,
    strategies that need it build it, `O(N_m |S_m| D)`.
  feature_dtype: storage dtype of the features and operand dtype of the
    products ("float32", "bfloat16"; default: the embeddings' own, float64 as
    float32); products accumulate in float32.
  mesh: the device mesh (default: all devices); block: tile edge.
  picks_per_pass: greedy k-center picks per pass over the pool (see
    `kernels.kcenter_greedy_sharded`; the picks do not depend on it).

When the chosen modality holds fewer available items than the budget, the
rest is taken from the next modality in the strategy's order of preference.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmal_jax.acquisition import kernels
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition.layout import DEFAULT_BLOCK, ShardedRows

Query = tuple[str, int]
MODALITY_CHOICES = ("auto", "random")


@dataclasses.dataclass(frozen=True)
class _Round:
  """One acquisition round's inputs, validated and laid out on the mesh."""
  modalities: tuple[str, ...]
  pools: dict[str, ShardedRows]      # Embeddings, normalised by the kernels.
  # What coverage distances are computed on: `pools`, or with
  # distances_on="raw" and the Euclidean metric the same rows unscaled.
  coverage: dict[str, ShardedRows]
  annotated: dict[str, np.ndarray]   # (N_m,) bool
  available: dict[str, np.ndarray]   # (N_m,) bool: unannotated and candidate.
  metric: str
  block: int

  def available_mask(self, m: str) -> jax.Array:
    return layout_lib.shard_mask(self.available[m], self.pools[m].layout)

  def num_available(self, m: str) -> int:
    return int(self.available[m].sum())


def _num_items(embeddings, annotated) -> dict[str, int]:
  """N_m: a host array's rows; a jax.Array may carry padding rows after the
  N_m = len(annotated[m]) items (a laid-out pool, see `layout.shard_rows`)."""
  if not isinstance(annotated, Mapping) or set(annotated) != set(embeddings):
    got = (sorted(annotated) if isinstance(annotated, Mapping)
           else type(annotated).__name__)
    raise ValueError(f"annotated must be a dict over the embeddings' "
                     f"modalities {sorted(embeddings)}, got {got}.")
  sizes = {}
  for m, z in embeddings.items():
    sizes[m] = z.shape[0]
    if isinstance(z, jax.Array) and np.ndim(annotated[m]) == 1:
      sizes[m] = min(z.shape[0], np.shape(annotated[m])[0])
  return sizes


def _check_masks(masks, sizes, name: str) -> dict[str, np.ndarray]:
  if not isinstance(masks, Mapping) or set(masks) != set(sizes):
    got = sorted(masks) if isinstance(masks, Mapping) else type(masks).__name__
    raise ValueError(f"{name} must be a dict over the embeddings' modalities "
                     f"{sorted(sizes)}, got {got}.")
  return {m: kernels.check_mask(masks[m], n, f"{name}[{m!r}]")
          for m, n in sizes.items()}


def _check_embeddings(embeddings) -> dict:
  if not isinstance(embeddings, Mapping) or len(embeddings) < 2:
    got = sorted(embeddings) if isinstance(embeddings, Mapping) else embeddings
    raise ValueError(f"Acquisition needs embeddings for at least two "
                     f"modalities, got {got!r}.")
  checked = {m: layout_lib.as_feature_array(z, f"embeddings[{m!r}]")
             for m, z in embeddings.items()}
  dims = {m: z.shape[1] for m, z in checked.items()}
  if len(set(dims.values())) != 1:
    raise ValueError(f"Embedding dimensions differ across modalities: {dims}; "
                     f"all towers must project to the same dimension.")
  return checked


DISTANCES_ON = ("normalized", "raw")


def check_distances_on(distances_on: str) -> str:
  if distances_on not in DISTANCES_ON:
    raise ValueError(f"Unknown distances_on {distances_on!r}; expected one "
                     f"of {DISTANCES_ON}.")
  return distances_on


def _lay_out(embeddings, annotated, candidates=None, *, metric="euclidean",
             distances_on="normalized", mesh=None, block=DEFAULT_BLOCK,
             feature_dtype=None) -> _Round:
  """Validates a round's inputs and lays each modality out on the mesh.

  Embeddings are host arrays `(N_m, D)` or `jax.Array`s; a row-sharded one
  in the layout of `layout.shard_rows` (`N_m = len(annotated[m])` real rows
  first) is used without a copy. Cost: one pass over every embedding (norms,
  finite check), plus the copy of those not already laid out; one more pass
  (no copy) for raw Euclidean coverage distances.
  """
  kernels.check_metric(metric)
  check_distances_on(distances_on)
  block = layout_lib.check_block(block)
  embeddings = _check_embeddings(embeddings)
  sizes = _num_items(embeddings, annotated)
  annotated = _check_masks(annotated, sizes, "annotated")
  for m, n in sizes.items():
    if n == 0:
      raise ValueError(f"Modality {m!r} is empty: no items to acquire from or "
                       f"to match against.")
  candidates = (None if candidates is None
                else _check_masks(candidates, sizes, "candidates"))
  available = {m: ~annotated[m] & (True if candidates is None
                                   else candidates[m]) for m in embeddings}
  mesh = layout_lib.resolve_mesh(mesh)
  pools = {
      m: layout_lib.shard_rows(
          z, mesh, block=block, normalize=True, dtype=feature_dtype,
          name=f"embeddings[{m!r}]",
          num_rows=sizes[m] if isinstance(z, jax.Array) else None)
      for m, z in embeddings.items()}
  coverage = pools
  if distances_on == "raw" and metric == "euclidean":
    # The same device rows, unscaled: shard_rows takes them without a copy.
    coverage = {m: layout_lib.shard_rows(
        p.rows, mesh, block=block, normalize=False, dtype=p.rows.dtype,
        name=f"embeddings[{m!r}]", num_rows=p.layout.num_rows)
                for m, p in pools.items()}
  return _Round(tuple(embeddings), pools, coverage, annotated, available,
                metric, block)


def _check_budget(rnd: _Round, budget, candidates_given: bool) -> int:
  budget = layout_lib.check_count(budget, "budget", 1)
  total = sum(rnd.num_available(m) for m in rnd.modalities)
  if budget > total:
    where = "unannotated" + (" candidate" if candidates_given else "")
    raise ValueError(f"budget={budget} is larger than the {total} {where} "
                     f"items left to query.")
  return budget


def _start(embeddings, annotated, candidates, *, budget, metric, mesh, block,
           feature_dtype, distances_on="normalized") -> tuple[_Round, int]:
  rnd = _lay_out(embeddings, annotated, candidates, metric=metric,
                 distances_on=distances_on, mesh=mesh, block=block,
                 feature_dtype=feature_dtype)
  return rnd, _check_budget(rnd, budget, candidates is not None)


def _allocate(order, rnd: _Round, budget: int) -> list[tuple[str, int]]:
  """Splits the budget over modalities in order of preference."""
  plan, remaining = [], budget
  for m in order:
    take = min(remaining, rnd.num_available(m))
    if take:
      plan.append((m, take))
      remaining -= take
  return plan


def _random_order(rnd: _Round, rng: np.random.Generator) -> list[str]:
  return [rnd.modalities[i] for i in rng.permutation(len(rnd.modalities))]


# --------------------------------------------------------------------------
# The min-distance cache (Step 1, and the starting distances of Step 2).


@jax.jit
def _masked_max(values, mask):
  return jnp.max(jnp.where(mask, values, -jnp.inf))


def _distance_to_annotated(rnd: _Round, m: str, indices) -> jax.Array:
  """Blocked distance of every item of m to items `indices` of m."""
  pool = rnd.coverage[m]
  return kernels.min_distance_sharded(
      pool, kernels.gather_rows(pool, indices, block=rnd.block),
      metric=rnd.metric)


def _check_cache(min_dist, rnd: _Round) -> dict[str, np.ndarray]:
  """A passed min-distance cache as host float32 vectors, validated."""
  if not isinstance(min_dist, Mapping) or set(min_dist) != set(rnd.modalities):
    raise ValueError(f"min_dist must be a dict over the modalities "
                     f"{sorted(rnd.modalities)}.")
  checked = {}
  for m in rnd.modalities:
    n = rnd.pools[m].layout.num_rows
    if tuple(np.shape(min_dist[m])) != (n,):
      raise ValueError(f"min_dist[{m!r}] must have shape ({n},), got "
                       f"{tuple(np.shape(min_dist[m]))}.")
    values = np.asarray(min_dist[m], np.float32)
    bad = np.isnan(values) | (values == -np.inf)
    if bad.any():
      raise ValueError(f"min_dist[{m!r}] holds {int(bad.sum())} NaN or -inf "
                       f"value(s), first at item {int(np.argmax(bad))}: a "
                       f"cache holds distances (finite, or +inf with no "
                       f"annotated item); rebuild it with "
                       f"build_min_distance_cache.")
    checked[m] = values
  return checked


def _cache_blocks(rnd: _Round, min_dist) -> dict[str, jax.Array]:
  """The round's min-distance cache in blocked layout: given, or built."""
  if min_dist is None:
    return {m: _distance_to_annotated(rnd, m, np.flatnonzero(rnd.annotated[m]))
            for m in rnd.modalities}
  return {m: layout_lib.row_vector(values, rnd.pools[m].layout, np.inf)
          for m, values in _check_cache(min_dist, rnd).items()}


def build_min_distance_cache(embeddings, annotated, *,
                             metric: str = "euclidean",
                             distances_on: str = "normalized",
                             mesh: Mesh | None = None,
                             block: int = DEFAULT_BLOCK,
                             feature_dtype=None) -> dict[str, np.ndarray]:
  """Distance of every item to its nearest annotated item of its modality.

  Args:
    embeddings: `{m: (N_m, D)}`, L2-normalised here as the strategies do
      (kept as given for `distances_on="raw"` Euclidean distances).
    annotated: `{m: (N_m,) bool}`.
    metric, distances_on, mesh, block, feature_dtype: as for the strategies.

  Returns:
    `{m: (N_m,) float32 numpy}`, +inf where modality m has no annotated
    item. Cost: `2 sum_m N_m |S_m| D` flops: the honest per-round cost
    whenever the embeddings change (every round after retraining).
  """
  rnd = _lay_out(embeddings, annotated, metric=metric,
                 distances_on=distances_on, mesh=mesh, block=block,
                 feature_dtype=feature_dtype)
  return {m: kernels.to_host(d, rnd.pools[m].layout)
          for m, d in _cache_blocks(rnd, None).items()}


def update_min_distance_cache(min_dist, embeddings, newly_annotated, *,
                              metric: str = "euclidean",
                              distances_on: str = "normalized",
                              mesh: Mesh | None = None,
                              block: int = DEFAULT_BLOCK,
                              feature_dtype=None) -> dict[str, np.ndarray]:
  """Folds newly annotated items into a min-distance cache.

  Valid while the embeddings stay the same (no retraining in between, e.g.
  fixed features, or several acquisitions per training round).

  Args:
    min_dist: `{m: (N_m,)}` from `build_min_distance_cache` (or earlier
      updates) on the same embeddings.
    embeddings: `{m: (N_m, D)}`.
    newly_annotated: `{m: int indices}` annotated since; missing keys: none.
    metric, distances_on, mesh, block, feature_dtype: as the cache was built
      with.

  Returns:
    The updated cache (numpy). Cost: `2 sum_m N_m |new_m| D` flops.
  """
  sizes = {m: np.shape(z)[0] for m, z in embeddings.items()}
  if isinstance(min_dist, Mapping) and set(min_dist) == set(embeddings):
    sizes = {m: np.shape(min_dist[m])[0] if np.ndim(min_dist[m]) == 1 else n
             for m, n in sizes.items()}
  none = {m: np.zeros(n, np.bool_) for m, n in sizes.items()}
  rnd = _lay_out(embeddings, none, metric=metric, distances_on=distances_on,
                 mesh=mesh, block=block, feature_dtype=feature_dtype)
  unknown = set(newly_annotated) - set(rnd.modalities)
  if unknown:
    raise ValueError(f"newly_annotated names unknown modalities "
                     f"{sorted(unknown)}; embeddings have "
                     f"{sorted(rnd.modalities)}.")
  blocks = _cache_blocks(rnd, min_dist)
  for m, indices in newly_annotated.items():
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= none[m].size):
      raise ValueError(f"newly_annotated[{m!r}] has indices outside "
                       f"[0, {none[m].size}).")
    if indices.size:
      blocks[m] = _minimum(blocks[m], _distance_to_annotated(rnd, m, indices))
  return {m: kernels.to_host(d, rnd.pools[m].layout)
          for m, d in blocks.items()}


@jax.jit
def _minimum(a, b):
  return jnp.minimum(a, b)


# --------------------------------------------------------------------------
# Shared steps.


def _coreset(rnd: _Round, m: str, size: int, cache: dict,
             picks_per_pass: int) -> np.ndarray:
  """Greedy k-center picks among m's available items, annotated items as centers."""
  has_centers = bool(rnd.annotated[m].any())
  return kernels.kcenter_greedy_sharded(
      rnd.coverage[m], size, eligible=rnd.available_mask(m),
      init_dist=cache[m] if has_centers else None, metric=rnd.metric,
      picks_per_pass=picks_per_pass)


def _summed_margins(rnd: _Round, m: str, items: np.ndarray) -> np.ndarray:
  """sum over m' != m of top1 - top2 similarity of items of m to m' (Step 3)."""
  queries = kernels.gather_rows(rnd.pools[m], items, block=rnd.block)
  total = None
  for other in rnd.modalities:
    if other != m:
      margins = kernels.top2_margin_sharded(
          queries, rnd.pools[other], rnd.available_mask(other))
      total = margins if total is None else _add(total, margins)
  return np.asarray(total)[:items.shape[0]]


@jax.jit
def _add(a, b):
  return a + b


# --------------------------------------------------------------------------
# Strategies.


def mmal(embeddings, annotated, *, budget: int, seed: int, candidates=None,
         coreset_size: int | None = None, modality: str = "auto",
         metric: str = "euclidean", distances_on: str = "normalized",
         min_dist=None, feature_dtype=None,
         mesh: Mesh | None = None, block: int = DEFAULT_BLOCK,
         picks_per_pass: int = kernels.DEFAULT_PICKS_PER_PASS) -> list[Query]:
  """Algorithm 1: least-covered modality, coreset there, smallest margins.

  1. Modality: `r_m = max over available x of min_{s in S_m} d(z_x, z_s)` from
     the min-distance cache; query the modality with the largest `r_m`
     (ties, including the cold start where no modality has annotated items,
     are broken at random with `seed`). `modality="random"` draws it at
     random, a modality name fixes it (the paper's Table 2 ablation).
  2. Coreset: greedy k-center of `coreset_size` (default 4 x budget) items of
     that modality, annotated items counting as centers.
  3. For each coreset item, the margin between its two most similar available
     items of every other modality, summed over those; query the `budget`
     items with the smallest sum (ties: earlier coreset pick).

  Cost per round: `O(N_m B_C D)` for the coreset and `O(B_C N_other D)` for
  the margins, plus the cache build `O(N |S| D)` when `min_dist` is not given.
  """
  rnd, budget = _start(embeddings, annotated, candidates, budget=budget,
                       metric=metric, distances_on=distances_on, mesh=mesh,
                       block=block, feature_dtype=feature_dtype)
  coreset_size = 4 * budget if coreset_size is None else coreset_size
  if (isinstance(coreset_size, bool) or
      not isinstance(coreset_size, (int, np.integer)) or
      coreset_size < budget):
    raise ValueError(f"coreset_size must be an integer >= budget ({budget}), "
                     f"got {coreset_size!r}.")
  rng = np.random.default_rng(seed)
  cache = _cache_blocks(rnd, min_dist)
  tie_break = rng.permutation(len(rnd.modalities))
  if modality == "auto":
    radius = {m: float(_masked_max(cache[m], rnd.available_mask(m)))
              for m in rnd.modalities}
    order = sorted(rnd.modalities, key=lambda m: (
        -radius[m], tie_break[rnd.modalities.index(m)]))
  elif modality == "random":
    order = [rnd.modalities[i] for i in tie_break]
  elif modality in rnd.modalities:
    order = [modality] + [rnd.modalities[i] for i in tie_break
                          if rnd.modalities[i] != modality]
  else:
    raise ValueError(f"modality must be one of {MODALITY_CHOICES} or a "
                     f"modality name {list(rnd.modalities)}, got {modality!r}.")
  queries = []
  for m, count in _allocate(order, rnd, budget):
    size = max(count, min(coreset_size, rnd.num_available(m)))
    coreset = _coreset(rnd, m, size, cache, picks_per_pass)
    margins = _summed_margins(rnd, m, coreset)
    chosen = coreset[np.argsort(margins, kind="stable")[:count]]
    queries += [(m, int(i)) for i in chosen]
  return queries


def coreset(embeddings, annotated, *, budget: int, seed: int, candidates=None,
            metric: str = "euclidean", distances_on: str = "normalized",
            min_dist=None, feature_dtype=None,
            mesh: Mesh | None = None, block: int = DEFAULT_BLOCK,
            picks_per_pass: int = kernels.DEFAULT_PICKS_PER_PASS
            ) -> list[Query]:
  """Algorithm 3: a random modality, then greedy k-center of `budget` there.

  Annotated items of the modality count as existing centers. Cost:
  `O(N_m B D)` plus the cache build `O(N_m |S_m| D)` without `min_dist`.
  """
  rnd, budget = _start(embeddings, annotated, candidates, budget=budget,
                       metric=metric, distances_on=distances_on, mesh=mesh,
                       block=block, feature_dtype=feature_dtype)
  rng = np.random.default_rng(seed)
  plan = _allocate(_random_order(rnd, rng), rnd, budget)
  cache = (_cache_blocks(rnd, min_dist) if min_dist is not None else
           {m: _distance_to_annotated(rnd, m, np.flatnonzero(rnd.annotated[m]))
            for m, _ in plan})
  return [(m, int(i)) for m, count in plan
          for i in _coreset(rnd, m, count, cache, picks_per_pass)]


def uncertainty(embeddings, annotated, *, budget: int, seed: int,
                candidates=None, metric: str = "euclidean",
                distances_on: str = "normalized", min_dist=None,
                feature_dtype=None, mesh: Mesh | None = None,
                block: int = DEFAULT_BLOCK,
                picks_per_pass: int = kernels.DEFAULT_PICKS_PER_PASS
                ) -> list[Query]:
  """Algorithm 4: the `budget` available items with the smallest margins.

  Margins (summed over the other modalities) of every available item of
  every modality against the available items of the others, in both
  directions; ties go to the earlier modality, then the smaller index.
  `metric`, `distances_on`, `min_dist` and `picks_per_pass` are accepted
  for a uniform interface and unused; `seed` too (the strategy is deterministic).
  Cost: `O(N^2 D)` by design.
  """
  del seed, min_dist, picks_per_pass
  rnd, budget = _start(embeddings, annotated, candidates, budget=budget,
                       metric=metric, distances_on=distances_on, mesh=mesh,
                       block=block, feature_dtype=feature_dtype)
  scored = []
  for order, m in enumerate(rnd.modalities):
    items = np.flatnonzero(rnd.available[m])
    if items.size:
      margins = _summed_margins(rnd, m, items)
      scored.append((margins, np.full(items.size, order), items))
  margins, orders, items = (np.concatenate(a) for a in zip(*scored))
  best = np.lexsort((items, orders, margins))[:budget]
  return [(rnd.modalities[orders[i]], int(items[i])) for i in best]


def random_strategy(embeddings, annotated, *, budget: int, seed: int,
                    candidates=None, metric: str = "euclidean",
                    distances_on: str = "normalized", min_dist=None,
                    feature_dtype=None, mesh: Mesh | None = None,
                    block: int = DEFAULT_BLOCK,
                    picks_per_pass: int = kernels.DEFAULT_PICKS_PER_PASS
                    ) -> list[Query]:
  """Passive baseline: uniform over the available items of a random modality.

  `metric`, `distances_on`, `min_dist`, `feature_dtype`, `picks_per_pass`
  are accepted for a uniform interface and unused. Cost: `O(N D)` for the input checks.
  """
  del min_dist, picks_per_pass
  rnd, budget = _start(embeddings, annotated, candidates, budget=budget,
                       metric=metric, distances_on=distances_on, mesh=mesh,
                       block=block, feature_dtype=feature_dtype)
  rng = np.random.default_rng(seed)
  queries = []
  for m, count in _allocate(_random_order(rnd, rng), rnd, budget):
    items = rng.choice(np.flatnonzero(rnd.available[m]), count, replace=False)
    queries += [(m, int(i)) for i in items]
  return queries


class UnknownStrategyError(ValueError, KeyError):
  """An unknown strategy name: a ValueError (as all bad input), and a
  KeyError for code that treats `STRATEGIES` as the dict it is."""

  def __str__(self):
    return str(self.args[0])


class _Registry(dict):
  """A dict whose missing keys raise an error listing the known ones."""

  def __missing__(self, name):
    raise UnknownStrategyError(f"Unknown acquisition strategy {name!r}; "
                               f"expected one of {sorted(self)}.")


STRATEGIES: dict[str, Callable[..., list[Query]]] = _Registry(
    mmal=mmal, random=random_strategy, coreset=coreset,
    uncertainty=uncertainty)
