"""The papers' configs run end to end on their real sources at tiny size:
`colorswap_siglip_b16.py` on ColorSwap parquet files with a zero-shot
evaluator (TFDS mock data), `datacomp_stream.py` on webdataset shards and
`coco_stream.py` on ../shared's COCO mini. Only the towers, the budget and
the epochs are shrunk; the source, regime, loss and optimizer are the
config's."""
import io
import os
import tarfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import test_loop
from mmal_jax import config_lib
from mmal_jax import evaluators
from mmal_jax import fs
from mmal_jax import loop
from mmal_jax import report
from mmal_jax.data import image_check
from test_sources import write_colorswap, write_shard

pytestmark = pytest.mark.skipif(
    jax.device_count() > 1, reason="1-device pass only: the sources do not "
    "depend on the device count, and the sharded loop is test_loop's")

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs")


def tiny(name: str, **overrides):
  """configs/<name> with 16-wide towers, byte tokens, random initial towers,
  one seed and strategy, budgets of 8 and 2-epoch fits."""
  config = config_lib.from_file(os.path.join(CONFIGS, name))
  config_lib.use_small_towers(config, width=16, depth=1, patch=8, res=16,
                              text_len=16)
  test_loop._override(config, {  # pylint: disable=protected-access
      "tokenizer": "bytes", "init.kind": "scratch", "init.checkpoint": "",
      "seeds": (0,), "strategies": ("mmal",), "budget": 8, "num_rounds": 2,
      "strategy_hparams.mmal.coreset_size": 16, "train.epochs": 2,
      "train.batch_size": 8, "eval.embed_batch_size": 16,
      "pp.text": "", **overrides})
  return config_lib.validate(config)


@pytest.mark.slow
def test_colorswap_config_with_a_zeroshot_evaluator(tmp_path):
  folder = str(tmp_path / "colorswap")
  write_colorswap(folder, "train", range(10, 22))
  write_colorswap(folder, "test", range(30, 34))
  config = tiny("colorswap_siglip_b16.py", **{"data.dir": folder})
  config.unlock()
  config.evals.c10 = evaluators.eval_config(
      "zeroshot", rounds=(2,), every=0, dataset="cifar10")
  config.lock()
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=16):
    text = loop.run_experiment(config, workdir)
  rows = report.read_rows(os.path.join(workdir, "metrics.jsonl"))
  assert [r["round"] for r in rows] == [0, 1, 2]
  assert rows[-1]["queries"] == 16
  assert all(np.isfinite(r["colorswap/group"]) for r in rows)
  # The evaluator runs at round 2 only; its metric and the average reach
  # metrics.jsonl and results.md.
  assert "c10/top1" not in rows[1] and 0 <= rows[2]["c10/top1"] <= 100
  assert rows[2][evaluators.AVERAGE] == rows[2]["c10/top1"]
  assert "c10/top1" in text


@pytest.mark.slow
def test_datacomp_stream_config_on_webdataset_shards(tmp_path):
  """The stream's first num_rounds buffers are the pool; one buffer a round."""
  train, held = str(tmp_path / "train"), str(tmp_path / "eval")
  write_shard(os.path.join(train, "00000.tar"), 0, 20, lone=(3,))
  write_shard(os.path.join(train, "00001.tar"), 20, 20)
  write_shard(os.path.join(held, "00000.tar"), 100, 8)
  # A truncated download among the held-out samples: left out with its
  # caption at load, counted in every row (#17 item 1).
  good = os.path.join(held, "00000.tar")
  write_shard(os.path.join(held, "00001.tar"), 200, 2, stats=False)
  with tarfile.open(os.path.join(held, "00001.tar"), "a") as tar, \
      tarfile.open(good) as source:
    jpg = source.extractfile("000100.jpg").read()[:40]
    for name, data in (("000300.jpg", jpg), ("000300.txt", b"cut short")):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  config = tiny("datacomp_stream.py", stream_buffer=16, **{
      "data.dir": train, "data.eval_dir": held})
  assert config.regime == "stream"
  workdir = str(tmp_path / "run")
  # An image whose ends look whole but whose data does not decode stops the
  # run, named, when first embedded; replaced, the same run goes on.
  second = os.path.join(train, "00001.tar")
  whole = fs.read_bytes(second)
  with tarfile.open(second) as tar:
    member = tar.getmember("000025.jpg")
    png = tar.extractfile(member).read()
  hollow = png[:8] + bytes(len(png) - 20) + png[-12:]
  fs.write_bytes(second, whole[:member.offset_data] + hollow
                 + whole[member.offset_data + member.size:])
  with pytest.raises(image_check.UndecodableImage,
                     match=r"00001.tar#000025 .*Replace it"):
    loop.run_experiment(config, workdir)
  fs.write_bytes(second, whole)
  loop.run_experiment(config, workdir)
  rows = report.read_rows(os.path.join(workdir, "metrics.jsonl"))
  assert [r["round"] for r in rows] == [0, 1, 2]
  assert rows[-1]["queries"] == 16
  assert all(np.isfinite(r["retrieval/t2i_r@1"]) for r in rows)
  assert all(r["skipped_items"] == 1 for r in rows)


@pytest.mark.slow
def test_coco_stream_config_on_coco_mini(tmp_path):
  coco = test_loop.COCO_MINI
  if not (coco / "annotations" / "captions_train2017.json").is_file():
    pytest.skip(f"COCO mini not found at {coco} (set MMAL_SHARED).")
  config = tiny("coco_stream.py", stream_buffer=20, **{
      "data.train_json": str(coco / "annotations" / "captions_train2017.json"),
      "data.train_images": str(coco / "train2017"),
      "data.eval_json": str(coco / "annotations" / "captions_val2017.json"),
      "data.eval_images": str(coco / "val2017"),
      "data.first_caption_only": False})
  assert config.regime == "stream"
  workdir = str(tmp_path / "coco")
  loop.run_experiment(config, workdir)
  rows = report.read_rows(os.path.join(workdir, "metrics.jsonl"))
  assert [r["round"] for r in rows] == [0, 1, 2]
  assert rows[-1]["queries"] == 16
  # One image query reveals all ~5 of its captions.
  state = test_loop._state(workdir, "mmal")  # pylint: disable=protected-access
  assert len(state.pairs()) >= state.cost
  assert np.isfinite(rows[-1]["retrieval/t2i_r@5"])
