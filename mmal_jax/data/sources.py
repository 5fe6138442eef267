"""Builds an experiment's pools from `config.data`.

`build(config.data)` returns `Sources(pool, eval_pool, pretrain_pool)`: the
unaligned pool the learner buys pairings in, a held-out pool with its true
matching for the metrics, and (where the source has one) a disjoint paired set
for pre-training the towers.
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from mmal_jax.config_lib import ConfigError
from mmal_jax.data import coco
from mmal_jax.data import features
from mmal_jax.data import shapes
from mmal_jax.data.pool import UnalignedPool, split_groups


@dataclasses.dataclass(frozen=True)
class Sources:
  pool: UnalignedPool
  eval_pool: UnalignedPool
  pretrain_pool: UnalignedPool | None = None


def _shapes(data) -> Sources:
  groups = shapes.make_colorswap(data.num_groups + data.num_eval_groups,
                                 data.image_size, data.seed,
                                 noise_std=data.noise_std)
  pool, eval_pool = split_groups(groups, data.num_eval_groups, data.seed)
  if data.get("missing_image_fraction", 0.):  # Fig. 4 right of paper 1.
    pool = shapes.drop_items(pool, "image", data.missing_image_fraction,
                             data.seed)
  pretrain = shapes.make_single_objects(data.pretrain_size, data.image_size,
                                        data.seed, noise_std=data.noise_std)
  return Sources(pool, eval_pool, pretrain)


def _require(data, *fields) -> None:
  missing = [f for f in fields if not data[f]]
  if missing:
    raise ConfigError(f"config.data.source={data.source!r} needs "
                      + ", ".join(f"config.data.{f}" for f in missing) + ".")


def _coco(data) -> Sources:
  _require(data, "train_json", "train_images", "eval_json", "eval_images")
  kw = dict(image_size=data.image_size or None,
            first_caption_only=data.first_caption_only)
  pool = coco.load_coco(data.train_json, data.train_images,
                        max_images=data.max_images or None, **kw)
  eval_pool = coco.load_coco(data.eval_json, data.eval_images,
                             max_images=data.eval_max_images or None, **kw)
  return Sources(pool, eval_pool)


def _features(data) -> Sources:
  """Fixed features; a seeded `eval_fraction` of the pairs is held out."""
  _require(data, "image_features", "text_features", "pairs")
  full = features.load_features(data.image_features, data.text_features,
                                data.pairs)
  pairs = full.pairs()
  if not 0 < data.eval_fraction < 1:
    raise ConfigError("config.data.eval_fraction must be in (0, 1).")
  num_eval = int(round(data.eval_fraction * len(pairs)))
  if not 0 < num_eval < len(pairs):
    raise ConfigError(
        f"config.data.eval_fraction={data.eval_fraction} leaves no pairs on "
        f"one side of the split of {len(pairs)} pairs.")
  held = np.random.default_rng(data.seed).choice(len(pairs), num_eval,
                                                 replace=False)
  in_eval = {m: np.zeros(full.num_items(m), bool) for m in full.modalities}
  in_eval["image"][pairs[held, 0]] = True
  in_eval["text"][pairs[held, 1]] = True
  return Sources(full.subset({m: ~k for m, k in in_eval.items()}),
                 full.subset(in_eval))


_BUILDERS = {"shapes": _shapes, "coco": _coco, "features": _features}
# Named by the paper's configs (configs/colorswap_*.py, datacomp_stream.py);
# their loaders are not part of this version.
PLANNED = ("colorswap", "datacomp")


def build(data: ml_collections.ConfigDict) -> Sources:
  """The pools `config.data` describes. Errors name the field or file."""
  if data.source in PLANNED:
    raise ConfigError(
        f"config.data.source={data.source!r} has no loader in this version of "
        f"mmal_jax; run with 'shapes', 'coco' or 'features' (e.g. "
        f"precomputed features of your copy of the data).")
  if data.source not in _BUILDERS:
    raise ConfigError(f"config.data.source={data.source!r} is not one of "
                      f"{sorted(_BUILDERS)}.")
  return _BUILDERS[data.source](data)

