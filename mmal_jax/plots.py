"""Pictures of what strategies bought (paper 1, Fig. 4 left).

`embedding_plot` draws a 2-D t-SNE of one modality's embeddings with the
items each strategy bought highlighted, one marker per strategy.
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

from mmal_jax import fs

_MARKERS = ("*", "o", "^", "s", "D", "v", "P", "X")


def embedding_plot(z, picked: Mapping[str, Sequence[int]], path: str, *,
                   labels=None, seed: int = 0, title: str = "",
                   max_points: int = 3000) -> None:
  """Writes a PNG: t-SNE of `z` with each strategy's items highlighted.

  Args:
    z: `(N, D)` embeddings of one modality.
    picked: strategy -> indices of the items it bought (rows of z).
    path: the PNG to write (through `fs`, so gs:// works).
    labels: optional `(N,)` ints colouring the background points.
    seed: t-SNE's seed; title: the figure title.
    max_points: background points kept (a seeded sample; picked items are
      always kept), bounding t-SNE's O(n^2)-ish cost.

  Raises ValueError for indices outside [0, N) or a non-2-D z.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top

  z = np.asarray(z, np.float32)
  if z.ndim != 2 or len(z) < 3:
    raise ValueError(f"z must be (N >= 3, D), got shape {z.shape}.")
  n = len(z)
  chosen = {s: np.asarray(i, np.int64).reshape(-1) for s, i in picked.items()}
  for s, idx in chosen.items():
    if idx.size and (idx.min() < 0 or idx.max() >= n):
      raise ValueError(f"picked[{s!r}] has indices outside [0, {n}).")
  keep = np.zeros(n, bool)
  keep[np.random.default_rng(seed).permutation(n)[:max_points]] = True
  for idx in chosen.values():
    keep[idx] = True
  rows = np.flatnonzero(keep)
  position = np.full(n, -1)
  position[rows] = np.arange(len(rows))
  xy = TSNE(2, perplexity=min(30., (len(rows) - 1) / 3), init="pca",
            random_state=seed).fit_transform(z[rows])

  fig, ax = plt.subplots(figsize=(6.4, 5.6))
  ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.35,
             c=None if labels is None else np.asarray(labels)[rows],
             cmap="tab10" if labels is not None else None,
             color="0.6" if labels is None else None, linewidths=0)
  for k, (strategy, idx) in enumerate(sorted(chosen.items())):
    p = xy[position[idx]]
    ax.scatter(p[:, 0], p[:, 1], s=40, marker=_MARKERS[k % len(_MARKERS)],
               facecolors="none" if k % 2 else None,
               edgecolors=f"C{k}", color=f"C{k}", linewidths=1.2,
               label=f"{strategy} ({len(idx)})")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title)
  if chosen:
    ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  fs.write_bytes(path, buffer.getvalue())
