"""Pallas forms of the two tile reductions: top-2 inner products and nearest center.

Each is one `pallas_call` whose tile matrix product is followed, in the same
kernel, by its max / top-2 reduction (the epilogue), folded into per-row
accumulators; no `(rows, columns)` tile goes back to memory. The arithmetic
is the XLA kernels' (`tile_math.top2_update`, the nearest-center score
`factor * <x, c> - bias`, products at `tile_math.product_precision`), so
both answer to the same references.

Two forms of each kernel, because the backends run a grid differently:

- "grid" (TPU, Mosaic): a `(row tiles, column tiles)` grid whose column
  axis runs in order on one core, the accumulators staying in the output
  block across it. Mosaic pipelines the tiles' copies into VMEM itself.
- "loop" (GPU, Triton): a grid of row tiles only, since a GPU runs grid
  programs concurrently (an accumulator carried across a grid axis would
  race). Each program loops over the column tiles and, for each, over
  `dim_chunk(D)`-wide slices of the feature axis, as a Triton matrix
  product does; the row tile's accumulators stay in registers.

`form_for(platform)` picks the form; both run anywhere in interpret mode
(`interpret=True`), which is how CI tests them on CPU. The Triton and
Mosaic lowerings themselves run on any host (`jax.jit(...).trace(...)
.lower(lowering_platforms=...)`), which tests/test_pallas_kernels.py does.

Status: lowered for CUDA and TPU and run interpreted in CI; not yet
compiled or timed on a GPU or TPU (the accelerator check times them with
`--pallas`), so the sharded kernels (`kernels`) keep the XLA path by
default on every backend. jax 0.11 deprecates Pallas' Triton backend in
favour of Mosaic GPU (`plgpu.kernel`); the loop form lowers there with a
DeprecationWarning and is the one to port once a GPU can time the port.

Shapes: rows and columns are padded to whole tiles by the caller's layout
(powers of two); the tile edges divide them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from mmal_jax.acquisition import tile_math

_INT_MAX = np.iinfo(np.int32).max
FORMS = ("grid", "loop")
# The loop form's tile: rows per program, columns per step, and the widest
# feature slice per product; a usual Triton matrix-product tile, untuned (no
# GPU has timed it here). 128 x 128 float32 accumulators over 8 warps are 64
# registers per thread.
LOOP_TILE_ROWS = 128
LOOP_TILE_COLS = 128
LOOP_MAX_DIM_CHUNK = 64
# Triton's smallest product edge: loop-form tiles are at least this large.
LOOP_MIN_TILE = 16
_TRITON = pallas_triton.CompilerParams(num_warps=8, num_stages=3)


def form_for(platform: str) -> str:
  """The kernel form for a `jax.Device.platform`: "loop" on GPUs, whose grid
  programs run concurrently, "grid" elsewhere (TPU; CPU interprets)."""
  return "loop" if platform in ("gpu", "cuda", "rocm") else "grid"


def dim_chunk(dim: int) -> int:
  """The loop form's feature slice: the largest power of two dividing `dim`,
  at most `LOOP_MAX_DIM_CHUNK` (64 for D = 768)."""
  return min(LOOP_MAX_DIM_CHUNK, dim & -dim)


def loop_tile(n: int, edge: int) -> int:
  """A loop-form tile edge for `n` rows (a power of two): `edge`, or `n` when
  smaller, but at least `LOOP_MIN_TILE` (`top2` / `nearest` pad a smaller
  operand up to it)."""
  return max(LOOP_MIN_TILE, min(edge, n))


def check_form(form: str) -> str:
  if form not in FORMS:
    raise ValueError(f"Unknown Pallas form {form!r}; expected one of {FORMS}.")
  return form


def _product(a, b):
  """(r, D) x (c, D) -> (r, c) float32 at the XLA kernels' precision."""
  return jax.lax.dot_general(
      a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
      precision=tile_math.product_precision(jnp.result_type(a, b)))


def _sliced_product(x_ref, c_ref, cols, chunk: int):
  """`x_ref (r, D) x c_ref[cols] (c, D)^T` in `chunk`-wide feature slices,
  summed in float32 (the loop form's tile product)."""
  num_rows = x_ref.shape[0]
  width = cols.size

  def one_slice(s, acc):
    d = pl.ds(s * chunk, chunk)
    return acc + _product(x_ref[:, d], c_ref[cols, d])

  return jax.lax.fori_loop(0, x_ref.shape[1] // chunk, one_slice,
                           jnp.zeros((num_rows, width), jnp.float32))


def _pad_rows(x, rows: int, value):
  """`x` with rows appended up to `rows` (filled with `value`); no copy when
  it already has them. Only tiny operands (< `LOOP_MIN_TILE` rows) grow."""
  extra = rows - x.shape[0]
  if extra <= 0:
    return x
  return jnp.concatenate(
      [x, jnp.full((extra,) + x.shape[1:], value, x.dtype)])


def _grid_call(kernel, row_operands, column_operands, out_dtypes, *,
               block_rows: int, block_cols: int, interpret: bool):
  """Runs a grid-form `kernel(*row refs, *column refs, *out refs,
  block_cols)` on a `(row tiles, column tiles)` grid whose column axis runs
  in order.

  Operands as `_loop_call`'s: `row_operands` (first: `(n, D)`, then `(n,)`)
  tiled by rows, `column_operands` `(array, fill)` pairs (first: `(c, D)`)
  tiled by columns (no padding: the fills are unused). Returns one `(n,)`
  array per `out_dtypes` entry.
  """
  num_rows = row_operands[0].shape[0]
  columns = [a for a, _ in column_operands]
  tiled = lambda a, edge, index: pl.BlockSpec(
      (edge,) + a.shape[1:], lambda i, j: (index(i, j),) + (0,) * (a.ndim - 1))
  return tuple(pl.pallas_call(
      functools.partial(kernel, block_cols=block_cols),
      grid=(num_rows // block_rows, columns[0].shape[0] // block_cols),
      in_specs=([tiled(a, block_rows, lambda i, j: i) for a in row_operands] +
                [tiled(a, block_cols, lambda i, j: j) for a in columns]),
      out_specs=[pl.BlockSpec((block_rows,), lambda i, j: (i,))] * len(
          out_dtypes),
      out_shape=[jax.ShapeDtypeStruct((num_rows,), t) for t in out_dtypes],
      interpret=interpret)(*row_operands, *columns))


def _loop_call(kernel, row_operands, column_operands, out_dtypes, *,
               block_rows: int, block_cols: int, interpret: bool):
  """Runs a loop-form `kernel(*row refs, *column refs, *out refs,
  block_cols, chunk)` on a 1-D grid of row tiles.

  `row_operands` (first: `(n, D)`, then `(n,)`) are tiled by rows; each
  program sees the whole of `column_operands`, `(array, fill)` pairs whose
  first is `(c, D)`. Operands under `LOOP_MIN_TILE` rows are padded with
  zeros (rows) or their fill (columns). Returns one `(n,)` array per
  `out_dtypes` entry.
  """
  num_rows, dim = row_operands[0].shape
  rows = max(num_rows, LOOP_MIN_TILE)
  cols = max(column_operands[0][0].shape[0], LOOP_MIN_TILE)
  row_operands = [_pad_rows(a, rows, 0) for a in row_operands]
  column_operands = [_pad_rows(a, cols, fill) for a, fill in column_operands]
  block_rows, block_cols = loop_tile(rows, block_rows), loop_tile(cols,
                                                                  block_cols)
  row_block = lambda a: pl.BlockSpec(
      (block_rows,) + a.shape[1:], lambda i: (i,) + (0,) * (a.ndim - 1))
  whole = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)
  outs = pl.pallas_call(
      functools.partial(kernel, block_cols=block_cols, chunk=dim_chunk(dim)),
      grid=(rows // block_rows,),
      in_specs=([row_block(a) for a in row_operands] +
                [whole(a) for a in column_operands]),
      out_specs=[pl.BlockSpec((block_rows,), lambda i: (i,))] * len(
          out_dtypes),
      out_shape=[jax.ShapeDtypeStruct((rows,), t) for t in out_dtypes],
      compiler_params=_TRITON, interpret=interpret)(
          *row_operands, *column_operands)
  return tuple(out[:num_rows] for out in outs)


# --------------------------------------------------------------------------
# Top-2 inner products.


def _top2_sims(sims, scale, valid):
  return jnp.where(valid[None, :], sims * scale[None, :], -jnp.inf)


def _top2_grid_kernel(q_ref, k_ref, scale_ref, valid_ref, top1_ref, top2_ref,
                      *, block_cols: int):
  del block_cols  # The grid's block is the tile.

  @pl.when(pl.program_id(1) == 0)
  def _():
    top1_ref[...] = jnp.full(top1_ref.shape, -jnp.inf, jnp.float32)
    top2_ref[...] = jnp.full(top2_ref.shape, -jnp.inf, jnp.float32)

  sims = _top2_sims(_product(q_ref[...], k_ref[...]), scale_ref[...],
                    valid_ref[...])
  top1, top2 = tile_math.top2_update(top1_ref[...], top2_ref[...], sims)
  top1_ref[...] = top1
  top2_ref[...] = top2


def _top2_loop_kernel(q_ref, k_ref, scale_ref, valid_ref, top1_ref, top2_ref,
                      *, block_cols: int, chunk: int):
  def one_key_tile(j, carry):
    cols = pl.ds(j * block_cols, block_cols)
    sims = _top2_sims(_sliced_product(q_ref, k_ref, cols, chunk),
                      scale_ref[cols], valid_ref[cols])
    return tile_math.top2_update(*carry, sims)

  init = jnp.full(top1_ref.shape, -jnp.inf, jnp.float32)
  top1, top2 = jax.lax.fori_loop(0, k_ref.shape[0] // block_cols,
                                 one_key_tile, (init, init))
  top1_ref[...] = top1
  top2_ref[...] = top2


@functools.partial(jax.jit, static_argnames=("block_rows", "block_cols",
                                             "form", "interpret"))
def top2(queries, keys, key_scale, key_valid, *, block_rows: int,
         block_cols: int, form: str = "grid", interpret: bool = False):
  """Top-1 and top-2 of `<query, key> * key_scale` over the valid keys.

  Args:
    queries: `(Q, D)`; keys: `(N, D)` (same dtype: float32 or bfloat16).
    key_scale: `(N,)` float32; key_valid: `(N,)` bool.
    block_rows, block_cols: tile edges dividing Q and N ("grid": the grid's
      blocks; "loop": queries per program and keys per step, each raised
      to `LOOP_MIN_TILE` by padding a smaller operand).
    form: "grid" or "loop" (`form_for`).
    interpret: run the kernel in Pallas' interpreter (any backend).

  Returns:
    `((Q,), (Q,))` float32; a best value reached by two keys is its own
    runner-up; -inf where fewer keys are valid. Cost: `2 Q N D` flops, one
    read of the keys per row tile, no `(Q, N)` array.
  """
  launch = _grid_call if check_form(form) == "grid" else _loop_call
  kernel = _top2_grid_kernel if form == "grid" else _top2_loop_kernel
  return launch(kernel, [queries],
                [(keys, 0), (key_scale, 0), (key_valid, False)],
                [jnp.float32] * 2, block_rows=block_rows,
                block_cols=block_cols, interpret=interpret)


# --------------------------------------------------------------------------
# Nearest center.


def _nearest_update(best, idx, score, first_col):
  """Folds a `(r, c)` score tile into the running best and its column; ties
  go to the smaller column."""
  top = jnp.max(score, axis=1)
  cols = jax.lax.broadcasted_iota(jnp.int32, score.shape, 1)
  first = jnp.min(jnp.where(score == top[:, None], cols, _INT_MAX), axis=1)
  better = top > best  # Strict: the earlier center wins ties.
  return (jnp.where(better, top, best),
          jnp.where(better, first + first_col, idx))


def _nearest_grid_kernel(x_ref, factor_ref, c_ref, bias_ref, best_ref,
                         idx_ref, *, block_cols: int):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    best_ref[...] = jnp.full(best_ref.shape, -jnp.inf, jnp.float32)
    idx_ref[...] = jnp.zeros(idx_ref.shape, jnp.int32)

  score = (factor_ref[...][:, None] * _product(x_ref[...], c_ref[...]) -
           bias_ref[...][None, :])
  best, idx = _nearest_update(best_ref[...], idx_ref[...], score,
                              j * block_cols)
  best_ref[...] = best
  idx_ref[...] = idx


def _nearest_loop_kernel(x_ref, factor_ref, c_ref, bias_ref, best_ref,
                         idx_ref, *, block_cols: int, chunk: int):
  factor = factor_ref[...][:, None]

  def one_center_tile(j, carry):
    cols = pl.ds(j * block_cols, block_cols)
    score = (factor * _sliced_product(x_ref, c_ref, cols, chunk) -
             bias_ref[cols][None, :])
    return _nearest_update(*carry, score, j * block_cols)

  best, idx = jax.lax.fori_loop(
      0, c_ref.shape[0] // block_cols, one_center_tile,
      (jnp.full(best_ref.shape, -jnp.inf, jnp.float32),
       jnp.zeros(idx_ref.shape, jnp.int32)))
  best_ref[...] = best
  idx_ref[...] = idx


@functools.partial(jax.jit, static_argnames=("block_rows", "block_cols",
                                             "form", "interpret"))
def nearest(x, factor, centers, bias, *, block_rows: int, block_cols: int,
            form: str = "grid", interpret: bool = False):
  """Largest `factor_i <x_i, c_j> - bias_j` over the centers, and its j.

  The min-distance kernel's reduction: euclidean uses factor 2 * scale and
  bias ||c||^2, cosine factor 1 and bias 0; invalid centers have bias +inf.

  Args:
    x: `(N, D)`; centers: `(C, D)` (same dtype).
    factor: `(N,)` float32; bias: `(C,)` float32.
    block_rows, block_cols: tile edges dividing N and C (see `top2`).
    form: "grid" or "loop" (`form_for`).
    interpret: run the kernel in Pallas' interpreter.

  Returns:
    `((N,) float32 best score (-inf: no valid center), (N,) int32 index of
    the first center reaching it)`. Cost: `2 N C D` flops, no `(N, C)` array.
  """
  launch = _grid_call if check_form(form) == "grid" else _loop_call
  kernel = _nearest_grid_kernel if form == "grid" else _nearest_loop_kernel
  return launch(kernel, [x, factor], [(centers, 0), (bias, jnp.inf)],
                [jnp.float32, jnp.int32], block_rows=block_rows,
                block_cols=block_cols, interpret=interpret)


def plan(platform: str, rows: int, cols: int, dim: int, block_rows: int,
         block_cols: int) -> dict:
  """The keyword arguments of `top2` / `nearest` on `platform`.

  `rows` x `cols` (powers of two) is the reduction's extent on one device;
  `block_rows` x `block_cols` the layout's tile, used as is by the grid
  form. The loop form (GPUs) takes `LOOP_TILE_ROWS` x `LOOP_TILE_COLS`
  instead (smaller operands: their size, at least `LOOP_MIN_TILE`) and
  needs D to be a multiple of `LOOP_MIN_TILE`. CPU interprets the grid form.
  Pure: O(1).
  """
  form = form_for(platform)
  if form == "grid":
    return dict(form=form, block_rows=block_rows, block_cols=block_cols,
                interpret=platform == "cpu")
  if dim_chunk(dim) < LOOP_MIN_TILE:
    raise ValueError(
        f"impl='pallas' on {platform} needs the feature dimension to be a "
        f"multiple of {LOOP_MIN_TILE} (Triton's smallest product); D = {dim}:"
        f" use impl='xla'.")
  return dict(form=form, block_rows=loop_tile(rows, LOOP_TILE_ROWS),
              block_cols=loop_tile(cols, LOOP_TILE_COLS), interpret=False)
