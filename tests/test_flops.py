"""Analytic model FLOPs (`mmal_jax.flops`) against a hand count and against
the matrix products in the traced program of a tiny two-tower model."""
import math

import jax
import jax.numpy as jnp
import pytest
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr

from mmal_jax import flops
from mmal_jax import losses
from mmal_jax.models import two_towers

# ViT: 8x8x3 images, 4x4 patches (T = 4), width 8, 1 block, MLP 16, MAP
# pooling; text: 5 tokens, width 8, 1 block, MLP 16; both project to 6.
TINY = dict(
    image=dict(patch_size=(4, 4), width=8, depth=1, mlp_dim=16, num_heads=2,
               pool_type="map"),
    text=dict(width=8, depth=1, mlp_dim=16, num_heads=2, vocab_size=11),
    out_dim=6, bias_init=-1.)
IMAGE, TEXT, BATCH = (8, 8, 3), (5,), 2

# Hand count, 2 FLOPs per multiply-accumulate.
VIT_STEM = 2 * 4 * 8 * (4 * 4 * 3)               # 4 patches x 48 inputs x 8
VIT_FORWARD = (
    VIT_STEM
    + 3 * 2 * 4 * 8 * 8 + 2 * 4 * 8 * 8          # Q, K, V; output projection
    + 2 * 4 * 4 * 8 + 2 * 4 * 4 * 8              # scores; weights x values
    + 2 * 4 * 8 * 16 + 2 * 4 * 16 * 8            # MLP
    + 2 * 8 * 8 + 2 * 2 * 4 * 8 * 8 + 2 * 8 * 8  # MAP: probe Q; K, V; output
    + 2 * 4 * 8 + 2 * 4 * 8                      # MAP: scores; weights x V
    + 2 * 8 * 16 + 2 * 16 * 8                    # MAP: MLP on one token
    + 2 * 8 * 6)                                 # head
TEXT_FORWARD = (
    3 * 2 * 5 * 8 * 8 + 2 * 5 * 8 * 8
    + 2 * 5 * 5 * 8 + 2 * 5 * 5 * 8
    + 2 * 5 * 8 * 16 + 2 * 5 * 16 * 8
    + 2 * 8 * 6)
LOGITS = 2 * BATCH * BATCH * 6


def test_tiny_two_towers_match_a_hand_count():
  assert (VIT_FORWARD, TEXT_FORWARD, LOGITS) == (9696, 6016, 48)
  got = flops.train_step_flops(TINY, "siglip", BATCH, IMAGE, TEXT)
  assert got == {"image_forward": VIT_FORWARD, "text_forward": TEXT_FORWARD,
                 "loss_forward": LOGITS,
                 "step": 3 * (BATCH * (VIT_FORWARD + TEXT_FORWARD) + LOGITS)}
  locked = flops.train_step_flops(TINY, "clip", BATCH, IMAGE, TEXT,
                                  locked_tower="img")
  assert locked["step"] == (BATCH * (VIT_FORWARD + 3 * TEXT_FORWARD)
                            + 2 * 2 * LOGITS)


def test_presets_resolve_variants():
  """B/16 at 224 px: 196 patches through 12 blocks of width 768."""
  image, width = flops.tower_flops("vit", {"variant": "B/16"}, None,
                                   (224, 224, 3))
  assert width == 768
  assert image == (2 * 196 * 768 * 16 * 16 * 3
                   + flops.encoder_flops(196, 768, 12, 3072))
  assert flops.encoder_flops(196, 768, 12, 3072) == 12 * (
      8 * 196 * 768 ** 2 + 4 * 196 ** 2 * 768 + 4 * 196 * 768 * 3072)
  with pytest.raises(ValueError, match="No FLOP count for tower"):
    flops.tower_flops("resnet", {}, 6, (8, 8, 3))


def _matmul_flops(jaxpr) -> int:
  """FLOPs of every dot_general / conv in a jaxpr, sub-jaxprs included
  (a scan's body times its length)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      rhs_free = [d for i, d in enumerate(rhs)
                  if i not in rhs_contract and i not in rhs_batch]
      total += 2 * math.prod(lhs) * math.prod(rhs_free)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += (2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs)
                // out_features)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          total += _matmul_flops(sub) * eqn.params.get("length", 1)
  return total


def _live_matmul_flops(fn, *args) -> int:
  """`_matmul_flops` of `fn`'s jaxpr after dead-code elimination (the ViT
  also applies its head to every patch, `logits_2d`, which XLA drops when
  unused, as here)."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  live, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  return _matmul_flops(live)


@pytest.mark.parametrize("scan", [False, True])
def test_count_equals_the_traced_programs_products(scan):
  """The forward pass's products in the (dead-code-free) jaxpr equal the
  analytic count; the gradient's are 3x that, less the patch embedding's
  input gradient, which nothing needs (the x3 convention counts it), plus,
  with scanned blocks under remat "nothing_saveable", the blocks' recomputed
  forward (hardware FLOPs, not model FLOPs)."""
  tower = dict(scan=scan, remat_policy="nothing_saveable")
  config = {**TINY, "image": {**TINY["image"], **tower},
            "text": {**TINY["text"], **tower}}
  model = two_towers.Model(**config)
  image = jnp.zeros((BATCH,) + IMAGE)
  text = jnp.zeros((BATCH,) + TEXT, jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), image,
                          text)["params"]

  def loss(p):
    zimg, ztxt, out = model.apply({"params": p}, image, text)
    return losses.siglip_loss(zimg, ztxt, out["t"], out["b"])

  counted = flops.train_step_flops(config, "siglip", BATCH, IMAGE, TEXT)
  forward = BATCH * (counted["image_forward"] + counted["text_forward"]) + (
      counted["loss_forward"])
  assert forward == BATCH * (VIT_FORWARD + TEXT_FORWARD) + LOGITS
  assert _live_matmul_flops(loss, params) == forward
  # Remat recomputes each block but its last product (the MLP's second
  # Dense: its output is not needed to differentiate the block).
  recomputed = scan * BATCH * (
      flops.encoder_flops(4, 8, 1, 16) - 2 * 4 * 16 * 8 +
      flops.encoder_flops(5, 8, 1, 16) - 2 * 5 * 16 * 8)
  assert _live_matmul_flops(jax.grad(loss), params) == (
      counted["step"] - BATCH * VIT_STEM + recomputed)
