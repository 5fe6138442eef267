"""ColorSwap text / image / group scores and GroupMatch, over groups of a pool.

Ties count against the model (a hit needs the correct candidate strictly
ahead of every wrong one).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from mmal_jax.evaluators import common

# Scores (%) of random similarities on groups of 2 images + 2 captions: a
# text (image) hit needs both images (captions) to rank their own partner
# first, 1/2 x 1/2; a group hit needs the one ordering of the 4 similarities
# that makes both the text and the image score hit, 4 of the 24 orderings.
CHANCE = {"text": 25.0, "image": 25.0, "group": 100.0 / 6}


def _group_similarities(zimg, ztxt, image_index, text_index):
  """`(G, k, k)` similarities s[g, i, j] = <image i of g, text j of g>."""
  zimg, ztxt = common.check_embeddings(zimg=zimg, ztxt=ztxt)
  if image_index is None and text_index is None:
    if zimg.shape[0] != ztxt.shape[0] or zimg.shape[0] % 2:
      raise ValueError("Without index arrays, zimg and ztxt must hold the same even number "
                       "of rows (groups of 2 consecutive rows).")
    image_index = text_index = np.arange(zimg.shape[0]).reshape(-1, 2)
  image_index = common.check_index("image_index", image_index, zimg.shape[0])
  text_index = common.check_index("text_index", text_index, ztxt.shape[0])
  if image_index.ndim != 2 or image_index.shape != text_index.shape:
    raise ValueError(f"image_index and text_index must be (G, k) arrays of one shape, got "
                     f"{image_index.shape} and {text_index.shape}.")
  return _einsum_groups(zimg[image_index], ztxt[text_index])


@jax.jit
def _einsum_groups(images, texts):
  return jnp.einsum("gid,gjd->gij", images, texts, precision=common.HIGHEST)


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
