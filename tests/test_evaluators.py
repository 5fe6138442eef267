"""Evaluators: zero-shot (a dataset with a known answer, and TFDS mock data
against a numpy reference), retrieval over a dataset, the config of
evaluators run at chosen rounds, and the metric names a config produces."""
import hashlib

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import tiny_tfds
from mmal_jax import config_lib
from mmal_jax import evaluators
from mmal_jax import sharding
from mmal_jax.data import pipeline, preprocess, shapes, sources
from mmal_jax.evaluators import retrieval, zeroshot

COLOURS = list(tiny_tfds.COLOURS)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tiny_tfds.prepare(data_dir)
  return data_dir


def one_hot_colour(params, x):
  """Image rows -> one-hot of the channel with the largest mean."""
  del params
  return jax.nn.one_hot(x.mean(axis=(1, 2)).argmax(-1), 3)


def colour_embedder():
  """embed_fn: images through the sharded pipeline, texts -> one-hot of the
  colour word they name (zero-shot answers are known), a fixed unit vector
  for texts without one."""
  mesh = sharding.make_mesh()

  def embed(params, pool, modality):
    if modality == "image":
      return pipeline.embed_pool(one_hot_colour, params, pool, "image",
                                 np.arange(pool.num_items("image")), mesh, 8,
                                 "decode|resize(4)|value_range(0, 1)")
    words = [next((c for c in COLOURS if c in t), None)
             for t in pool.items["text"]]
    return np.stack([np.eye(3, dtype=np.float32)[COLOURS.index(w)] if w else
                     np.full(3, 3 ** -0.5, np.float32) for w in words])
  return embed


def test_zeroshot_known_answer(tfds_dir):
  embed = colour_embedder()
  ev = zeroshot.Evaluator(embed, dataset="tiny_captions", data_dir=tfds_dir,
                          prompts=("a photo of a {}.", "a {} thing"))
  assert ev.run(None) == {"top1": 100.0}
  # Class names in another order: only the green images (1 of the 4 test
  # examples 6..9, label k % 3) keep their class.
  swapped = zeroshot.Evaluator(embed, dataset="tiny_captions",
                               data_dir=tfds_dir,
                               class_names=["blue", "green", "red"])
  assert swapped.run(None) == {"top1": 25.0}
  with pytest.raises(ValueError, match="2 class names for labels up to 2"):
    zeroshot.Evaluator(embed, dataset="tiny_captions", data_dir=tfds_dir,
                       class_names=["red", "green"]).run(None)


def text_vector(text: str, dim: int = 8) -> np.ndarray:
  seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
  return np.random.default_rng(seed).normal(size=dim).astype(np.float32)


def test_zeroshot_on_tfds_mock_data_matches_a_numpy_reference():
  mesh = sharding.make_mesh()
  projection = np.random.default_rng(0).normal(size=(32 * 32 * 3, 8)).astype(
      np.float32)
  pp = "decode|value_range(-1, 1)"

  def project(params, x):
    z = x.reshape(x.shape[0], -1) @ params
    return z / jax.numpy.linalg.norm(z, axis=1, keepdims=True)

  def embed(params, pool, modality):
    if modality == "image":
      return pipeline.embed_pool(project, params, pool, "image",
                                 np.arange(pool.num_items("image")), mesh, 16, pp)
    z = np.stack([text_vector(t) for t in pool.items["text"]])
    return z / np.linalg.norm(z, axis=1, keepdims=True)

  prompts = ("a photo of a {}.", "a blurry {}")
  with tfds.testing.mock_data(num_examples=20):
    ev = zeroshot.Evaluator(embed, dataset="cifar10", split="test",
                            prompts=prompts)
    got = ev.run(projection)["top1"]
    pool, labels, _, num_classes = ev.data
  # Reference: decode every image on the host, numpy all the way.
  images = np.stack([preprocess.decode_image(pool.items["image"].read(i))
                     for i in range(20)]) / np.float32(127.5) - 1
  zimg = images.reshape(20, -1) @ projection
  zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
  names = [str(c) for c in range(num_classes)]   # Mock metadata: "0".."9".
  classes = []
  for name in names:
    z = np.stack([text_vector(p.format(name)) for p in prompts])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    classes.append(z.mean(0) / np.linalg.norm(z.mean(0)))
  want = 100 * np.mean((zimg @ np.stack(classes).T).argmax(1) == labels)
  assert got == pytest.approx(want)
  assert len(labels) == 20 and num_classes == 10


def test_retrieval_evaluator_on_a_dataset(tfds_dir):
  """Captions "a <colour> image k": with colour embeddings an image's
  captions tie with every same-colour caption (ties count against)."""
  embed = colour_embedder()
  ev = retrieval.Evaluator(embed, dataset="tiny_captions", data_dir=tfds_dir,
                           text_key="captions/text")
  got = ev.run(None)
  pool = ev.pool
  z = {m: np.asarray(embed(None, pool, m))[:pool.num_items(m)]
       for m in ("image", "text")}
  want = retrieval.retrieval_recall(z["image"], z["text"],
                                    retrieval.text_to_image(pool))
  assert got == {**want, "mean_r@1": (want["i2t_r@1"] + want["t2i_r@1"]) / 2}
  assert set(got) == retrieval.Evaluator.metric_keys()


class Counter:
  MAIN = "score"
  DEFAULTS = {}

  def __init__(self, value):
    self.value, self.calls = value, 0

  def run(self, params):
    self.calls += 1
    return {"score": self.value + params, "other": 1.0}


def test_schedule_prefixes_and_average():
  evals = ml_collections.ConfigDict({
      "a": evaluators.eval_config("zeroshot", every=2),
      "b": evaluators.eval_config("retrieval", every=0, rounds=(1, 4))})
  built = evaluators.build(evals, embed_fn=None)
  assert isinstance(built["a"], zeroshot.Evaluator)
  fake = {"a": Counter(10.0), "b": Counter(20.0)}
  assert evaluators.run_due(fake, evals, 1, 0.0) == {"b/score": 20.0,
                                                     "b/other": 1.0}
  assert evaluators.run_due(fake, evals, 3, 0.0) == {}
  got = evaluators.run_due(fake, evals, 4, 1.0)
  assert got == {"a/score": 11.0, "a/other": 1.0, "b/score": 21.0,
                 "b/other": 1.0, "evals/average": 16.0}
  assert [e.calls for e in fake.values()] == [1, 2]
  assert evaluators.run_due({}, evaluators.default_config(), 0, 0.0) == {}


def test_config_problems():
  with pytest.raises(ValueError, match="no fields \\['datset'\\]"):
    evaluators.eval_config("zeroshot", datset="cifar10")
  with pytest.raises(ValueError, match="Unknown evaluator type 'linear'"):
    evaluators.eval_config("linear")
  evals = {"x": {"type": "linear"}, "y": {"type": "zeroshot", "every": -1,
                                          "dataset": "cifar10", "bogus": 1}}
  assert evaluators.check(evals) == [
      "config.evals.x.type='linear' is not one of ['retrieval', 'zeroshot'].",
      "config.evals.y has unknown fields ['bogus'].",
      "config.evals.y.every must be an int >= 0."]
  with pytest.raises(ValueError, match="unknown fields"):
    evaluators.build(evals, None)


@pytest.mark.parametrize("source", ["shapes", "features"])
def test_metric_names_match_what_pool_metrics_produces(source):
  config = config_lib.base_config()
  config.data.source = source
  config.evals = ml_collections.ConfigDict(
      {"c10": evaluators.eval_config("zeroshot")})
  names = evaluators.metric_names(config)
  assert {"c10/top1", "evals/average"} <= names
  pool = shapes.make_colorswap(6, 16, seed=0)
  if source == "features":  # No groups: what every non-grouped source gives.
    pool = type(pool)(items=pool.items, links=pool.links)
  rng = np.random.default_rng(0)
  z = {m: rng.normal(size=(12, 4)) for m in ("image", "text")}
  z = {m: v / np.linalg.norm(v, axis=1, keepdims=True) for m, v in z.items()}
  produced = set(evaluators.pool_metrics(z["image"], z["text"], pool))
  assert produced == {n for n in names if not n.startswith(("c10/", "evals/"))}
  assert ("colorswap/group" in names) == (source in sources.GROUPED)
