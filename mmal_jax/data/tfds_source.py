"""Any TFDS image-text dataset (`coco_captions`, ...) as an UnalignedPool.

`load_tfds(name, split, data_dir=..., image_key="image",
text_key="captions/text")` reads one split of a prepared TFDS dataset (by
name from `data_dir`, local or `gs://`; TFDS reads it with TensorFlow's own
file system, the one reader not routed through `mmal_jax.fs`). Nested
features are named with `/` (`captions/text` is the text of each element of
coco_captions' `captions` sequence). An example's image and its caption(s)
are partners: one caption (a string feature) or several (a sequence of
strings).

Images stay encoded (`BytesRefs`, decoded by `data.pipeline`), so the pool
holds the split's JPEG bytes in host memory: ~0.8 GB for COCO's 5k
Karpathy test split; use `max_images` (or a split slice such as
`"train[:20000]"`) for large splits, or a file source (`coco`, `datacomp`)
whose pool holds references only.
"""
from __future__ import annotations

import numpy as np

from mmal_jax.data import image_check
from mmal_jax.data.pool import BytesRefs, UnalignedPool, check_int


def _feature(features, key: str, name: str):
  node = features
  for part in key.split("/"):
    try:
      node = node[part]
    except (KeyError, TypeError):
      node = None
    if node is None:
      raise ValueError(f"TFDS dataset {name!r} has no feature {key!r}; its "
                       f"features: {features}.")
    if hasattr(node, "feature"):  # A Sequence: descend into its elements.
      node = node.feature
  return node


def _nested(key: str, value) -> dict:
  for part in reversed(key.split("/")):
    value = {part: value}
  return value


def _get(example, key: str):
  for part in key.split("/"):
    example = example[part]
  return example


def builder(name: str, data_dir: str | None = None):
  """The TFDS builder of `name` (from files in `data_dir` when given).

  Raises ValueError naming the dataset when TFDS cannot make one.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS raises several types (DatasetNotFoundError, registry errors, ...).
    raise ValueError(f"TFDS cannot find dataset {name!r} (data_dir="
                     f"{data_dir!r}): {str(e).splitlines()[0]}") from e


def check_split(b, split: str) -> None:
  """Raises ValueError unless `split` (maybe sliced: "train[:10%]") exists.

  A builder that lists no splits (not prepared, or mocked by
  `tfds.testing.mock_data`) is left to TFDS, which raises when read;
  `prepared_problem` reports the unprepared case up front.
  """
  base = split.split("[")[0]
  if b.info.splits and base not in b.info.splits:
    raise ValueError(f"TFDS dataset {b.info.full_name!r} has no split {base!r}"
                     f" prepared in {b.data_dir}; it has "
                     f"{sorted(b.info.splits)}.")


def prepared_problem(b) -> str | None:
  """Why `b` cannot be read (not prepared in its data_dir), or None."""
  if not b.info.splits:
    return (f"TFDS dataset {b.info.full_name!r} is not prepared in "
            f"{b.data_dir} (run its download_and_prepare, or set data_dir).")
  return None


def load_tfds(name: str, split: str, *, data_dir: str | None = None,
              image_key: str = "image", text_key: str = "captions/text",
              max_images: int | None = None) -> UnalignedPool:
  """One split of an image-text TFDS dataset, example order kept.

  Items: `"image"` `BytesRefs` (encoded, named `name/split#k`), `"text"` a
  tuple of captions (stripped); each image is linked to its example's
  captions. Raises ValueError naming the dataset for an unknown dataset,
  split or feature key, a non-image image feature, and an empty split. An
  image failing `image_check.encoded_problem` is left out with its captions
  (named in `pool.skipped` and a warning).
  Cost: one pass over the split, no image decoding.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if max_images is not None:
    check_int("max_images", max_images, 1)
  b = builder(name, data_dir)
  check_split(b, split)
  image_feature = _feature(b.info.features, image_key, name)
  if not isinstance(image_feature, tfds.features.Image):
    raise ValueError(f"TFDS feature {name}:{image_key} is "
                     f"{type(image_feature).__name__}, not an Image.")
  _feature(b.info.features, text_key, name)
  ds = b.as_dataset(split=split, shuffle_files=False, decoders=_nested(
      image_key, tfds.decode.SkipDecoding()))
  if max_images is not None:
    ds = ds.take(max_images)
  images, names, texts, image_of_text = [], [], [], []
  for k, example in enumerate(ds.as_numpy_iterator()):
    images.append(_get(example, image_key))
    names.append(f"{name}/{split}#{k}")
    captions = np.atleast_1d(_get(example, text_key))
    for caption in captions:
      texts.append(caption.decode("utf-8").strip())
      image_of_text.append(k)
  if not images:
    raise ValueError(f"TFDS split {name}:{split} holds no examples.")
  if not texts:
    raise ValueError(f"TFDS split {name}:{split} holds no {text_key!r} text.")
  pairs = np.stack([np.array(image_of_text), np.arange(len(texts))], axis=1)
  pool = UnalignedPool(
      items={"image": BytesRefs(np.array(images, object), names),
             "text": tuple(texts)},
      links={("image", "text"): pairs})
  return image_check.drop_undecodable(pool, f"TFDS {name}:{split}")
