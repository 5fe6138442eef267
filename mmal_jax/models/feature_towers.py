"""Towers over precomputed feature vectors (fixed, independent per modality).

For the regime where each modality arrives as frozen features (e.g. from
separate vision and language encoders), only a small map into the shared
space is learned: `kind="identity"` (no parameters), `"linear"` (`head`) or
`"mlp"` (`hidden_{i}` Dense + GELU, then `head`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp


class Model(nn.Module):
  """Feature tower: `(features (B, F) float, train=False) -> (x, out)`.

  x is (B, num_classes), or (B, F) for "identity". Cost: 2 * B * sum of
  (in * out) over its Dense layers FLOPs.
  """
  num_classes: Optional[int] = None
  kind: str = "linear"  # "identity", "linear" or "mlp"
  hidden_dims: Sequence[int] = ()
  dropout: float = 0.0
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, features, *, train=False):
    x = jnp.asarray(features, self.dtype_mm)
    if x.ndim != 2:
      raise ValueError(f"Feature towers take (B, F) inputs, got {x.shape}.")
    if self.kind == "identity":
      if self.num_classes not in (None, x.shape[-1]):
        raise ValueError(f"An identity tower outputs its {x.shape[-1]} input "
                         f"features; out_dim {self.num_classes} differs.")
      hidden_dims = ()
    elif self.kind == "linear":
      hidden_dims = ()
    elif self.kind == "mlp":
      if not self.hidden_dims:
        raise ValueError("kind='mlp' needs non-empty hidden_dims.")
      hidden_dims = self.hidden_dims
    else:
      raise ValueError(f"Unknown feature tower kind: {self.kind!r}")
    if self.kind != "identity" and not self.num_classes:
      raise ValueError(f"kind={self.kind!r} needs an output dimension.")

    out = {}
    for i, dim in enumerate(hidden_dims):
      x = nn.Dense(dim, dtype=self.dtype_mm, name=f"hidden_{i}")(x)
      x = nn.gelu(x)
      x = nn.Dropout(rate=self.dropout)(x, not train)
    out["pre_logits"] = x
    if self.kind != "identity":
      x = out["logits"] = nn.Dense(self.num_classes, dtype=self.dtype_mm,
                                   name="head")(x)
    return x, out
