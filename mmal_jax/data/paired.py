"""Pre-aligned pairs with class labels: the cold-start experiment's data.

MMCSAL (`mmcsal`) buys labels, not pairings: its pool is N pairs (item i of
each modality = pair i) with a class label each, and a held-out test set of
the same kind. `problems(config.data)` lists every problem of a data config
(unknown source, missing field or file) without loading anything, so a run
stops before any work; `build(config.data)` then loads it.

Sources (`config.data.source`) and their fields:
  digits    sklearn's 8x8 digits, each image's left and right halves as the
            two modalities (`data.digits`), label = the digit.
  shapes    generated ColorSwap-like scenes (image, caption): num_groups,
            image_size, noise_std, seed; label = the first object's shape or
            colour (`label`).
  features  one `.npy` (N, F_m) float array per modality (row i = pair i)
            and int labels (N,): modalities, train_features, train_labels;
            test_features / test_labels, or else a seeded `test_fraction`
            held out.
Paths may be local or `gs://` (`mmal_jax.fs`).
"""
from __future__ import annotations

import dataclasses
import io

import ml_collections
import numpy as np

from mmal_jax import fs
from mmal_jax.data import digits
from mmal_jax.data import shapes
from mmal_jax.data.pool import UnalignedPool
from mmal_jax.errors import ConfigError

SOURCES = ("digits", "shapes", "features")


@dataclasses.dataclass(frozen=True)
class PairedData:
  """Two modalities of N pairs (item i of each = pair i) and labels, plus a
  held-out test set of the same kind."""
  pool: UnalignedPool
  labels: np.ndarray
  test: UnalignedPool
  test_labels: np.ndarray
  num_classes: int

  @property
  def modalities(self) -> tuple[str, ...]:
    return self.pool.modalities

  @property
  def size(self) -> int:
    return self.pool.num_items(self.modalities[0])


def split_pairs(pool: UnalignedPool, labels: np.ndarray, test_fraction: float,
                seed: int) -> tuple[UnalignedPool, np.ndarray, UnalignedPool,
                                    np.ndarray]:
  """A seeded `test_fraction` of the pairs held out: (pool, labels, test,
  test labels), pairs keeping their order. Cost: O(N)."""
  n = len(labels)
  test = np.zeros(n, bool)
  test[np.random.default_rng(seed).permutation(n)[
      :int(round(test_fraction * n))]] = True
  if test.all() or not test.any():
    raise ConfigError(f"config.data.test_fraction={test_fraction} leaves no "
                      f"pairs on one side of the split of {n}.")
  keep = lambda mask: pool.subset({m: mask for m in pool.modalities})
  return keep(~test), labels[~test], keep(test), labels[test]


def _files(data: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(what, path) of every file a features config reads."""
  out = [(f"{m} features", p) for m, p in zip(data.modalities,
                                              data.train_features)]
  out.append(("labels", data.train_labels))
  if _has_test_files(data):
    out += [(f"{m} test features", p) for m, p in zip(data.modalities,
                                                      data.test_features)]
    out.append(("test labels", data.test_labels))
  return out


def _has_test_files(data) -> bool:
  return bool(all(data.test_features) and data.test_labels)


def problems(data: ml_collections.ConfigDict) -> list[str]:
  """Every problem of a data config that shows without loading it: the
  source, the fields a features config needs, each missing file, the
  held-out fraction. One sentence each, naming the field or file. Cost:
  one existence check per file."""
  if data.source not in SOURCES:
    return [f"config.data.source={data.source!r} is not one of "
            f"{list(SOURCES)}."]
  found = []
  if not _has_test_files(data) and not 0 < data.test_fraction < 1:
    found.append("config.data.test_fraction must be in (0, 1).")
  if data.source != "features":
    return found
  if len(data.modalities) != 2 or len(data.train_features) != 2 or not all(
      data.train_features) or not data.train_labels:
    return found + [
        "config.data.source='features' needs config.data.modalities (two "
        "names), train_features (one .npy per modality) and train_labels."]
  for what, path in _files(data):
    if not fs.exists(path):
      found.append(f"{what} file not found: {path}; fix config.data's path.")
  return found


def _load_npy(path: str, what: str) -> np.ndarray:
  try:
    return np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ConfigError(f"Cannot read {what} file {path}: {e}") from None


def _feature_pairs(modalities, paths, labels_path) -> tuple[UnalignedPool,
                                                            np.ndarray]:
  features = {}
  for m, path in zip(modalities, paths):
    x = _load_npy(path, f"{m} features")
    if x.ndim != 2 or x.dtype.kind != "f" or not np.isfinite(x).all():
      raise ConfigError(f"{path} must hold a finite float (N, F) array, got "
                        f"{x.dtype} {x.shape}.")
    features[m] = x.astype(np.float32)
  labels = _load_npy(labels_path, "labels")
  sizes = {len(x) for x in features.values()} | {len(labels)}
  if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(sizes) != 1:
    raise ConfigError(f"{labels_path} must hold int labels (N,) for the N "
                      f"rows of every feature file; sizes {sorted(sizes)}.")
  index = np.arange(len(labels))
  return (UnalignedPool(items=features, links={
      tuple(modalities): np.stack([index, index], axis=1)}),
          labels.astype(np.int64))


def build(data: ml_collections.ConfigDict) -> PairedData:
  """The pairs `config.data` describes (see the module docstring).

  Raises ConfigError naming the field or file (`problems` first, then what
  only loading shows: a file's contents). Cost: loading the source.
  """
  found = problems(data)
  if found:
    raise ConfigError(" ".join(found))
  if data.source == "features":
    pool, labels = _feature_pairs(data.modalities, data.train_features,
                                  data.train_labels)
    if _has_test_files(data):
      test, test_labels = _feature_pairs(data.modalities, data.test_features,
                                         data.test_labels)
    else:
      pool, labels, test, test_labels = split_pairs(
          pool, labels, data.test_fraction, data.seed)
  else:
    if data.source == "digits":
      pool, labels = digits.load_digits_pairs()
    else:
      pool = shapes.make_colorswap(data.num_groups, data.image_size,
                                   data.seed, noise_std=data.noise_std)
      labels = shapes.class_labels(pool.items["text"], by=data.label)
    pool, labels, test, test_labels = split_pairs(pool, labels,
                                                  data.test_fraction,
                                                  data.seed)
  num_classes = int(max(labels.max(), test_labels.max())) + 1
  return PairedData(pool, labels, test, test_labels, num_classes)
