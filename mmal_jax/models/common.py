"""Transformer pieces shared by the image and the text tower.

Module names follow big_vision's `models/vit.py`, so that its checkpoints load
unchanged: a block is `LayerNorm_0`, `MultiHeadDotProductAttention_0`
(`query|key|value|out`), `LayerNorm_1`, `MlpBlock_0/Dense_{0,1}`; the encoder
holds `encoderblock_{i}` (or one `encoderblock` whose leaves are stacked along a
leading depth axis under `nn.scan`) and `encoder_norm`; attention pooling is
`MAPHead_0` with a `probe`.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# name: (width, depth, mlp_dim, num_heads); Table 2 of arXiv:2106.04560 plus
# big_vision's "mu" (micro), SigLIP's shape-optimised "So400m" and SigLIP 2's
# "g-opt" (released as g-opt/16, paired with a So400m text tower) and "G-opt".
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "G-opt": (1536, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}


def decode_variant(variant: Optional[str]) -> dict:
  """"B" or "B/16" -> {width, depth, mlp_dim, num_heads[, patch_size]}."""
  if variant is None:
    return {}
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; known: {sorted(VARIANTS)}.")
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  hparams = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if patch:
    hparams["patch_size"] = (int(patch), int(patch))
  return hparams


def resolve(module: nn.Module, defaults: dict) -> dict:
  """Architecture of `module`: `defaults` < its `variant` < its explicit fields.

  Fields left at None take their value from the variant, then from `defaults`.
  """
  hparams = {**defaults, **decode_variant(module.variant)}
  for name in defaults:
    value = getattr(module, name)
    if value is not None:
      hparams[name] = value
  return hparams


def fused_attention(query, key, value, mask=None, dtype=None):
  """`jax.nn.dot_product_attention` in flax's `attention_fn` slot.

  query (B, T, heads, head_dim), key / value (B, S, heads, head_dim), mask
  broadcastable to (B, heads, T, S), nonzero where attending (flax's). With
  `implementation=None` jax picks cuDNN's fused (flash) attention where the
  backend and shapes allow it, else its XLA path; both compute what
  `nn.dot_product_attention` does (softmax(q k^T / sqrt(head_dim)) v) and
  never materialise the (T, S) weights in the fused case. No attention
  dropout (the towers use none). Cost: 4 B T S heads head_dim FLOPs.
  """
  if mask is not None:  # flax's masks may be 0/1 floats.
    mask = jnp.asarray(mask).astype(bool)
  out = jax.nn.dot_product_attention(query, key, value, mask=mask,
                                     implementation=None)
  return out.astype(dtype) if dtype is not None else out


# `attention` field of the blocks: "xla" is flax's reference implementation
# (explicit softmax weights), "fused" the one above.
ATTENTION = {"xla": nn.dot_product_attention, "fused": fused_attention}


def attention_fn(name: str):
  """The `ATTENTION` function called `name`; ValueError naming the choices."""
  if name not in ATTENTION:
    raise ValueError(f"Unknown attention {name!r}: one of {sorted(ATTENTION)}.")
  return ATTENTION[name]


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense -> GELU -> Dropout -> Dense."""
  mlp_dim: Optional[int] = None  # Defaults to 4x the input width.
  dropout: float = 0.0
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, x, deterministic=True):
    inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim or 4 * width, dtype=self.dtype_mm, **inits)(x)
    x = nn.gelu(x)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(width, dtype=self.dtype_mm, **inits)(x)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm block (self-attention, MLP); returns (x, out)."""
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype_mm: str = "float32"
  causal: bool = False
  attention: str = "xla"  # An `ATTENTION` name.

  @nn.compact
  def __call__(self, x, deterministic=True):
    out = {}
    mask = nn.make_causal_mask(x[..., 0]) if self.causal else None
    y = nn.LayerNorm()(x)
    y = out["sa"] = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        deterministic=deterministic, dtype=self.dtype_mm,
        attention_fn=attention_fn(self.attention))(y, y, mask=mask)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = out["+sa"] = x + y

    y = nn.LayerNorm()(x)
    y = out["mlp"] = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout,
                              dtype_mm=self.dtype_mm)(y, deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = out["+mlp"] = x + y
    return x, out


class Encoder(nn.Module):
  """`depth` blocks then a final LayerNorm; returns (encoded, per-block out).

  `scan=True` stacks the blocks' parameters along a leading axis and runs them
  with `nn.scan` (one compiled block: compile time independent of depth), each
  block rematerialised in the backward pass under `remat_policy`, a
  `jax.checkpoint_policies` name, as big_vision: the default
  "nothing_saveable" keeps only the blocks' inputs (activation memory of one
  block instead of `depth`, ~1/3 more compute); "none" keeps everything.
  Unrolled encoders (`scan=False`) keep every activation, as big_vision's.
  `attention`: "xla" (flax's) or "fused" (`fused_attention`); the same
  parameters and, up to rounding, the same outputs.
  """
  depth: int
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype_mm: str = "float32"
  causal: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, deterministic=True):
    attention_fn(self.attention)  # An unknown name fails before tracing.
    block_cls = Encoder1DBlock
    if self.remat_policy != "none" and not hasattr(jax.checkpoint_policies,
                                                    self.remat_policy):
      raise ValueError(f"Unknown remat_policy {self.remat_policy!r}: 'none' or "
                       f"a jax.checkpoint_policies name.")
    if self.scan and self.remat_policy != "none":
      block_cls = nn.remat(
          Encoder1DBlock, prevent_cse=False,
          static_argnums=(2,),  # (self, x, deterministic)
          policy=getattr(jax.checkpoint_policies, self.remat_policy))
    block_kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                    dropout=self.dropout, dtype_mm=self.dtype_mm,
                    causal=self.causal, attention=self.attention)
    out = {}
    if self.scan:
      x, scan_out = nn.scan(
          block_cls, variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=nn.broadcast, length=self.depth,
      )(name="encoderblock", **block_kw)(x, deterministic)
      for i in range(self.depth):
        out[f"block{i:02d}"] = jax.tree.map(lambda o, i=i: o[i], scan_out)
    else:
      for i in range(self.depth):
        x, out[f"block{i:02d}"] = block_cls(
            name=f"encoderblock_{i}", **block_kw)(x, deterministic)
    out["pre_ln"] = x
    return nn.LayerNorm(name="encoder_norm")(x), out


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the sequence."""
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dtype_mm: str = "float32"
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    batch, _, width = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(),
                       (1, 1, width), jnp.float32)
    probe = jnp.tile(probe.astype(x.dtype), [batch, 1, 1])
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        dtype=self.dtype_mm,
        attention_fn=attention_fn(self.attention))(probe, x)
    y = nn.LayerNorm()(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, dtype_mm=self.dtype_mm)(y)
    return x[:, 0]
