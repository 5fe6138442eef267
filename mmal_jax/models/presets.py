"""Recipes as `ml_collections.ConfigDict`s: model, loss, optimizer, inputs.

Each returns a config with
  model:     kwargs of `two_towers.Model` (big_vision's `config.model`),
  loss:      "siglip" or "clip" (`train_step.make_loss`),
  optim:     `optim.make_optimizer` fields,
  res, text_len, tokenizer: the inputs the model expects; the text tower's
             `vocab_size` is the tokenizer's (`tokenizers.vocab_size`).
The defaults reproduce released checkpoints, which load into them with
`checkpoint.load` (texts padded with EOS, as `tokenizers` describes):
  siglip("B/16"): big_vision's SigLIP B/16 at 224 px (WebLI, English),
    gs://big_vision/siglip/webli_en_b16_224_63724782.npz, with `C4_EN`;
    other released SigLIPs by variant / res / text_len (So400m/14 at 224 px
    uses text_len=16, every other one 64).
  lit(): LiT-L16S (ViT-L/16 + S text tower, vision_transformer's release),
    gs://vit_models/lit/LiT-L16S.npz, with `LIT_L16S` (16k pieces, 16 tokens).
  clip("B/32"): the CLIP architecture only: OpenAI's weights are not released
    in this layout and are not converted here (their ViT has a LayerNorm
    before the encoder, QuickGELU MLPs, pools text at the EOT position and
    uses a BPE tokenizer).
"""
from __future__ import annotations

from typing import Optional

import ml_collections

from mmal_jax import tokenizers
from mmal_jax.models import common


def optimizer(**overrides) -> ml_collections.ConfigDict:
  """big_vision's SigLIP optimizer: Adam(b2=0.95), lr 1e-3, wd 1e-4, clip 1."""
  config = ml_collections.ConfigDict(dict(
      lr=1e-3, wd=1e-4, b1=0.9, b2=0.95, eps=1e-8, mu_dtype=None,
      grad_clip_norm=1.0, warmup_steps=1_000, total_steps=100_000,
      locked_tower=None, frozen=(), wd_regex=r"(.*/)?kernel"))
  config.update(overrides)
  return config


def _tower_kw(dtype: str, scan: bool, remat_policy: str,
              attention: str = "xla") -> dict:
  """Tower fields shared by both towers; `attention` ("xla" or "fused", see
  `common.Encoder`) appears only when not the default, so configs written
  before it existed stay equal."""
  kw = dict(dtype_mm=dtype, scan=scan, remat_policy=remat_policy)
  if attention != "xla":
    common.attention_fn(attention)  # Unknown names fail here.
    kw["attention"] = attention
  return kw


def _vocab(tokenizer: str, vocab_size: Optional[int]) -> int:
  return tokenizers.vocab_size(tokenizer) if vocab_size is None else vocab_size


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
           res: int = 224, text_len: int = 64,
           tokenizer: str = tokenizers.C4_EN,
           vocab_size: Optional[int] = None, dtype: str = "float32",
           scan: bool = False, remat_policy: str = "nothing_saveable",
           attention: str = "xla"
           ) -> ml_collections.ConfigDict:
  """SigLIP (arXiv:2303.15343): MAP-pooled ViT without head, text tower with a
  head to the image width, t = 10, b = -10, sigmoid loss. `vocab_size`
  defaults to the tokenizer's."""
  kw = _tower_kw(dtype, scan, remat_policy, attention)
  return ml_collections.ConfigDict(dict(
      model=_vit_and_text(variant, text_variant, "map",
                          _vocab(tokenizer, vocab_size), kw, -10.),
      loss="siglip", optim=optimizer(), res=res, text_len=text_len,
      tokenizer=tokenizer))


def lit(variant: str = "L/16", *, text_variant: Optional[str] = "S",
        res: int = 224, text_len: int = 16,
        tokenizer: str = tokenizers.LIT_L16S,
        vocab_size: Optional[int] = None, dtype: str = "float32",
        scan: bool = False, remat_policy: str = "nothing_saveable",
        loss: str = "clip", attention: str = "xla"
        ) -> ml_collections.ConfigDict:
  """LiT (arXiv:2111.07991): a pre-trained ViT ("tok" pooling, no head) is
  locked, the text tower (last-token pooling, head to the image width) learns
  to map into its pre-logits space. The defaults are the LiT-L16S release.

  To train one, initialise `params["img"]` from an image checkpoint
  (`checkpoint.load`, e.g. an AugReg ViT; its old layout converts).
  `loss="siglip"` gives SigLIP-LiT (adds the bias b = -10). `text_variant`
  None: the image tower's.
  """
  kw = _tower_kw(dtype, scan, remat_policy, attention)
  return ml_collections.ConfigDict(dict(
      model=_vit_and_text(variant, text_variant, "tok",
                          _vocab(tokenizer, vocab_size), kw,
                          -10. if loss == "siglip" else None),
      loss=loss, optim=optimizer(locked_tower="img", wd=1e-2), res=res,
      text_len=text_len, tokenizer=tokenizer))


# CLIP's text tower is narrower than its image tower (B/32: 512, L/14: 768).
_CLIP_TEXT = {"B": "M", "L": "B", "H": "L"}


def clip(variant: str = "B/32", *, text_variant: Optional[str] = None,
         res: int = 224, text_len: int = 77,
         tokenizer: str = tokenizers.C4_EN,
         vocab_size: Optional[int] = None, dtype: str = "float32",
         scan: bool = False, remat_policy: str = "nothing_saveable",
         attention: str = "xla") -> ml_collections.ConfigDict:
  """CLIP (arXiv:2103.00020)-style: class-token ViT and causal text tower
  (last-token pooling of EOS-padded text), both with heads to the text width,
  t = 1/0.07, softmax loss. No released weights load into it (see the module
  docstring): train it (`init.kind="scratch"` / "pretrain") or bring a .npz
  in this layout."""
  name = variant.split("/")[0]
  text_variant = text_variant or _CLIP_TEXT.get(name, name)
  kw = _tower_kw(dtype, scan, remat_policy, attention)
  dim = common.decode_variant(text_variant)["width"]
  return ml_collections.ConfigDict(dict(
      model=dict(
          image_model="vit", text_model="text_transformer",
          image=dict(variant=variant, pool_type="tok", head_zeroinit=False,
                     **kw),
          text=dict(variant=text_variant,
                    vocab_size=_vocab(tokenizer, vocab_size),
                    causal_mask=True, **kw),
          out_dim=dim, temperature_init=1 / 0.07, bias_init=None),
      # CLIP's AdamW (lr 5e-4, decay 0.2 * lr) in big_vision's wd convention.
      loss="clip", optim=optimizer(lr=5e-4, b2=0.98, wd=1e-4),
      res=res, text_len=text_len, tokenizer=tokenizer))


def tiny(loss: str = "siglip", *, res: int = 16, text_len: int = 8,
         dtype: str = "float32", scan: bool = False,
         remat_policy: str = "nothing_saveable", attention: str = "xla"
         ) -> ml_collections.ConfigDict:
  """A seconds-to-compile two-tower model for tests: width 32, depth 1, patch 8,
  byte tokens."""
  kw = _tower_kw(dtype, scan, remat_policy, attention)
  return ml_collections.ConfigDict(dict(
      model=dict(
          image_model="vit", text_model="text_transformer",
          image=dict(variant="mu/8", pool_type="map", **kw),
          text=dict(variant="mu", vocab_size=tokenizers.vocab_size("bytes"),
                    **kw),
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
