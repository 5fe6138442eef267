"""Undecodable images (#17 item 1): left out at load with their partners and
named, counted in `pool.skipped`; one that passes the cheap check but fails
to decode is named when the pipeline meets it."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmal_jax import sharding
from mmal_jax.data import (colorswap, image_check, pipeline, sources,
                           webdataset)
from mmal_jax.data.coco import load_coco
from mmal_jax.data.pool import BytesRefs, UnalignedPool


def encode(colour, fmt="JPEG", size=(16, 16)):
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, format=fmt)
  return buf.getvalue()


def hollow(jpeg):
  """A JPEG with its header and end marker but no compressed data: passes
  `encoded_problem`, fails to decode."""
  return jpeg[:jpeg.index(b"\xff\xda") + 12] + b"\xff\xd9"


def problem(data):
  return image_check.encoded_problem(data[:1024], data[-1024:], len(data))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_whole_images_pass(fmt):
  assert problem(encode((10, 200, 30), fmt)) is None


@pytest.mark.parametrize("fmt, cut, match", [
    ("JPEG", 0.5, "truncated JPEG"), ("PNG", 0.5, "truncated PNG"),
    ("GIF", 0.9, "truncated GIF"), ("BMP", 0.5, "truncated BMP"),
    ("WEBP", 0.5, "truncated WebP"), ("TIFF", 1.0, "TIFF"),
    ("JPEG", 0.0, "empty file")])
def test_damaged_or_foreign_images_fail(fmt, cut, match):
  data = encode((10, 200, 30), fmt, size=(64, 64))
  assert match in problem(data[:int(len(data) * cut)])
  assert "not a JPEG" in problem(b"<html>404</html>")


def test_coco_leaves_out_bad_images_with_their_captions(tmp_path, caplog):
  images = tmp_path / "images"
  images.mkdir()
  (images / "a.jpg").write_bytes(encode((255, 0, 0)))
  (images / "b.jpg").write_bytes(encode((0, 255, 0))[:200])  # truncated
  (images / "c.tif").write_bytes(encode((0, 0, 255), "TIFF"))
  (images / "d.jpg").write_bytes(encode((9, 9, 9)))
  names = ["a.jpg", "b.jpg", "c.tif", "d.jpg"]
  data = {"images": [{"id": k, "file_name": n} for k, n in enumerate(names)],
          "annotations": [{"image_id": k, "caption": f"cap {k} {j}"}
                          for k in range(4) for j in range(2)]}
  (tmp_path / "c.json").write_text(json.dumps(data))
  pool = load_coco(tmp_path / "c.json", images)
  assert list(pool.items["image"]) == [str(images / "a.jpg"),
                                       str(images / "d.jpg")]
  assert pool.items["text"] == ("cap 0 0", "cap 0 1", "cap 3 0", "cap 3 1")
  assert pool.pairs().tolist() == [[0, 0], [0, 1], [1, 2], [1, 3]]
  assert pool.skipped == (str(images / "b.jpg"), str(images / "c.tif"))
  assert "b.jpg (truncated JPEG" in caplog.text and "c.tif (TIFF" in caplog.text


def write_shard(path, samples):
  with tarfile.open(path, "w") as tar:
    for key, (image, caption) in samples.items():
      for ext, data in (("jpg", image), ("txt", caption.encode())):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_webdataset_leaves_out_the_sample_and_the_stream_agrees(tmp_path):
  shard = str(tmp_path / "000.tar")
  write_shard(shard, {"k0": (encode((1, 1, 1)), "zero"),
                      "k1": (b"\xff\xd8\xff\xe0garbage", "one"),
                      "k2": (encode((2, 2, 2)), "two")})
  pool = webdataset.load_shards([shard])
  assert [r.rsplit("#")[1] for r in pool.items["image"]] == ["k0", "k2"]
  assert pool.items["text"] == ("zero", "two")
  assert pool.skipped == (f"{shard}#k1",)
  stream = webdataset.WebDatasetStream([shard], seed=0)
  assert stream.buffer(0, 3, seed=0).skipped == (f"{shard}#k1",)
  eval_dir = tmp_path / "eval"
  eval_dir.mkdir()
  write_shard(str(eval_dir / "000.tar"), {"e": (encode((3, 3, 3)), "e")})
  built = sources.build(_datacomp_config(tmp_path))
  assert built.skipped_items == 0  # The stream's pool is built by the loop.
  assert built.stream.buffer(0, 3, seed=0).num_items("image") == 2


def _datacomp_config(tmp_path):
  config = sources.default_config()
  config.update(dict(source="datacomp", dir=str(tmp_path),
                     eval_dir=str(tmp_path / "eval")))
  return config


def test_colorswap_leaves_out_the_group(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = {"id": [4, 5], "caption_1": ["a", "c"], "caption_2": ["b", "d"],
          "image_1": [{"bytes": encode((4, 0, 0)), "path": ""},
                      {"bytes": encode((5, 0, 0)), "path": ""}],
          "image_2": [{"bytes": encode((4, 1, 0)), "path": ""},
                      {"bytes": encode((5, 1, 0))[:-300], "path": ""}]}
  (tmp_path / "data").mkdir()
  path = tmp_path / "data" / "train-0.parquet"
  pq.write_table(pa.table(rows), str(path))
  pool = colorswap.load_colorswap(str(tmp_path), "train")
  assert pool.items["text"] == ("a", "b")
  assert pool.groups["image"].tolist() == [4, 4]
  assert pool.skipped == (f"{path} row 1 (id 5) image_2",)


def test_a_hollow_image_is_named_when_the_pipeline_decodes_it():
  good = encode((7, 7, 7))
  bad = hollow(good)
  assert problem(bad) is None  # The cheap check cannot see it ...
  names = [f"g{i}" for i in range(8)]
  names[2] = "parquet row 2"
  pool = UnalignedPool(
      items={"image": BytesRefs([bad if i == 2 else good for i in range(8)],
                                names),
             "text": np.eye(8, dtype=np.float32)},
      links={("image", "text"): np.stack([np.arange(8)] * 2, 1)})
  apply = lambda params, x: x.reshape(x.shape[0], -1)[:, :2]
  with pytest.raises(image_check.UndecodableImage,
                     match=r"Cannot decode image parquet row 2 \(.*\)\. "
                           r"Replace it"):
    pipeline.embed_pool(apply, None, pool, "image", np.arange(8),
                        sharding.make_mesh(), 8, "decode|resize(8)")
  with pytest.raises(image_check.UndecodableImage, match="parquet row 2"):
    for _ in pipeline.train_batches(
        pool, pool.pairs(), 8, {"image": "decode|resize(8)", "text": ""},
        seed=0, mesh=sharding.make_mesh()):
      pass


def test_skipped_items_is_bookkeeping_not_a_metric():
  from mmal_jax import report  # pylint: disable=g-import-not-at-top
  assert report.metric_names([{"skipped_items": 2, "groupmatch": 0.5}]) == [
      "groupmatch"]
