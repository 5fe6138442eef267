"""Recipes as `ml_collections.ConfigDict`s: model, loss, optimizer, inputs.

Each returns a config with
  model:     kwargs of `two_towers.Model` (big_vision's `config.model`),
  loss:      "siglip" or "clip" (`train_step.make_loss`),
  optim:     `optim.make_optimizer` fields,
  res, text_len, tokenizer: the inputs the model expects.
`siglip("B/16")` reproduces the published SigLIP architecture (its
checkpoints load into it); pass `tokenizer="sp:<c4_en model>"` to use them.
"""
from __future__ import annotations

from typing import Optional

import ml_collections

from mmal_jax.models import common


def optimizer(**overrides) -> ml_collections.ConfigDict:
  """big_vision's SigLIP optimizer: Adam(b2=0.95), lr 1e-3, wd 1e-4, clip 1."""
  config = ml_collections.ConfigDict(dict(
      lr=1e-3, wd=1e-4, b1=0.9, b2=0.95, eps=1e-8, mu_dtype=None,
      grad_clip_norm=1.0, warmup_steps=1_000, total_steps=100_000,
      locked_tower=None, frozen=(), wd_regex=r"(.*/)?kernel"))
  config.update(overrides)
  return config


def _tower_kw(dtype: str, scan: bool, remat_policy: str) -> dict:
  return dict(dtype_mm=dtype, scan=scan, remat_policy=remat_policy)


def _vit_and_text(variant: str, text_variant: Optional[str], pool_type: str,
                  vocab_size: int, kw: dict, bias_init: Optional[float]
                  ) -> dict:
  """A ViT and a text tower projecting to the ViT's width (SigLIP, LiT)."""
  return dict(
      image_model="vit", text_model="text_transformer",
      image=dict(variant=variant, pool_type=pool_type, **kw),
      text=dict(variant=text_variant or variant.split("/")[0],
                vocab_size=vocab_size, **kw),
      out_dim=(None, common.decode_variant(variant)["width"]),
      temperature_init=10., bias_init=bias_init)


def siglip(variant: str = "B/16", *, text_variant: Optional[str] = None,
           res: int = 224, text_len: int = 64, vocab_size: int = 32_000,
           tokenizer: str = "bytes", dtype: str = "float32",
           scan: bool = False, remat_policy: str = "none"
           ) -> ml_collections.ConfigDict:
  """SigLIP (arXiv:2303.15343): MAP-pooled ViT without head, text tower with a
  head to the image width, t = 10, b = -10, sigmoid loss."""
  kw = _tower_kw(dtype, scan, remat_policy)
  return ml_collections.ConfigDict(dict(
      model=_vit_and_text(variant, text_variant, "map", vocab_size, kw, -10.),
      loss="siglip", optim=optimizer(), res=res, text_len=text_len,
      tokenizer=tokenizer))


def lit(variant: str = "L/16", *, text_variant: Optional[str] = None,
        res: int = 224, text_len: int = 16, vocab_size: int = 32_000,
        tokenizer: str = "bytes", dtype: str = "float32", scan: bool = False,
        remat_policy: str = "none", loss: str = "clip"
        ) -> ml_collections.ConfigDict:
  """LiT (arXiv:2111.07991): a pre-trained ViT ("tok" pooling, no head) is
  locked, the text tower learns to map into its pre-logits space.

  Initialise `params["img"]` from an image checkpoint (`checkpoint.load`).
  `loss="siglip"` gives SigLIP-LiT (adds the bias b = -10).
  """
  kw = _tower_kw(dtype, scan, remat_policy)
  return ml_collections.ConfigDict(dict(
      model=_vit_and_text(variant, text_variant, "tok", vocab_size, kw,
                          -10. if loss == "siglip" else None),
      loss=loss, optim=optimizer(locked_tower="img", wd=1e-2), res=res,
      text_len=text_len, tokenizer=tokenizer))


# CLIP's text tower is narrower than its image tower (B/32: 512, L/14: 768).
_CLIP_TEXT = {"B": "M", "L": "B", "H": "L"}


def clip(variant: str = "B/32", *, text_variant: Optional[str] = None,
         res: int = 224, text_len: int = 77, vocab_size: int = 32_000,
         tokenizer: str = "bytes", dtype: str = "float32", scan: bool = False,
         remat_policy: str = "none") -> ml_collections.ConfigDict:
  """CLIP (arXiv:2103.00020)-style: class-token ViT and causal text tower,
  both with heads to the text width, t = 1/0.07, softmax loss. (big_vision's
  ViT has no pre-encoder LayerNorm, so OpenAI weights do not load as is.)"""
  name = variant.split("/")[0]
  text_variant = text_variant or _CLIP_TEXT.get(name, name)
  kw = _tower_kw(dtype, scan, remat_policy)
  dim = common.decode_variant(text_variant)["width"]
  return ml_collections.ConfigDict(dict(
      model=dict(
          image_model="vit", text_model="text_transformer",
          image=dict(variant=variant, pool_type="tok", head_zeroinit=False,
                     **kw),
          text=dict(variant=text_variant, vocab_size=vocab_size,
                    causal_mask=True, **kw),
          out_dim=dim, temperature_init=1 / 0.07, bias_init=None),
      # CLIP's AdamW (lr 5e-4, decay 0.2 * lr) in big_vision's wd convention.
      loss="clip", optim=optimizer(lr=5e-4, b2=0.98, wd=1e-4),
      res=res, text_len=text_len, tokenizer=tokenizer))


def tiny(loss: str = "siglip", *, res: int = 16, text_len: int = 8,
         dtype: str = "float32", scan: bool = False,
         remat_policy: str = "none") -> ml_collections.ConfigDict:
  """A seconds-to-compile two-tower model for tests: width 32, depth 1, patch 8,
  byte tokens."""
  kw = _tower_kw(dtype, scan, remat_policy)
  return ml_collections.ConfigDict(dict(
      model=dict(
          image_model="vit", text_model="text_transformer",
          image=dict(variant="mu/8", pool_type="map", **kw),
          text=dict(variant="mu", vocab_size=259, **kw),
          out_dim=(None, 32), temperature_init=10.,
          bias_init=-10. if loss == "siglip" else None),
      loss=loss, optim=optimizer(warmup_steps=2, total_steps=100), res=res,
      text_len=text_len, tokenizer="bytes"))


def features(image_dim: int, text_dim: int, *, out_dim: int = 128,
             kind: str = "mlp", hidden_dims=(512,), loss: str = "siglip",
             dtype: str = "float32") -> ml_collections.ConfigDict:
  """Fixed-feature regime: both modalities arrive as (B, F) vectors, each
  mapped by a feature tower ("identity", "linear" or "mlp")."""
  tower = dict(kind=kind, dtype_mm=dtype,
               hidden_dims=tuple(hidden_dims) if kind == "mlp" else ())
  return ml_collections.ConfigDict(dict(
      model=dict(
          image_model="feature_tower", text_model="feature_tower",
          image=tower, text=tower,
          out_dim=None if kind == "identity" else out_dim,
          temperature_init=10., bias_init=-10. if loss == "siglip" else None),
      loss=loss, optim=optimizer(), feature_dims=(image_dim, text_dim)))
