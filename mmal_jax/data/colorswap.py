"""ColorSwap (Burapacheep et al., 2024) from its released parquet files.

The Hugging Face release (`stanfordnlp/colorswap`) holds `{split}-*.parquet`
files (in the folder or its `data/` subfolder) with columns `id` (int),
`image_1`, `image_2` (Hugging Face `Image`: a struct with the encoded `bytes`
and a `path`), `caption_1`, `caption_2` (strings), plus `image_source`,
`caption_source` (not used). Caption k describes image k; the two captions
hold the same words with the colour words swapped.

Split rule: the release's own splits, `train` (700 groups: the paper's pool
of 1400 pairs, Table 1) for the pool and `test` (300 groups) held out for the
ColorSwap scores.

A group becomes 2 images + 2 captions of an `UnalignedPool` with `groups` =
the example's `id`: image 2g is `image_1` of row g and matches caption 2g.
Images stay encoded in memory (`BytesRefs`, ~1.4 GB for all 2000 images);
`data.pipeline` decodes them. Files may be local or `gs://` (`mmal_jax.fs`).
"""
from __future__ import annotations

import os

import numpy as np

from mmal_jax import fs
from mmal_jax.data import image_check
from mmal_jax.data.pool import BytesRefs, UnalignedPool

COLUMNS = ("id", "image_1", "image_2", "caption_1", "caption_2")


def split_files(directory: str, split: str) -> list[str]:
  """The split's parquet files in `directory` or `directory/data`, sorted."""
  for folder in (directory, os.path.join(directory, "data")):
    if fs.isdir(folder):
      files = fs.glob(folder, f"{split}-*.parquet")
      if files:
        return files
  raise FileNotFoundError(
      f"No ColorSwap {split!r} files ({split}-*.parquet) in {directory} or "
      f"{os.path.join(directory, 'data')}.")


def check_schema(path: str) -> None:
  """Raises ValueError naming the file and column when `path`'s parquet
  schema lacks a ColorSwap column or has one of the wrong type; reads the
  footer only."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    with fs.open(path, "rb") as f:
      schema = pq.read_schema(f)
  except (OSError, pa.ArrowException) as e:
    raise ValueError(f"Cannot read parquet file {path}: {e}") from e
  for column in COLUMNS:
    if column not in schema.names:
      raise ValueError(f"ColorSwap file {path} has no column {column!r} "
                       f"(columns: {schema.names}).")
  for column in ("image_1", "image_2"):
    kind = schema.field(column).type
    if not (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0):
      raise ValueError(f"ColorSwap file {path}: column {column!r} must be an "
                       f"image struct with 'bytes', got {kind}.")
  for column in ("caption_1", "caption_2"):
    if not pa.types.is_string(schema.field(column).type) and not (
        pa.types.is_large_string(schema.field(column).type)):
      raise ValueError(f"ColorSwap file {path}: column {column!r} must hold "
                       f"strings, got {schema.field(column).type}.")


def load_colorswap(directory: str | os.PathLike, split: str) -> UnalignedPool:
  """One split of ColorSwap as a grouped one-to-one pool.

  Items: `"image"` `BytesRefs` (2 per group, named `FILE row R (id I)
  image_K`), `"text"` a tuple of captions; `groups` are the `id`s. Raises
  FileNotFoundError when the split has no files, ValueError naming file and
  column for a missing column, a wrong type, a missing image or caption, or
  a repeated id. A group with an image failing
  `image_check.encoded_problem` is left out (named in `pool.skipped` and a
  warning). Cost: one read of the split's files.
  """
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  directory = os.fspath(directory)
  ids, images, names, captions = [], [], [], []
  for path in split_files(directory, split):
    check_schema(path)
    with fs.open(path, "rb") as f:
      table = pq.read_table(f, columns=list(COLUMNS)).to_pylist()
    for r, row in enumerate(table):
      for k in (1, 2):
        image, caption = row[f"image_{k}"], row[f"caption_{k}"]
        if not image or not image.get("bytes"):
          raise ValueError(f"ColorSwap file {path} row {r} (id {row['id']}): "
                           f"image_{k} has no bytes.")
        if not isinstance(caption, str) or not caption.strip():
          raise ValueError(f"ColorSwap file {path} row {r} (id {row['id']}): "
                           f"caption_{k} is empty.")
        images.append(image["bytes"])
        names.append(f"{path} row {r} (id {row['id']}) image_{k}")
        captions.append(caption.strip())
      ids.append(row["id"])
  if not ids:
    raise ValueError(f"The ColorSwap {split!r} files in {directory} hold no "
                     "rows.")
  if len(set(ids)) != len(ids):
    raise ValueError(f"The ColorSwap {split!r} files in {directory} repeat an "
                     "id.")
  group = np.repeat(np.asarray(ids, np.int64), 2)
  index = np.arange(len(captions))
  pool = UnalignedPool(
      items={"image": BytesRefs(np.array(images, object), names),
             "text": tuple(captions)},
      links={("image", "text"): np.stack([index, index], axis=1)},
      groups={"image": group, "text": group})
  return image_check.drop_undecodable(pool, f"ColorSwap {split!r} in {directory}")
