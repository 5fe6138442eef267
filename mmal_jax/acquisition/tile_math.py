"""Tile arithmetic shared by the XLA kernels and their Pallas forms.

`kernels` (the sharded XLA kernels) and `pallas_kernels` (the same tile
reductions as fused Pallas kernels) compute products at the same precision
and fold tiles into running top-2s the same way, so both answer to the same
references. Both build on this module; it imports no other part of the
package.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def product_precision(dtype) -> jax.lax.Precision:
  """The matrix-unit precision of a product whose operands are `dtype`.

  float32: HIGHEST, i.e. float32 accuracy on every backend (XLA's default
  runs float32 products as TF32 on NVIDIA GPUs and as one bfloat16 pass on
  TPUs, which moves distances by ~1e-3 relative and changes picks).
  bfloat16 / float16: DEFAULT, one pass over the operands as stored,
  accumulated in float32: the documented low-precision mode of a pool stored
  in that dtype.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return jax.lax.Precision.DEFAULT


def top2_update(t1, t2, sims):
  """Folds a `(q, r)` tile into the running top-2 `(q,)` of each row.

  Three reductions XLA fuses with the product (no argmax): the tile's best,
  how many keys reach it, and its best below it; a tied best is its own
  runner-up. Exact: max/min and comparisons only.
  """
  best = jnp.max(sims, axis=1)
  is_best = sims == best[:, None]
  ties = jnp.sum(is_best, axis=1, dtype=jnp.int32)
  second = jnp.where(ties >= 2, best,
                     jnp.max(jnp.where(is_best, -jnp.inf, sims), axis=1))
  return (jnp.maximum(t1, best),
          jnp.maximum(jnp.minimum(t1, best), jnp.maximum(t2, second)))
