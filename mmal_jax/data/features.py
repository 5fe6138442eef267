"""Precomputed features (one file per modality) plus a pairing file, as an UnalignedPool.

Feature files: `.npy` holding a float `(N, D)` array (row i = item i), or
`.npz` holding exactly one array (or one named `features`). Image and text
dimensions may differ. Values must be finite.

Pairing file: the ground-truth pairs, one `(image_idx, text_idx)` per row,
either `.npy` with an int `(P, 2)` array or `.csv` with the header line
`image,text` followed by one `i,j` line per pair. Items in no row have no
partner; a pair may not repeat.
"""
from __future__ import annotations

import os

import numpy as np

from mmal_jax.data.pool import UnalignedPool, as_index_rows


def _load_array(path: str, what: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} file not found: {path}")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".npy", ".npz"):
    raise ValueError(f"{what} file {path} must be .npy or .npz, not {ext or 'extensionless'}.")
  try:
    loaded = np.load(path, allow_pickle=False)
    if ext == ".npy":
      return loaded
    with loaded:
      arrays = {name: loaded[name] for name in loaded.files}
  except (OSError, EOFError, ValueError) as e:
    raise ValueError(f"Cannot read {what} file {path}: {e}") from e
  if "features" in arrays:
    return arrays["features"]
  if len(arrays) != 1:
    raise ValueError(f"{what} file {path} holds arrays {list(arrays)}; it needs exactly one, "
                     "or one named 'features'.")
  return next(iter(arrays.values()))


def _load_features(path: str, modality: str) -> np.ndarray:
  x = _load_array(path, f"{modality} features")
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{modality} features in {path} must be a non-empty (N, D) array, "
                     f"got shape {x.shape}.")
  if x.dtype.kind != "f":
    raise ValueError(f"{modality} features in {path} must be floating point, got {x.dtype}.")
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    raise ValueError(f"{modality} features in {path} have NaN/inf in {int(bad.sum())} rows, "
                     f"first row {int(np.argmax(bad))}.")
  return x.astype(np.float32)


def _load_pairs(path: str) -> np.ndarray:
  if path.lower().endswith(".csv"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"pairs file not found: {path}")
    with open(path) as f:
      lines = f.read().splitlines()
    if not lines or lines[0].replace(" ", "") != "image,text":
      raise ValueError(f"{path}:1: a pairs CSV must start with the header 'image,text'.")
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
      if not line.strip():
        continue
      fields = line.split(",")
      try:
        if len(fields) != 2:
          raise ValueError
        rows.append((int(fields[0]), int(fields[1])))
      except ValueError:
        raise ValueError(f"{path}:{lineno}: expected 'image_idx,text_idx', got {line!r}.") \
          from None
    return np.array(rows, np.int64).reshape(-1, 2)
  return as_index_rows(f"pairs in {path}", _load_array(path, "pairs"))


def load_features(image_path: str | os.PathLike, text_path: str | os.PathLike,
                  pairs_path: str | os.PathLike) -> UnalignedPool:
  """Loads feature rows of both modalities and their pairing as an UnalignedPool.

  Items: `"image"` float32 `(N_img, D_img)`, `"text"` float32 `(N_txt, D_txt)`.
  Raises FileNotFoundError / ValueError naming the file for a missing or
  unreadable file, a wrong shape or dtype, NaN/inf rows, and pair indices out
  of range or repeated. Cost: one read of each file, O(P log P) for the pairs.
  """
  image_path, text_path, pairs_path = map(os.fspath, (image_path, text_path, pairs_path))
  images = _load_features(image_path, "image")
  texts = _load_features(text_path, "text")
  pairs = _load_pairs(pairs_path)
  try:
    return UnalignedPool(items={"image": images, "text": texts},
                         links={("image", "text"): pairs})
  except ValueError as e:
    raise ValueError(f"{pairs_path}: {e}") from e
