"""The modality gap (MMCSAL eq. 10) and mean cosine similarities."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmal_jax.evaluators import common


@jax.jit
def _sum_and_squares(z):
  return jnp.sum(z, axis=0), jnp.sum(z * z)


def modality_gap(zimg, ztxt) -> dict[str, float]:
  """Modality gap (MMCSAL eq. 10) and mean cosine similarities, without N x N matrices.

  `gap` = ||mean zimg - mean ztxt||; `intra_image_cos` / `intra_text_cos` = mean
  cosine over distinct pairs within a modality, (||sum z||^2 - sum ||z||^2) /
  (N (N - 1)); `cross_cos` = mean over all image-text pairs = <mean zimg, mean
  ztxt>. Needs >= 2 rows per modality. Cost: O((N_img + N_txt) * D).
  """
  zimg, ztxt = common.check_embeddings(zimg=zimg, ztxt=ztxt)
  out, means = {}, []
  for name, z in (("image", zimg), ("text", ztxt)):
    n = z.shape[0]
    if n < 2:
      raise ValueError(f"modality_gap needs at least 2 {name} rows, got {n}.")
    total, squares = (np.asarray(x, np.float64) for x in _sum_and_squares(z))
    out[f"intra_{name}_cos"] = float((total @ total - squares) / (n * (n - 1)))
    means.append(total / n)
  out["gap"] = float(np.linalg.norm(means[0] - means[1]))
  out["cross_cos"] = float(means[0] @ means[1])
  return out
