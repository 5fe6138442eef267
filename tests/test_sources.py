"""Dataset sources on files the tests write (and a GCS emulator): TFDS,
ColorSwap parquet, webdataset shards and their stream, features with an
explicit split, COCO on gs://, and `sources.check`."""
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tiny_tfds
from test_fs import root  # noqa: F401  (a local and a gs:// folder)
from mmal_jax import fs
from mmal_jax import sharding
from mmal_jax.config_lib import ConfigError
from mmal_jax.data import pipeline, preprocess, sources, webdataset
from mmal_jax.data.pool import group_layout


def data_config(**fields):
  config = sources.default_config()
  config.update(fields)
  return config


def encode(array, fmt="PNG"):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def decoded(pool, m, i):
  items = pool.items[m]
  return preprocess.decode_image(items.read(i))


# TFDS

@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tiny_tfds.prepare(data_dir)
  return data_dir


def test_tfds_source(tfds_dir):
  data = sources.build(data_config(source="tfds", tfds_name="tiny_captions",
                                   tfds_data_dir=tfds_dir))
  assert data.pool.sizes == {"image": 6, "text": 12}
  assert data.eval_pool.sizes == {"image": 4, "text": 8}
  for pool in (data.pool, data.eval_pool):
    for i in range(pool.num_items("image")):
      captions = [pool.items["text"][t] for _, t in pool.partners("image", i)]
      k = int(captions[1].split()[-1])
      assert captions[0].startswith(f"a {list(tiny_tfds.COLOURS)[k % 3]}")
      np.testing.assert_array_equal(decoded(pool, "image", i),
                                    tiny_tfds.image(k))
  small = sources.build(data_config(
      source="tfds", tfds_name="tiny_captions", tfds_data_dir=tfds_dir,
      max_images=2, split="train[2:]"))
  assert small.pool.sizes == {"image": 2, "text": 4}
  # Pre-training pairs: a split of their own, or whole units (an image and
  # both its captions) held out of the pool.
  split = sources.build(data_config(
      source="tfds", tfds_name="tiny_captions", tfds_data_dir=tfds_dir,
      split="train[2:]", pretrain_split="train[:2]"))
  assert split.pool.sizes == {"image": 4, "text": 8}
  assert split.pretrain_pool.sizes == {"image": 2, "text": 4}
  held = sources.build(data_config(
      source="tfds", tfds_name="tiny_captions", tfds_data_dir=tfds_dir,
      pretrain_fraction=0.5))
  assert held.pool.sizes == held.pretrain_pool.sizes == {"image": 3,
                                                         "text": 6}
  assert len(held.pretrain_pool.pairs()) == len(held.pool.pairs()) == 6
  captions = lambda pool: set(pool.items["text"])
  assert not captions(held.pool) & captions(held.pretrain_pool)
  assert "no split 'nope'" in " ".join(sources.check(data_config(
      source="tfds", tfds_name="tiny_captions", tfds_data_dir=tfds_dir,
      pretrain_split="nope")))
  assert sources.check(data_config(source="tfds", tfds_name="tiny_captions",
                                    tfds_data_dir=tfds_dir)) == []
  problems = sources.check(data_config(
      source="tfds", tfds_name="tiny_captions",
      tfds_data_dir=os.path.join(tfds_dir, "empty")))
  assert len(problems) == 1 and "is not prepared in" in problems[0]


@pytest.mark.parametrize("fields, match", [
    (dict(split="validation"), "no split 'validation'"),
    (dict(text_key="captions/nope"), "no feature 'captions/nope'"),
    (dict(image_key="label"), "is ClassLabel, not an Image"),
    (dict(tfds_name="no_such_dataset"), "cannot find dataset 'no_such_dataset'"),
])
def test_tfds_errors(tfds_dir, fields, match):
  config = data_config(**{"source": "tfds", "tfds_name": "tiny_captions",
                          "tfds_data_dir": tfds_dir, **fields})
  with pytest.raises(ValueError, match=match):
    sources.build(config)
  if "split" in fields or "tfds_name" in fields:
    assert any(match.split("'")[0] in p for p in sources.check(config))


# ColorSwap

def write_colorswap(folder, split, ids, drop=None, bad_image=None):
  """A ColorSwap-schema parquet file; image k of id i has colour (i, k)."""
  rows = {"id": [], "image_1": [], "image_2": [], "caption_1": [],
          "caption_2": [], "image_source": [], "caption_source": []}
  for i in ids:
    rows["id"].append(i)
    for k in (1, 2):
      data = encode(np.full((6, 8, 3), (i, 40 * k, 7), np.uint8))
      rows[f"image_{k}"].append({"bytes": None if i == bad_image else data,
                                 "path": f"{i}_{k}.png"})
    rows["caption_1"].append(f"a red cube {i} and a blue ball")
    rows["caption_2"].append(f"a blue cube {i} and a red ball")
    rows["image_source"].append("midjourney")
    rows["caption_source"].append("human")
  if drop:
    del rows[drop]
  buf = io.BytesIO()
  pq.write_table(pa.table(rows), buf)
  fs.write_bytes(os.path.join(folder, "data",
                              f"{split}-00000-of-00001.parquet"),
                 buf.getvalue())


def test_colorswap_source(root):
  write_colorswap(root, "train", [3, 5, 9])
  write_colorswap(root, "test", [11, 12])
  config = data_config(source="colorswap", dir=root)
  assert sources.check(config) == []
  data = sources.build(config)
  pool, eval_pool = data.pool, data.eval_pool
  assert pool.sizes == {"image": 6, "text": 6}
  assert eval_pool.sizes == {"image": 4, "text": 4}
  image_index, text_index = group_layout(pool)
  assert image_index.tolist() == [[0, 1], [2, 3], [4, 5]]
  np.testing.assert_array_equal(pool.groups["image"], [3, 3, 5, 5, 9, 9])
  assert pool.items["text"][2] == "a red cube 5 and a blue ball"
  assert pool.items["text"][3] == "a blue cube 5 and a red ball"
  assert tuple(decoded(pool, "image", 3)[0, 0]) == (5, 80, 7)
  assert "(id 5) image_2" in pool.items["image"][3]
  # The input pipeline decodes the in-memory bytes.
  z = pipeline.embed_pool(
      lambda p, x: x[:, 0, 0], None, pool, "image", np.arange(6),
      sharding.make_mesh(), 8, "decode|value_range(0, 255)")
  np.testing.assert_allclose(np.asarray(z)[:6, 0], [3, 3, 5, 5, 9, 9])


@pytest.mark.parametrize("kwargs, match", [
    (dict(drop="caption_2"), r"has no column 'caption_2'"),
    (dict(bad_image=5), r"row 1 \(id 5\): image_1 has no bytes"),
])
def test_colorswap_errors(tmp_path, kwargs, match):
  write_colorswap(str(tmp_path), "train", [3, 5], **kwargs)
  write_colorswap(str(tmp_path), "test", [7])
  config = data_config(source="colorswap", dir=str(tmp_path))
  with pytest.raises(ValueError, match=match):
    sources.build(config)
  if "drop" in kwargs:
    problems = sources.check(config)
    assert len(problems) == 1 and "train-00000-of-00001.parquet" in problems[0]
  empty = data_config(source="colorswap", dir=str(tmp_path / "none"))
  problems = sources.check(empty)
  assert len(problems) == 2 and "No ColorSwap 'train' files" in problems[0]


# Webdataset shards and the stream

def write_shard(path, first, count, lone=(), stats=True):
  """Samples first..first+count-1: jpg + txt + json, except `lone` keys
  (caption only). Image k has colour (k, 0, 0)."""
  with fs.open(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
    for k in range(first, first + count):
      members = {"txt": f"caption {k}".encode(), "json": b"{}"}
      if k not in lone:
        members["jpg"] = encode(np.full((8, 8, 3), (8 * k, 0, 0), np.uint8),
                                "PNG")
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{k:06d}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  if stats:
    fs.write_text(path[:-4] + "_stats.json", json.dumps({"successes": count}))


def unit_keys(pool):
  """The stream sample of every image and caption of a buffer pool."""
  images = [int(ref.rsplit("#", 1)[1]) for ref in pool.items["image"]]
  texts = [int(t.split()[-1]) for t in pool.items["text"]]
  return images, texts


def test_webdataset_stream(root, monkeypatch):
  train, held = os.path.join(root, "train"), os.path.join(root, "eval")
  write_shard(os.path.join(train, "00000.tar"), 0, 7, lone=(3,))
  write_shard(os.path.join(train, "00001.tar"), 7, 5, stats=False)
  write_shard(os.path.join(train, "00002.tar"), 12, 6)
  write_shard(os.path.join(held, "00000.tar"), 100, 4)
  config = data_config(source="datacomp", dir=train, eval_dir=held, seed=1)
  assert sources.check(config) == []
  data = sources.build(config)
  assert data.pool is None and data.eval_pool.sizes == {"image": 4, "text": 4}
  stream = data.stream
  assert stream.num_units == 18 and stream.num_buffers(5) == 4
  buffers = list(stream.buffers(5, seed=0))
  seen = []
  for t, buffer in enumerate(buffers):
    images, texts = unit_keys(buffer)
    units = sorted(set(images) | set(texts))
    assert len(units) == (5 if t < 3 else 3)
    for i, j in buffer.pairs():      # The hidden matching pairs sample k's
      assert images[i] == texts[j]   # image with sample k's caption.
    assert len(buffer.pairs()) == len(images) == len(units) - (3 in units)
    assert texts != sorted(texts) or len(texts) < 3  # Captions scrambled.
    seen += units
  assert sorted(seen) == list(range(18))
  # Image bytes are read lazily from the shard, by byte range.
  images, _ = unit_keys(buffers[1])
  assert tuple(decoded(buffers[1], "image", 0)[0, 0]) == (8 * images[0], 0, 0)
  # Resuming at buffer 2 scans only the shards buffer 2 overlaps.
  scanned = []
  real = webdataset.scan_shard
  monkeypatch.setattr(webdataset, "scan_shard",
                      lambda p: scanned.append(p) or real(p))
  fresh = sources.build(config).stream
  scanned.clear()  # The eval shard, read by build.
  again = fresh.buffer(2, 5, seed=0)
  assert unit_keys(again) == unit_keys(buffers[2])
  order = fresh.paths
  # The shard without stats is scanned to count; buffer 2 = samples 10..14.
  counts = fresh.counts
  starts = np.concatenate([[0], np.cumsum(counts)])
  overlapping = {order[k] for k in range(3)
                 if starts[k] < 15 and starts[k + 1] > 10}
  assert set(scanned) == overlapping | {os.path.join(train, "00001.tar")}
  other = list(sources.build(config).stream.buffers(5, seed=0))
  assert [unit_keys(b) for b in other] == [unit_keys(b) for b in buffers]


def test_webdataset_errors(tmp_path):
  write_shard(str(tmp_path / "a.tar"), 0, 3)
  fs.write_text(str(tmp_path / "a_stats.json"), json.dumps({"successes": 4}))
  stream = webdataset.WebDatasetStream([str(tmp_path / "a.tar")], 0)
  with pytest.raises(ValueError, match="holds 3 samples but its _stats.json"):
    stream.buffer(0, 2, 0)
  (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
  with pytest.raises(ValueError, match="Cannot read webdataset shard .*bad.tar"):
    webdataset.scan_shard(str(tmp_path / "bad.tar"))
  problems = sources.check(data_config(source="datacomp",
                                       dir=str(tmp_path / "none"),
                                       eval_dir=str(tmp_path)))
  assert problems == [f"config.data.dir: No webdataset shards (*.tar) in "
                      f"{tmp_path / 'none'}."]


# Features with the dataset's own held-out split

@pytest.fixture
def feature_files(tmp_path):
  rng = np.random.default_rng(0)
  np.save(tmp_path / "img.npy", rng.normal(size=(6, 3)).astype(np.float32))
  np.save(tmp_path / "txt.npy", rng.normal(size=(6, 3)).astype(np.float32))
  np.save(tmp_path / "pairs.npy", np.array([[5, 0], [0, 1], [1, 2], [2, 3],
                                            [3, 4], [4, 5]]))
  return tmp_path


@pytest.mark.parametrize("name, value", [
    ("flags.npy", np.array([True, False, False, True, False, False])),
    ("rows.npy", np.array([3, 0])),
    ("rows.txt", "0\n3\n"),
])
def test_features_explicit_split(feature_files, name, value):
  path = feature_files / name
  if isinstance(value, str):
    path.write_text(value)
  else:
    np.save(path, value)
  t = feature_files
  data = sources.build(data_config(
      source="features", image_features=str(t / "img.npy"),
      text_features=str(t / "txt.npy"), pairs=str(t / "pairs.npy"),
      eval_pairs=str(path)))
  images = np.load(t / "img.npy")
  # Pair rows 0 and 3 ((5, 0) and (2, 3)) are held out.
  np.testing.assert_array_equal(data.eval_pool.items["image"], images[[2, 5]])
  assert data.eval_pool.pairs().tolist() == [[0, 1], [1, 0]]
  assert data.pool.sizes == {"image": 4, "text": 4}
  assert len(data.pool.pairs()) == 4


@pytest.mark.parametrize("value, match", [
    (np.array([True, False]), r"shape \(2,\); the pairs file has 6 rows"),
    (np.array([0, 6]), r"outside \[0, 6\)"),
    (np.ones(6, bool), "takes 6 of the 6 pairs"),
    (np.array([0.5]), "bool flags or int row indices"),
])
def test_features_explicit_split_errors(feature_files, value, match):
  t = feature_files
  np.save(t / "split.npy", value)
  with pytest.raises(ValueError, match=match):
    sources.build(data_config(
        source="features", image_features=str(t / "img.npy"),
        text_features=str(t / "txt.npy"), pairs=str(t / "pairs.npy"),
        eval_pairs=str(t / "split.npy")))


# COCO on gs:// and check()

def test_coco_on_gcs(gcs_bucket):
  root = gcs_bucket + "/coco"
  for name, colour in (("a.jpg", (255, 0, 0)), ("b.png", (0, 0, 255))):
    fs.write_bytes(f"{root}/img/{name}",
                   encode(np.full((10, 20, 3), colour, np.uint8), "PNG"))
  fs.write_text(f"{root}/c.json", json.dumps({
      "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.png"}],
      "annotations": [{"image_id": 3, "caption": "blue"},
                      {"image_id": 7, "caption": "red"}]}))
  data = sources.build(data_config(
      source="coco", train_json=f"{root}/c.json", train_images=f"{root}/img",
      eval_json=f"{root}/c.json", eval_images=f"{root}/img", image_size=0))
  pool = data.pool
  assert pool.items["image"][1] == f"{root}/img/b.png"
  mesh = sharding.make_mesh()
  z = pipeline.embed_pool(lambda p, x: x[:, 0, 0], None, pool, "image",
                          np.arange(2), mesh, 8, "decode|value_range(0, 255)")
  np.testing.assert_allclose(np.asarray(z)[:2], [[255, 0, 0], [0, 0, 255]])
  np.testing.assert_allclose(
      preprocess.prepare_items(pool, "image", [1])[0, 0, 0], [-1, -1, 1])


def test_check_reports_every_problem_at_once(tmp_path):
  assert sources.check(data_config(source="imagenet")) == [
      f"config.data.source='imagenet' is not one of {sorted(sources.SOURCES)}."]
  config = data_config(source="coco", train_json=str(tmp_path / "t.json"),
                       train_images=str(tmp_path), eval_json="x.json",
                       eval_images=str(tmp_path / "no"))
  problems = sources.check(config)
  assert len(problems) == 3, problems
  assert "config.data.train_json: file not found" in problems[0]
  config = config.to_dict() | {"trian_json": "typo"}
  problems = sources.check(config)
  assert problems[0].startswith("config.data has no field 'trian_json'")
  with pytest.raises(ConfigError, match="no field 'trian_json'"):
    sources.build(config)
  assert sources.check(data_config(source="coco")) == [
      "config.data.source='coco' needs config.data.train_json, "
      "config.data.train_images, config.data.eval_json, "
      "config.data.eval_images."]
  assert sources.check(data_config()) == []
