"""Precomputed features (one file per modality) plus a pairing file, as an UnalignedPool.

Feature files: `.npy` holding a float `(N, D)` array (row i = item i), or
`.npz` holding exactly one array (or one named `features`). Image and text
dimensions may differ. Values must be finite.

Pairing file: the ground-truth pairs, one `(image_idx, text_idx)` per row,
either `.npy` with an int `(P, 2)` array or `.csv` with the header line
`image,text` followed by one `i,j` line per pair. Items in no row have no
partner; a pair may not repeat.

Held-out split (optional, `load_eval_pairs`): which rows of the pairing file
belong to the dataset's own evaluation split, as `.npy` (a bool `(P,)` flag
per row, or int row indices) or `.txt` (one row index per line).

Every file may be local or `gs://` (read through `mmal_jax.fs`).
"""
from __future__ import annotations

import io
import os

import numpy as np

from mmal_jax import fs
from mmal_jax.data.pool import UnalignedPool, as_index_rows


def _load_array(path: str, what: str) -> np.ndarray:
  if not fs.isfile(path):
    raise FileNotFoundError(f"{what} file not found: {path}")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".npy", ".npz"):
    raise ValueError(f"{what} file {path} must be .npy or .npz, not {ext or 'extensionless'}.")
  try:
    loaded = np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False)
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
  # Checked after the cast: values beyond float32's range (1e39) become inf.
  with np.errstate(over="ignore"):
    x = x.astype(np.float32)
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    raise ValueError(f"{modality} features in {path} have NaN/inf (as float32) in "
                     f"{int(bad.sum())} rows, first row {int(np.argmax(bad))}: fix "
                     "those rows of the file.")
  return x


def load_pairs(path: str | os.PathLike) -> np.ndarray:
  """The pairing file's rows, in file order, as int64 `(P, 2)`."""
  path = os.fspath(path)
  if path.lower().endswith(".csv"):
    if not fs.isfile(path):
      raise FileNotFoundError(f"pairs file not found: {path}")
    lines = fs.read_text(path).splitlines()
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
  pairs = load_pairs(pairs_path)
  try:
    return UnalignedPool(items={"image": images, "text": texts},
                         links={("image", "text"): pairs})
  except ValueError as e:
    raise ValueError(f"{pairs_path}: {e}") from e


def load_eval_pairs(path: str | os.PathLike, num_pairs: int, *,
                    what: str = "eval pairs",
                    rows_of: str = "the pairs file") -> np.ndarray:
  """Bool `(num_pairs,)`: the pairing-file rows in the held-out split (or
  another selection of rows of `rows_of`, named `what` in errors, e.g. the
  pre-training pairs).

  `.npy`: a bool flag per row or int row indices; `.txt`: one row index per
  line. Raises FileNotFoundError / ValueError naming the file for a missing
  file, a wrong length or dtype, or indices outside [0, num_pairs).
  """
  path = os.fspath(path)
  if path.lower().endswith(".txt"):
    if not fs.isfile(path):
      raise FileNotFoundError(f"{what} file not found: {path}")
    rows = []
    for lineno, line in enumerate(fs.read_text(path).splitlines(), 1):
      if line.strip():
        try:
          rows.append(int(line))
        except ValueError:
          raise ValueError(f"{path}:{lineno}: expected a pair row index, got "
                           f"{line!r}.") from None
    value = np.array(rows, np.int64)
  else:
    value = _load_array(path, what)
  if value.dtype == bool:
    if value.shape != (num_pairs,):
      raise ValueError(f"{what} flags in {path} have shape {value.shape}; "
                       f"{rows_of} has {num_pairs} rows.")
    return value
  if value.ndim != 1 or (value.size and value.dtype.kind not in "iu"):
    raise ValueError(f"{what} in {path} must be bool flags or int row "
                     f"indices, got {value.dtype} {value.shape}.")
  if value.size and (value.min() < 0 or value.max() >= num_pairs):
    raise ValueError(f"{what} in {path} hold row indices outside "
                     f"[0, {num_pairs}).")
  flags = np.zeros(num_pairs, bool)
  flags[value] = True
  return flags


def split_by_pairs(pool: UnalignedPool, pairs: np.ndarray, held_out: np.ndarray
                   ) -> tuple[UnalignedPool, UnalignedPool]:
  """(train pool, eval pool): the items of the `held_out` rows of `pairs`
  (`(P, 2)` image, text) form the eval pool, every other item the train pool.

  A train pair sharing an item with a held-out pair loses that link. Raises
  ValueError when either side would hold no pair. Cost: O(N + P).
  """
  if not held_out.any() or held_out.all():
    raise ValueError(f"The held-out split takes {int(held_out.sum())} of the "
                     f"{len(pairs)} pairs; both sides need at least one.")
  in_eval = {m: np.zeros(pool.num_items(m), bool) for m in pool.modalities}
  in_eval["image"][pairs[held_out, 0]] = True
  in_eval["text"][pairs[held_out, 1]] = True
  return (pool.subset({m: ~k for m, k in in_eval.items()}),
          pool.subset(in_eval))
