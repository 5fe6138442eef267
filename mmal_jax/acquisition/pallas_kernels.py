"""Pallas forms of the two tile reductions: top-2 inner products and nearest center.

Each is one `pallas_call` over a `(row tiles, column tiles)` grid: a tile's
matrix product is followed, in the same kernel, by its max / top-2
reduction (the epilogue), folded into per-row accumulators that stay in the
output block across the column axis; no `(rows, columns)` tile goes back to
memory. The arithmetic is the XLA kernels' (`tile_math.top2_update`, the
nearest-center score `factor * <x, c> - bias`, products at
`tile_math.product_precision`), so both answer to the same references.

Status: tested on CPU in interpret mode (`interpret=True`) against the numpy
references of the XLA kernels; not yet compiled or timed on a GPU or TPU,
so the sharded kernels (`kernels`) keep the XLA path on every backend.

Shapes: rows and columns are padded to whole tiles by the caller's layout
(powers of two); `block_rows` and `block_cols` divide them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from mmal_jax.acquisition import tile_math

_INT_MAX = np.iinfo(np.int32).max


def _product(a, b):
  """(r, D) x (c, D) -> (r, c) float32 at the XLA kernels' precision."""
  return jax.lax.dot_general(
      a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
      precision=tile_math.product_precision(jnp.result_type(a, b)))


def _top2_kernel(q_ref, k_ref, scale_ref, valid_ref, top1_ref, top2_ref):
  @pl.when(pl.program_id(1) == 0)
  def _():
    top1_ref[...] = jnp.full(top1_ref.shape, -jnp.inf, jnp.float32)
    top2_ref[...] = jnp.full(top2_ref.shape, -jnp.inf, jnp.float32)

  sims = _product(q_ref[...], k_ref[...]) * scale_ref[...][None, :]
  sims = jnp.where(valid_ref[...][None, :], sims, -jnp.inf)
  top1, top2 = tile_math.top2_update(top1_ref[...], top2_ref[...], sims)
  top1_ref[...] = top1
  top2_ref[...] = top2


@functools.partial(jax.jit, static_argnames=("block_rows", "block_cols",
                                             "interpret"))
def top2(queries, keys, key_scale, key_valid, *, block_rows: int,
         block_cols: int, interpret: bool = False):
  """Top-1 and top-2 of `<query, key> * key_scale` over the valid keys.

  Args:
    queries: `(Q, D)`; keys: `(N, D)` (same dtype: float32 or bfloat16).
    key_scale: `(N,)` float32; key_valid: `(N,)` bool.
    block_rows, block_cols: tile edges dividing Q and N.
    interpret: run the kernel in Pallas' interpreter (any backend).

  Returns:
    `((Q,), (Q,))` float32; a best value reached by two keys is its own
    runner-up; -inf where fewer keys are valid. Cost: `2 Q N D` flops, one
    read of the keys per row tile, no `(Q, N)` array.
  """
  num_q, dim = queries.shape
  num_k = keys.shape[0]
  grid = (num_q // block_rows, num_k // block_cols)
  row_block = pl.BlockSpec((block_rows,), lambda i, j: (i,))
  col_block = pl.BlockSpec((block_cols,), lambda i, j: (j,))
  return pl.pallas_call(
      _top2_kernel, grid=grid,
      in_specs=[pl.BlockSpec((block_rows, dim), lambda i, j: (i, 0)),
                pl.BlockSpec((block_cols, dim), lambda i, j: (j, 0)),
                col_block, col_block],
      out_specs=[row_block, row_block],
      out_shape=[jax.ShapeDtypeStruct((num_q,), jnp.float32)] * 2,
      interpret=interpret)(queries, keys, key_scale, key_valid)


def _nearest_kernel(x_ref, factor_ref, c_ref, bias_ref, best_ref, idx_ref, *,
                    block_cols: int):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    best_ref[...] = jnp.full(best_ref.shape, -jnp.inf, jnp.float32)
    idx_ref[...] = jnp.zeros(idx_ref.shape, jnp.int32)

  score = (factor_ref[...][:, None] * _product(x_ref[...], c_ref[...]) -
           bias_ref[...][None, :])
  top = jnp.max(score, axis=1)
  cols = jax.lax.broadcasted_iota(jnp.int32, score.shape, 1)
  first = jnp.min(jnp.where(score == top[:, None], cols, _INT_MAX), axis=1)
  better = top > best_ref[...]  # Strict: the earlier center wins ties.
  best_ref[...] = jnp.where(better, top, best_ref[...])
  idx_ref[...] = jnp.where(better, first + j * block_cols, idx_ref[...])


@functools.partial(jax.jit, static_argnames=("block_rows", "block_cols",
                                             "interpret"))
def nearest(x, factor, centers, bias, *, block_rows: int, block_cols: int,
            interpret: bool = False):
  """Largest `factor_i <x_i, c_j> - bias_j` over the centers, and its j.

  The min-distance kernel's reduction: euclidean uses factor 2 * scale and
  bias ||c||^2, cosine factor 1 and bias 0; invalid centers have bias +inf.

  Args:
    x: `(N, D)`; centers: `(C, D)` (same dtype).
    factor: `(N,)` float32; bias: `(C,)` float32.
    block_rows, block_cols: tile edges dividing N and C.
    interpret: run the kernel in Pallas' interpreter.

  Returns:
    `((N,) float32 best score (-inf: no valid center), (N,) int32 index of
    the first center reaching it)`. Cost: `2 N C D` flops, no `(N, C)` array.
  """
  num_x, dim = x.shape
  num_c = centers.shape[0]
  grid = (num_x // block_rows, num_c // block_cols)
  row_block = pl.BlockSpec((block_rows,), lambda i, j: (i,))
  return pl.pallas_call(
      functools.partial(_nearest_kernel, block_cols=block_cols), grid=grid,
      in_specs=[pl.BlockSpec((block_rows, dim), lambda i, j: (i, 0)),
                row_block,
                pl.BlockSpec((block_cols, dim), lambda i, j: (j, 0)),
                pl.BlockSpec((block_cols,), lambda i, j: (j,))],
      out_specs=[row_block, row_block],
      out_shape=[jax.ShapeDtypeStruct((num_x,), jnp.float32),
                 jax.ShapeDtypeStruct((num_x,), jnp.int32)],
      interpret=interpret)(x, factor, centers, bias)
