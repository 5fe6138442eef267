"""Pictures of a run beside its AL curves (`report.write`, `mmcsal`).

`embedding_plot` draws a 2-D t-SNE of one modality's embeddings with the
items each strategy bought highlighted, one marker per strategy (paper 1,
Fig. 4 left). `modality_figure` (which modality each strategy queried per
round), `seconds_figure` (acquisition and training seconds per round) and
`stage1_loss_figure` (MMCSAL's Stage-1 loss per step) return matplotlib
Figures drawn from metrics rows / loss arrays; `save_png` writes one.
"""
from __future__ import annotations

import collections
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
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top

  plt = _pyplot()

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
  save_png(fig, path)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_png(fig, path: str) -> None:
  """Writes `fig` as a PNG to `path` (through `fs`: atomic, gs:// too) and
  closes it."""
  plt = _pyplot()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  fs.write_bytes(path, buffer.getvalue())


def modality_queries(rows: Sequence[dict]) -> dict[str, dict]:
  """strategy -> {"round": (R,), modality: (R,) ...}: the queries of each
  modality bought in each round (>= 1), mean over the seeds with that round
  (from the rows' `modality_counts`). Cost: O(rows)."""
  counts = collections.defaultdict(list)
  for r in rows:
    if r["round"] > 0 and r.get("modality_counts"):
      counts[(r["strategy"], r["round"])].append(r["modality_counts"])
  modalities = sorted({m for c in counts.values() for d in c for m in d})
  out = {}
  for strategy in sorted({s for s, _ in counts}):
    rounds = sorted(t for s, t in counts if s == strategy)
    out[strategy] = {"round": np.asarray(rounds), **{
        m: np.asarray([np.mean([d.get(m, 0) for d in counts[(strategy, t)]])
                       for t in rounds]) for m in modalities}}
  return out


def modality_figure(rows: Sequence[dict]):
  """A panel per strategy: per round, a bar of the queries it bought,
  stacked by modality (mean over seeds, `modality_queries`)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  data = modality_queries(rows)
  cols = max(1, min(3, len(data)))
  nrows = max(1, -(-len(data) // cols))
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows + 0.6),
                           squeeze=False, sharey=True, layout="constrained")
  handles = {}
  for ax, (strategy, d) in zip(axes.flat, sorted(data.items())):
    bottom = np.zeros(len(d["round"]))
    for k, m in enumerate(sorted(set(d) - {"round"})):
      bars = ax.bar(d["round"], d[m], bottom=bottom, color=f"C{k}", label=m)
      handles.setdefault(m, bars)
      bottom = bottom + d[m]
    ax.set_title(strategy)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel("queries (mean over seeds)")
  for ax in list(axes.flat)[len(data):]:
    ax.axis("off")
  if handles:
    fig.legend(handles.values(), handles.keys(), loc="outside lower center",
               ncol=len(handles), frameon=False, title="modality queried")
  return fig


SECONDS_KEYS = {"acquire_s": "acquisition seconds",
                "train_s": "training seconds"}


def seconds_per_round(rows: Sequence[dict], key: str) -> dict[str, dict]:
  """strategy -> {"round": (R,), "mean": (R,)}: `key` (a seconds column)
  per round, mean over the seeds that timed it. Cost: O(rows)."""
  values = collections.defaultdict(list)
  for r in rows:
    if r.get(key) is not None:
      values[(r["strategy"], r["round"])].append(r[key])
  out = {}
  for strategy in sorted({s for s, _ in values}):
    rounds = sorted(t for s, t in values if s == strategy)
    out[strategy] = {"round": np.asarray(rounds), "mean": np.asarray(
        [np.mean(values[(strategy, t)]) for t in rounds])}
  return out


def seconds_figure(rows: Sequence[dict]):
  """Two panels, acquisition and training seconds per round, a line per
  strategy (mean over seeds; a resumed round may be untimed)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(SECONDS_KEYS), figsize=(9.2, 3.8),
                           layout="constrained")
  for ax, (key, title) in zip(axes, SECONDS_KEYS.items()):
    for k, (strategy, d) in enumerate(sorted(
        seconds_per_round(rows, key).items())):
      ax.plot(d["round"], d["mean"], marker="o", ms=3, color=f"C{k}",
              label=strategy)
    ax.set_title(title + " per round")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel("seconds (mean over seeds)")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.suptitle("The first timed round includes compilation",
               fontsize="medium")
  return fig


def stage1_loss_figure(losses: Mapping[str, np.ndarray]):
  """One panel: a line per Stage-1 run (label -> `(steps,)` loss per
  training step)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
  for k, (label, loss) in enumerate(sorted(losses.items())):
    loss = np.asarray(loss, np.float64)
    ax.plot(np.arange(1, len(loss) + 1), loss, color=f"C{k}", label=label,
            lw=1)
  ax.set_xlabel("Stage-1 step")
  ax.set_ylabel("training loss")
  ax.set_title("MMCSAL Stage 1 (MMSSL) loss per step")
  ax.grid(alpha=0.3)
  if losses:
    ax.legend(fontsize=8)
  return fig
