"""The pool's items as the annotation page shows them; never a model.

`load_pool(workdir)` rebuilds the run's pool from `WORKDIR/config.json`
(`sources.build` on its data section, as the run does), so the page shows
exactly the items the queries' indices name. `Items` turns `(modality,
index)` into what a browser can show: a caption (plain text, escaped by the
page), or image bytes: the file's own bytes for JPEG / PNG / GIF / WebP
(`FileRefs`, `RangeRefs`, `BytesRefs`, image paths), anything else (in-memory
pixels such as the generated `shapes` source, other encodings) encoded to
PNG here. Feature rows have no picture: they are shown as their row number.
"""
from __future__ import annotations

import functools
import io
import json
import os

import ml_collections
import numpy as np

from mmal_jax import fs
from mmal_jax.data import pool as pool_lib
from mmal_jax.data import sources

_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json as a ConfigDict. Raises ValueError naming it."""
  path = os.path.join(workdir, "config.json")
  if not fs.exists(path):
    raise ValueError(f"{path} not found: --workdir must be the workdir of a "
                     f"run (python -m mmal_jax.main ... --workdir W).")
  try:
    return ml_collections.ConfigDict(json.loads(fs.read_text(path)))
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ValueError(f"{path} cannot be read ({e}).") from None


def load_pool(config: ml_collections.ConfigDict) -> pool_lib.UnalignedPool:
  """The run's pool, rebuilt from its config (no model is loaded).
  Raises ValueError naming the data that cannot be read."""
  try:
    data = sources.build(config.data)
  except (OSError, ValueError) as e:
    raise ValueError(f"The run's data cannot be loaded: {e}") from None
  if data.pool is None:  # A stream: the loop's pool is its first buffers.
    from mmal_jax import loop  # pylint: disable=g-import-not-at-top
    data = loop._with_pool(data, config)  # pylint: disable=protected-access
  return data.pool


class Items:
  """What the page shows of each pool item.

  `kind(m)` is "image", "text" or "vector" (feature rows); `text(m, i)` a
  caption, `image(m, i)` `(bytes, media type)`.
  """

  def __init__(self, pool: pool_lib.UnalignedPool):
    self.pool = pool
    self.kinds = {}
    for m in pool.modalities:
      items = pool.items[m]
      if isinstance(items, np.ndarray) and items.ndim == 2:
        self.kinds[m] = "vector"
      elif isinstance(items, tuple) and isinstance(items[0], str):
        # Strings are image paths in an image modality, else captions.
        self.kinds[m] = "image" if m == "image" else "text"
      elif isinstance(items, pool_lib.ItemRefs) and m == "text":
        self.kinds[m] = "text"
      else:
        self.kinds[m] = "image"
    self._lower = {}

  def kind(self, modality: str) -> str:
    return self.kinds[modality]

  def has(self, modality, index) -> bool:
    """True for a modality of the pool and an int index in its range."""
    return (isinstance(modality, str) and modality in self.kinds and
            isinstance(index, int) and not isinstance(index, bool) and
            0 <= index < self.pool.num_items(modality))

  def text(self, modality: str, index: int) -> str:
    """The caption of a text item (a vector's row number for features)."""
    if self.kinds[modality] == "vector":
      return f"{modality} feature row {index}"
    item = self.pool.items[modality][index]
    if isinstance(self.pool.items[modality], pool_lib.ItemRefs):
      item = self.pool.items[modality].read(index).decode("utf-8", "replace")
    return str(item)

  def describe(self, modality: str, index: int) -> dict:
    """JSON-able `{"modality", "index", "kind", "text"}` (text: captions and
    vectors only; images are fetched from `/item/<modality>/<index>`)."""
    kind = self.kinds[modality]
    return {"modality": modality, "index": int(index), "kind": kind,
            "text": None if kind == "image" else self.text(modality, index)}

  @functools.lru_cache(maxsize=4096)
  def image(self, modality: str, index: int) -> tuple[bytes, str]:
    """`(bytes, media type)` of an image item. Raises ValueError for data
    that is not an image a browser shows (it is never served as is)."""
    items = self.pool.items[modality]
    if isinstance(items, pool_lib.ItemRefs):
      data = items.read(index)
    elif isinstance(items[index], str):
      data = fs.read_bytes(items[index])
    elif isinstance(items[index], bytes):
      data = items[index]
    else:
      return _png(np.asarray(items[index])), "image/png"
    for magic, media_type in _MAGIC:
      if data.startswith(magic):
        return data, media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
      return data, "image/webp"
    from PIL import Image  # pylint: disable=g-import-not-at-top
    try:
      with Image.open(io.BytesIO(data)) as im:
        return _png(np.asarray(im.convert("RGB"))), "image/png"
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{modality} item {index} is not an image ({e}).") from e

  def search(self, modality: str, query: str) -> list[int]:
    """Indices of the text items whose caption holds every word of `query`
    (case-insensitive), in pool order. Cost: one pass over the captions
    (lower-cased once)."""
    if modality not in self._lower:
      self._lower[modality] = [
          self.text(modality, i).lower()
          for i in range(self.pool.num_items(modality))]
    words = query.lower().split()
    return [i for i, caption in enumerate(self._lower[modality])
            if all(w in caption for w in words)]


def _png(pixels: np.ndarray) -> bytes:
  """uint8 (or float in [0, 1] / [0, 255]) `(H, W[, C])` pixels as a PNG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if pixels.dtype != np.uint8:
    pixels = pixels.astype(np.float32)
    if pixels.size and pixels.max() <= 1.0:
      pixels = pixels * 255.0
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()
