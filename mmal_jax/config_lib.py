"""The base experiment config every `configs/*.py` starts from, and its checks.

A config is a locked `ml_collections.ConfigDict`: the command line may change
any field (`--config.train.epochs=5`) but not invent one, so a typo fails
with the name of the unknown key.

Fields (defaults below):
  seeds, strategies, strategy_hparams.<name>: runs = strategies x seeds; the
    hparams go to `acquisition.STRATEGIES[name]`.
  acquisition: `block` (tile edge), `feature_dtype`, `picks_per_pass` for
    every strategy (see `acquisition.strategies`).
  regime: "pool" (every unannotated item is a candidate) or "stream" (round t
    sees only buffer t of `stream_buffer` matched units; the rest is gone).
  budget, num_rounds: queries per round and rounds per run.
  data: `source` ("shapes", "coco", "features"; "colorswap" and "datacomp"
    are named for the paper's configs, their loaders are not in yet) and its
    fields.
  model, loss, optim, res, text_len, tokenizer: from `models.presets`.
  init: where the towers start: "pretrain" (contrastive pre-training on
    `data`'s pre-training set, cached in the workdir), "checkpoint" (a
    big_vision .npz, `init.checkpoint`), or "scratch".
  pretrain: epochs / batch_size / lr of that pre-training.
  train: per-round training on the annotated pairs: epochs, batch_size,
    warmup_fraction of the steps, reinit_each_round (restart from the initial
    weights each round, the paper's fine-tuning protocol, or continue),
    checkpoint_every (steps; orbax, for resuming a preempted run).
  eval: embed_batch_size.
  report: main_metric (annotation savings vs random), metrics (the tables
    and curves; empty: every metric).
  oracle: "simulated" (the dataset's matching) or "file" (people answer
    WORKDIR/queries/round_T.jsonl in WORKDIR/answers/round_T.jsonl).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mmal_jax.acquisition import STRATEGIES
from mmal_jax.models import presets

REGIMES = ("pool", "stream")
DATA_SOURCES = ("shapes", "coco", "features", "colorswap", "datacomp")
INIT_KINDS = ("pretrain", "checkpoint", "scratch")
ORACLES = ("simulated", "file")


class ConfigError(ValueError):
  """A config, or data or workdir it names, that cannot run; says what to fix."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment (unlocked: configs override them)."""
  c = ml_collections.ConfigDict()
  c.seeds = (0, 1, 2, 3)  # The paper averages 4 runs.
  c.strategies = ("random", "coreset", "uncertainty", "mmal")
  c.strategy_hparams = ml_collections.ConfigDict(dict(
      random={}, coreset={}, uncertainty={},
      mmal=dict(coreset_size=config_dict.placeholder(int),  # 4 x budget
                modality="auto", metric="euclidean")))
  c.acquisition = ml_collections.ConfigDict(dict(
      block=1024, feature_dtype="float32", picks_per_pass=16))
  c.regime = "pool"
  c.stream_buffer = 1024
  c.budget = 70
  c.num_rounds = 6

  c.data = ml_collections.ConfigDict(dict(
      source="shapes", seed=0,
      # shapes
      num_groups=700, num_eval_groups=200, image_size=32, noise_std=6.0,
      # image_size: shapes render at it; coco preloads at it (0: decode
      # each batch from the files, at the model resolution).
      pretrain_size=4000,
      # coco
      train_json="", train_images="", eval_json="", eval_images="",
      max_images=0, eval_max_images=0, first_caption_only=True,
      # features
      image_features="", text_features="", pairs="", eval_fraction=0.2,
      # colorswap, datacomp: local copies
      dir=""))

  c.update(presets.tiny("siglip"))
  c.init = ml_collections.ConfigDict(dict(kind="pretrain", checkpoint=""))
  c.pretrain = ml_collections.ConfigDict(dict(epochs=10, batch_size=128,
                                              lr=1e-3))
  c.train = ml_collections.ConfigDict(dict(
      epochs=50, batch_size=70, warmup_fraction=0.1, reinit_each_round=True,
      checkpoint_every=200))
  c.eval = ml_collections.ConfigDict(dict(embed_batch_size=256))
  c.report = ml_collections.ConfigDict(dict(main_metric="colorswap/group",
                                            metrics=()))
  c.oracle = ml_collections.ConfigDict(dict(kind="simulated", timeout_s=0.0))
  return c


MODEL_FIELDS = ("model", "loss", "optim", "res", "text_len", "tokenizer")


def use_preset(config: ml_collections.ConfigDict,
               preset: ml_collections.ConfigDict) -> None:
  """Replaces config's model fields by a `models.presets` recipe's, whole."""
  for key in MODEL_FIELDS:
    config[key] = preset[key]


def use_small_towers(config: ml_collections.ConfigDict, *, width: int,
                     depth: int, patch: int, res: int, text_len: int) -> None:
  """ViT and text transformer of `width` x `depth` (heads of 32, MLP 4x)."""
  tower = dict(width=width, depth=depth, mlp_dim=4 * width,
               num_heads=max(1, width // 32))
  config.model.image.update(variant=f"mu/{patch}", **tower)
  config.model.text.update(variant="mu", **tower)
  config.model.out_dim = (None, width)
  config.res = res
  config.text_len = text_len


def _choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(f"config.{name}={value!r} is not one of {list(choices)}.")


def _positive(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ConfigError(f"config.{name} must be a positive integer, got "
                      f"{value!r}.")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks a config's values; returns it locked. ConfigError names the field.

  `--config.strategies=mmal,random` arrives as one string: it is split here.
  """
  config.strategies = tuple(
      name.strip() for entry in config.strategies for name in entry.split(",")
      if name.strip())
  if not config.strategies:
    raise ConfigError("config.strategies is empty; name at least one of "
                      f"{sorted(STRATEGIES)}.")
  for name in config.strategies:
    if name not in STRATEGIES:
      raise ConfigError(f"config.strategies names unknown strategy {name!r}; "
                        f"known: {sorted(STRATEGIES)}.")
  extra = set(config.strategy_hparams) - set(STRATEGIES)
  if extra:
    raise ConfigError(f"config.strategy_hparams has unknown strategies "
                      f"{sorted(extra)}; known: {sorted(STRATEGIES)}.")
  if not config.seeds:
    raise ConfigError("config.seeds is empty.")
  _choice("regime", config.regime, REGIMES)
  _choice("data.source", config.data.source, DATA_SOURCES)
  _choice("init.kind", config.init.kind, INIT_KINDS)
  _choice("oracle.kind", config.oracle.kind, ORACLES)
  _choice("loss", config.loss, ("siglip", "clip"))
  for name in ("budget", "num_rounds", "stream_buffer", "train.epochs",
               "train.batch_size", "eval.embed_batch_size"):
    value = config
    for part in name.split("."):
      value = value[part]
    _positive(name, value)
  if config.regime == "stream" and config.budget > config.stream_buffer:
    raise ConfigError(f"config.budget={config.budget} is larger than a stream "
                      f"buffer (config.stream_buffer={config.stream_buffer}).")
  if not 0 <= config.train.warmup_fraction < 1:
    raise ConfigError("config.train.warmup_fraction must be in [0, 1).")
  config.lock()
  return config
