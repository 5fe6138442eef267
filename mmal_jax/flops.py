"""Model FLOPs of a two-tower training step, counted from the towers' shapes.

The count is the one MFU is defined with (PaLM, arXiv:2204.02311, App. B):
the matrix products the model needs, 2 FLOPs per multiply-accumulate, forward
once and backward twice (gradients with respect to activations and to
weights), so a trained tower costs 3x its forward pass. Rematerialisation
(`remat_policy`) recomputes activations and adds hardware FLOPs, not model
FLOPs; elementwise work (LayerNorm, softmax, GELU, the optimizer) is left
out. A locked tower (LiT, `optim.locked_tower`) costs its forward pass only.
XLA's cost analysis is no substitute: it misses what it cannot see (on GPU
the products are cuBLAS custom calls; a scanned layer counts once).

Per example, with d = width, m = mlp_dim (4d when unset), T tokens, L blocks:

  encoder block   8 T d^2          Q, K, V and output projections
                + 4 T^2 d          attention scores Q K^T and weights x V
                + 4 T d m          MLP (two Dense layers)
  ViT stem        2 T d p^2 c      patch embedding (T = (H/p)(W/p) patches,
                                   one more token with pool_type "tok")
  MAP head        4 d^2 + 4 T d^2 + 4 T d + 4 d m
                                   probe query and output projections, K and
                                   V over the T tokens, scores and weights x V
                                   of one query, the MLP on one token
  Dense head      2 d_in d_out     `pre_logits` (rep_size) and `head`
  feature tower   2 sum(d_in d_out) over its Dense layers

A text tower's token embedding is a lookup (no FLOPs); a causal mask does not
shrink the dense attention products. The loss adds, per step of global batch
B and embedding size D, the logits product 2 B^2 D (SigLIP; CLIP computes it
once per direction: 4 B^2 D), and its backward one such product per trained
side (x3, or x2 with a locked tower).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from mmal_jax.models import common
from mmal_jax.models import feature_towers
from mmal_jax.models import text_transformer
from mmal_jax.models import vit


def encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> int:
  """Forward FLOPs of `depth` pre-LN blocks on one sequence of `tokens`
  (projections 8 T d^2, attention 4 T^2 d, MLP 4 T d m per block)."""
  t, d, m = tokens, width, mlp_dim
  return depth * (8 * t * d * d + 4 * t * t * d + 4 * t * d * m)


def map_head_flops(tokens: int, width: int, mlp_dim: int) -> int:
  """Forward FLOPs of attention pooling (`common.MAPHead`) over `tokens`:
  one query, keys and values of every token, an MLP on the pooled token."""
  t, d, m = tokens, width, mlp_dim
  return 4 * d * d + 4 * t * d * d + 4 * t * d + 4 * d * m


def _pool_and_head_flops(pool_type: str, tokens: int, arch: dict,
                         rep_size, num_classes: Optional[int]) -> tuple[int, int]:
  """(FLOPs, output width) of pooling, `pre_logits` and `head`."""
  width = arch["width"]
  flops = 0
  if pool_type == "map":
    flops += map_head_flops(tokens, width, arch["mlp_dim"])
  if rep_size:
    rep = width if rep_size is True else int(rep_size)
    flops += 2 * width * rep
    width = rep
  if num_classes:
    flops += 2 * width * num_classes
    width = num_classes
  return flops, width


def _arch(module_cls, defaults: dict, config: Mapping[str, Any]) -> dict:
  """The module's resolved architecture (`common.resolve`: variant, fields,
  defaults), mlp_dim filled in as `common.MlpBlock` does (4 x width)."""
  arch = common.resolve(module_cls(**config), defaults)
  arch["mlp_dim"] = arch["mlp_dim"] or 4 * arch["width"]
  return arch


def vit_flops(config: Mapping[str, Any], image_shape: Sequence[int]
              ) -> tuple[int, int]:
  """(forward FLOPs per image, output width) of `vit.Model(**config)` on
  `image_shape` (H, W, C). Formula: module docstring."""
  arch = _arch(vit.Model, vit._DEFAULTS, config)  # pylint: disable=protected-access
  height, width_px, channels = image_shape
  ph, pw = arch["patch_size"]
  tokens = (height // ph) * (width_px // pw)
  pool_type = config.get("pool_type", "gap")
  flops = 2 * tokens * arch["width"] * ph * pw * channels
  tokens += pool_type == "tok"
  flops += encoder_flops(tokens, arch["width"], arch["depth"], arch["mlp_dim"])
  head, out = _pool_and_head_flops(pool_type, tokens, arch,
                                   config.get("rep_size", False),
                                   config.get("num_classes"))
  return flops + head, out


def text_flops(config: Mapping[str, Any], seq_len: int) -> tuple[int, int]:
  """(forward FLOPs per text, output width) of `text_transformer.Model(
  **config)` on `seq_len` tokens. Formula: module docstring."""
  arch = _arch(text_transformer.Model, text_transformer._DEFAULTS, config)  # pylint: disable=protected-access
  flops = encoder_flops(seq_len, arch["width"], arch["depth"], arch["mlp_dim"])
  head, out = _pool_and_head_flops(config.get("pool_type", "last"), seq_len,
                                   arch, False, config.get("num_classes"))
  return flops + head, out


def feature_tower_flops(config: Mapping[str, Any], num_features: int
                        ) -> tuple[int, int]:
  """(forward FLOPs per example, output width) of `feature_towers.Model(
  **config)` on `num_features` inputs: 2 d_in d_out per Dense layer."""
  model = feature_towers.Model(**config)
  dims = [num_features]
  if model.kind == "mlp":
    dims += list(model.hidden_dims)
  if model.kind != "identity":
    dims.append(model.num_classes)
  return sum(2 * a * b for a, b in zip(dims, dims[1:])), dims[-1]


_TOWER_FLOPS = {"vit": vit_flops, "text_transformer": text_flops,
                "proj.image_text.text_transformer": text_flops,
                "feature_tower": feature_tower_flops}


def tower_flops(model_name: str, config: Optional[Mapping[str, Any]],
                out_dim: Optional[int], input_shape: Sequence[int]
                ) -> tuple[int, int]:
  """(forward FLOPs per example, embedding width) of one tower as
  `two_towers.Model` builds it (`out_dim` as its `num_classes` unless the
  tower's config sets one). `input_shape`: one example's input shape,
  (H, W, C) images, (L,) tokens, (F,) features."""
  if model_name not in _TOWER_FLOPS:
    raise ValueError(f"No FLOP count for tower {model_name!r}; known: "
                     f"{sorted(_TOWER_FLOPS)}.")
  config = {"num_classes": out_dim, **(config or {})}
  shape = tuple(input_shape)
  return _TOWER_FLOPS[model_name](config, shape if model_name == "vit"
                                  else shape[0])


def loss_flops(loss: str, batch: int, dim: int) -> int:
  """Forward FLOPs of the contrastive loss's logits on a global batch:
  2 B^2 D for "siglip", 4 B^2 D for "clip" (one product per direction)."""
  per_product = 2 * batch * batch * dim
  if loss == "siglip":
    return per_product
  if loss == "clip":
    return 2 * per_product
  raise ValueError(f"Unknown loss {loss!r}: 'siglip' or 'clip'.")


def train_step_flops(model: Mapping[str, Any], loss: str, batch: int,
                     image_shape: Sequence[int], text_shape: Sequence[int], *,
                     locked_tower: Optional[str] = None) -> dict[str, int]:
  """Model FLOPs of one training step of `two_towers.Model(**model)`.

  `batch`: global batch; `image_shape` / `text_shape`: one example's inputs;
  `locked_tower`: "img" or "txt" (LiT) counts that tower's forward only.
  Returns forward FLOPs per example of each tower (`image_forward`,
  `text_forward`), of the loss per step (`loss_forward`) and the step's
  total (`step`: 3x forward of what is trained, 1x of a locked tower; the
  logits' backward product for each trained side).
  Pure Python on the config: no tracing, no devices.
  """
  out_dim = model.get("out_dim", 128)
  if out_dim is None or isinstance(out_dim, int):
    out_dim = (out_dim, out_dim)
  image, image_dim = tower_flops(model.get("image_model", "vit"),
                                 model.get("image"), out_dim[0], image_shape)
  text, text_dim = tower_flops(model.get("text_model", "text_transformer"),
                               model.get("text"), out_dim[1], text_shape)
  if image_dim != text_dim:
    raise ValueError(f"The towers embed to {image_dim} and {text_dim} "
                     f"dimensions; the loss needs one.")
  logits = loss_flops(loss, batch, image_dim)
  if locked_tower not in ("img", "txt", None):
    raise ValueError(f"Unknown locked_tower {locked_tower!r}: 'img', 'txt' "
                     f"or None.")
  trained = {"img": locked_tower != "img", "txt": locked_tower != "txt"}
  factor = {k: 3 if v else 1 for k, v in trained.items()}
  step = (batch * (factor["img"] * image + factor["txt"] * text) +
          (1 + sum(trained.values())) * logits)
  return {"image_forward": image, "text_forward": text,
          "loss_forward": logits, "step": step}
