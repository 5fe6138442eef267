"""Pseudo-label accuracy (the paper's Table 4) and the margins of correct and
wrong pseudo-labels (Table 3): each item matched to its most similar item of
the other modality, ties going to the smallest index."""
from __future__ import annotations

import numpy as np

from mmal_jax.data.pool import as_index_rows
from mmal_jax.evaluators import common


def _pseudo_labels(zimg, ztxt, pairs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per direction ("i2t", "t2i"): the items that have a partner, and whether
  each one's arg-max match in the other modality is one of its partners."""
  zimg, ztxt = common.check_embeddings(zimg=zimg, ztxt=ztxt)
  pairs = as_index_rows("pairs", pairs)
  pairs = np.stack([common.check_index("pairs[:, 0]", pairs[:, 0], zimg.shape[0]),
                    common.check_index("pairs[:, 1]", pairs[:, 1], ztxt.shape[0])],
                   axis=1)
  num_txt = ztxt.shape[0]
  codes = pairs[:, 0] * num_txt + pairs[:, 1]
  out = {}
  for name, col, q, keys in (("i2t", 0, zimg, ztxt), ("t2i", 1, ztxt, zimg)):
    items = np.unique(pairs[:, col])
    best = common.blockwise(common.argmax_key, q[items], items, keys,
                            np.zeros(1, np.int64))
    img, txt = (items, best) if col == 0 else (best, items)
    out[name] = (items, np.isin(img * num_txt + txt, codes))
  return out


def pseudo_label_accuracy(zimg, ztxt, pairs) -> dict[str, float]:
  """Accuracy (%) of matching each item to its most similar item of the other modality.

  `pairs` is `(P, 2)` int ground-truth `(image, text)` rows (one-to-many
  allowed). Each image with a partner is matched to its arg-max text, correct
  if that text is one of its partners; likewise each text. Keys: `"i2t"`,
  `"t2i"` and `"mean"` (their average). Cost: O(N_img * N_txt * D), in blocks.
  """
  out = {name: 100.0 * float(np.mean(hits))
         for name, (_, hits) in _pseudo_labels(zimg, ztxt, pairs).items()}
  out["mean"] = (out["i2t"] + out["t2i"]) / 2
  return out


def margin_by_correctness(zimg, ztxt, pairs) -> dict[str, float]:
  """Mean top-1 minus top-2 similarity margin of correctly and of wrongly
  pseudo-labelled items (the paper's Table 3), both directions pooled.

  Keys `"correct"`, `"incorrect"` (NaN when a group is empty). The margins
  are MMAL's Step 3 score (`acquisition.top2_margin`). Cost: as
  `pseudo_label_accuracy`, plus the same again for the margins.
  """
  from mmal_jax.acquisition import top2_margin  # pylint: disable=g-import-not-at-top
  margins, hits = [], []
  for name, (items, hit) in _pseudo_labels(zimg, ztxt, pairs).items():
    queries, keys = (zimg, ztxt) if name == "i2t" else (ztxt, zimg)
    margins.append(np.asarray(top2_margin(np.asarray(queries)[items],
                                          np.asarray(keys))))
    hits.append(hit)
  margins, hits = np.concatenate(margins), np.concatenate(hits)
  mean = lambda x: float(np.mean(x)) if x.size else float("nan")
  return {"correct": mean(margins[hits]), "incorrect": mean(margins[~hits])}
