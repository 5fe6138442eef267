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
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from mmal_jax import fs
from mmal_jax.config_lib import ConfigError
from mmal_jax.data import coco
from mmal_jax.data import colorswap
from mmal_jax.data import features
from mmal_jax.data import shapes
from mmal_jax.data import tfds_source
from mmal_jax.data import webdataset
from mmal_jax.data.pool import UnalignedPool, split_groups

# Sources whose pools have groups of 2 images + 2 captions (ColorSwap scores).
GROUPED = ("shapes", "colorswap")
# Sources with a pre-training set (`Sources.pretrain_pool`).
WITH_PRETRAIN = ("shapes",)


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
      # tfds
      tfds_name="", tfds_data_dir="", image_key="image",
      text_key="captions/text",
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


def _features(data) -> Sources:
  """Fixed features; `eval_pairs` rows or a seeded `eval_fraction` held out."""
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
  return Sources(*features.split_by_pairs(full, pairs, held_out))


def _tfds(data) -> Sources:
  kw = dict(data_dir=data.tfds_data_dir or None, image_key=data.image_key,
            text_key=data.text_key)
  pool = tfds_source.load_tfds(data.tfds_name, data.split,
                               max_images=data.max_images or None, **kw)
  eval_pool = tfds_source.load_tfds(data.tfds_name, data.eval_split,
                                    max_images=data.eval_max_images or None,
                                    **kw)
  return Sources(pool, eval_pool)


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
  problems = _structure_problems(data, unknown)
  if problems:
    raise ConfigError(" ".join(problems))
  return _BUILDERS[data.source](data)


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
      for field in ("split", "eval_split"):
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
  if not any("needs config.data" in p for p in problems):
    problems += _file_problems(data)
  return problems

