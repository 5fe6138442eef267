"""Vision Transformer image tower, parameter-compatible with big_vision's ViT.

Parameters: `embedding` (Conv, kernel (p, p, 3, width)), `pos_embedding`
(1, h*w, width) when learned, `cls` (1, 1, width) with `pool_type="tok"`,
`Transformer/...` (see `common.Encoder`), `MAPHead_0` with `pool_type="map"`,
`pre_logits` with `rep_size`, `head` with `num_classes`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmal_jax.models import common

_DEFAULTS = dict(patch_size=(16, 16), width=768, depth=12, mlp_dim=None,
                 num_heads=12)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype=jnp.float32) -> jnp.ndarray:
  """Fixed 2-D sin-cos position embedding (MoCo v3), shape (1, h*w, width)."""
  if width % 4:
    raise ValueError(f"sincos2d needs a width divisible by 4, got {width}.")
  y, x = jnp.mgrid[:h, :w]
  omega = 1. / temperature ** (jnp.arange(width // 4) / (width // 4 - 1))
  y = jnp.einsum("m,d->md", y.flatten(), omega)
  x = jnp.einsum("m,d->md", x.flatten(), omega)
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None]


class Model(nn.Module):
  """ViT. `variant` ("Ti/16", "So400m/14", ...) fills fields left at None.

  Call: `(images (B, H, W, C) float, train=False) -> (x, out)` where x is
  (B, num_classes) with a head, else (B, width) (or (B, N, width) for
  `pool_type="none"`). Cost: ~2 * params * N FLOPs per image, N = H*W / p^2.
  """
  num_classes: Optional[int] = None
  variant: Optional[str] = None
  patch_size: Optional[Sequence[int]] = None
  width: Optional[int] = None
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None
  num_heads: Optional[int] = None
  posemb: str = "learn"  # or "sincos2d"
  rep_size: Union[int, bool] = False
  dropout: float = 0.0
  pool_type: str = "gap"  # "map", "tok", "0" (first token) or "none"
  head_zeroinit: bool = True
  scan: bool = False
  remat_policy: str = "nothing_saveable"  # With scan, see common.Encoder.
  attention: str = "xla"  # or "fused", see common.Encoder.
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, image, *, train=False):
    arch = common.resolve(self, _DEFAULTS)
    out = {}
    image = jnp.asarray(image, self.dtype_mm)
    x = out["stem"] = nn.Conv(
        arch["width"], tuple(arch["patch_size"]),
        strides=tuple(arch["patch_size"]), padding="VALID", name="embedding",
        dtype=self.dtype_mm)(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])

    if self.posemb == "learn":
      pos = self.param("pos_embedding",
                       nn.initializers.normal(stddev=1 / np.sqrt(c)),
                       (1, h * w, c), jnp.float32)
    elif self.posemb == "sincos2d":
      pos = posemb_sincos_2d(h, w, c)
    else:
      raise ValueError(f"Unknown posemb type: {self.posemb!r}")
    x = out["with_posemb"] = x + pos.astype(x.dtype)

    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)

    x = nn.Dropout(rate=self.dropout)(x, not train)
    x, out["encoder"] = common.Encoder(
        depth=arch["depth"], mlp_dim=arch["mlp_dim"],
        num_heads=arch["num_heads"], dropout=self.dropout, scan=self.scan,
        remat_policy=self.remat_policy, dtype_mm=self.dtype_mm,
        attention=self.attention,
        name="Transformer")(x, deterministic=not train)
    encoded = out["encoded"] = x

    if self.pool_type == "map":
      x = common.MAPHead(num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"],
                         dtype_mm=self.dtype_mm, attention=self.attention)(x)
    elif self.pool_type == "gap":
      x = jnp.mean(x, axis=1)
    elif self.pool_type in ("0", "tok"):
      x = x[:, 0]
      if self.pool_type == "tok":
        encoded = encoded[:, 1:]
    elif self.pool_type != "none":
      raise ValueError(f"Unknown pool type: {self.pool_type!r}")
    out["head_input"] = x
    x_2d = jnp.reshape(encoded, [n, h, w, -1])

    if self.rep_size:
      rep_size = arch["width"] if self.rep_size is True else self.rep_size
      hidden = nn.Dense(rep_size, name="pre_logits")
      x_2d = nn.tanh(hidden(x_2d))
      x = nn.tanh(hidden(x))
    out["pre_logits_2d"] = x_2d
    out["pre_logits"] = x

    if self.num_classes:
      kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
      head = nn.Dense(self.num_classes, name="head", **kw)
      out["logits_2d"] = head(x_2d)
      x = out["logits"] = head(x)
    return x, out
