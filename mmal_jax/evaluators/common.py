"""What every evaluator shares: the interface, input checks, blocked scoring.

Interface (big_vision's `Evaluator(predict_fn, **config).run(params)`):
each module under `mmal_jax.evaluators` that evaluates a model defines

  class Evaluator:
    DEFAULTS: dict          # its config fields and their defaults
    MAIN: str               # its headline metric (the DataComp average's)
    def __init__(self, embed_fn, **config) -> None   # cheap: no data read
    def run(self, params) -> dict[str, float]        # metric -> value (%)
    @classmethod
    def metric_keys(cls, config) -> set[str]         # the keys run returns

where `embed_fn(params, pool, modality)` returns the L2-normalised
embeddings of every item of `modality` of an `UnalignedPool`, rows in item
order: a numpy `(N, D)` array, or a global `(padded_rows, D)` `jax.Array`
row-sharded over the mesh with the N real rows first (what
`data.pipeline.embed_pool` returns). Datasets are read on the first `run`.

The metric functions take `zimg (N_img, D)`, `ztxt (N_txt, D)`, rows of unit
norm (checked to 1e-3), numpy or jax; similarity is the dot product; scores
are percentages in [0, 100]. Where a full similarity matrix would appear it
is computed in blocks of query rows (about 2^24 similarities at a time), so
memory stays O(block * N_keys) for e.g. COCO-5k's 5k x 25k.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmal_jax import sharding

HIGHEST = jax.lax.Precision.HIGHEST
BLOCK_ELEMENTS = 1 << 24

EmbedFn = Callable[..., "np.ndarray | jax.Array"]


def to_host(z, num_rows: int) -> np.ndarray:
  """The first `num_rows` rows of `z` (numpy, or a global jax.Array that may
  span several hosts) as a numpy array on every process."""
  return sharding.to_host(z)[:num_rows]


def check_embeddings(**named) -> list[np.ndarray]:
  """The named embeddings as float32 host arrays, after checking shape, dtype, NaN, norm."""
  out = []
  for name, z in named.items():
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[0] == 0:
      raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {z.shape}.")
    if z.dtype.kind != "f":
      raise ValueError(f"{name} must be floating point, got {z.dtype}.")
    z = z.astype(np.float32)
    if not np.isfinite(z).all():
      raise ValueError(f"{name} holds NaN or inf.")
    worst = float(np.max(np.abs(np.linalg.norm(z, axis=1) - 1.0)))
    if worst > 1e-3:
      raise ValueError(f"{name} rows must be L2-normalised; max |norm - 1| = {worst:.3g}.")
    out.append(z)
  if len({z.shape[1] for z in out}) > 1:
    raise ValueError(f"Embedding dimensions differ: {[z.shape for z in out]}.")
  return out


def check_index(name: str, index, size: int, allow_missing: bool = False) -> np.ndarray:
  """`index` as int64 after checking it is an int array with values in [0, size)
  (or -1 = missing, with `allow_missing`)."""
  index = np.asarray(index)
  if index.size == 0 or index.dtype.kind not in "iu":
    raise ValueError(f"{name} must be a non-empty int array, got {index.dtype} {index.shape}.")
  low = -1 if allow_missing else 0
  if index.min() < low or index.max() >= size:
    raise ValueError(f"{name} holds indices outside [{low}, {size}).")
  return index.astype(np.int64)


def blockwise(fn, queries: np.ndarray, query_labels: np.ndarray, keys: np.ndarray,
              key_labels: np.ndarray) -> np.ndarray:
  """Applies a jitted `fn(q_block, q_labels, keys, key_labels) -> (B,)` over query blocks.

  Blocks have a fixed number of rows (the last is padded with label -2) so
  `fn` compiles once per (block, keys) shape.
  """
  n = queries.shape[0]
  block = int(max(1, min(n, BLOCK_ELEMENTS // max(1, keys.shape[0]))))
  pad = -n % block
  queries = np.pad(queries, ((0, pad), (0, 0)))
  query_labels = np.pad(query_labels, (0, pad), constant_values=-2)
  keys, key_labels = jnp.asarray(keys), jnp.asarray(key_labels)
  out = [np.asarray(fn(queries[lo:lo + block], query_labels[lo:lo + block], keys, key_labels))
         for lo in range(0, n + pad, block)]
  return np.concatenate(out)[:n]


@jax.jit
def argmax_key(q, q_labels, keys, key_labels):
  """Per query row: the index of its most similar key (ties: the smallest)."""
  del q_labels, key_labels
  return jnp.argmax(jnp.dot(q, keys.T, precision=HIGHEST), axis=1)
