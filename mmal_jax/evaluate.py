"""Downstream metrics on L2-normalised embeddings (numpy or jax arrays).

`zimg` is `(N_img, D)`, `ztxt` is `(N_txt, D)`, rows of unit norm (checked to
1e-3); similarity is the dot product. All scores are percentages in [0, 100].
Where a full similarity matrix would appear it is computed in blocks of query
rows (about 2^24 similarities at a time), so memory stays
O(block * N_keys) for e.g. COCO-5k's 5k x 25k.

Ties: retrieval and the group scores count a tie against the model (a hit
needs the correct candidate strictly ahead of every wrong one);
`pseudo_label_accuracy` takes the arg-max, ties going to the smallest index.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from mmal_jax.data.pool import as_index_rows
from mmal_jax.data.pool import group_layout

_HIGHEST = jax.lax.Precision.HIGHEST
_BLOCK_ELEMENTS = 1 << 24


def _check_embeddings(**named) -> list[np.ndarray]:
  """The named embeddings as float32 host arrays, after checking shape, dtype, NaN, norm."""
  out = []
  for name, z in named.items():
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[0] == 0:
      raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {z.shape}.")
    if z.dtype.kind != "f":
      raise ValueError(f"{name} must be floating point, got {z.dtype}.")
    z = z.astype(np.float32)
    if not np.isfinite(z).all():
      raise ValueError(f"{name} holds NaN or inf.")
    worst = float(np.max(np.abs(np.linalg.norm(z, axis=1) - 1.0)))
    if worst > 1e-3:
      raise ValueError(f"{name} rows must be L2-normalised; max |norm - 1| = {worst:.3g}.")
    out.append(z)
  if len({z.shape[1] for z in out}) > 1:
    raise ValueError(f"Embedding dimensions differ: {[z.shape for z in out]}.")
  return out


def _check_index(name: str, index, size: int, allow_missing: bool = False) -> np.ndarray:
  """`index` as int64 after checking it is an int array with values in [0, size)
  (or -1 = missing, with `allow_missing`)."""
  index = np.asarray(index)
  if index.size == 0 or index.dtype.kind not in "iu":
    raise ValueError(f"{name} must be a non-empty int array, got {index.dtype} {index.shape}.")
  low = -1 if allow_missing else 0
  if index.min() < low or index.max() >= size:
    raise ValueError(f"{name} holds indices outside [{low}, {size}).")
  return index.astype(np.int64)


def _blockwise(fn, queries: np.ndarray, query_labels: np.ndarray, keys: np.ndarray,
               key_labels: np.ndarray) -> np.ndarray:
  """Applies a jitted `fn(q_block, q_labels, keys, key_labels) -> (B,)` over query blocks.

  Blocks have a fixed number of rows (the last is padded with label -2) so
  `fn` compiles once per (block, keys) shape.
  """
  n = queries.shape[0]
  block = int(max(1, min(n, _BLOCK_ELEMENTS // max(1, keys.shape[0]))))
  pad = -n % block
  queries = np.pad(queries, ((0, pad), (0, 0)))
  query_labels = np.pad(query_labels, (0, pad), constant_values=-2)
  keys, key_labels = jnp.asarray(keys), jnp.asarray(key_labels)
  out = [np.asarray(fn(queries[lo:lo + block], query_labels[lo:lo + block], keys, key_labels))
         for lo in range(0, n + pad, block)]
  return np.concatenate(out)[:n]


@jax.jit
def _rank_of_best_positive(q, q_labels, keys, key_labels):
  """Per query row: number of non-positive keys scoring >= its best positive key."""
  s = jnp.dot(q, keys.T, precision=_HIGHEST)
  positive = q_labels[:, None] == key_labels[None, :]
  best = jnp.max(jnp.where(positive, s, -jnp.inf), axis=1, keepdims=True)
  return jnp.sum(~positive & (s >= best), axis=1)


@jax.jit
def _argmax_key(q, q_labels, keys, key_labels):
  del q_labels, key_labels
  return jnp.argmax(jnp.dot(q, keys.T, precision=_HIGHEST), axis=1)


def retrieval_recall(zimg, ztxt, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
  """Recall@k of image->text and text->image retrieval, in %.

  `text_to_image` is `(N_txt,)` int: the image of each caption (-1: none).
  i2t: an image is a hit at k if any of its captions is among its k most
  similar texts; t2i: a caption is a hit if its image is among its k most
  similar images. Images without captions and captions without an image are
  left out of their direction's mean. Keys: `"i2t_r@k"`, `"t2i_r@k"`.
  Cost: two passes of O(N_img * N_txt * D), in blocks.
  """
  zimg, ztxt = _check_embeddings(zimg=zimg, ztxt=ztxt)
  text_to_image = _check_index("text_to_image", text_to_image, zimg.shape[0],
                               allow_missing=True)
  if text_to_image.shape != (ztxt.shape[0],):
    raise ValueError(f"text_to_image has shape {text_to_image.shape}, expected "
                     f"({ztxt.shape[0]},).")
  if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
    raise ValueError(f"ks must be positive ints, got {ks!r}.")
  image_ids = np.arange(zimg.shape[0])
  has_text = np.isin(image_ids, text_to_image)
  has_image = text_to_image >= 0
  if not has_text.any():
    raise ValueError("No caption has an image: retrieval is undefined.")
  i2t = _blockwise(_rank_of_best_positive, zimg, image_ids, ztxt, text_to_image)[has_text]
  t2i = _blockwise(_rank_of_best_positive, ztxt, text_to_image, zimg, image_ids)[has_image]
  out = {}
  for name, ranks in (("i2t", i2t), ("t2i", t2i)):
    for k in ks:
      out[f"{name}_r@{k}"] = 100.0 * float(np.mean(ranks < k))
  return out


def _pseudo_labels(zimg, ztxt, pairs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per direction ("i2t", "t2i"): the items that have a partner, and whether
  each one's arg-max match in the other modality is one of its partners."""
  zimg, ztxt = _check_embeddings(zimg=zimg, ztxt=ztxt)
  pairs = as_index_rows("pairs", pairs)
  pairs = np.stack([_check_index("pairs[:, 0]", pairs[:, 0], zimg.shape[0]),
                    _check_index("pairs[:, 1]", pairs[:, 1], ztxt.shape[0])], axis=1)
  num_txt = ztxt.shape[0]
  codes = pairs[:, 0] * num_txt + pairs[:, 1]
  out = {}
  for name, col, q, keys in (("i2t", 0, zimg, ztxt), ("t2i", 1, ztxt, zimg)):
    items = np.unique(pairs[:, col])
    best = _blockwise(_argmax_key, q[items], items, keys, np.zeros(1, np.int64))
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


def _group_similarities(zimg, ztxt, image_index, text_index):
  """`(G, k, k)` similarities s[g, i, j] = <image i of g, text j of g>."""
  zimg, ztxt = _check_embeddings(zimg=zimg, ztxt=ztxt)
  if image_index is None and text_index is None:
    if zimg.shape[0] != ztxt.shape[0] or zimg.shape[0] % 2:
      raise ValueError("Without index arrays, zimg and ztxt must hold the same even number "
                       "of rows (groups of 2 consecutive rows).")
    image_index = text_index = np.arange(zimg.shape[0]).reshape(-1, 2)
  image_index = _check_index("image_index", image_index, zimg.shape[0])
  text_index = _check_index("text_index", text_index, ztxt.shape[0])
  if image_index.ndim != 2 or image_index.shape != text_index.shape:
    raise ValueError(f"image_index and text_index must be (G, k) arrays of one shape, got "
                     f"{image_index.shape} and {text_index.shape}.")
  return _einsum_groups(zimg[image_index], ztxt[text_index])


@jax.jit
def _einsum_groups(images, texts):
  return jnp.einsum("gid,gjd->gij", images, texts, precision=_HIGHEST)


def colorswap_scores(zimg, ztxt, image_index=None, text_index=None) -> dict[str, float]:
  """ColorSwap text / image / group scores (%), over groups of 2 images + 2 captions.

  `image_index`, `text_index`: `(G, 2)` int, caption `text_index[g, k]` matches
  image `image_index[g, k]` (e.g. from `data.pool.group_layout`); omitted, rows
  2g and 2g+1 form group g in both. Text score: both images are more similar
  to their own caption than to the other; image score: both captions are more
  similar to their own image than to the other; group: both. Cost: O(G * D).
  """
  s = np.asarray(_group_similarities(zimg, ztxt, image_index, text_index))
  if s.shape[1] != 2:
    raise ValueError(f"ColorSwap groups hold 2 images and 2 captions, got {s.shape[1]}.")
  text = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
  image = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
  return {"text": 100.0 * float(text.mean()), "image": 100.0 * float(image.mean()),
          "group": 100.0 * float((text & image).mean())}


def groupmatch_score(zimg, ztxt, image_index=None, text_index=None) -> float:
  """GroupMatch score (%): groups whose best one-to-one image-caption assignment is right.

  Index arrays as in `colorswap_scores` but `(G, k)` with 2 <= k <= 8. A group
  is a hit when the identity assignment's total similarity is strictly larger
  than that of every other of the k! permutations (k = 2: s00 + s11 > s01 + s10).
  Cost: O(G * (k^2 * D + k! * k)).
  """
  s = np.asarray(_group_similarities(zimg, ztxt, image_index, text_index), np.float64)
  k = s.shape[1]
  if not 2 <= k <= 8:
    raise ValueError(f"groupmatch_score needs groups of 2..8 items, got {k}.")
  perms = np.array(list(itertools.permutations(range(k))))   # identity first
  totals = s[:, np.arange(k), perms].sum(axis=-1)            # (G, k!)
  return 100.0 * float(np.mean(totals[:, 0] > totals[:, 1:].max(axis=1)))


@jax.jit
def _sum_and_squares(z):
  return jnp.sum(z, axis=0), jnp.sum(z * z)


def modality_gap(zimg, ztxt) -> dict[str, float]:
  """Modality gap (MMCSAL eq. 10) and mean cosine similarities, without N x N matrices.

  `gap` = ||mean zimg - mean ztxt||; `intra_image_cos` / `intra_text_cos` = mean
  cosine over distinct pairs within a modality, (||sum z||^2 - sum ||z||^2) /
  (N (N - 1)); `cross_cos` = mean over all image-text pairs = <mean zimg, mean
  ztxt>. Needs >= 2 rows per modality. Cost: O((N_img + N_txt) * D).
  """
  zimg, ztxt = _check_embeddings(zimg=zimg, ztxt=ztxt)
  out, means = {}, []
  for name, z in (("image", zimg), ("text", ztxt)):
    n = z.shape[0]
    if n < 2:
      raise ValueError(f"modality_gap needs at least 2 {name} rows, got {n}.")
    total, squares = (np.asarray(x, np.float64) for x in _sum_and_squares(z))
    out[f"intra_{name}_cos"] = float((total @ total - squares) / (n * (n - 1)))
    means.append(total / n)
  out["gap"] = float(np.linalg.norm(means[0] - means[1]))
  out["cross_cos"] = float(means[0] @ means[1])
  return out


def pool_metrics(zimg, ztxt, pool) -> dict[str, float]:
  """Every metric that `pool`'s matching supports, as `"family/name": %` entries.

  `zimg`, `ztxt`: embeddings of all of `pool`'s images and texts, in order.
  ColorSwap scores and GroupMatch when the pool has groups; retrieval R@1/5/10
  and pseudo-label accuracy from its pairs; the modality gap always.
  Cost: O(N_img * N_txt * D), in blocks.
  """
  out = {}
  if pool.groups is not None:
    image_index, text_index = group_layout(pool)
    if image_index.shape[1] == 2:
      scores = colorswap_scores(zimg, ztxt, image_index, text_index)
      out.update({f"colorswap/{k}": v for k, v in scores.items()})
    out["groupmatch"] = groupmatch_score(zimg, ztxt, image_index, text_index)
  pairs = pool.pairs("image", "text")
  if len(pairs):
    text_to_image = np.full(pool.num_items("text"), -1, np.int64)
    text_to_image[pairs[:, 1]] = pairs[:, 0]
    recall = retrieval_recall(zimg, ztxt, text_to_image)
    out.update({f"retrieval/{k}": v for k, v in recall.items()})
    accuracy = pseudo_label_accuracy(zimg, ztxt, pairs)
    out.update({f"pseudo_label/{k}": v for k, v in accuracy.items()})
    margins = margin_by_correctness(zimg, ztxt, pairs)
    out.update({f"margin/{k}": v for k, v in margins.items()})
  gap = modality_gap(zimg, ztxt)
  out.update({f"modality_gap/{k}": v for k, v in gap.items()})
  return out
