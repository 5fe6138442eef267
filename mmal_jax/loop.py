"""The active-learning experiment: strategies x seeds x rounds, resumable.

Round t of a run (one strategy, one seed):
  1. embed every item the strategy may look at (pool: all items; stream: the
     round's buffer and the annotated items) with the current towers;
  2. acquire `config.budget` queries with `STRATEGIES[strategy]`;
  3. ask the oracle, add the revealed pairs (the annotated set is saved);
  4. train on all annotated pairs, from the initial towers
     (`train.reinit_each_round`, the paper's protocol) or from the last ones;
  5. evaluate on the held-out pool and append a row to metrics.jsonl.
Round 0 only evaluates the initial towers.

Workdir:
  config.json, metrics.jsonl, results.md, al_curves.png,
  pretrained/params.npz          the towers pre-trained once (init "pretrain"),
  runs/<strategy>/seed_<s>/      annotation.json (the annotated set, updated
                                 each round), annotated/round_<t>.json
                                 (snapshots), ckpt/ (orbax train states),
  tensorboard/<strategy>_seed_<s>/  TensorBoard summaries,
  queries/, answers/             the file oracle's exchange (one run only).
Everything is written before it is relied on, so rerunning the same command
after a preemption continues where the run stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from mmal_jax import config_lib
from mmal_jax import evaluate
from mmal_jax import report
from mmal_jax import sharding
from mmal_jax import summaries
from mmal_jax import train
from mmal_jax.acquisition import STRATEGIES
from mmal_jax.data import oracle as oracle_lib
from mmal_jax.data import sources
from mmal_jax.data.annotation import AnnotationState, atomic_write_text
from mmal_jax.data import pool as pool_lib
from mmal_jax.data.pool import UnalignedPool
from mmal_jax.models import checkpoint

MODALITIES = train.MODALITIES


class ConfigMismatchError(config_lib.ConfigError):
  """The workdir holds a run of another config."""


def check_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                  write: bool = True) -> None:
  """Checks that WORKDIR/config.json, if there, is `config`; else writes it."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  exists = os.path.exists(path)
  if exists:
    with open(path) as f:
      saved = json.load(f)
    if saved != current:
      diffs = sorted(_differences(saved, current))
      raise ConfigMismatchError(
          f"{workdir} holds a run of a different config (differs in: "
          f"{', '.join(diffs[:10])}). Rerun with the same config to resume "
          f"it, or pass a new --workdir.")
  if not write:
    return
  os.makedirs(workdir, exist_ok=True)
  if sharding.is_main_process() and not exists:
    atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True))
  # Every process, also one that already sees process 0's file.
  sharding.barrier("config.json")


def _differences(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for key in set(a) | set(b):
      yield from _differences(a.get(key), b.get(key), f"{prefix}{key}.")
  elif a != b:
    yield prefix.rstrip(".")


def _derived_seed(*parts: int) -> int:
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@dataclasses.dataclass
class Experiment:
  """Shared state of one experiment: data, towers, initial weights."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  data: sources.Sources
  towers: train.Towers
  num_units: int
  metrics_path: str

  @classmethod
  def create(cls, config, workdir, mesh=None) -> Experiment:
    mesh = sharding.make_mesh() if mesh is None else mesh
    if config.init.kind == "checkpoint" and not config.init.checkpoint:
      raise config_lib.ConfigError(
          "config.init.kind='checkpoint' needs --config.init.checkpoint=PATH "
          "(a big_vision .npz).")
    if config.oracle.kind == "file" and (len(config.strategies) > 1 or
                                        len(config.seeds) > 1):
      raise config_lib.ConfigError(
          "The file oracle serves one run: set one strategy and one seed "
          "(config.strategies, config.seeds).")
    check_workdir(config, workdir, write=False)
    try:
      data = sources.build(config.data)
    except config_lib.ConfigError:
      raise
    except (OSError, ValueError) as e:
      raise config_lib.ConfigError(
          f"Cannot load the {config.data.source!r} data: {e} Fix the file or "
          f"the config.data fields that name it.") from e
    for name, pool in (("pool", data.pool), ("eval pool", data.eval_pool)):
      if set(pool.modalities) != set(MODALITIES):
        raise config_lib.ConfigError(
            f"The {name} has modalities {pool.modalities}; training needs "
            f"{MODALITIES}.")
    num_units = pool_lib.count_units(pool_lib.matching_components(data.pool))
    needed = config.budget * config.num_rounds
    if needed > num_units:
      raise config_lib.ConfigError(
          f"config.budget x config.num_rounds = {needed} queries, but the pool "
          f"holds {num_units} matched units: lower the budget or the rounds.")
    num_buffers = pool_lib.num_stream_buffers(num_units, config.stream_buffer)
    if config.regime == "stream" and num_buffers < config.num_rounds:
      raise config_lib.ConfigError(
          f"The stream has {num_buffers} buffers of {config.stream_buffer} "
          f"units, fewer than config.num_rounds={config.num_rounds}.")
    check_workdir(config, workdir)  # Last: a config that cannot run leaves no trace.
    return cls(config, workdir, mesh, data, train.Towers(config, mesh),
               num_units, os.path.join(workdir, "metrics.jsonl"))

  def initial_params(self, seed: int):
    """The towers every run starts from (and restarts from each round)."""
    kind = self.config.init.kind
    if kind == "scratch":
      return self.towers.init_params(self.data.pool, seed)
    template = self.towers.init_params(self.data.pool, 0)
    if kind == "checkpoint":
      return checkpoint.load(template, self.config.init.checkpoint)
    path = os.path.join(self.workdir, "pretrained", "params.npz")
    if not os.path.exists(path):
      self._pretrain(template, path)
    return checkpoint.load(template, path)

  def _pretrain(self, params, path: str) -> None:
    pool = self.data.pretrain_pool
    if pool is None:
      raise config_lib.ConfigError(
          f"config.init.kind='pretrain' needs a data source with a "
          f"pre-training set; {self.config.data.source!r} has none. Use "
          f"init.kind='checkpoint' or 'scratch'.")
    pre = self.config.pretrain
    optim_config = ml_collections.ConfigDict(self.config.optim.to_dict())
    optim_config.lr = pre.lr
    result = self.towers.fit(
        params, pool, pool.pairs(), optim_config=optim_config,
        epochs=pre.epochs, batch_size=pre.batch_size,
        warmup_fraction=self.config.train.warmup_fraction,
        seed=self.config.data.seed,
        checkpoints=train.Checkpoints(os.path.join(os.path.dirname(path),
                                                   "ckpt")),
        checkpoint_every=self.config.train.checkpoint_every,
        label="[pretrain]")
    if sharding.is_main_process():
      checkpoint.save(jax.device_get(result.params), path)
    sharding.barrier("pretrained")
    logging.info("Pre-trained the towers in %.1fs (%d steps): %s",
                 result.seconds, result.steps, path)

  def done_rounds(self, strategy: str, seed: int) -> set[int]:
    if not os.path.exists(self.metrics_path):
      return set()
    return {r["round"] for r in report.read_rows(self.metrics_path)
            if r["strategy"] == strategy and r["seed"] == seed}

  def log_row(self, row: dict) -> None:
    if sharding.is_main_process():
      with open(self.metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")

  def evaluate(self, params) -> dict[str, float]:
    pool = self.data.eval_pool
    batch = self.config.eval.embed_batch_size
    z = {m: self.towers.embed(params, pool, m, np.arange(pool.num_items(m)),
                              batch) for m in MODALITIES}
    return evaluate.pool_metrics(z["image"], z["text"], pool)


class Run:
  """One strategy and seed: the rounds of Algorithm 1's outer loop."""

  def __init__(self, experiment: Experiment, strategy: str, seed: int):
    self.x = experiment
    self.config = experiment.config
    self.strategy = strategy
    self.seed = seed
    self.dir = os.path.join(experiment.workdir, "runs", strategy,
                            f"seed_{seed}")
    self.label = f"[{strategy} seed {seed}]"
    pool = experiment.data.pool
    self.state_path = os.path.join(self.dir, "annotation.json")
    self.state = (AnnotationState.load(self.state_path, pool)
                  if os.path.exists(self.state_path)
                  else AnnotationState.for_pool(pool))
    self.checkpoints = train.Checkpoints(os.path.join(self.dir, "ckpt"))
    self.summaries = summaries.SummaryWriter(os.path.join(
        experiment.workdir, "tensorboard", f"{strategy}_seed_{seed}"),
                                             enabled=sharding.is_main_process())
    if self.config.oracle.kind == "file":
      self.oracle = oracle_lib.FileOracle(
          experiment.workdir, pool, timeout_s=self.config.oracle.timeout_s)
    else:
      self.oracle = oracle_lib.SimulatedOracle(pool)
    self.buffers = None
    if self.config.regime == "stream":
      self.buffers = list(pool_lib.stream_buffers(
          pool, self.config.stream_buffer, _derived_seed(seed, 1)))

  def run(self, initial_params, on_round=None) -> None:
    """Runs (or resumes) every round; `on_round()` is called after each."""
    done = self.x.done_rounds(self.strategy, self.seed)
    params = initial_params
    latest = self.checkpoints.latest()
    if latest is not None and latest[0] in done:
      params = self.checkpoints.restore(
          latest[0], latest[1], self.x.towers.state_like(
              self.config.optim, initial_params))["params"]
    if 0 not in done:
      self._log(0, {}, self.x.evaluate(params))
    for t in range(1, self.config.num_rounds + 1):
      if t in done:
        continue
      timing = {}
      if self.state.last_round < t:
        timing = self._acquire(t, params)
      start = (initial_params if self.config.train.reinit_each_round
               else params)
      result = self.x.towers.fit(
          start, self.x.data.pool, self.state.pairs("image", "text"),
          optim_config=self.config.optim, epochs=self.config.train.epochs,
          batch_size=self.config.train.batch_size,
          warmup_fraction=self.config.train.warmup_fraction,
          seed=_derived_seed(self.seed, t), checkpoints=self.checkpoints,
          round_index=t, checkpoint_every=self.config.train.checkpoint_every,
          label=f"{self.label} round {t}/{self.config.num_rounds}")
      params = result.params
      timing.update(train_s=result.seconds, train_steps=result.steps)
      if result.final_loss is not None:
        self.summaries.scalars(self.state.cost, {"train/loss":
                                                 result.final_loss})
      start_eval = time.perf_counter()
      metrics = self.x.evaluate(params)
      timing["eval_s"] = time.perf_counter() - start_eval
      self._log(t, timing, metrics)
      if on_round:
        on_round()

  def _candidates(self, t: int) -> dict[str, np.ndarray]:
    """Indices of the items embedded this round: pool, or buffer + annotated."""
    pool = self.x.data.pool
    if self.buffers is None:
      return {m: np.arange(pool.num_items(m)) for m in MODALITIES}
    return {m: np.union1d(self.buffers[t - 1][m],
                          np.flatnonzero(self.state.annotated[m]))
            for m in MODALITIES}

  def _acquire(self, t: int, params) -> dict[str, float]:
    pool = self.x.data.pool
    queries = None
    if isinstance(self.oracle, oracle_lib.FileOracle):
      queries = self.oracle.pending_queries(t)
    timing = {"embed_s": 0.0, "acquire_s": 0.0}
    if queries is None:
      items = self._candidates(t)
      start = time.perf_counter()
      embeddings = {m: self.x.towers.embed(
          params, pool, m, items[m], self.config.eval.embed_batch_size)
                    for m in MODALITIES}
      timing["embed_s"] = time.perf_counter() - start
      annotated = {m: self.state.annotated[m][items[m]] for m in MODALITIES}
      candidates = None
      if self.buffers is not None:
        candidates = {m: np.isin(items[m], self.buffers[t - 1][m])
                      for m in MODALITIES}
      start = time.perf_counter()
      picked = STRATEGIES[self.strategy](
          embeddings, annotated, budget=self.config.budget,
          seed=_derived_seed(self.seed, t), candidates=candidates,
          mesh=self.x.mesh, block=self.config.acquisition.block,
          feature_dtype=self.config.acquisition.feature_dtype,
          picks_per_pass=self.config.acquisition.picks_per_pass,
          **self.config.strategy_hparams.get(self.strategy, {}))
      timing["acquire_s"] = time.perf_counter() - start
      queries = [(m, int(items[m][i])) for m, i in picked]
    answers = self.oracle.answer(t, queries)
    self.state.apply(answers)
    if sharding.is_main_process():
      self.state.save(self.state_path)
      atomic_write_text(os.path.join(self.dir, "annotated",
                                     f"round_{t}.json"), self.state.to_json())
    return timing

  def _log(self, t: int, timing: dict, metrics: dict[str, float]) -> None:
    counts = {m: 0 for m in MODALITIES}
    for answer in self.state.log:
      if answer.round_index == t:
        counts[answer.modality] += 1
    row = {"strategy": self.strategy, "seed": self.seed, "round": t,
           "queries": self.state.cost, "modality_counts": counts,
           "pairs": int(len(self.state.pairs("image", "text"))),
           "percent": 100.0 * self.state.cost / self.x.num_units,
           **timing, **metrics}
    self.x.log_row(row)
    self.summaries.scalars(self.state.cost, {
        k: v for k, v in row.items()
        if k not in ("strategy", "seed", "round") and isinstance(v, float)})
    main = self.config.report.main_metric
    logging.info("%s round %d/%d: %d queries (%.1f%%), %d pairs%s", self.label,
                 t, self.config.num_rounds, row["queries"], row["percent"],
                 row["pairs"], f", {main} {metrics[main]:.1f}"
                 if main in metrics else "")


def run_experiment(config: ml_collections.ConfigDict, workdir: str,
                   mesh=None) -> str:
  """Runs (or resumes) every strategy x seed; returns the results Markdown."""
  start = time.perf_counter()
  experiment = Experiment.create(config, workdir, mesh)
  runs = [(s, seed) for s in config.strategies for seed in config.seeds]
  total = len(runs) * config.num_rounds
  finished = [sum(len(experiment.done_rounds(s, seed) - {0})
                  for s, seed in runs)]
  first = finished[0]

  def progress():
    finished[0] += 1
    elapsed = time.perf_counter() - start
    eta = elapsed / (finished[0] - first) * (total - finished[0])
    logging.info("Progress: %d/%d rounds, %.0fs elapsed, ETA %.0fs",
                 finished[0], total, elapsed, eta)

  initial = {}
  for strategy, seed in runs:
    key = seed if config.init.kind == "scratch" else None
    if key not in initial:
      initial[key] = experiment.initial_params(seed)
    Run(experiment, strategy, seed).run(initial[key], on_round=progress)
  sharding.barrier("metrics.jsonl")
  text = report.write(workdir, config.report.main_metric,
                      config.report.metrics,
                      save=sharding.is_main_process())
  logging.info("Finished in %.0fs; results in %s/results.md",
               time.perf_counter() - start, workdir)
  return text
