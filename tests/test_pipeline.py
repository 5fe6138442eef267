"""The tf.data pipeline: the same batches as pair_batches, exact resume, the
shard rule, and the sharded embedding pass against a host computation."""
import functools
import io
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmal_jax import sharding
from mmal_jax import tokenizers
from mmal_jax.data import pipeline, preprocess, shapes
from mmal_jax.data.pool import BytesRefs, FileRefs, RangeRefs, UnalignedPool

TOKENIZER = tokenizers.get_tokenizer("bytes")


class EosPadded:
  def encode(self, texts, length):
    return TOKENIZER.encode(texts, length, pad_id=TOKENIZER.eos_id)


def shapes_pool(num_groups=12):
  return shapes.make_colorswap(num_groups, 16, seed=0)


def test_default_pp_matches_prepare_items_on_pixels_and_text():
  pool = shapes_pool()
  pp = pipeline.default_pp(pool, res=16, text_len=20, tokenizer="bytes")
  idx = np.array([5, 0, 3])
  for m, want in (("image", preprocess.prepare_items(pool, "image", idx)),
                  ("text", preprocess.prepare_items(
                      pool, "text", idx, tokenizer=EosPadded(),
                      text_length=20))):
    fn = pipeline.preprocess_fn(pool, m, pp[m])
    got = np.stack([fn(np.int64(i)).numpy() for i in idx])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_train_batches_equal_pair_batches_and_resume_exactly():
  pool = shapes_pool()
  mesh = sharding.make_mesh()
  n_dev = mesh.size
  batch = 8 if n_dev < 8 else n_dev
  pairs = pool.pairs()[::-1].copy()
  pp = pipeline.default_pp(pool, res=16, text_len=20, tokenizer="bytes")
  run = lambda **kw: list(pipeline.train_batches(
      pool, pairs, batch, pp, seed=3, mesh=mesh, num_epochs=3, **kw))
  got = run()
  per_epoch = len(pairs) // batch
  assert len(got) == 3 * per_epoch
  prepare = functools.partial(preprocess.prepare_items, pool,
                              tokenizer=EosPadded(), text_length=20)
  want = list(preprocess.pair_batches(pairs, batch, prepare, seed=3,
                                      num_epochs=3))
  for g, w in zip(got, want):
    assert g["image"].sharding.is_equivalent_to(sharding.row_sharding(mesh), 4)
    for key in ("image", "text", "image_index", "text_index"):
      np.testing.assert_allclose(np.asarray(g[key]), w[key], atol=1e-6)
  resumed = run(start_step=per_epoch + 1)
  assert len(resumed) == len(got) - per_epoch - 1
  for g, r in zip(got[per_epoch + 1:], resumed):
    np.testing.assert_array_equal(np.asarray(g["image_index"]),
                                  np.asarray(r["image_index"]))
    np.testing.assert_array_equal(np.asarray(g["text"]), np.asarray(r["text"]))
  forever = pipeline.train_batches(pool, pairs, batch, pp, seed=3, mesh=mesh,
                                   num_epochs=None)
  assert len([next(forever) for _ in range(4 * per_epoch)]) == 4 * per_epoch


def test_train_batches_errors():
  pool, mesh = shapes_pool(), sharding.make_mesh()
  pp = pipeline.default_pp(pool, res=16, text_len=8, tokenizer="bytes")
  with pytest.raises(ValueError, match="exceeds the 24 pairs"):
    pipeline.train_batches(pool, pool.pairs(), 32, pp, seed=0, mesh=mesh)


def test_train_batches_are_padded_to_the_device_count():
  """A batch of 5 on n devices: padded to a multiple of n with copies of its
  first pairs, marked by "valid"; its real rows are pair_batches' (1 device:
  no padding, no "valid")."""
  pool, mesh = shapes_pool(), sharding.make_mesh()
  pp = pipeline.default_pp(pool, res=16, text_len=8, tokenizer="bytes")
  padded = -(-5 // mesh.size) * mesh.size
  got = list(pipeline.train_batches(pool, pool.pairs(), 5, pp, seed=2,
                                    mesh=mesh))
  prepare = functools.partial(preprocess.prepare_items, pool,
                              tokenizer=EosPadded(), text_length=8)
  want = list(preprocess.pair_batches(pool.pairs(), 5, prepare, seed=2))
  assert len(got) == len(want) == 24 // 5
  for g, w in zip(got, want):
    index = np.asarray(g["image_index"])
    assert index.shape == (padded,)
    np.testing.assert_array_equal(index[:5], w["image_index"])
    np.testing.assert_array_equal(index[5:], index[:padded - 5])
    if padded == 5:
      assert "valid" not in g
    else:
      np.testing.assert_array_equal(np.asarray(g["valid"]),
                                    np.arange(padded) < 5)


def test_rows_of_a_process():
  """The shard rule on a hand-made 2-process layout: each process reads the
  rows of its own devices, ascending."""
  index = lambda lo, hi: (slice(lo, hi),)
  indices_map = {"a": index(0, 2), "b": index(2, 4), "c": index(4, 6),
                 "d": index(6, 8)}
  np.testing.assert_array_equal(
      pipeline._rows_of(indices_map, ["d", "a"], 8), [0, 1, 6, 7])
  mesh = sharding.make_mesh()
  np.testing.assert_array_equal(
      pipeline.process_rows(sharding.row_sharding(mesh), 16), np.arange(16))


def linear(params, x):
  return x.reshape(x.shape[0], -1) @ params


@pytest.mark.parametrize("num_rows, batch_size", [(37, 16), (5, 1024), (64, 8)])
def test_embed_pool_matches_host_computation(num_rows, batch_size):
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(num_rows)
  features = rng.normal(size=(80, 6)).astype(np.float32)
  pool = UnalignedPool(items={"image": features})
  params = rng.normal(size=(6, 4)).astype(np.float32)
  indices = rng.permutation(80)[:num_rows]
  out = pipeline.embed_pool(linear, params, pool, "image", indices, mesh,
                            batch_size, "")
  batch, steps = pipeline.embed_layout(num_rows, batch_size, mesh.size)
  assert out.shape == (batch * steps, 4) and batch * steps < num_rows + batch
  assert out.sharding.is_equivalent_to(sharding.row_sharding(mesh), 2)
  host = np.asarray(out)
  np.testing.assert_allclose(host[:num_rows], features[indices] @ params,
                             rtol=1e-5, atol=1e-5)
  assert (host[num_rows:] == 0).all()


def test_embed_pool_small_call_uses_a_small_bucket():
  assert pipeline.embed_layout(159, 1024, 8) == (256, 1)
  assert pipeline.embed_layout(159, 1024, 1) == (256, 1)
  assert pipeline.embed_layout(3000, 1024, 8) == (1024, 3)
  assert pipeline.embed_layout(3, 4, 8) == (8, 1)


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def test_every_kind_of_reference_decodes_the_same(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (9 + i, 12, 3), np.uint8) for i in range(5)]
  blobs = [_png(x) for x in images]
  for i, blob in enumerate(blobs):
    (tmp_path / f"{i}.png").write_bytes(blob)
  shard = tmp_path / "shard.bin"
  shard.write_bytes(b"".join(blobs))
  offsets = np.cumsum([0] + [len(b) for b in blobs[:-1]])
  refs = {
      "files": FileRefs(str(tmp_path), [f"{i}.png" for i in range(5)]),
      "bytes": BytesRefs(np.array(blobs, object)),
      "ranges": RangeRefs((str(shard),), np.zeros(5, int), offsets,
                          [len(b) for b in blobs], [str(i) for i in range(5)]),
      "paths": tuple(str(tmp_path / f"{i}.png") for i in range(5)),
      "arrays": tuple(images),
  }
  # big_vision's resize: tf.image.resize, bilinear, cast back to uint8.
  want = np.stack([tf.cast(tf.image.resize(images[i], (6, 6)), tf.uint8)
                   for i in (4, 1)]) / np.float32(127.5) - 1
  mesh = sharding.make_mesh()
  params = np.eye(6 * 6 * 3, 5, dtype=np.float32)
  for name, items in refs.items():
    pool = UnalignedPool(items={"image": items})
    fn = pipeline.preprocess_fn(pool, "image", "decode|resize(6)|value_range")
    got = np.stack([fn(np.int64(i)).numpy() for i in (4, 1)])
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)
    z = pipeline.embed_pool(linear, params, pool, "image", [4, 1], mesh, 8,
                            "decode|resize(6)|value_range")
    np.testing.assert_allclose(np.asarray(z)[:2], got.reshape(2, -1)[:, :5],
                               atol=1e-6)



class CountingRefs(BytesRefs):
  """Encoded images that log which items are read."""

  def __init__(self, data, reads):
    super().__init__(data)
    object.__setattr__(self, "reads", reads)

  def read(self, i):
    self.reads.append(int(i))
    return super().read(i)


def counting_pool(n=40):
  """n one-colour 4 px PNGs (colour from the index) with captions; the log."""
  reads = []
  blobs = [_png(np.full((4, 4, 3), (3 * i, 100, 255 - 2 * i), np.uint8))
           for i in range(n)]
  pool = UnalignedPool(
      items={"image": CountingRefs(np.array(blobs, object), reads),
             "text": tuple(f"item {i}" for i in range(n))},
      links={("image", "text"): np.stack([np.arange(n)] * 2, 1)})
  return pool, reads


# Batches of 8 over 40 pairs: 5 per epoch, 2 epochs, then resumed at step 3;
# 40 items embedded in batches of 16: 48 rows. Images read: (10 + 7) * 8 + 48.
IMAGES_READ = 184


def pipeline_fingerprint(pool, mesh) -> dict:
  """Training batches (and a resumed run) and embeddings of a counting pool,
  as global arrays."""
  pp = {"image": "decode|value_range(0, 1)",
        "text": "tokenize(max_len=8, eos='sticky', model='bytes', inkey='text')"}
  out = {}
  for name, start in (("train", 0), ("resumed", 3)):
    batches = list(pipeline.train_batches(
        pool, pool.pairs(), 8, pp, seed=1, mesh=mesh, num_epochs=2,
        start_step=start))
    for key in ("image_index", "image", "text"):
      out[f"{name}/{key}"] = jax.numpy.stack([b[key] for b in batches])
  z = pipeline.embed_pool(linear, np.eye(48, 3, dtype=np.float32), pool,
                          "image", np.arange(40)[::-1], mesh, 16, pp["image"])
  out["embeddings"] = z[:40]
  return out


@pytest.mark.slow
def test_two_processes_read_their_own_rows_and_agree(tmp_path):
  """A 2-process jax.distributed job (2 CPU devices each) gives the batches
  and embeddings of one process, each process reading half of the items."""
  pool, reads = counting_pool()
  want = pipeline_fingerprint(pool, sharding.make_mesh())
  assert len(reads) == IMAGES_READ
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  here = os.path.dirname(__file__)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(sys.path)
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(here, "pipeline_multihost_worker.py"),
       str(i), port, str(tmp_path)], env=env, cwd=here,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  got = json.loads((tmp_path / "result.json").read_text())
  assert set(got) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], np.asarray(value), atol=1e-6,
                               err_msg=key)
  for i in range(2):
    reads = json.loads((tmp_path / f"reads_{i}.json").read_text())
    assert len(reads) == IMAGES_READ // 2


def test_shard_members_are_read_in_runs_not_one_read_per_image(
    tmp_path, monkeypatch):
  """#17 item 21: embedding a webdataset pool reads each run of consecutive
  shard members with one read (one GET on gs://), same results."""
  from mmal_jax.data import pool as pool_lib  # pylint: disable=g-import-not-at-top
  blobs = [_png(np.full((4, 4, 3), (2 * i, 9, 200), np.uint8))
           for i in range(100)]
  shard = tmp_path / "shard.tar"
  shard.write_bytes(b"".join(blobs))
  offsets = np.cumsum([0] + [len(b) for b in blobs[:-1]])
  refs = RangeRefs((str(shard),), np.zeros(100, int), offsets,
                   [len(b) for b in blobs], [str(i) for i in range(100)])
  reads = []
  opened = pool_lib.fs.open

  class Counting:
    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def seek(self, *a):
      return self.f.seek(*a)

    def read(self, n=-1):
      reads.append(n)
      return self.f.read(n)

  monkeypatch.setattr(pool_lib.fs, "open",
                      lambda path, mode="r": Counting(opened(path, mode)))
  pool = UnalignedPool(items={"image": refs})
  indices = np.arange(100)[::-1][:90][::-1]  # Items 10..99 in order.
  z = pipeline.embed_pool(lambda p, x: x[:, 0, 0], None, pool, "image",
                          indices, sharding.make_mesh(), 128,
                          "decode|value_range(0, 255)")
  np.testing.assert_allclose(np.asarray(z)[:90, 0], 2 * indices)
  # 90 items padded to a batch of 128 (the last repeated): 2 runs of 64.
  assert len(reads) == 2, reads


def test_captions_are_tokenised_ahead_in_one_batch(monkeypatch):
  """#17 item 21: no Python call per caption inside the tf.data graph; the
  same tokens as the per-caption path."""
  from mmal_jax.data import pp as pp_lib  # pylint: disable=g-import-not-at-top
  pool, _ = counting_pool(40)
  text_pp = ("tokenize(max_len=8, eos='sticky', model='bytes', "
             "pad_value='</s>', lower=False, inkey='text', outkey='text')")
  one_by_one = pipeline.preprocess_fn(pool, "text", text_pp)
  want = np.stack([one_by_one(np.int64(i)).numpy() for i in range(40)])
  calls = []
  encode = pp_lib.encode
  monkeypatch.setattr(pp_lib, "encode", lambda tok, texts, *a: (
      calls.append(len(list(texts))) or encode(tok, texts, *a)))
  z = pipeline.embed_pool(lambda p, x: x.astype(np.float32), None, pool,
                          "text", np.arange(40), sharding.make_mesh(), 16,
                          text_pp)
  np.testing.assert_array_equal(np.asarray(z)[:40], want)
  assert sorted(calls) == [1, 40]  # The op's argument check, then 1 batch.
  calls.clear()
  for batch in pipeline.train_batches(
      pool, pool.pairs()[:16], 8, {"image": "decode", "text": text_pp},
      seed=0, mesh=sharding.make_mesh()):
    np.testing.assert_array_equal(
        np.asarray(batch["text"]), want[np.asarray(batch["text_index"])])
  assert sorted(calls) == [1, 16]
