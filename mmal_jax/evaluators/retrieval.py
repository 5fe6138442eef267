"""Image <-> text retrieval recall@k, and an evaluator over a captioned set.

The evaluator embeds every image and caption of a held-out image-caption set
(COCO 5k / Flickr30k style, ~5 captions per image) read from TFDS
(`source="tfds"`: `dataset`, `split`, `data_dir`, `image_key`, `text_key`)
or a COCO captions JSON + image folder (`source="coco"`: `captions_json`,
`images`), and reports R@1/5/10 both ways plus their R@1 mean (DataComp's
retrieval score). Ties count against the model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmal_jax.evaluators import common


@jax.jit
def _rank_of_best_positive(q, q_labels, keys, key_labels):
  """Per query row: number of non-positive keys scoring >= its best positive key."""
  s = jnp.dot(q, keys.T, precision=common.HIGHEST)
  positive = q_labels[:, None] == key_labels[None, :]
  best = jnp.max(jnp.where(positive, s, -jnp.inf), axis=1, keepdims=True)
  return jnp.sum(~positive & (s >= best), axis=1)


def retrieval_recall(zimg, ztxt, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
  """Recall@k of image->text and text->image retrieval, in %.

  `text_to_image` is `(N_txt,)` int: the image of each caption (-1: none).
  i2t: an image is a hit at k if any of its captions is among its k most
  similar texts; t2i: a caption is a hit if its image is among its k most
  similar images. Images without captions and captions without an image are
  left out of their direction's mean. Keys: `"i2t_r@k"`, `"t2i_r@k"`.
  Cost: two passes of O(N_img * N_txt * D), in blocks.
  """
  zimg, ztxt = common.check_embeddings(zimg=zimg, ztxt=ztxt)
  text_to_image = common.check_index("text_to_image", text_to_image,
                                     zimg.shape[0], allow_missing=True)
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
  i2t = common.blockwise(_rank_of_best_positive, zimg, image_ids, ztxt,
                         text_to_image)[has_text]
  t2i = common.blockwise(_rank_of_best_positive, ztxt, text_to_image, zimg,
                         image_ids)[has_image]
  out = {}
  for name, ranks in (("i2t", i2t), ("t2i", t2i)):
    for k in ks:
      out[f"{name}_r@{k}"] = 100.0 * float(np.mean(ranks < k))
  return out


def text_to_image(pool) -> np.ndarray:
  """`(N_txt,)` int64: each caption's image in `pool` (-1: none)."""
  pairs = pool.pairs("image", "text")
  out = np.full(pool.num_items("text"), -1, np.int64)
  out[pairs[:, 1]] = pairs[:, 0]
  return out


class Evaluator:
  """Retrieval R@1/5/10 on a held-out image-caption set (see module doc)."""
  DEFAULTS = dict(source="tfds", dataset="coco_captions", split="test",
                  data_dir="", image_key="image", text_key="captions/text",
                  captions_json="", images="", max_images=0)
  MAIN = "mean_r@1"
  KS = (1, 5, 10)

  def __init__(self, embed_fn, **config):
    self.embed_fn = embed_fn
    self.config = {**self.DEFAULTS, **config}
    self._pool = None

  @classmethod
  def metric_keys(cls, config=None) -> set[str]:
    del config
    return {f"{d}_r@{k}" for d in ("i2t", "t2i") for k in cls.KS} | {cls.MAIN}

  @property
  def pool(self):
    """The evaluation set as an UnalignedPool (read once)."""
    if self._pool is None:
      c = self.config
      if c["source"] == "tfds":
        from mmal_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
        self._pool = tfds_source.load_tfds(
            c["dataset"], c["split"], data_dir=c["data_dir"] or None,
            image_key=c["image_key"], text_key=c["text_key"],
            max_images=c["max_images"] or None)
      elif c["source"] == "coco":
        from mmal_jax.data import coco  # pylint: disable=g-import-not-at-top
        self._pool = coco.load_coco(c["captions_json"], c["images"],
                                    max_images=c["max_images"] or None)
      else:
        raise ValueError(f"retrieval source={c['source']!r} must be 'tfds' "
                         "or 'coco'.")
    return self._pool

  def run(self, params) -> dict[str, float]:
    """R@k both ways and `mean_r@1`. Cost: one embedding pass over the set,
    then O(N_img * N_txt * D) on the host."""
    pool = self.pool
    z = {m: common.to_host(self.embed_fn(params, pool, m), pool.num_items(m))
         for m in ("image", "text")}
    out = retrieval_recall(z["image"], z["text"], text_to_image(pool), self.KS)
    out[self.MAIN] = (out["i2t_r@1"] + out["t2i_r@1"]) / 2
    return out
