"""Zero-shot classification over a TFDS classification dataset.

Each class name is put into every prompt template (`"a photo of a {}."`),
the prompts are embedded, L2-normalised, averaged per class and normalised
again (CLIP's and big_vision's prompt ensembling); each image is assigned the
class with the most similar embedding; the metric is top-1 accuracy (%).
Any TFDS classification dataset by name (`cifar10`, `cifar100`,
`imagenet2012`, ...) from `data_dir`; class names come from the label
feature's names, or `class_names` (e.g. readable names for ImageNet's
WordNet ids). Images are embedded by `embed_fn` (sharded over the mesh when
it returns `data.pipeline.embed_pool`'s global array); the scoring runs where
the embeddings are, batches of rows split over every device, and only the
count of correct rows leaves the devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmal_jax.data.pool import BytesRefs, UnalignedPool
from mmal_jax.evaluators import common


def class_embeddings(ztxt, num_classes: int) -> np.ndarray:
  """`(C, D)` classifier from `(C * T, D)` prompt embeddings, class-major:
  mean of the normalised prompts of each class, normalised. O(C T D)."""
  z = np.asarray(ztxt, np.float64).reshape(num_classes, -1, np.shape(ztxt)[1])
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  z = z.mean(axis=1)
  return (z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32)


@jax.jit
def _num_correct(zimg, labels, classifier):
  logits = jnp.dot(zimg, classifier.T, precision=common.HIGHEST)
  hits = (jnp.argmax(logits, axis=1) == labels) & (labels >= 0)
  return jnp.sum(hits)


def top1_accuracy(zimg, labels: np.ndarray, classifier: np.ndarray) -> float:
  """Top-1 accuracy (%) of `classifier` `(C, D)` on the first `len(labels)`
  rows of `zimg` (numpy, or a row-sharded global array with padding rows
  after them). Ties go to the smallest class. Cost: O(N C D) on the devices
  holding the rows."""
  labels = np.asarray(labels, np.int32)
  padded = np.full(zimg.shape[0], -1, np.int32)
  padded[:len(labels)] = labels
  if isinstance(zimg, jax.Array) and isinstance(
      zimg.sharding, jax.sharding.NamedSharding):
    rows = jax.sharding.NamedSharding(zimg.sharding.mesh,
                                      jax.sharding.PartitionSpec(
                                          zimg.sharding.spec[0]))
    padded = jax.make_array_from_callback(padded.shape, rows,
                                          lambda index: padded[index])
  return 100.0 * int(_num_correct(zimg, padded, classifier)) / len(labels)


def load_classification(dataset: str, split: str, *, data_dir: str | None,
                        image_key: str = "image", label_key: str = "label",
                        max_examples: int | None = None
                        ) -> tuple[UnalignedPool, np.ndarray, list[str]]:
  """(pool of the split's encoded images, `(N,)` labels, class names).

  Raises ValueError naming the dataset for an unknown dataset, split or key,
  or a label feature without class names.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mmal_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  b = tfds_source.builder(dataset, data_dir)
  tfds_source.check_split(b, split)
  for key in (image_key, label_key):
    if key not in b.info.features:
      raise ValueError(f"TFDS dataset {dataset!r} has no feature {key!r}; "
                       f"its features: {list(b.info.features)}.")
  label_feature = b.info.features[label_key]
  names = list(getattr(label_feature, "names", None) or [])
  ds = b.as_dataset(split=split, shuffle_files=False,
                    decoders={image_key: tfds.decode.SkipDecoding()})
  if max_examples:
    ds = ds.take(max_examples)
  images, labels = [], []
  for example in ds.as_numpy_iterator():
    images.append(example[image_key])
    labels.append(int(example[label_key]))
  if not images:
    raise ValueError(f"TFDS split {dataset}:{split} holds no examples.")
  refs = BytesRefs(np.array(images, object),
                   [f"{dataset}/{split}#{k}" for k in range(len(images))])
  return UnalignedPool(items={"image": refs}), np.array(labels), names


class Evaluator:
  """Zero-shot top-1 accuracy (see the module docstring)."""
  DEFAULTS = dict(dataset="cifar10", split="test", data_dir="",
                  image_key="image", label_key="label", class_names=(),
                  prompts=("a photo of a {}.",), max_examples=0)
  MAIN = "top1"

  def __init__(self, embed_fn, **config):
    self.embed_fn = embed_fn
    self.config = {**self.DEFAULTS, **config}
    self._data = None

  @classmethod
  def metric_keys(cls, config=None) -> set[str]:
    del config
    return {cls.MAIN}

  @property
  def data(self):
    """(image pool, labels, prompt pool, number of classes), read once."""
    if self._data is None:
      c = self.config
      pool, labels, names = load_classification(
          c["dataset"], c["split"], data_dir=c["data_dir"] or None,
          image_key=c["image_key"], label_key=c["label_key"],
          max_examples=c["max_examples"] or None)
      names = list(c["class_names"]) or names
      if not names or labels.max() >= len(names):
        raise ValueError(
            f"zero-shot {c['dataset']}: {len(names)} class names for labels "
            f"up to {labels.max()}; set class_names.")
      prompts = tuple(p.format(name) for name in names for p in c["prompts"])
      self._data = (pool, labels, UnalignedPool(items={"text": prompts}),
                    len(names))
    return self._data

  def run(self, params) -> dict[str, float]:
    """`{"top1": %}`. Cost: one embedding pass over the images and the
    C x T prompts, then O(N C D) on the devices."""
    pool, labels, prompts, num_classes = self.data
    ztxt = common.to_host(self.embed_fn(params, prompts, "text"),
                          prompts.num_items("text"))
    classifier = class_embeddings(ztxt, num_classes)
    zimg = self.embed_fn(params, pool, "image")
    return {self.MAIN: top1_accuracy(zimg, labels, classifier)}
