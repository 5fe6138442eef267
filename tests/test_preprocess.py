"""Image preprocessing, tokenisation and batch iterators."""
import functools

import jax
import numpy as np
import pytest
from PIL import Image

from mmal_jax import sharding
from mmal_jax.data import preprocess, shapes
from mmal_jax.data.pool import UnalignedPool


class ByteTokenizer:
  """Tiny stand-in for mmal_jax.tokenizers: bytes + 1, 0 = padding."""

  def encode(self, texts, length):
    out = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      ids = [b + 1 for b in text.encode()][:length]
      out[row, :len(ids)] = ids
    return out


def test_value_range_and_resize():
  x = np.array([[[0, 255, 51]]], np.uint8)
  np.testing.assert_allclose(preprocess.value_range(x), [[[-1.0, 1.0, -0.6]]], atol=1e-6)
  np.testing.assert_allclose(preprocess.value_range(x, 0, 1), [[[0.0, 1.0, 0.2]]], atol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    preprocess.value_range(x.astype(np.float32))
  image = np.zeros((10, 20, 3), np.uint8)
  image[:, 10:] = 200
  small = preprocess.resize(image, 4)
  assert small.shape == (4, 4, 3) and small.dtype == np.uint8
  assert small[:, 0].max() < 30 and small[:, -1].min() > 170
  assert preprocess.resize(small, 4) is small
  with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
    preprocess.resize(np.zeros((4, 4)), 2)


def test_load_image(tmp_path):
  Image.new("L", (6, 3), 128).save(tmp_path / "grey.png")
  x = preprocess.load_image(tmp_path / "grey.png")
  assert x.shape == (3, 6, 3) and x.dtype == np.uint8 and (x == 128).all()
  with pytest.raises(FileNotFoundError, match="missing.png"):
    preprocess.load_image(tmp_path / "missing.png")
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 nope")
  with pytest.raises(ValueError, match="Cannot decode image .*bad.jpg"):
    preprocess.load_image(tmp_path / "bad.jpg")


def test_prepare_items_for_each_kind(tmp_path):
  tok = ByteTokenizer()
  pool = shapes.make_colorswap(3, 16, seed=0)
  images = preprocess.prepare_items(pool, "image", [4, 0], image_size=24)
  assert images.shape == (2, 24, 24, 3) and images.dtype == np.float32
  assert images.min() >= -1 and images.max() <= 1
  native = preprocess.prepare_items(pool, "image", [4])
  np.testing.assert_allclose(native[0], pool.items["image"][4] / 127.5 - 1, atol=1e-6)
  tokens = preprocess.prepare_items(pool, "text", [1], tokenizer=tok, text_length=8)
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens[0], [ord(c) + 1 for c in pool.items["text"][1][:8]])
  with pytest.raises(ValueError, match="needs tokenizer and text_length"):
    preprocess.prepare_items(pool, "text", [1])

  Image.new("RGB", (5, 9), (255, 0, 0)).save(tmp_path / "a.png")
  Image.new("RGB", (7, 3), (0, 255, 0)).save(tmp_path / "b.png")
  files = UnalignedPool(items={"image": [str(tmp_path / "a.png"), str(tmp_path / "b.png")],
                               "text": np.eye(2, 3, dtype=np.float64)})
  x = preprocess.prepare_items(files, "image", [1, 0], image_size=4)
  np.testing.assert_allclose(x[:, 0, 0], [[-1, 1, -1], [1, -1, -1]], atol=1e-6)
  with pytest.raises(ValueError, match="differ in size; pass image_size"):
    preprocess.prepare_items(files, "image", [0, 1])
  features = preprocess.prepare_items(files, "text", [1])
  assert features.dtype == np.float32 and features.shape == (1, 3)
  with pytest.raises(ValueError, match="no image indices"):
    preprocess.prepare_items(files, "image", [])


def test_tokenize_checks_tokenizer_output():
  class Bad:
    def encode(self, texts, length):
      return np.zeros((len(texts), length + 1), np.int32)

  with pytest.raises(ValueError, match=r"returned int32 \(1, 5\), expected int \(1, 4\)"):
    preprocess.tokenize(Bad(), ["x"], 4)
  with pytest.raises(ValueError, match="takes strings"):
    preprocess.tokenize(ByteTokenizer(), [3], 4)


def feature_pool(n=10):
  """Item values identify the item: image i = [i], text j = [100 + j]."""
  return UnalignedPool(items={"image": np.arange(n, dtype=np.float32)[:, None],
                              "text": 100 + np.arange(n, dtype=np.float32)[:, None]},
                       links={("image", "text"): np.stack([np.arange(n), np.arange(n)], 1)})


def test_pair_batches_epochs_cover_all_pairs_once():
  pool = feature_pool(10)
  prepare = functools.partial(preprocess.prepare_items, pool)
  pairs = pool.pairs()[::-1].copy()
  batches = list(preprocess.pair_batches(pairs, 4, prepare, seed=0, num_epochs=2,
                                         drop_remainder=False))
  assert [len(b["image"]) for b in batches] == [4, 4, 2, 4, 4, 2]
  for epoch in (batches[:3], batches[3:]):
    images = np.concatenate([b["image"][:, 0] for b in epoch])
    texts = np.concatenate([b["text"][:, 0] for b in epoch])
    assert sorted(images) == list(range(10))
    np.testing.assert_array_equal(texts, images + 100)          # rows stay paired
    np.testing.assert_array_equal(np.concatenate([b["image_index"] for b in epoch]), images)
  order = lambda bs: np.concatenate([b["image_index"] for b in bs])
  assert not np.array_equal(order(batches[:3]), order(batches[3:]))
  again = list(preprocess.pair_batches(pairs, 4, prepare, seed=0, num_epochs=2,
                                       drop_remainder=False))
  np.testing.assert_array_equal(order(again), order(batches))
  other = list(preprocess.pair_batches(pairs, 4, prepare, seed=1, num_epochs=1,
                                       drop_remainder=False))
  assert not np.array_equal(order(other), order(batches[:3]))
  dropped = list(preprocess.pair_batches(pairs, 4, prepare, seed=0, num_epochs=1))
  assert [len(b["image"]) for b in dropped] == [4, 4]
  forever = preprocess.pair_batches(pairs, 4, prepare, seed=0, num_epochs=None)
  assert len([next(forever) for _ in range(7)]) == 7


@pytest.mark.parametrize("kwargs, match", [
    (dict(pairs=np.zeros((0, 2), np.int64)), "empty annotated set"),
    (dict(pairs=np.zeros((3, 3), np.int64)), r"int \(P, 2\) array"),
    (dict(batch_size=20), "exceeds the 10 pairs"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
    (dict(num_epochs=0), "num_epochs must be an int >= 1"),
])
def test_pair_batches_errors(kwargs, match):
  pool = feature_pool(10)
  args = dict(pairs=pool.pairs(), batch_size=4) | kwargs
  with pytest.raises(ValueError, match=match):
    preprocess.pair_batches(args.pop("pairs"), args.pop("batch_size"),
                            functools.partial(preprocess.prepare_items, pool), seed=0, **args)


def test_batches_on_a_mesh():
  mesh = sharding.make_mesh()
  n_dev = len(jax.devices())
  pool = feature_pool(4 * n_dev)
  prepare = functools.partial(preprocess.prepare_items, pool)
  batch = next(preprocess.pair_batches(pool.pairs(), 2 * n_dev, prepare, seed=0, mesh=mesh))
  assert isinstance(batch["image"], jax.Array)
  assert batch["image"].sharding.is_equivalent_to(sharding.row_sharding(mesh), 2)
  np.testing.assert_array_equal(np.asarray(batch["text"])[:, 0],
                                np.asarray(batch["image"])[:, 0] + 100)
  inputs, valid = next(preprocess.item_batches("image", np.arange(3), 4 * n_dev, prepare,
                                               mesh=mesh))
  # 3 rows pad to 4, rounded up to the device count; not to 4 * n_dev.
  assert valid == 3 and inputs.shape == (-(-4 // n_dev) * n_dev, 1)
  assert inputs.sharding.is_equivalent_to(sharding.row_sharding(mesh), 2)
  # A batch the devices do not divide (and a last partial batch) is padded
  # with copies of its first pairs, marked by "valid" (1 device: no padding).
  want = list(preprocess.pair_batches(pool.pairs(), n_dev + 1, prepare, seed=0,
                                      drop_remainder=False))
  got = list(preprocess.pair_batches(pool.pairs(), n_dev + 1, prepare, seed=0,
                                     mesh=mesh, drop_remainder=False))
  assert len(got) == len(want)
  for g, w in zip(got, want):
    real = len(w["image_index"])
    order = preprocess.padded_order(real, n_dev)
    np.testing.assert_array_equal(np.asarray(g["image_index"]),
                                  w["image_index"][order])
    if len(order) == real:
      assert "valid" not in g
    else:
      np.testing.assert_array_equal(np.asarray(g["valid"]),
                                    np.arange(len(order)) < real)


def test_item_batches_pad_the_last_batch():
  pool = feature_pool(10)
  prepare = functools.partial(preprocess.prepare_items, pool)
  indices = np.array([9, 3, 4, 0, 7])
  batches = list(preprocess.item_batches("text", indices, 2, prepare))
  assert [v for _, v in batches] == [2, 2, 1]
  assert [x.shape for x, _ in batches] == [(2, 1), (2, 1), (1, 1)]
  batches = list(preprocess.item_batches("text", indices, 4, prepare))
  assert [x.shape for x, _ in batches] == [(4, 1), (1, 1)]
  batches = list(preprocess.item_batches("text", indices[:3], 4, prepare))
  np.testing.assert_array_equal(batches[-1][0][:, 0], [109, 103, 104, 104])
  valid = np.concatenate([x[:v] for x, v in batches])
  np.testing.assert_array_equal(valid, prepare("text", indices[:3]))
  with pytest.raises(ValueError, match="non-empty 1-D"):
    preprocess.item_batches("text", [], 2, prepare)


def test_item_batches_pad_to_the_smallest_bucket():
  """coco_stream.py: 159 images with embed_batch_size=1024 padded every call
  to 1024 rows (issue 8 item 10); they now pad to 256."""
  pool = feature_pool(1100)
  prepare = functools.partial(preprocess.prepare_items, pool)
  rows = lambda n, bs: [x.shape[0] for x, _ in preprocess.item_batches(
      "image", np.arange(n), bs, prepare)]
  assert rows(159, 1024) == [256]
  assert rows(1030, 1024) == [1024, 8]
  assert rows(1024, 1024) == [1024]
  assert rows(1, 1024) == [1]
  assert [preprocess.bucket_size(n, 48, 8) for n in (1, 7, 9, 17, 33, 48)] == [
      8, 8, 16, 32, 48, 48]
  with pytest.raises(ValueError, match="not a multiple of the 8 devices"):
    preprocess.bucket_size(3, 12, 8)
