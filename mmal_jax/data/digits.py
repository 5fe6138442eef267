"""scikit-learn's bundled 8x8 digits as pre-aligned pairs with class labels.

Each image is split down the middle into its left and right 8x4 halves, two
modalities of the same digit: `"left"` and `"right"`, float32 `(N, 32)`
rows in [0, 1], pair i = image i, label = its digit (10 classes). The data
ship with scikit-learn (`sklearn.datasets.load_digits`: 1797 images), so
nothing is downloaded.
"""
from __future__ import annotations

import numpy as np
from sklearn import datasets

from mmal_jax.data.pool import UnalignedPool

MODALITIES = ("left", "right")
NUM_CLASSES = 10


def load_digits_pairs() -> tuple[UnalignedPool, np.ndarray]:
  """All 1797 digits as `(pool, labels)`.

  `pool` has modalities `"left"`, `"right"` (item i of each = the halves of
  image i, linked one-to-one); `labels` is int64 `(N,)` in [0, 10).
  Cost: reading scikit-learn's bundled file (about 1 MB).
  """
  digits = datasets.load_digits()
  images = (digits.images / 16.).astype(np.float32)       # (N, 8, 8)
  halves = {"left": images[:, :, :4], "right": images[:, :, 4:]}
  index = np.arange(len(images))
  pool = UnalignedPool(
      items={m: h.reshape(len(images), -1) for m, h in halves.items()},
      links={MODALITIES: np.stack([index, index], axis=1)})
  return pool, digits.target.astype(np.int64)
