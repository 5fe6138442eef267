"""What the annotation page shows beside each query: its likeliest partners.

With the file oracle, the loop calls `write` at acquisition time with the
embeddings the acquisition used, still on the mesh, and it writes
`WORKDIR/queries/round_T.ranking.npz` (before the queries file, so a queries
file always has its ranking beside it):

  query_modality, query_index  `(Q,)` the round's queries, in query order;
  match_modality               `(Q,)` the other modality of each query;
  match_index, match_score     `(Q, R)` int64 pool indices and float32 cosine
                               similarities of each query's R most similar
                               items of the other modality, best first (ties:
                               smaller index first), among the items embedded
                               this round; R = min(`num_ranked`, items);
  top_k                        `()` how many of them the page shows;
  browse_<m>_index             `(N_m,)` int64 pool indices of the items of
                               modality m embedded this round;
  browse_<m>_vectors           `(N_m, d)` float16, their L2-normalised
                               embeddings, projected to `d = browse_dim`
                               dimensions (a fixed random orthonormal map,
                               then normalised again) when the towers are
                               wider: for "browse by similarity", which ranks
                               a modality for any item the person picks
                               (approximate when projected; absent when
                               browse_dim is 0).

The top-R search is a sharded kernel: each device scans its own rows of the
other modality one `(Q, chunk)` tile at a time, keeping a running top R, and
the devices' top R are merged with one all-gather. No `(Q, N)` matrix exists.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from mmal_jax import fs
from mmal_jax import sharding

_AXES = sharding.ROW_AXES
_CHUNK = 1024
_PROJECTION_SEED = 0


def path(workdir: str, round_index: int) -> str:
  """WORKDIR/queries/round_T.ranking.npz."""
  return os.path.join(workdir, "queries", f"round_{round_index}.ranking.npz")


def other_modality(modalities, modality: str) -> str:
  """The one modality of a two-modality pool that is not `modality`."""
  others = [m for m in modalities if m != modality]
  if len(others) != 1:
    raise ValueError(f"The annotation page needs two modalities, got "
                     f"{tuple(modalities)}.")
  return others[0]


def lay_out(x, mesh: Mesh) -> jax.Array:
  """`(N, D)` rows as a global array row-sharded over `mesh`, zero-padded to a
  multiple of the device count (a row-sharded `jax.Array` is kept as is).
  Cost: one host-to-device copy of a host array."""
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(
      sharding.row_sharding(mesh), x.ndim):
    return x
  x = np.asarray(x, np.float32)
  rows = -(-x.shape[0] // mesh.size) * mesh.size
  padded = np.zeros((rows, x.shape[1]), np.float32)
  padded[:x.shape[0]] = x
  return sharding.put_global(padded, sharding.row_sharding(mesh))


@functools.partial(jax.jit, static_argnames=("mesh", "k", "chunk"))
def _top_k_kernel(queries, keys, num_keys, *, mesh, k, chunk):
  """(Qp, k) best inner products of each query with the first `num_keys`
  key rows and their global row indices (-1 where fewer keys)."""

  def local(queries, keys, num_keys):
    rows = keys.shape[0]
    offset = jax.lax.axis_index(_AXES).astype(jnp.int32) * rows
    positions = jnp.arange(chunk, dtype=jnp.int32)

    def one_tile(i, carry):
      # The last tile is shifted back to fit; rows it sees again are masked.
      start = jnp.minimum(i * chunk, rows - chunk)
      tile = jax.lax.dynamic_slice_in_dim(keys, start, chunk)
      sims = jnp.einsum("qd,rd->qr", queries, tile,
                        preferred_element_type=jnp.float32)
      row = start + positions
      valid = (row >= i * chunk) & (offset + row < num_keys)
      sims = jnp.where(valid[None, :], sims, -jnp.inf)
      # Running best first: equal scores keep the smaller index.
      scores = jnp.concatenate([carry[0], sims], axis=1)
      index = jnp.concatenate(
          [carry[1], jnp.broadcast_to(offset + row, sims.shape)], axis=1)
      best, pos = jax.lax.top_k(scores, k)
      return best, jnp.take_along_axis(index, pos, axis=1)

    init = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
            jnp.full((queries.shape[0], k), -1, jnp.int32))
    best, index = jax.lax.fori_loop(0, -(-rows // chunk), one_tile, init)
    # Devices in row order: equal scores again keep the smaller index.
    best = jax.lax.all_gather(best, _AXES, axis=1, tiled=True)
    index = jax.lax.all_gather(index, _AXES, axis=1, tiled=True)
    best, pos = jax.lax.top_k(best, k)
    return best, jnp.take_along_axis(index, pos, axis=1)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(_AXES), P()),
                       out_specs=(P(), P()), check_vma=False)(
                           queries, keys, num_keys)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _take_rows(x, rows, *, mesh):
  return jax.lax.with_sharding_constraint(x[rows], sharding.replicated(mesh))


def top_k_matches(keys: jax.Array, num_keys: int, query_rows: jax.Array,
                  query_pool: jax.Array, k: int, mesh: Mesh
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The k largest inner products of some rows of one array with the rows of
  another, both row-sharded over `mesh`.

  Args:
    keys: `(P, D)` row-sharded; its first `num_keys` rows count.
    num_keys: the real key rows (k <= num_keys).
    query_rows: `(Q,)` int row positions into `query_pool`.
    query_pool: `(P', D)` row-sharded; the queries are its rows `query_rows`.
    k: how many matches per query.
    mesh: the mesh both are sharded over.

  Returns:
    `(Q, k)` float32 scores (descending; ties: smaller row first) and `(Q, k)`
    int64 key rows, on the host. Cost: `2 Q N D` flops in `(Q, 1024)` tiles,
    memory `O(Q (D + k) + N D / devices)`; the queries are padded to a power
    of two (one compilation per bucket).
  """
  query_rows = np.asarray(query_rows, np.int32)
  num_queries = len(query_rows)
  padded = np.zeros(max(8, 1 << (num_queries - 1).bit_length()), np.int32)
  padded[:num_queries] = query_rows
  replicated = sharding.replicated(mesh)
  queries = _take_rows(query_pool, sharding.put_global(padded, replicated),
                       mesh=mesh)
  keys = lay_out(keys, mesh)
  chunk = min(_CHUNK, keys.shape[0] // mesh.size)
  scores, index = _top_k_kernel(
      queries.astype(keys.dtype), keys,
      sharding.put_global(np.int32(num_keys), replicated), mesh=mesh, k=k,
      chunk=chunk)
  return (sharding.to_host(scores)[:num_queries],
          sharding.to_host(index)[:num_queries].astype(np.int64))


@functools.partial(jax.jit, static_argnames=("mesh",))
def _project(x, projection, *, mesh):
  y = jnp.dot(x.astype(jnp.float32), projection,
              preferred_element_type=jnp.float32)
  y = y / jnp.maximum(jnp.linalg.norm(y, axis=1, keepdims=True), 1e-12)
  return jax.lax.with_sharding_constraint(y, sharding.row_sharding(mesh))


def browse_vectors(x: jax.Array, num_rows: int, dim: int, mesh: Mesh
                   ) -> np.ndarray:
  """`(num_rows, min(D, dim))` float16 normalised rows of a row-sharded
  `(P, D)` array, projected to `dim` dimensions by a fixed random orthonormal
  map when D > dim. Cost: one `(P, D) x (D, dim)` product, one gather of
  `num_rows x dim` values to the host."""
  width = x.shape[1]
  projection = np.eye(width, dtype=np.float32)
  if width > dim:
    gauss = np.random.default_rng(_PROJECTION_SEED).standard_normal(
        (width, dim))
    projection = np.linalg.qr(gauss)[0].astype(np.float32)
  y = _project(lay_out(x, mesh), sharding.put_global(
      projection, sharding.replicated(mesh)), mesh=mesh)
  return sharding.to_host(y)[:num_rows].astype(np.float16)


def write(target: str, embeddings: dict, items: dict, picked, *, mesh: Mesh,
          top_k: int, num_ranked: int, browse_dim: int) -> None:
  """Computes and writes a round's ranking file (see the module docstring).

  Args:
    target: the file (`path(workdir, t)`), local or gs://; written atomically
      by the main process, computed by every process.
    embeddings: modality -> `(P_m, D)` row-sharded embeddings (or a host
      array), row r being the item `items[m][r]`, as the acquisition got them.
    items: modality -> `(N_m,)` pool indices of the embedded items.
    picked: the round's queries as `(modality, row)`, in query order.
    mesh: the mesh the embeddings are on.
    top_k, num_ranked, browse_dim: `config.oracle` (see config_lib).

  Cost: `2 Q N D` flops for the ranking, one gather of `N x browse_dim`
  values per modality.
  """
  modalities = list(items)
  picked = [(m, int(r)) for m, r in picked]
  arrays = {"top_k": np.int64(top_k),
            "query_modality": np.array([m for m, _ in picked]),
            "query_index": np.array([items[m][r] for m, r in picked],
                                    np.int64)}
  match_modality = [other_modality(modalities, m) for m, _ in picked]
  ranked = min([num_ranked] + [len(items[o]) for o in set(match_modality)])
  arrays["match_modality"] = np.array(match_modality)
  arrays["match_index"] = np.zeros((len(picked), ranked), np.int64)
  arrays["match_score"] = np.zeros((len(picked), ranked), np.float32)
  for m in modalities:
    which = [q for q, (qm, _) in enumerate(picked) if qm == m]
    if not which:
      continue
    other = match_modality[which[0]]
    scores, rows = top_k_matches(
        embeddings[other], len(items[other]), [picked[q][1] for q in which],
        lay_out(embeddings[m], mesh), ranked, mesh)
    arrays["match_index"][which] = np.asarray(items[other])[rows]
    arrays["match_score"][which] = scores
  for m in modalities if browse_dim else ():
    arrays[f"browse_{m}_index"] = np.asarray(items[m], np.int64)
    arrays[f"browse_{m}_vectors"] = browse_vectors(
        embeddings[m], len(items[m]), browse_dim, mesh)
  if sharding.is_main_process():
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fs.write_bytes(target, buffer.getvalue())


@dataclasses.dataclass(frozen=True)
class Ranking:
  """A round's ranking file, read (see the module docstring)."""
  path: str
  top_k: int
  queries: list[tuple[str, int]]
  match_modality: list[str]
  match_index: np.ndarray
  match_score: np.ndarray
  browse_index: dict[str, np.ndarray]
  browse_vectors: dict[str, np.ndarray]

  def rank_of(self, query: int, partners) -> int | None:
    """1-based best rank among `partners` (`(modality, index)`) in query
    `query`'s ranked matches; None if none of them is ranked."""
    ranks = [int(r) + 1 for m, i in partners
             if m == self.match_modality[query]
             for r in np.flatnonzero(self.match_index[query] == i)]
    return min(ranks, default=None)

  def vector(self, modality: str, index: int) -> np.ndarray | None:
    """Item `(modality, index)`'s browse vector (float32), None if absent."""
    if modality not in self.browse_index:
      return None
    row = np.flatnonzero(self.browse_index[modality] == index)
    if not row.size:
      return None
    return self.browse_vectors[modality][row[0]].astype(np.float32)

  def similar(self, modality: str, vector: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """`modality`'s browsed items by decreasing similarity to `vector`:
    (pool indices, scores). Cost: O(N d) on the host."""
    scores = self.browse_vectors[modality].astype(np.float32) @ vector
    order = np.lexsort((self.browse_index[modality], -scores))
    return self.browse_index[modality][order], scores[order]


def load(target: str) -> Ranking | None:
  """The ranking file at `target`, None if there is none.

  Raises ValueError naming the file when it cannot be read or is malformed.
  """
  if not fs.exists(target):
    return None
  try:
    with np.load(io.BytesIO(fs.read_bytes(target)),
                 allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    queries = list(zip(arrays["query_modality"].tolist(),
                       arrays["query_index"].tolist()))
    index, score = arrays["match_index"], arrays["match_score"]
    if index.shape != score.shape or index.shape[0] != len(queries):
      raise ValueError("match arrays do not fit the queries")
    browse = [k[len("browse_"):-len("_index")] for k in arrays
              if k.startswith("browse_") and k.endswith("_index")]
    return Ranking(target, int(arrays["top_k"]), queries,
                   arrays["match_modality"].tolist(), index, score,
                   {m: arrays[f"browse_{m}_index"] for m in browse},
                   {m: arrays[f"browse_{m}_vectors"] for m in browse})
  except (OSError, ValueError, KeyError, EOFError) as e:
    raise ValueError(f"{target} cannot be read ({e}).") from e
