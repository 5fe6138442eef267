"""Model inputs from pool items, as big_vision's `decode|resize|value_range(-1, 1)`.

Images become float32 `(B, S, S, 3)` in [-1, 1] (square resize without keeping
the aspect ratio, like big_vision's `resize(S)`; bilinear with PIL's
antialiasing where big_vision uses `tf.image.resize`), captions become int32
`(B, L)` token ids from a tokenizer with `encode(texts, length)`, and feature
rows pass through as float32. Batches come from numpy iterators: shuffled pair
batches for training and padded item batches for embedding a whole modality,
optionally placed on a device mesh (split over every device).

This is the single-process reference path (PIL, one thread);
`data.pipeline` is the tf.data pipeline with the same batches.
"""
from __future__ import annotations

import io
import os
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
from PIL import Image

from mmal_jax import fs
from mmal_jax import sharding
from mmal_jax.data.pool import (ItemRefs, UnalignedPool, as_index_rows,
                                check_int)

PrepareFn = Callable[[str, np.ndarray], np.ndarray]


class Tokenizer(Protocol):

  def encode(self, texts: list[str], length: int) -> np.ndarray:
    """int32 `(len(texts), length)` token ids, padded / truncated to `length`."""


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
  """Decodes encoded image bytes to uint8 `(H, W, 3)` RGB. Raises naming `what`."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"Cannot decode image {what}: {e}") from e


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file (local or `gs://`) to uint8 `(H, W, 3)` RGB.

  Raises FileNotFoundError / ValueError naming the file.
  """
  path = os.fspath(path)
  try:
    data = fs.read_bytes(path)
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    raise FileNotFoundError(f"Image file not found: {path}") from None
  return decode_image(data, path)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of uint8 `(H, W, 3)` to `(size, size, 3)`. Cost: O(H*W + size^2)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"resize takes uint8 (H, W, 3) images, got {image.dtype} {image.shape}.")
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def value_range(images: np.ndarray, vmin: float = -1.0, vmax: float = 1.0) -> np.ndarray:
  """Maps uint8 pixel values [0, 255] linearly to float32 [vmin, vmax]."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"value_range takes uint8 images, got {images.dtype}.")
  return (images.astype(np.float32) * np.float32((vmax - vmin) / 255.0)
          + np.float32(vmin))


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], length: int) -> np.ndarray:
  """int32 `(len(texts), length)` token ids; checks what the tokenizer returns."""
  texts = list(texts)
  if not all(isinstance(t, str) for t in texts):
    raise ValueError("tokenize takes strings.")
  tokens = np.asarray(tokenizer.encode(texts, length))
  if tokens.shape != (len(texts), length) or tokens.dtype.kind not in "iu":
    raise ValueError(f"tokenizer.encode returned {tokens.dtype} {tokens.shape}, expected "
                     f"int ({len(texts)}, {length}).")
  return tokens.astype(np.int32)


def prepare_items(pool: UnalignedPool, modality: str, indices, *,
                  image_size: int | None = None, tokenizer: Tokenizer | None = None,
                  text_length: int | None = None) -> np.ndarray:
  """Model inputs for items `indices` of `modality`, stacked on axis 0.

  - float rows (features): float32 `(B, D)` as they are;
  - uint8 images (an array, a tuple of arrays / paths of `"image"` items, or
    `ItemRefs` to encoded images): resized to `image_size` (required unless
    all share one size), float32 in [-1, 1];
  - strings of any other modality (captions): `tokenizer.encode(..., text_length)`.

  Bind the options with `functools.partial(prepare_items, pool, image_size=...)`
  to get the `prepare(modality, indices)` the batch iterators take.
  Cost: one decode + resize per image, one tokenizer call per batch.
  """
  if len(indices) == 0:
    raise ValueError(f"prepare_items got no {modality} indices.")
  items = pool.take(modality, indices)
  if isinstance(items, np.ndarray) and items.dtype.kind == "f":
    return items.astype(np.float32)
  if isinstance(items, tuple) and items and all(isinstance(x, str) for x in items) \
      and modality != "image":
    if tokenizer is None or text_length is None:
      raise ValueError(f"{modality} items are strings: prepare_items needs tokenizer and "
                       "text_length.")
    return tokenize(tokenizer, items, text_length)
  if isinstance(items, ItemRefs):
    images = [decode_image(items.read(i), items[i]) for i in range(len(items))]
  elif isinstance(items, tuple):
    images = [load_image(x) if isinstance(x, (str, os.PathLike)) else np.asarray(x)
              for x in items]
  else:
    images = list(items)
  if image_size is not None:
    images = [resize(x, image_size) for x in images]
  elif len({x.shape for x in images}) > 1:
    raise ValueError(f"{modality} images differ in size; pass image_size.")
  return value_range(np.stack(images))


def _check_batch_size(batch_size: int, mesh) -> None:
  check_int("batch_size", batch_size, 1)
  if mesh is not None and batch_size % mesh.devices.size:
    raise ValueError(f"batch_size {batch_size} is not divisible by the "
                     f"{mesh.devices.size} devices of the mesh.")


def padded_order(num_rows: int, num_devices: int) -> np.ndarray:
  """Row order of a batch of `num_rows` padded to the next multiple of
  `num_devices`: the rows, then copies of the first ones. Rows from
  `num_rows` on are padding, which the losses mask out (`valid`)."""
  padded = -(-num_rows // num_devices) * num_devices
  return np.arange(padded) % num_rows


def _place(batch, mesh):
  if mesh is None:
    return batch
  rows = sharding.row_sharding(mesh)
  if isinstance(batch, dict):
    return {k: sharding.put_global(v, rows) for k, v in batch.items()}
  return sharding.put_global(batch, rows)


def pair_batches(pairs: np.ndarray, batch_size: int, prepare: PrepareFn, *, seed: int,
                 modalities: tuple[str, str] = ("image", "text"), num_epochs: int | None = 1,
                 drop_remainder: bool = True, mesh=None,
                 start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Shuffled training batches over ground-truth / revealed pairs.

  `pairs` is `(P, 2)` int rows `(index in modalities[0], index in modalities[1])`.
  Each epoch e visits every pair once in the order of a permutation drawn with
  `(seed, e)`; batches hold `batch_size` pairs (the last one smaller, or dropped
  with `drop_remainder`). A batch is `{m: prepare(m, idx), m + "_index": idx}`
  for both modalities (the index lets a loss mask repeated items). With `mesh`,
  arrays are global `jax.Array`s split over every device; a batch the device
  count does not divide is padded (`padded_order`) and carries `"valid"`, bool,
  False on the padding, so the batches are the same on any mesh.
  `num_epochs=None` repeats forever. `start_step` skips
  that many batches without preparing them (resuming a preempted run).
  Cost per batch: `prepare` on `batch_size` items of each modality.
  """
  check_int("batch_size", batch_size, 1)
  pairs = as_index_rows("pairs", pairs)
  if len(pairs) == 0:
    raise ValueError("No pairs to make batches of (empty annotated set).")
  if drop_remainder and len(pairs) < batch_size:
    raise ValueError(f"batch_size {batch_size} exceeds the {len(pairs)} pairs and "
                     "drop_remainder=True would yield no batch.")
  if num_epochs is not None:
    check_int("num_epochs", num_epochs, 1)
  check_int("start_step", start_step, 0)
  return _pair_batches(pairs, batch_size, prepare, seed, modalities,
                       num_epochs, drop_remainder, mesh, start_step)


def _pair_batches(pairs, batch_size, prepare, seed, modalities, num_epochs, drop_remainder,
                  mesh, start_step):
  stop = len(pairs) - len(pairs) % batch_size if drop_remainder else len(pairs)
  per_epoch = -(-stop // batch_size)
  epoch = start_step // per_epoch
  skip = start_step % per_epoch
  while num_epochs is None or epoch < num_epochs:
    order = np.random.default_rng([seed, epoch]).permutation(len(pairs))
    for lo in range(skip * batch_size, stop, batch_size):
      rows = pairs[order[lo:lo + batch_size]]
      batch = {}
      if mesh is not None and len(rows) % mesh.devices.size:
        batch["valid"] = np.arange(len(padded_order(
            len(rows), mesh.devices.size))) < len(rows)
        rows = rows[padded_order(len(rows), mesh.devices.size)]
      for col, m in enumerate(modalities):
        batch[m] = prepare(m, rows[:, col])
        batch[m + "_index"] = rows[:, col].astype(np.int32)
      yield _place(batch, mesh)
    epoch, skip = epoch + 1, 0


def bucket_size(num_rows: int, batch_size: int, num_devices: int = 1) -> int:
  """Rows to pad a batch of `num_rows` real rows to.

  The smallest power of two >= `num_rows`, rounded up to a multiple of
  `num_devices`, at most `batch_size` (itself a multiple of `num_devices`).
  A jitted tower compiles once per bucket: at most log2(batch_size) + 1
  shapes, and a small call pads to less than twice its rows instead of to
  `batch_size`.
  """
  check_int("num_rows", num_rows, 1)
  check_int("batch_size", batch_size, 1)
  check_int("num_devices", num_devices, 1)
  if batch_size % num_devices:
    raise ValueError(f"batch_size {batch_size} is not a multiple of the "
                     f"{num_devices} devices.")
  bucket = 1 << (num_rows - 1).bit_length()
  return min(batch_size, -(-bucket // num_devices) * num_devices)


def item_batches(modality: str, indices, batch_size: int, prepare: PrepareFn, *,
                 mesh=None) -> Iterator[tuple[np.ndarray, int]]:
  """Batches for embedding items `indices` of one modality, in order.

  Yields `(inputs, num_valid)`: batches of `batch_size` rows, the last one
  padded (by repeating its last item) to `bucket_size(rows, batch_size,
  devices)` rows, so a jitted tower compiles for a few shapes only and a
  small call is not padded to `batch_size`; only the first `num_valid` rows
  are real. With `mesh`, `inputs` is a global array split over every device.
  Cost per batch: `prepare` on `num_valid` items.
  """
  _check_batch_size(batch_size, mesh)
  indices = np.asarray(indices, np.int64)
  if indices.ndim != 1 or indices.size == 0:
    raise ValueError(f"indices must be a non-empty 1-D array, got shape {indices.shape}.")
  return _item_batches(modality, indices, batch_size, prepare, mesh)


def _item_batches(modality, indices, batch_size, prepare, mesh):
  devices = 1 if mesh is None else mesh.devices.size
  for lo in range(0, len(indices), batch_size):
    chunk = indices[lo:lo + batch_size]
    inputs = prepare(modality, chunk)
    pad = bucket_size(len(chunk), batch_size, devices) - len(chunk)
    if pad:
      inputs = np.concatenate([inputs, np.repeat(inputs[-1:], pad, axis=0)])
    yield _place(inputs, mesh), len(chunk)
