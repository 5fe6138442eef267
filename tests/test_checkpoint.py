"""big_vision .npz checkpoints: round trip, big_vision's layouts, errors."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from mmal_jax.models import checkpoint
from mmal_jax.models import presets
from mmal_jax.models import two_towers
from mmal_jax.models import vit

KEY = jax.random.PRNGKey(0)
IMAGES = jax.random.normal(KEY, (2, 16, 16, 3))
TOKENS = jax.random.randint(KEY, (2, 8), 0, 259)
W, MLP, HEADS, VOCAB = 32, 128, 2, 259  # presets.tiny(): "mu" towers.


def big_vision_block(prefix):
  """Names and shapes big_vision's Encoder1DBlock gives a width-32 block."""
  attn = f"{prefix}/MultiHeadDotProductAttention_0"
  keys = {f"{prefix}/LayerNorm_{i}/{p}": (W,) for i in (0, 1)
          for p in ("scale", "bias")}
  keys.update({f"{attn}/{n}/kernel": (W, HEADS, W // HEADS)
               for n in ("query", "key", "value")})
  keys.update({f"{attn}/{n}/bias": (HEADS, W // HEADS)
               for n in ("query", "key", "value")})
  keys.update({f"{attn}/out/kernel": (HEADS, W // HEADS, W),
               f"{attn}/out/bias": (W,),
               f"{prefix}/MlpBlock_0/Dense_0/kernel": (W, MLP),
               f"{prefix}/MlpBlock_0/Dense_0/bias": (MLP,),
               f"{prefix}/MlpBlock_0/Dense_1/kernel": (MLP, W),
               f"{prefix}/MlpBlock_0/Dense_1/bias": (W,)})
  return keys


def big_vision_tiny_siglip_layout():
  """The key layout of a big_vision SigLIP checkpoint of `presets.tiny()`."""
  keys = {"t": (1,), "b": (1,),
          "img/embedding/kernel": (8, 8, 3, W), "img/embedding/bias": (W,),
          "img/pos_embedding": (1, 4, W),
          "img/Transformer/encoder_norm/scale": (W,),
          "img/Transformer/encoder_norm/bias": (W,),
          "img/MAPHead_0/probe": (1, 1, W),
          "txt/Embed_0/embedding": (VOCAB, W), "txt/pos_embedding": (1, 8, W),
          "txt/Encoder_0/encoder_norm/scale": (W,),
          "txt/Encoder_0/encoder_norm/bias": (W,),
          "txt/head/kernel": (W, W), "txt/head/bias": (W,)}
  keys.update(big_vision_block("img/Transformer/encoderblock_0"))
  keys.update(big_vision_block("txt/Encoder_0/encoderblock_0"))
  map_head = big_vision_block("img/MAPHead_0")
  keys.update({k: v for k, v in map_head.items() if "LayerNorm_1" not in k})
  return keys


def tiny_model(**tower_kw):
  """The model and its parameter shapes (no compute)."""
  model = two_towers.Model(**presets.tiny(**tower_kw).model)
  return model, jax.eval_shape(model.init, KEY, IMAGES, TOKENS)["params"]


@pytest.fixture(scope="module")
def tiny():
  model, _ = tiny_model()
  return model, jax.jit(model.init)(KEY, IMAGES, TOKENS)["params"]


def embed(model, params):
  return jax.jit(model.apply)({"params": params}, IMAGES, TOKENS)[:2]


def test_save_load_round_trip(tmp_path, tiny):
  _, params = tiny
  path = str(tmp_path / "sub" / "ckpt.npz")
  checkpoint.save(params, path)
  loaded = checkpoint.load(jax.eval_shape(lambda: params), path)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)


def test_loads_big_vision_layout(tmp_path, tiny):
  layout = big_vision_tiny_siglip_layout()
  rng = np.random.default_rng(0)
  arrays = {f"params/{k}": rng.normal(size=s).astype(np.float32)
            for k, s in layout.items()}
  path = str(tmp_path / "bv.npz")
  np.savez(path, **arrays)

  model, params = tiny_model()
  assert {k: tuple(v.shape) for k, v in checkpoint.flatten(params).items()
          } == layout
  loaded = checkpoint.load(params, path)
  for name, value in checkpoint.flatten(loaded).items():
    np.testing.assert_array_equal(value, arrays[f"params/{name}"])
  # Single tower out of the two-tower file, big_vision's "file:img" syntax.
  image_tower = checkpoint.load(params["img"], path + ":img")
  np.testing.assert_array_equal(image_tower["MAPHead_0"]["probe"],
                                arrays["params/img/MAPHead_0/probe"])
  # A single-tower file (a plain ViT checkpoint) into the image tower.
  vit_path = str(tmp_path / "vit.npz")
  np.savez(vit_path, **{k[len("params/img/"):]: v for k, v in arrays.items()
                        if k.startswith("params/img/")})
  jax.tree.map(np.testing.assert_array_equal,
               checkpoint.load(params["img"], vit_path), image_tower)
  zimg, ztxt = embed(tiny[0], loaded)
  assert np.all(np.isfinite(zimg)) and np.all(np.isfinite(ztxt))


def test_scanned_and_unrolled_checkpoints_interconvert(tmp_path, tiny):
  model, params = tiny
  scanned_model, scanned_params = tiny_model(scan=True)
  path = str(tmp_path / "unrolled.npz")
  checkpoint.save(params, path)
  as_scanned = checkpoint.load(scanned_params, path)
  assert as_scanned["img"]["Transformer"]["encoderblock"]["LayerNorm_0"][
      "scale"].shape == (1, W)
  for a, b in zip(embed(scanned_model, as_scanned), embed(model, params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  checkpoint.save(as_scanned, str(tmp_path / "scanned.npz"))
  back = checkpoint.load(params, str(tmp_path / "scanned.npz"))
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_mismatch_lists_missing_unexpected_and_wrong_shapes(tmp_path, tiny):
  _, params = tiny
  flat = {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}
  del flat["txt/head/bias"]
  flat["img/head/kernel"] = np.zeros((W, 10), np.float32)
  flat["img/pos_embedding"] = np.zeros((1, 9, W), np.float32)
  path = str(tmp_path / "wrong.npz")
  np.savez(path, **flat)
  with pytest.raises(ValueError) as error:
    checkpoint.load(params, path)
  message = str(error.value)
  assert "Missing from the checkpoint (1):\n  txt/head/bias" in message
  assert "Unexpected in the checkpoint (1):\n  img/head/kernel" in message
  assert "img/pos_embedding: file (1, 9, 32), model (1, 4, 32)" in message

  # dont_load keeps the init value and tolerates the head on either side;
  # resample_posemb resizes the 3x3 grid to 2x2.
  loaded = checkpoint.load(params, path, dont_load=("txt/head/.*",
                                                    "img/head/.*"),
                           resample_posemb=("img/pos_embedding",))
  np.testing.assert_array_equal(loaded["txt"]["head"]["bias"],
                                params["txt"]["head"]["bias"])
  assert loaded["img"]["pos_embedding"].shape == (1, 4, W)


def test_bfloat16_checkpoint_is_cast_to_model_dtype(tmp_path, tiny):
  _, params = tiny
  path = str(tmp_path / "bf16.npz")
  checkpoint.save(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), path)
  raw = checkpoint.read(path)
  assert raw["t"].dtype == jnp.bfloat16
  loaded = checkpoint.load(params, path)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded))
  np.testing.assert_allclose(loaded["t"], params["t"], rtol=1e-2)


def test_unflatten_inverts_flatten():
  tree = {"a": {"b": np.ones(2), "c": {"d": np.zeros(1)}}, "e": np.ones(3)}
  flat = checkpoint.flatten(tree)
  assert set(flat) == {"a/b", "a/c/d", "e"}
  assert flax.traverse_util.flatten_dict(checkpoint.unflatten(flat)).keys() \
      == flax.traverse_util.flatten_dict(tree).keys()


def test_training_checkpoint_takes_params_beside_optimizer_state(tmp_path,
                                                                 tiny):
  """big_vision's training npz: "params/..." next to "opt/..." (issue 8.13)."""
  _, params = tiny
  flat = {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}
  arrays = {f"params/{k}": v for k, v in flat.items()}
  arrays.update({f"opt/1/0/mu/{k}": np.zeros_like(v) for k, v in flat.items()})
  arrays["opt/1/0/count"] = np.zeros((), np.int32)
  path = str(tmp_path / "train.npz")
  np.savez(path, **arrays)
  assert set(checkpoint.read(path)) == set(flat)
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load(params, path),
               params)


def _to_old_vit_layout(flat, prefix):
  """The AugReg / vision_transformer layout of the ViT under `prefix`."""
  block_names = {"LayerNorm_0": "LayerNorm_0",
                 "MultiHeadDotProductAttention_0":
                     "MultiHeadDotProductAttention_1",
                 "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
  old = {}
  for name, value in flat.items():
    if not name.startswith(prefix):
      old[name] = value
      continue
    parts = name.split("/")
    for i, part in enumerate(parts[:-1]):
      if parts[i - 1].startswith("encoderblock_") and part in block_names:
        parts[i] = block_names[part]
    old["/".join(parts)] = value
  posemb = old.pop(prefix + "pos_embedding")
  cls_posemb = np.random.default_rng(1).normal(
      size=(1, 1, posemb.shape[-1])).astype(np.float32)
  old[prefix + "Transformer/posembed_input/pos_embedding"] = np.concatenate(
      [cls_posemb, posemb], axis=1)
  old[prefix + "cls"] = old[prefix + "cls"] - cls_posemb
  return old


@pytest.mark.parametrize("scan", [False, True])
def test_old_vit_layout_loads(tmp_path, scan):
  """AugReg / vision_transformer npz files convert on load (issue 8.14)."""
  model = vit.Model(num_classes=5, variant="mu/8", depth=2, pool_type="tok",
                    rep_size=16, head_zeroinit=False)
  params = jax.jit(model.init)(KEY, IMAGES)["params"]
  flat = {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}
  old = _to_old_vit_layout(flat, "")
  assert "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel" in old
  assert old["Transformer/posembed_input/pos_embedding"].shape == (1, 5, W)
  path = str(tmp_path / "augreg.npz")
  np.savez(path, **old)
  target = params
  if scan:
    target = jax.eval_shape(vit.Model(
        num_classes=5, variant="mu/8", depth=2, pool_type="tok", rep_size=16,
        scan=True).init, KEY, IMAGES)["params"]
  loaded = checkpoint.load(target, path)
  if scan:
    loaded = checkpoint.load(params, _saved(tmp_path, loaded))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               loaded, params)
  np.testing.assert_allclose(model.apply({"params": loaded}, IMAGES)[0],
                             model.apply({"params": params}, IMAGES)[0],
                             atol=1e-5)


def _saved(tmp_path, params):
  path = str(tmp_path / "resaved.npz")
  checkpoint.save(params, path)
  return path


def test_old_two_tower_layout_loads(tmp_path):
  """A LiT file as vision_transformer released them: both towers pre-linen."""
  config = presets.tiny("clip")
  config.model.image.pool_type = "tok"
  model = two_towers.Model(**config.model)
  params = jax.jit(model.init)(KEY, IMAGES, TOKENS)["params"]
  flat = {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}
  old = _to_old_vit_layout(flat, "img/")
  for name in list(old):
    if name.startswith("txt/Encoder_0/encoderblock_0/"):
      new = name.replace("/MultiHeadDotProductAttention_0/",
                         "/MultiHeadDotProductAttention_1/")
      new = new.replace("/LayerNorm_1/", "/LayerNorm_2/")
      old[new.replace("/MlpBlock_0/", "/MlpBlock_3/")] = old.pop(name)
  path = str(tmp_path / "lit.npz")
  np.savez(path, **old)
  loaded = checkpoint.load(params, path)
  for a, b in zip(embed(model, loaded), embed(model, params)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_text_posemb_added_twice_is_merged():
  flat = {"pos_embedding": np.ones((1, 4, 2)),
          "Encoder_0/pos_embedding": np.full((1, 4, 2), 2.),
          "Encoder_0/encoder_norm/scale": np.ones(2)}
  fixed = checkpoint.fix_old_layout(flat)
  np.testing.assert_array_equal(fixed["pos_embedding"], np.full((1, 4, 2), 3.))
  assert set(fixed) == {"pos_embedding", "Encoder_0/encoder_norm/scale"}


def test_fix_old_layout_leaves_current_files_alone(tiny):
  _, params = tiny
  flat = {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}
  fixed = checkpoint.fix_old_layout(flat)
  assert fixed.keys() == flat.keys()
  for name, value in flat.items():
    np.testing.assert_array_equal(fixed[name], value)


def test_resample_grid_matches_scipy_zoom_per_channel():
  """As big_vision: linear zoom of each channel (issue 8.16)."""
  old, new, dim = 7, 12, 3
  y, x = np.mgrid[:old, :old] / (old - 1)
  grid = np.stack([np.sin(3 * x + c) * np.cos(2 * y - c)
                   for c in range(dim)], axis=-1).astype(np.float32)
  out = checkpoint.resample_grid(grid.reshape(1, old * old, dim),
                                 (1, new * new, dim))
  assert out.shape == (1, new * new, dim)
  want = np.stack([scipy.ndimage.zoom(grid[..., c], new / old, order=1)
                   for c in range(dim)], axis=-1)
  np.testing.assert_allclose(out.reshape(new, new, dim), want, atol=1e-6)


@pytest.mark.parametrize("content", [None, b"not an npz at all"])
def test_unreadable_npz_says_which_file_and_to_delete_it(tmp_path, tiny,
                                                         content):
  _, params = tiny
  path = str(tmp_path / "broken.npz")
  checkpoint.save(params, path)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2] if content is None else content)
  with pytest.raises(ValueError, match=r"broken\.npz.*[Dd]elete it"):
    checkpoint.read(path)


def test_save_is_atomic(tmp_path, tiny, monkeypatch):
  """An interrupted save leaves the previous file whole (issue 13.1)."""
  _, params = tiny
  path = str(tmp_path / "params.npz")
  checkpoint.save(params, path)
  before = open(path, "rb").read()

  def interrupted(fd):
    raise KeyboardInterrupt("killed mid-write")

  monkeypatch.setattr(os, "fsync", interrupted)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(jax.tree.map(lambda x: x + 1, params), path)
  assert open(path, "rb").read() == before
  assert os.listdir(tmp_path) == ["params.npz"]


def test_save_and_load_on_gcs(gcs_bucket, tiny):
  _, params = tiny
  path = f"{gcs_bucket}/run/params.npz"
  checkpoint.save(params, path)
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load(params, path),
               params)
  image_tower = checkpoint.load(params["img"], path + ":img")
  jax.tree.map(np.testing.assert_array_equal, image_tower, params["img"])
