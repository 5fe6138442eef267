"""COCO-format captions (`captions_*.json` + an image folder) as an UnalignedPool."""
from __future__ import annotations

import json
import os

import numpy as np

from mmal_jax import fs
from mmal_jax.data import image_check
from mmal_jax.data import preprocess
from mmal_jax.data.pool import FileRefs, UnalignedPool, check_int


def _read_json(path: str) -> dict:
  if not fs.isfile(path):
    raise FileNotFoundError(f"COCO captions file not found: {path}")
  try:
    data = json.loads(fs.read_text(path))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"Cannot read COCO captions file {path}: {e}") from e
  if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
      or not isinstance(data.get("annotations"), list):
    raise ValueError(f"{path} is not COCO captions JSON: it needs 'images' and "
                     "'annotations' lists.")
  return data


def load_coco(captions_json: str | os.PathLike, image_dir: str | os.PathLike, *,
              max_images: int | None = None, image_size: int | None = None,
              first_caption_only: bool = False) -> UnalignedPool:
  """Loads COCO captions as a pool with one-to-many image -> captions matching.

  Images are taken in the JSON's `images` order (the first `max_images` of
  them); texts are their captions grouped by image, each image's captions in
  the JSON's `annotations` order. With `first_caption_only` only that first
  caption is kept (the paper's MS-COCO protocol). Images without a caption are
  items with no partner.

  Items: `"image"` is `FileRefs` to the image files (decoded by the input
  pipeline), or with `image_size` a uint8 `(N, S, S, 3)` array of decoded,
  square-resized images; `"text"` a tuple of caption strings. Paths may be
  local or `gs://` (read through `mmal_jax.fs`). Raises FileNotFoundError for
  a missing JSON, image folder or referenced image file, ValueError for
  unreadable / malformed JSON, unknown or duplicate image ids, undecodable
  images (with `image_size`) and an empty selection. Without `image_size`,
  images failing `image_check.encoded_problem` are left out with their
  captions (named in `pool.skipped` and a warning).
  Cost: O(annotations) plus one listing of `image_dir`; with `image_size`,
  one decode + resize per image, else two small reads per image.
  """
  captions_json, image_dir = os.fspath(captions_json), os.fspath(image_dir)
  if max_images is not None:
    check_int("max_images", max_images, 1)
  data = _read_json(captions_json)
  if not fs.isdir(image_dir):
    raise FileNotFoundError(f"COCO image folder not found: {image_dir}")

  row_of, file_names = {}, []
  for k, im in enumerate(data["images"]):
    if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
      raise ValueError(f"{captions_json}: images[{k}] needs 'id' and 'file_name'.")
    if im["id"] in row_of:
      raise ValueError(f"{captions_json}: image id {im['id']} is listed twice.")
    row_of[im["id"]] = k
    file_names.append(im["file_name"])
  num_images = len(file_names) if max_images is None else min(max_images, len(file_names))
  if num_images == 0:
    raise ValueError(f"{captions_json} lists no images (empty dataset).")

  captions_of = [[] for _ in range(num_images)]
  for k, ann in enumerate(data["annotations"]):
    if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(
        ann.get("caption"), str):
      raise ValueError(f"{captions_json}: annotations[{k}] needs 'image_id' and a "
                       "'caption' string.")
    if ann["image_id"] not in row_of:
      raise ValueError(f"{captions_json}: annotations[{k}] refers to unknown image id "
                       f"{ann['image_id']}.")
    row = row_of[ann["image_id"]]
    if row < num_images and not (first_caption_only and captions_of[row]):
      captions_of[row].append(ann["caption"].strip())
  texts = tuple(c for cs in captions_of for c in cs)
  if not texts:
    raise ValueError(f"{captions_json} has no captions for the {num_images} selected images.")

  refs = FileRefs(image_dir, file_names[:num_images])
  present = set(fs.listdir(image_dir))
  missing = [refs[i] for i, name in enumerate(file_names[:num_images])
             if name not in present and ("/" not in name or
                                         not fs.isfile(refs[i]))]
  if missing:
    raise FileNotFoundError(f"{len(missing)} of {num_images} images referenced by "
                            f"{captions_json} are not in {image_dir}, e.g. {missing[:3]}.")
  images = refs if image_size is None else np.stack(
      [preprocess.resize(preprocess.load_image(p), image_size) for p in refs])
  image_of_text = np.repeat(np.arange(num_images), [len(cs) for cs in captions_of])
  pool = UnalignedPool(
      items={"image": images, "text": texts},
      links={("image", "text"): np.stack([image_of_text, np.arange(len(texts))], axis=1)})
  return image_check.drop_undecodable(pool, image_dir)
