"""Every metric a held-out pool's matching supports (the per-round metrics)."""
from __future__ import annotations

from mmal_jax.data.pool import group_layout
from mmal_jax.evaluators.colorswap import colorswap_scores, groupmatch_score
from mmal_jax.evaluators.gap import modality_gap
from mmal_jax.evaluators.pseudo_label import (margin_by_correctness,
                                              pseudo_label_accuracy)
from mmal_jax.evaluators.retrieval import retrieval_recall, text_to_image


def pool_metric_names(grouped: bool, group_size: int = 2,
                      paired: bool = True) -> set[str]:
  """The keys `pool_metrics` returns for a pool with groups of `group_size`
  (if `grouped`) and ground-truth pairs (if `paired`)."""
  names = {f"modality_gap/{k}" for k in ("intra_image_cos", "intra_text_cos",
                                         "gap", "cross_cos")}
  if grouped:
    names.add("groupmatch")
    if group_size == 2:
      names |= {f"colorswap/{k}" for k in ("text", "image", "group")}
  if paired:
    names |= {f"retrieval/{d}_r@{k}" for d in ("i2t", "t2i")
              for k in (1, 5, 10)}
    names |= {f"pseudo_label/{k}" for k in ("i2t", "t2i", "mean")}
    names |= {"margin/correct", "margin/incorrect"}
  return names


# Items per modality the per-round metrics need (`modality_gap`'s
# within-modality mean over distinct pairs).
MIN_ITEMS = 2


def pool_problems(pool) -> list[str]:
  """Why `pool_metrics` cannot score `pool` (a held-out pool), one sentence
  each ([] if it can): fewer than `MIN_ITEMS` items of a modality.
  Cost: O(modalities)."""
  return [f"The held-out pool holds {n} {m} item(s); the per-round metrics "
         f"(modality gap) need at least {MIN_ITEMS} per modality: hold out "
         f"more (config.data.eval_fraction, eval_pairs, eval data)."
         for m, n in pool.sizes.items() if n < MIN_ITEMS]


def pool_metrics(zimg, ztxt, pool) -> dict[str, float]:
  """Every metric `pool`'s matching supports, as `"family/name": %` entries.

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
    recall = retrieval_recall(zimg, ztxt, text_to_image(pool))
    out.update({f"retrieval/{k}": v for k, v in recall.items()})
    accuracy = pseudo_label_accuracy(zimg, ztxt, pairs)
    out.update({f"pseudo_label/{k}": v for k, v in accuracy.items()})
    margins = margin_by_correctness(zimg, ztxt, pairs)
    out.update({f"margin/{k}": v for k, v in margins.items()})
  gap = modality_gap(zimg, ztxt)
  out.update({f"modality_gap/{k}": v for k, v in gap.items()})
  return out
