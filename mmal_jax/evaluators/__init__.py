"""Evaluators run at chosen rounds of an experiment, and the pool metrics.

Each evaluator is a module with one small interface (see `common`):
`Evaluator(embed_fn, **config).run(params) -> {metric: value}`, where
`embed_fn(params, pool, modality)` embeds every item of a pool.

  zeroshot    zero-shot top-1 accuracy on a TFDS classification dataset
  retrieval   image <-> text R@1/5/10 on a held-out captioned set
  (pool_metrics: ColorSwap, GroupMatch, retrieval, pseudo-label accuracy,
  margins and modality gap on the experiment's own held-out pool, every
  round; `colorswap`, `pseudo_label`, `gap` hold those metrics.)

Config (`config.evals`, empty by default: `default_config()`): one entry per
evaluator, named by the user; the name prefixes its metrics:

  config.evals.cifar10 = evaluators.eval_config(
      "zeroshot", every=2, dataset="cifar10", split="test")
  config.evals.coco = evaluators.eval_config(
      "retrieval", rounds=(0, 6), dataset="coco_captions", split="test")

Fields: `type`, `every` (run at rounds divisible by it; 0: never by
this rule), `rounds` (run at these rounds too), and the type's own fields
(`zeroshot.Evaluator.DEFAULTS`, `retrieval.Evaluator.DEFAULTS`).
`run_due(...)` returns `{"<name>/<metric>": value}` for the evaluators due at
a round and, when every listed evaluator ran, `"evals/average"`: the mean of
their headline metrics (zero-shot top-1, retrieval mean R@1), DataComp's
average over its task list.
"""
from __future__ import annotations

from typing import Mapping

import ml_collections
import numpy as np

from mmal_jax.data import sources
from mmal_jax.evaluators import retrieval
from mmal_jax.evaluators import zeroshot
from mmal_jax.evaluators.pool_metrics import pool_metric_names, pool_metrics

TYPES = {"zeroshot": zeroshot.Evaluator, "retrieval": retrieval.Evaluator}
SCHEDULE = dict(type="", every=1, rounds=())
AVERAGE = "evals/average"


def default_config() -> ml_collections.ConfigDict:
  """`config.evals`: no evaluator beyond the per-round pool metrics."""
  return ml_collections.ConfigDict()


def eval_config(type: str,  # pylint: disable=redefined-builtin
                **fields) -> ml_collections.ConfigDict:
  """One evaluator's config: its type's defaults updated with `fields`.

  Raises ValueError for an unknown type or field.
  """
  if type not in TYPES:
    raise ValueError(f"Unknown evaluator type {type!r}; known: "
                     f"{sorted(TYPES)}.")
  config = ml_collections.ConfigDict({**SCHEDULE, **TYPES[type].DEFAULTS,
                                      "type": type})
  unknown = sorted(set(fields) - set(config))
  if unknown:
    raise ValueError(f"Evaluator type {type!r} has no fields {unknown}; "
                     f"fields: {sorted(config)}.")
  config.update(fields)
  return config


def _entries(evals) -> dict[str, dict]:
  return {name: (cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
          for name, cfg in (evals or {}).items()}


def check(evals) -> list[str]:
  """Every problem of `config.evals` (types, fields, schedule), one line
  each; reads no data."""
  problems = []
  for name, cfg in _entries(evals).items():
    kind = cfg.get("type")
    if kind not in TYPES:
      problems.append(f"config.evals.{name}.type={kind!r} is not one of "
                      f"{sorted(TYPES)}.")
      continue
    unknown = sorted(set(cfg) - set(SCHEDULE) - set(TYPES[kind].DEFAULTS))
    if unknown:
      problems.append(f"config.evals.{name} has unknown fields {unknown}.")
    every = cfg.get("every", SCHEDULE["every"])
    rounds = cfg.get("rounds", SCHEDULE["rounds"])
    if not isinstance(every, int) or every < 0:
      problems.append(f"config.evals.{name}.every must be an int >= 0.")
    if any(not isinstance(r, int) or r < 0 for r in rounds):
      problems.append(f"config.evals.{name}.rounds must be ints >= 0.")
  return problems


def build(evals, embed_fn) -> dict:
  """name -> Evaluator for `config.evals` (no data read yet).

  Raises ValueError listing every problem `check` finds.
  """
  problems = check(evals)
  if problems:
    raise ValueError(" ".join(problems))
  out = {}
  for name, cfg in _entries(evals).items():
    kind = TYPES[cfg["type"]]
    out[name] = kind(embed_fn, **{k: v for k, v in cfg.items()
                                  if k in kind.DEFAULTS})
  return out


def is_due(cfg: Mapping, round_index: int) -> bool:
  """Whether an evaluator with schedule `cfg` runs at `round_index`."""
  every = cfg.get("every", SCHEDULE["every"])
  return (round_index in tuple(cfg.get("rounds", ())) or
          bool(every) and round_index % every == 0)


def run_due(evaluators: Mapping, evals, round_index: int, params
            ) -> dict[str, float]:
  """Runs the evaluators due at `round_index`; prefixed metrics and, when all
  ran, the average of their headline metrics (`AVERAGE`)."""
  out, main = {}, []
  entries = _entries(evals)
  for name, evaluator in evaluators.items():
    if is_due(entries[name], round_index):
      metrics = evaluator.run(params)
      out.update({f"{name}/{k}": v for k, v in metrics.items()})
      main.append(metrics[evaluator.MAIN])
  if evaluators and len(main) == len(evaluators):
    out[AVERAGE] = float(np.mean(main))
  return out


def metric_names(config) -> set[str]:
  """Every metric name an experiment config produces: the pool metrics its
  data source supports and its evaluators' (prefixed) metrics. For checking
  `report.main_metric` up front."""
  names = pool_metric_names(grouped=config.data.source in sources.GROUPED)
  entries = _entries(config.get("evals"))
  for name, cfg in entries.items():
    if cfg.get("type") in TYPES:
      names |= {f"{name}/{k}" for k in TYPES[cfg["type"]].metric_keys(cfg)}
  if entries:
    names.add(AVERAGE)
  return names
