"""Builds an experiment's pools from `config.data`.

`build(config.data)` returns `Sources(pool, eval_pool, pretrain_pool,
stream)`: the unaligned pool the learner buys pairings in, a held-out pool
with its true matching for the metrics, (where the source has one) a
disjoint paired set for pre-training the towers, and for stream-only sources
(`datacomp`) the stream of buffers instead of a pool. `check(config.data)`
lists every problem of a data config (unknown source or field, missing
field, missing file, bad parquet schema, unprepared TFDS split) without
loading the data, so a run can stop before any work.

Sources (`config.data.source`) and their fields (`default_config()`):
  shapes     generated ColorSwap-like groups: num_groups, num_eval_groups,
             image_size, noise_std, pretrain_size, seed.
  coco       COCO captions JSON + image folder: train_json, train_images,
             eval_json, eval_images, max_images, eval_max_images,
             first_caption_only, image_size (0: keep file references).
  features   `.npy` / `.npz` features + pairs file: image_features,
             text_features, pairs; the held-out pairs are `eval_pairs` (the
             dataset's own split: a flag per pair row or row indices) or else
             a seeded `eval_fraction`.
  tfds       any TFDS image-text dataset: tfds_name, tfds_data_dir, split,
             eval_split, image_key, text_key, max_images, eval_max_images.
  colorswap  the released parquet files in `dir`: split (pool, "train", 700
             groups) and eval_split (held out, "test", 300 groups).
  datacomp   webdataset shards (img2dataset): `dir` the training stream's
             shards, `eval_dir` held-out shards (the eval pool); `seed`
             orders the shards. ("webdataset" is the same source.)
Every path may be local or `gs://` (read through `mmal_jax.fs`).

Pre-training pairs of one's own (every source with a pool but `shapes`,
which generates its own set): `pretrain_fraction` (seeded by `seed`) or
`pretrain_pairs` (an index file: `.npy` bool flags or int row indices, or
`.txt` one row index per line) holds known pairs out of the pool; with
`init.kind="pretrain"` the towers are trained contrastively on them before
round 1. `pretrain_fraction` is a fraction of the pool's matched units (an
image with all its captions; a pair where pairs are one-to-one). Whole
matched units are held out, so their items are in neither the pool nor the
eval pool. `pretrain_pairs` indexes the rows of the `features` source's
pairing file (rows of held-out eval pairs may not be named; a fraction is
drawn among the others), and for the other sources the pool's true pairs in
`UnalignedPool.pairs()` order.
For `tfds`, `pretrain_split` names a split of its own instead (e.g.
split="train[10%:]", pretrain_split="train[:10%]"; disjoint splits are the
user's to give).
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from mmal_jax import fs
from mmal_jax.errors import ConfigError
from mmal_jax.data import coco
from mmal_jax.data import colorswap
from mmal_jax.data import features
from mmal_jax.data import pool as pool_lib
from mmal_jax.data import shapes
from mmal_jax.data import tfds_source
from mmal_jax.data import webdataset
from mmal_jax.data.pool import UnalignedPool, split_groups

# Sources whose pools have groups of 2 images + 2 captions (ColorSwap scores).
GROUPED = ("shapes", "colorswap")
# Sources with a pre-training set of their own (`Sources.pretrain_pool`).
WITH_PRETRAIN = ("shapes",)
# Stream-only sources: no pool to hold pre-training pairs out of.
STREAM_ONLY = ("datacomp", "webdataset")


@dataclasses.dataclass(frozen=True)
class Sources:
  """What `build` returns; `pool` is None for a stream-only source."""
  pool: UnalignedPool | None
  eval_pool: UnalignedPool
  pretrain_pool: UnalignedPool | None = None
  stream: webdataset.WebDatasetStream | None = None

  @property
  def skipped_items(self) -> int:
    """Undecodable items left out of the pools (`data.image_check`)."""
    return sum(len(p.skipped) for p in (self.pool, self.eval_pool,
                                        self.pretrain_pool) if p is not None)


def default_config() -> ml_collections.ConfigDict:
  """Every `config.data` field with its default (see the module docstring)."""
  return ml_collections.ConfigDict(dict(
      source="shapes", seed=0,
      # shapes
      num_groups=700, num_eval_groups=200, image_size=32, noise_std=6.0,
      missing_image_fraction=0.0,  # images removed (paper 1, Fig. 4 right)
      # image_size: shapes render at it; coco preloads at it (0: decode
      # each batch from the files, at the model resolution).
      pretrain_size=4000,
      # coco
      train_json="", train_images="", eval_json="", eval_images="",
      max_images=0, eval_max_images=0, first_caption_only=True,
      # features
      image_features="", text_features="", pairs="", eval_fraction=0.2,
      eval_pairs="",
      # Pre-training pairs held out of the pool (module docstring); 0 / "":
      # none.
      pretrain_fraction=0.0, pretrain_pairs="",
      # tfds
      tfds_name="", tfds_data_dir="", image_key="image",
      text_key="captions/text", pretrain_split="",
      # tfds and colorswap splits
      split="train", eval_split="test",
      # colorswap (parquet folder), datacomp (training shards)
      dir="",
      # datacomp held-out shards
      eval_dir=""))


_REQUIRED = {
    "coco": ("train_json", "train_images", "eval_json", "eval_images"),
    "features": ("image_features", "text_features", "pairs"),
    "tfds": ("tfds_name",),
    "colorswap": ("dir",),
    "datacomp": ("dir", "eval_dir"),
    "webdataset": ("dir", "eval_dir"),
}


def _shapes(data) -> Sources:
  groups = shapes.make_colorswap(data.num_groups + data.num_eval_groups,
                                 data.image_size, data.seed,
                                 noise_std=data.noise_std)
  pool, eval_pool = split_groups(groups, data.num_eval_groups, data.seed)
  if data.missing_image_fraction:
    pool = shapes.drop_items(pool, "image", data.missing_image_fraction,
                             data.seed)
  pretrain = shapes.make_single_objects(data.pretrain_size, data.image_size,
                                        data.seed, noise_std=data.noise_std)
  return Sources(pool, eval_pool, pretrain)


def _coco(data) -> Sources:
  kw = dict(image_size=data.image_size or None,
            first_caption_only=data.first_caption_only)
  pool = coco.load_coco(data.train_json, data.train_images,
                        max_images=data.max_images or None, **kw)
  eval_pool = coco.load_coco(data.eval_json, data.eval_images,
                             max_images=data.eval_max_images or None, **kw)
  return Sources(pool, eval_pool)


def has_pretrain(data) -> bool:
  """Whether `data` (a `config.data`) builds a pre-training set."""
  return (data.source in WITH_PRETRAIN or bool(data.get("pretrain_pairs")) or
          bool(data.get("pretrain_fraction")) or
          bool(data.get("pretrain_split")))


def _pretrain_rows(data, num_pairs: int, eligible: np.ndarray,
                   rows_of: str) -> np.ndarray:
  """`(num_pairs,)` bool: the pre-training rows (of `rows_of`), from
  `pretrain_pairs` or a seeded `pretrain_fraction` of the `eligible` rows
  (one per matched unit: the fraction is of units)."""
  if data.pretrain_pairs:
    return features.load_eval_pairs(data.pretrain_pairs, num_pairs,
                                    what="pretrain pairs", rows_of=rows_of)
  rows = np.flatnonzero(eligible)
  count = int(round(data.pretrain_fraction * rows.size))
  if not 0 < count < rows.size:
    raise ConfigError(
        f"config.data.pretrain_fraction={data.pretrain_fraction} holds out "
        f"{count} of the pool's {rows.size} matched units (pairs); both the "
        f"pre-training set and the pool need some: pick a fraction in (0, 1) "
        f"that does.")
  chosen = np.zeros(num_pairs, bool)
  # Its own stream of the seed: the eval split draws from `seed` itself.
  chosen[np.random.default_rng([data.seed, 1]).choice(rows, count,
                                                      replace=False)] = True
  return chosen


def _split_off(pool: UnalignedPool, held: dict[str, np.ndarray]
               ) -> tuple[UnalignedPool, UnalignedPool]:
  """(pool without the `held` items, pre-training pool of them)."""
  for m, mask in held.items():
    if mask.all() or not mask.any():
      raise ConfigError(
          f"config.data.pretrain_pairs / pretrain_fraction holds out "
          f"{'all' if mask.all() else 'none'} of the pool's {m} items; hold "
          f"out some of the pool's pairs, not all or none.")
  return pool.subset({m: ~k for m, k in held.items()}), pool.subset(held)


def _hold_out_pretrain(sources: Sources, data) -> Sources:
  """`sources` with the pre-training pairs' units moved out of the pool."""
  pairs = sources.pool.pairs("image", "text")
  chosen = _pretrain_rows(data, len(pairs), pool_lib.first_pair_of_units(
      sources.pool, pairs), "the pool's list of true pairs")
  pool, pretrain = _split_off(sources.pool, pool_lib.unit_items(
      sources.pool, pairs, chosen))
  return dataclasses.replace(sources, pool=pool, pretrain_pool=pretrain)


def _features(data) -> Sources:
  """Fixed features; `eval_pairs` rows or a seeded `eval_fraction` held out,
  and the pre-training rows (if any) out of what is left."""
  full = features.load_features(data.image_features, data.text_features,
                                data.pairs)
  pairs = features.load_pairs(data.pairs)
  if data.eval_pairs:
    held_out = features.load_eval_pairs(data.eval_pairs, len(pairs))
  else:
    if not 0 < data.eval_fraction < 1:
      raise ConfigError("config.data.eval_fraction must be in (0, 1).")
    num_eval = int(round(data.eval_fraction * len(pairs)))
    if not 0 < num_eval < len(pairs):
      raise ConfigError(
          f"config.data.eval_fraction={data.eval_fraction} leaves no pairs on "
          f"one side of the split of {len(pairs)} pairs.")
    held_out = np.zeros(len(pairs), bool)
    held_out[np.random.default_rng(data.seed).choice(len(pairs), num_eval,
                                                     replace=False)] = True
  pool, eval_pool = features.split_by_pairs(full, pairs, held_out)
  if not has_pretrain(data):
    return Sources(pool, eval_pool)
  in_eval = {"image": np.zeros(full.num_items("image"), bool),
             "text": np.zeros(full.num_items("text"), bool)}
  in_eval["image"][pairs[held_out, 0]] = True
  in_eval["text"][pairs[held_out, 1]] = True
  touches_eval = in_eval["image"][pairs[:, 0]] | in_eval["text"][pairs[:, 1]]
  chosen = _pretrain_rows(data, len(pairs), ~touches_eval &
                          pool_lib.first_pair_of_units(full, pairs),
                          "the pairs file")
  if (chosen & touches_eval).any():
    rows = np.flatnonzero(chosen & touches_eval)
    raise ConfigError(
        f"config.data.pretrain_pairs={data.pretrain_pairs} names {rows.size} "
        f"pair row(s) whose items are in the held-out eval pairs (first row "
        f"{rows[0]}); remove them from the file.")
  # Eval items stay eval items, even in a unit reaching a pre-training pair.
  held = {m: k & ~in_eval[m] for m, k in pool_lib.unit_items(
      full, pairs, chosen).items()}
  rest, pretrain = _split_off(pool, {m: k[~in_eval[m]]
                                    for m, k in held.items()})
  return Sources(rest, eval_pool, pretrain)


def _tfds(data) -> Sources:
  kw = dict(data_dir=data.tfds_data_dir or None, image_key=data.image_key,
            text_key=data.text_key)
  pool = tfds_source.load_tfds(data.tfds_name, data.split,
                               max_images=data.max_images or None, **kw)
  eval_pool = tfds_source.load_tfds(data.tfds_name, data.eval_split,
                                    max_images=data.eval_max_images or None,
                                    **kw)
  pretrain = None
  if data.pretrain_split:
    pretrain = tfds_source.load_tfds(data.tfds_name, data.pretrain_split, **kw)
  return Sources(pool, eval_pool, pretrain)


def _colorswap(data) -> Sources:
  return Sources(colorswap.load_colorswap(data.dir, data.split),
                 colorswap.load_colorswap(data.dir, data.eval_split))


def _datacomp(data) -> Sources:
  stream = webdataset.WebDatasetStream(webdataset.shard_paths(data.dir),
                                       data.seed)
  eval_pool = webdataset.load_shards(webdataset.shard_paths(data.eval_dir))
  return Sources(None, eval_pool, stream=stream)


_BUILDERS = {"shapes": _shapes, "coco": _coco, "features": _features,
             "tfds": _tfds, "colorswap": _colorswap, "datacomp": _datacomp,
             "webdataset": _datacomp}
SOURCES = tuple(_BUILDERS)


def with_defaults(data: ml_collections.ConfigDict
                  ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """`default_config()` updated with `data`'s fields; and the unknown ones."""
  full = default_config()
  given = data.to_dict() if hasattr(data, "to_dict") else dict(data)
  unknown = sorted(set(given) - set(full))
  full.update({k: v for k, v in given.items() if k in full})
  return full, unknown


def _structure_problems(data, unknown) -> list[str]:
  if data.source not in _BUILDERS:
    return [f"config.data.source={data.source!r} is not one of "
            f"{sorted(_BUILDERS)}."]
  problems = [f"config.data has no field {name!r} (fields: "
              f"{sorted(default_config())})." for name in unknown]
  missing = [f for f in _REQUIRED.get(data.source, ()) if not data[f]]
  if missing:
    problems.append(f"config.data.source={data.source!r} needs "
                    + ", ".join(f"config.data.{f}" for f in missing) + ".")
  return problems


def build(data: ml_collections.ConfigDict) -> Sources:
  """The pools `config.data` describes.

  ConfigError for an unknown source or field or a missing required field;
  FileNotFoundError / ValueError naming the file and field for data that
  cannot be read.
  """
  data, unknown = with_defaults(data)
  problems = _structure_problems(data, unknown) + _pretrain_problems(data)
  if problems:
    raise ConfigError(" ".join(problems))
  built = _BUILDERS[data.source](data)
  if has_pretrain(data) and built.pretrain_pool is None:
    built = _hold_out_pretrain(built, data)
  return built


def _pretrain_problems(data) -> list[str]:
  """What is wrong with `pretrain_fraction` / `pretrain_pairs` /
  `pretrain_split` (no reads)."""
  fraction = data.pretrain_fraction
  given = [f"config.data.{name}" for name in ("pretrain_fraction",
                                              "pretrain_pairs",
                                              "pretrain_split") if data[name]]
  if not given:
    return []
  problems = []
  if len(given) > 1:
    problems.append(f"{' and '.join(given)} each choose the pre-training "
                    f"pairs; give one of them.")
  if data.pretrain_split and data.source != "tfds":
    problems.append(f"config.data.pretrain_split is a TFDS split; "
                    f"config.data.source={data.source!r} takes "
                    f"config.data.pretrain_fraction or pretrain_pairs.")
  if (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or
      not 0 <= fraction < 1):
    problems.append(f"config.data.pretrain_fraction must be in [0, 1), got "
                    f"{fraction!r}.")
  if data.source in WITH_PRETRAIN:
    problems.append(f"config.data.source={data.source!r} generates its own "
                    f"pre-training set (config.data.pretrain_size); drop "
                    f"config.data.pretrain_fraction / pretrain_pairs.")
  if data.source in STREAM_ONLY:
    problems.append(f"config.data.source={data.source!r} is a stream with no "
                    f"pool to hold pre-training pairs out of; drop "
                    f"config.data.pretrain_fraction / pretrain_pairs.")
  return problems


def _file_problems(data) -> list[str]:
  """Missing files and folders, bad schemas: cheap reads only."""
  problems = []

  def need(field, is_dir=False, value=None):
    path = data[field] if value is None else value
    ok = fs.isdir(path) if is_dir else fs.isfile(path)
    if not ok:
      problems.append(f"config.data.{field}: {'folder' if is_dir else 'file'}"
                      f" not found: {path}")
    return ok

  source = data.source
  if source == "coco":
    for field in ("train_json", "eval_json"):
      need(field)
    for field in ("train_images", "eval_images"):
      need(field, is_dir=True)
  elif source == "features":
    for field in ("image_features", "text_features", "pairs"):
      need(field)
    if data.eval_pairs:
      need("eval_pairs")
    elif not 0 < data.eval_fraction < 1:
      problems.append("config.data.eval_fraction must be in (0, 1).")
  elif source == "tfds":
    try:
      b = tfds_source.builder(data.tfds_name, data.tfds_data_dir or None)
      unprepared = tfds_source.prepared_problem(b)
      if unprepared:
        problems.append(f"config.data.tfds_name: {unprepared}")
      for field in ("split", "eval_split") + (
          ("pretrain_split",) if data.pretrain_split else ()):
        try:
          tfds_source.check_split(b, data[field])
        except ValueError as e:
          problems.append(f"config.data.{field}: {e}")
    except ValueError as e:
      problems.append(f"config.data.tfds_name: {e}")
  elif source == "colorswap":
    for field in ("split", "eval_split"):
      try:
        for path in colorswap.split_files(data.dir, data[field]):
          colorswap.check_schema(path)
      except (FileNotFoundError, ValueError) as e:
        problems.append(f"config.data.{field}: {e}")
  elif source in ("datacomp", "webdataset"):
    for field in ("dir", "eval_dir"):
      try:
        webdataset.shard_paths(data[field])
      except FileNotFoundError as e:
        problems.append(f"config.data.{field}: {e}")
  return problems


def check(data: ml_collections.ConfigDict) -> list[str]:
  """Every problem of a data config, one line each ([] if it can be built).

  Checks the source name, unknown and missing fields, that the files and
  folders it names exist, ColorSwap parquet schemas (footers only), that a
  TFDS split is prepared, and that shard folders hold `.tar` shards. Loads
  no data. Cost: a few metadata reads per named path.
  """
  data, unknown = with_defaults(data)
  problems = _structure_problems(data, unknown)
  if problems and data.source not in _BUILDERS:
    return problems
  problems += _pretrain_problems(data)
  if not any("needs config.data" in p for p in problems):
    problems += _file_problems(data)
    if data.pretrain_pairs and not fs.isfile(data.pretrain_pairs):
      problems.append(f"config.data.pretrain_pairs: file not found: "
                      f"{data.pretrain_pairs}")
  return problems

