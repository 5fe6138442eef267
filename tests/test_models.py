"""Towers and the two-tower model: shapes, dtypes, pooling, parameter names."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmal_jax import tokenizers
from mmal_jax.models import common
from mmal_jax.models import feature_towers
from mmal_jax.models import presets
from mmal_jax.models import text_transformer
from mmal_jax.models import two_towers
from mmal_jax.models import vit

KEY = jax.random.PRNGKey(0)
IMAGES = jax.random.normal(KEY, (2, 16, 16, 3))
TOKENS = jax.random.randint(KEY, (2, 8), 0, 50)


def shapes(tree):
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


@pytest.mark.parametrize("variant", sorted(common.VARIANTS))
def test_vit_variant_parameter_shapes(variant):
  # Real sizes, shapes only (eval_shape; scan traces a single block).
  width, depth, mlp_dim, heads = common.VARIANTS[variant]
  model = vit.Model(variant=f"{variant}/14", scan=True, pool_type="map")
  params = jax.eval_shape(model.init, KEY, jnp.zeros((1, 28, 28, 3)))["params"]
  s = shapes(params)
  block = "Transformer/encoderblock/"
  assert s["embedding/kernel"] == (14, 14, 3, width)
  assert s["pos_embedding"] == (1, 4, width)
  assert s[block + "MultiHeadDotProductAttention_0/query/kernel"] == (
      depth, width, heads, width // heads)
  assert s[block + "MultiHeadDotProductAttention_0/out/kernel"] == (
      depth, heads, width // heads, width)
  assert s[block + "MlpBlock_0/Dense_0/kernel"] == (depth, width, mlp_dim)
  assert s["MAPHead_0/probe"] == (1, 1, width)
  assert "head/kernel" not in s


def test_siglip_b16_parameter_tree_matches_big_vision():
  config = presets.siglip("B/16")
  model = two_towers.Model(**config.model)
  params = jax.eval_shape(model.init, KEY, jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 64), jnp.int32))["params"]
  s = shapes(params)
  expected = {
      "t": (1,), "b": (1,),
      "img/embedding/kernel": (16, 16, 3, 768), "img/embedding/bias": (768,),
      "img/pos_embedding": (1, 196, 768),
      "img/Transformer/encoderblock_11/LayerNorm_1/scale": (768,),
      "img/Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel": (3072, 768),
      "img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/key/bias":
          (12, 64),
      "img/Transformer/encoder_norm/bias": (768,),
      "img/MAPHead_0/MultiHeadDotProductAttention_0/out/kernel": (12, 64, 768),
      "img/MAPHead_0/MlpBlock_0/Dense_0/kernel": (768, 3072),
      "img/MAPHead_0/LayerNorm_0/scale": (768,),
      "txt/Embed_0/embedding": (32000, 768),
      "txt/pos_embedding": (1, 64, 768),
      "txt/Encoder_0/encoderblock_11/MlpBlock_0/Dense_0/bias": (3072,),
      "txt/Encoder_0/encoder_norm/scale": (768,),
      "txt/head/kernel": (768, 768), "txt/head/bias": (768,),
  }
  assert {k: s[k] for k in expected} == expected
  assert not any(k.startswith("img/head") for k in s)
  # Leaves: per tower 12 blocks x 16 (2 LayerNorms, 4 attention Dense, 2 MLP
  # Dense) + norm; image stem 3 + MAPHead 15; text stem 2 + head 2; t, b.
  assert len(s) == 2 * (12 * 16 + 2) + 3 + 15 + 2 + 2 + 2
  d, m, L = 768, 3072, 12
  block = 4 * d + 4 * d * d + 4 * d + 2 * d * m + m + d
  image = 16 * 16 * 3 * d + d + 196 * d + L * block + 2 * d + (
      d + block - 2 * d)  # MAPHead: probe + a block with one LayerNorm.
  text = 32000 * d + 64 * d + L * block + 2 * d + d * d + d
  assert sum(np.prod(v) for v in s.values()) == image + text + 2


@pytest.mark.parametrize("pool_type,out_shape", [
    ("gap", (2, 32)), ("map", (2, 32)), ("tok", (2, 32)), ("0", (2, 32)),
    ("none", (2, 4, 32))])
def test_vit_pooling(pool_type, out_shape):
  model = vit.Model(variant="mu/8", pool_type=pool_type)
  params = model.init(KEY, IMAGES)
  x, out = model.apply(params, IMAGES)
  assert x.shape == out_shape and x.dtype == jnp.float32
  assert out["pre_logits_2d"].shape == (2, 2, 2, 32)
  assert ("cls" in params["params"]) == (pool_type == "tok")
  assert ("MAPHead_0" in params["params"]) == (pool_type == "map")


def test_vit_head_rep_size_and_sincos_posemb():
  model = vit.Model(num_classes=5, variant="mu/8", rep_size=16,
                    posemb="sincos2d", head_zeroinit=False)
  params = model.init(KEY, IMAGES)["params"]
  assert "pos_embedding" not in params
  assert params["pre_logits"]["kernel"].shape == (32, 16)
  x, out = model.apply({"params": params}, IMAGES)
  assert x.shape == (2, 5) and out["logits_2d"].shape == (2, 2, 2, 5)
  assert vit.posemb_sincos_2d(2, 2, 32).shape == (1, 4, 32)


def test_bfloat16_compute_keeps_float32_params():
  model = vit.Model(variant="mu/8", dtype_mm="bfloat16", pool_type="map")
  params = model.init(KEY, IMAGES)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert model.apply(params, IMAGES)[1]["stem"].dtype == jnp.bfloat16
  ref = vit.Model(variant="mu/8", pool_type="map").apply(params, IMAGES)[0]
  np.testing.assert_allclose(model.apply(params, IMAGES)[0], ref, atol=0.1)


def _has_remat(model, params):
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda p: jnp.sum(model.apply({"params": p}, IMAGES)[0])))(params)
  return "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


def test_remat_and_scan_do_not_change_the_function():
  def loss(model, params):
    return jnp.sum(model.apply({"params": params}, IMAGES)[0] ** 2)

  plain = vit.Model(variant="mu/8", depth=2)
  params = plain.init(KEY, IMAGES)["params"]
  blocks = params["Transformer"]
  stacked = dict(params, Transformer={
      "encoder_norm": blocks["encoder_norm"],
      "encoderblock": jax.tree.map(lambda *xs: jnp.stack(xs),
                                   blocks["encoderblock_0"],
                                   blocks["encoderblock_1"])})
  want = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
  for policy in ("nothing_saveable", "none"):
    scanned = vit.Model(variant="mu/8", depth=2, scan=True,
                        remat_policy=policy)
    np.testing.assert_allclose(loss(scanned, stacked), loss(plain, params),
                               rtol=1e-6)
    grads = jax.jit(jax.grad(lambda p, m=scanned: loss(m, p)))(stacked)
    for i in range(2):
      jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(
          a[i], b, rtol=1e-5, atol=1e-6),
                   grads["Transformer"]["encoderblock"],
                   want["Transformer"][f"encoderblock_{i}"])


def test_remat_policy_defaults_to_nothing_saveable_under_scan():
  """big_vision's default (issue 8.17): the scanned blocks rematerialise."""
  assert vit.Model.remat_policy == "nothing_saveable"
  assert text_transformer.Model.remat_policy == "nothing_saveable"
  assert common.Encoder.remat_policy == "nothing_saveable"
  for name in ("siglip", "lit", "clip", "tiny"):
    config = getattr(presets, name)()
    assert config.model.image.remat_policy == "nothing_saveable", name
  scanned = vit.Model(variant="mu/8", depth=2, scan=True)
  params = jax.eval_shape(scanned.init, KEY, IMAGES)["params"]
  assert _has_remat(scanned, params)
  assert not _has_remat(vit.Model(variant="mu/8", depth=2, scan=True,
                                  remat_policy="none"), params)
  unrolled = vit.Model(variant="mu/8", depth=2)
  assert not _has_remat(unrolled, jax.eval_shape(unrolled.init, KEY,
                                                 IMAGES)["params"])
  with pytest.raises(ValueError, match="remat_policy"):
    vit.Model(variant="mu/8", scan=True, remat_policy="typo").init(KEY, IMAGES)


def test_siglip2_g_opt_variants():
  """SigLIP 2's released g-opt/16 and its G-opt sibling (issue 8.15)."""
  assert common.decode_variant("g-opt/16") == dict(
      width=1536, depth=40, mlp_dim=6144, num_heads=16, patch_size=(16, 16))
  assert common.decode_variant("G-opt") == dict(
      width=1536, depth=48, mlp_dim=8192, num_heads=16)


def test_dropout_only_in_training():
  model = vit.Model(variant="mu/8", dropout=0.5)
  params = model.init(KEY, IMAGES)
  eval_a, eval_b = (model.apply(params, IMAGES)[0] for _ in range(2))
  np.testing.assert_array_equal(eval_a, eval_b)
  train = [model.apply(params, IMAGES, train=True,
                       rngs={"dropout": jax.random.PRNGKey(i)})[0]
           for i in range(2)]
  assert not np.allclose(train[0], train[1])


@pytest.mark.parametrize("pool_type", ["last", "first", "gap", "max", "map"])
def test_text_pooling(pool_type):
  model = text_transformer.Model(num_classes=7, variant="mu", vocab_size=50,
                                 pool_type=pool_type)
  params = model.init(KEY, TOKENS)
  x, out = model.apply(params, TOKENS)
  assert x.shape == (2, 7) and out["pre_logits"].shape == (2, 32)
  transformed = out["transformed"]
  pooled = {"last": transformed[:, -1], "first": transformed[:, 0],
            "gap": transformed.mean(1), "max": transformed.max(1)}
  if pool_type in pooled:
    np.testing.assert_allclose(out["pre_logits"], pooled[pool_type])


def test_text_causal_mask_hides_later_tokens():
  edited = TOKENS.at[:, 4:].set(3)
  for causal in (True, False):
    model = text_transformer.Model(variant="mu", vocab_size=50,
                                   causal_mask=causal)
    params = model.init(KEY, TOKENS)
    a = model.apply(params, TOKENS)[1]["transformed"]
    b = model.apply(params, edited)[1]["transformed"]
    assert np.allclose(a[:, :4], b[:, :4], atol=1e-6) == causal


@pytest.mark.parametrize("kind,dims", [
    ("identity", (2, 12)), ("linear", (2, 6)), ("mlp", (2, 6))])
def test_feature_towers(kind, dims):
  features = jax.random.normal(KEY, (2, 12))
  model = feature_towers.Model(
      num_classes=None if kind == "identity" else 6, kind=kind,
      hidden_dims=(10,) if kind == "mlp" else ())
  params = model.init(KEY, features)
  x, _ = model.apply(params, features)
  assert x.shape == dims
  names = set(params.get("params", {}))
  assert names == {"identity": set(), "linear": {"head"},
                   "mlp": {"hidden_0", "head"}}[kind]
  with pytest.raises(ValueError):
    feature_towers.Model(num_classes=5, kind="identity").init(KEY, features)


def test_two_towers_embeddings_and_single_modality():
  config = presets.tiny()
  model = two_towers.Model(**config.model)
  params = model.init(KEY, IMAGES, TOKENS)["params"]
  zimg, ztxt, out = model.apply({"params": params}, IMAGES, TOKENS)
  assert zimg.shape == ztxt.shape == (2, 32)
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=1), 1., rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=1), 1., rtol=1e-5)
  np.testing.assert_allclose(out["t"], [10.], rtol=1e-6)
  np.testing.assert_allclose(params["t"], [np.log(10.)], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [-10.])
  assert out["img/pre_logits"].shape == (2, 32)
  zimg_alone, none, _ = model.apply({"params": params}, IMAGES, None)
  assert none is None
  np.testing.assert_allclose(zimg_alone, zimg, rtol=1e-6)
  none, ztxt_alone, _ = model.apply({"params": params}, None, TOKENS)
  assert none is None
  np.testing.assert_allclose(ztxt_alone, ztxt, rtol=1e-6)


def test_two_towers_over_features():
  config = presets.features(12, 20, out_dim=8, kind="mlp", hidden_dims=(16,))
  model = two_towers.Model(**config.model)
  image_features = jax.random.normal(KEY, (3, 12))
  text_features = jax.random.normal(KEY, (3, 20))
  params = model.init(KEY, image_features, text_features)["params"]
  zimg, ztxt, _ = model.apply({"params": params}, image_features,
                              text_features)
  assert zimg.shape == ztxt.shape == (3, 8)
  assert set(params["img"]) == {"hidden_0", "head"}


def test_lit_preset_is_the_lit_l16s_release():
  """The shapes of gs://vit_models/lit/LiT-L16S.npz once converted."""
  config = presets.lit()
  model = two_towers.Model(**config.model)
  s = shapes(jax.eval_shape(
      model.init, KEY, jnp.zeros((1, config.res, config.res, 3)),
      jnp.zeros((1, config.text_len), jnp.int32))["params"])
  expected = {
      "t": (1,), "img/cls": (1, 1, 1024), "img/pos_embedding": (1, 196, 1024),
      "img/embedding/kernel": (16, 16, 3, 1024),
      "img/Transformer/encoderblock_23/MlpBlock_0/Dense_0/kernel": (1024,
                                                                    4096),
      "txt/Embed_0/embedding": (16_000, 384), "txt/pos_embedding": (1, 16, 384),
      "txt/Encoder_0/encoderblock_11/MultiHeadDotProductAttention_0/query/"
      "kernel": (384, 6, 64),
      "txt/head/kernel": (384, 1024)}
  assert {k: s[k] for k in expected} == expected
  assert "b" not in s and not any(k.startswith("img/head") for k in s)
  assert config.tokenizer == tokenizers.LIT_L16S and config.loss == "clip"
  assert config.model.text.get("pool_type", "last") == "last"


@pytest.mark.parametrize("name", ["siglip", "lit", "clip", "tiny"])
def test_preset_vocab_matches_its_tokenizer(name):
  config = getattr(presets, name)()
  assert config.model.text.vocab_size == tokenizers.vocab_size(
      config.tokenizer)
  with pytest.raises(ValueError, match="pass vocab_size"):
    presets.siglip(tokenizer="sp:/my/own.model")
  own = presets.siglip(tokenizer="sp:/my/own.model", vocab_size=1000)
  assert own.model.text.vocab_size == 1000


def test_fused_attention_is_the_same_function():
  """attention="fused" (jax.nn.dot_product_attention, cuDNN's flash
  attention where available): the same parameters and, up to rounding, the
  same embeddings and gradients as flax's attention; with MAP pooling, a
  causal text tower, scanned blocks and remat; unknown names are refused."""
  def model(attention):
    config = presets.tiny(scan=True, attention=attention).model
    config.text.causal_mask = True
    return two_towers.Model(**config)

  def loss(m, params):
    zimg, ztxt, _ = m.apply({"params": params}, IMAGES, TOKENS)
    return jnp.sum(zimg @ ztxt.T)

  reference, fused = model("xla"), model("fused")
  params = reference.init(KEY, IMAGES, TOKENS)["params"]
  assert shapes(jax.eval_shape(fused.init, KEY, IMAGES, TOKENS)["params"]) \
      == shapes(params)
  want = jax.jit(jax.value_and_grad(lambda p: loss(reference, p)))(params)
  got = jax.jit(jax.value_and_grad(lambda p: loss(fused, p)))(params)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               got[1], want[1])
  with pytest.raises(ValueError, match="Unknown attention 'flash'"):
    presets.tiny(attention="flash")
