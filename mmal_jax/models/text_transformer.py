"""Text transformer tower, parameter-compatible with big_vision's (CLIP-like).

Parameters: `Embed_0/embedding` (vocab_size, width), `pos_embedding`
(1, seq_len, width), `Encoder_0/...` (see `common.Encoder`), `MAPHead_0` with
`pool_type="map"`, `head` with `num_classes`.

Tokens are expected as big_vision's SigLIP tokenises them (see
`mmal_jax.tokenizers`): EOS kept under truncation ("sticky") and, for
`pool_type="last"`, padding with the EOS id so that the last position is EOS.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmal_jax.models import common

_DEFAULTS = dict(width=512, depth=12, mlp_dim=2048, num_heads=8)


class Model(nn.Module):
  """Text transformer. `variant` ("B", "L", ...) fills fields left at None.

  Call: `(tokens (B, L) int, train=False) -> (x, out)`, x (B, num_classes) with
  a head, else (B, width). `causal_mask=True` masks attention autoregressively
  as in CLIP's text encoder (no parameter changes).
  Cost: ~2 * params * L FLOPs per text (plus attention, 4 * L^2 * width).
  """
  num_classes: Optional[int] = None
  variant: Optional[str] = None
  width: Optional[int] = None
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None
  num_heads: Optional[int] = None
  dropout: float = 0.0
  vocab_size: int = 32_000
  pool_type: str = "last"  # "first", "gap" (= "mean"), "max" or "map"
  causal_mask: bool = False
  scan: bool = False
  remat_policy: str = "nothing_saveable"  # With scan, see common.Encoder.
  attention: str = "xla"  # or "fused", see common.Encoder.
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, text, *, train=False):
    arch = common.resolve(self, _DEFAULTS)
    out = {}
    x = out["embedded"] = nn.Embed(
        num_embeddings=self.vocab_size, features=arch["width"],
        dtype=self.dtype_mm)(text)
    _, seq_len, width = x.shape
    pos = self.param("pos_embedding",
                     nn.initializers.normal(stddev=1 / np.sqrt(width)),
                     (1, seq_len, width), jnp.float32)
    x = x + pos.astype(x.dtype)

    x, encoder_out = common.Encoder(
        depth=arch["depth"], mlp_dim=arch["mlp_dim"],
        num_heads=arch["num_heads"], dropout=self.dropout, scan=self.scan,
        remat_policy=self.remat_policy, dtype_mm=self.dtype_mm,
        attention=self.attention,
        causal=self.causal_mask)(x, deterministic=not train)
    out.update({"transformed": x, **encoder_out})

    if self.pool_type == "last":
      x = x[:, -1]
    elif self.pool_type == "first":
      x = x[:, 0]
    elif self.pool_type in ("mean", "gap"):
      x = x.mean(axis=1)
    elif self.pool_type in ("max", "gmp"):
      x = x.max(axis=1)
    elif self.pool_type == "map":
      x = common.MAPHead(num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"],
                         dtype_mm=self.dtype_mm, attention=self.attention)(x)
    else:
      raise ValueError(f"Unknown pool type: {self.pool_type!r}")
    out["pre_logits"] = x

    if self.num_classes:
      x = out["logits"] = nn.Dense(self.num_classes, name="head")(x)
    return x, out
