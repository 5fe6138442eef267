"""The active-learning experiment: strategies x seeds x rounds, resumable.

Round t of a run (one strategy, one seed):
  1. embed every item the strategy may look at (pool: all items; stream: the
     round's buffer and the annotated items) with the current towers;
  2. acquire `config.budget` queries with `STRATEGIES[strategy]`;
  3. ask the oracle, add the revealed pairs (saved before anything else);
  4. train on all annotated pairs, from the initial towers
     (`train.reinit_each_round`, the paper's protocol) or from the last ones;
  5. evaluate on the held-out pool and append a row to metrics.jsonl.
Round 0 only evaluates the initial towers.

Workdir (any `mmal_jax.fs` path: local or gs://):
  config.json, metrics.jsonl, results.md, al_curves.png, logs/,
  pretrained/params.npz          the towers pre-trained once (init "pretrain":
                                 on the shapes source's own set, or the pairs
                                 data.pretrain_fraction / pretrain_pairs hold
                                 out of the pool), pretrained/ckpt/ while
                                 that runs,
  runs/<strategy>/seed_<s>/      ckpt/ (orbax: the whole run state, see
                                 `run_state`), annotation.json (the annotated
                                 set), annotated/round_<t>.json (snapshots)
                                 and, once finished, final_params.npz (the
                                 last round's towers, a big_vision .npz that
                                 `init.checkpoint` loads),
  tensorboard/<strategy>_seed_<s>/  TensorBoard summaries,
  queries/, answers/             the file oracle's exchange (one run only);
                                 queries/round_<t>.ranking.npz and
                                 annotate/ for the annotation page.

Resuming: the run's orbax checkpoint is the source of truth; every other
file is an output written from it and rewritten if missing or damaged. On a
restart the checkpoint is cross-checked against annotation.json, the
snapshots and metrics.jsonl: bought pairs found in any of them are kept (a
longer consistent log wins), contradictions and pairs recorded as bought but
found nowhere stop the run with one line naming the files.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Callable
import zipfile

from absl import logging
import jax
import ml_collections
import numpy as np

from mmal_jax import config_lib
from mmal_jax import evaluate
from mmal_jax import evaluators
from mmal_jax import experiment as experiment_lib
from mmal_jax import faults
from mmal_jax import fs
from mmal_jax import plots
from mmal_jax import report
from mmal_jax import run_state
from mmal_jax import sharding
from mmal_jax import strict_json
from mmal_jax import summaries
from mmal_jax import train
from mmal_jax.acquisition import cold_start
from mmal_jax.acquisition import STRATEGIES
from mmal_jax.annotate import ranking
from mmal_jax.data import oracle as oracle_lib
from mmal_jax.data import pool as pool_lib
from mmal_jax.data import sources
from mmal_jax.data.annotation import AnnotationState
from mmal_jax.evaluators.pool_metrics import pool_problems as eval_pool_problems
from mmal_jax.models import checkpoint

MODALITIES = train.MODALITIES
RunStateError = run_state.RunStateError


def _is_prefix(text: str, state: AnnotationState) -> bool:
  """True if `text` is a saved annotation state that `state` extends."""
  try:
    return AnnotationState.from_json(text).is_prefix_of(state)
  except ValueError:
    return False


@dataclasses.dataclass
class Experiment:
  """Shared state of one experiment: data, towers, initial weights, rows."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  data: sources.Sources
  towers: train.Towers
  num_units: int
  checkpoint_params: dict | None = None
  evaluators: dict = dataclasses.field(default_factory=dict)
  unit = "rounds"  # What `experiment_lib.run` counts in progress lines.

  def __post_init__(self):
    self.rows = experiment_lib.Rows(self.workdir)
    self._initial = {}

  @property
  def num_rounds(self) -> int:
    return self.config.num_rounds

  @classmethod
  def create(cls, config, workdir, mesh=None) -> Experiment:
    """Checks everything a run needs, then writes config.json.

    Every blocking problem (config values, workdir, data, checkpoint,
    budget) is collected and raised at once as one ConfigError; nothing is
    written before.
    """
    found = config_lib.problems(config)
    values_ok = not found
    found = experiment_lib.workdir_problems(config, workdir, found)
    init_path = config.init.checkpoint
    if config.init.kind == "checkpoint" and not fs.exists(init_path):
      found.append(f"config.init.checkpoint={init_path!r} does not exist; "
                   f"give the path of a big_vision .npz.")
    data = None
    data_problems = sources.check(config.data)
    found += data_problems
    if not data_problems:  # Build only what `check` found nothing wrong in.
      try:
        data = _with_pool(sources.build(config.data), config)
      except config_lib.ConfigError as e:
        found.append(str(e))
      except (OSError, ValueError) as e:
        found.append(f"Cannot load the {config.data.source!r} data: {e} Fix "
                     f"the file or the config.data fields that name it.")
    num_units = 0
    if data is not None and values_ok:
      num_units = pool_lib.count_units(
          pool_lib.matching_components(data.pool))
      found += _data_problems(config, data, num_units, (
          jax.device_count() if mesh is None else mesh.size))
    experiment_lib.raise_problems(found)
    mesh = (sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
            if mesh is None else mesh)
    experiment = cls(config, workdir, mesh, data, train.Towers(config, mesh),
                     num_units)
    experiment.evaluators = evaluators.build(config.evals,
                                             experiment.embed_all)
    if config.init.kind == "checkpoint":
      try:
        experiment.checkpoint_params = checkpoint.load(
            experiment.towers.init_params(data.pool, 0), init_path)
      except (OSError, ValueError, KeyError) as e:
        config_lib.raise_problems([f"config.init.checkpoint: {e}"])
    # Last: a config that cannot run leaves no trace.
    experiment_lib.check_workdir(config, workdir)
    return experiment

  def initial_params(self, seed: int):
    """The towers every run starts from (and restarts from each round);
    built once per seed ("scratch") or once ("pretrain", "checkpoint")."""
    key = seed if self.config.init.kind == "scratch" else None
    if key not in self._initial:
      self._initial[key] = self._initial_params(seed)
    return self._initial[key]

  def _initial_params(self, seed: int):
    kind = self.config.init.kind
    if kind == "scratch":
      return self.towers.init_params(self.data.pool, seed)
    if kind == "checkpoint":
      return self.checkpoint_params
    template = self.towers.init_params(self.data.pool, 0)
    path = os.path.join(self.workdir, "pretrained", "params.npz")
    if fs.exists(path):
      try:
        return checkpoint.load(template, path)
      except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        # Damaged: a kill mid-write by a version without atomic writes.
        logging.warning("%s cannot be read (%s); pre-training again.", path, e)
    self._pretrain(template, path)
    return checkpoint.load(template, path)

  def _pretrain(self, params, path: str) -> None:
    pool = self.data.pretrain_pool
    pre = self.config.pretrain
    optim_config = ml_collections.ConfigDict(self.config.optim.to_dict())
    optim_config.lr = pre.lr
    ckpt = run_state.RunCheckpoints(os.path.join(os.path.dirname(path),
                                                 "ckpt"))
    like_train = lambda: self.towers.state_like(optim_config, params)
    latest = ckpt.latest(params, like_train)
    resume = None
    if latest is not None and latest[0]["phase"] == "training":
      resume = (latest[0]["train_step"], latest[1])

    def save(step, state):
      ckpt.save({"round": 0, "phase": "training", "train_step": step},
                train=state)
      faults.point("pretrain_checkpoint")

    try:
      result = self.towers.fit(
          params, pool, pool.pairs(), optim_config=optim_config,
          epochs=pre.epochs, batch_size=pre.batch_size,
          warmup_fraction=self.config.train.warmup_fraction,
          seed=self.config.data.seed, resume=resume, on_checkpoint=save,
          checkpoint_every=self.config.train.checkpoint_every,
          log_every=self.config.train.log_every, label="[pretrain]",
          lr_name="config.pretrain.lr")
    finally:  # An error or a signal: the save in flight still commits.
      ckpt.close()
    # Every process takes part: FSDP shards may live on several hosts.
    params = jax.tree.map(sharding.to_host, result.params)
    if sharding.is_main_process():
      checkpoint.save(params, path)
    sharding.barrier("pretrained")
    logging.info("Pre-trained the towers in %.1fs (%d steps): %s",
                 result.seconds, result.steps, path)

  def start_run(self, strategy: str, seed: int) -> Run:
    """The run resumed from the workdir (`Run.resume`); a finished one
    exports its towers if a kill came first, and is closed."""
    run = Run(self, strategy, seed)
    run.resume(self.initial_params(seed))
    if run.finished:
      run.export_towers(run.arrays, self.initial_params(seed))
      run.close()
    return run

  def report(self, runs: list[Run]) -> str:
    """Writes results.md and its plots (and embedding.png on request);
    returns the Markdown."""
    config = self.config
    text = report.write(self.workdir, config_lib.main_metric(config),
                        config.report.metrics,
                        save=sharding.is_main_process())
    if config.report.embedding_plot:
      seed = config.seeds[0]
      _embedding_plot(self, self.initial_params(seed), {
          r.strategy: np.flatnonzero(r.state.annotated["image"])
          for r in runs if r.seed == seed})
    return text

  def embed_all(self, params, pool, modality: str) -> np.ndarray:
    """`(N_m, D)` embeddings of every `modality` item of `pool`."""
    return self.towers.embed(params, pool, modality,
                             np.arange(pool.num_items(modality)),
                             self.config.eval.embed_batch_size)

  def evaluate(self, params, round_index: int) -> dict[str, float]:
    """The held-out pool's metrics and the evaluators due at this round."""
    pool = self.data.eval_pool
    z = {m: self.embed_all(params, pool, m) for m in MODALITIES}
    metrics = evaluate.pool_metrics(z["image"], z["text"], pool)
    metrics.update(evaluators.run_due(self.evaluators, self.config.evals,
                                      round_index, params))
    return metrics


def _with_pool(data: sources.Sources, config) -> sources.Sources:
  """A stream-only source's pool: the stream's first `num_rounds` buffers
  (images stay references into their shards; only the shards those buffers
  overlap are scanned). The stream regime then serves them one per round."""
  if data.pool is not None:
    return data
  size = min(data.stream.num_units, config.num_rounds * config.stream_buffer)
  return dataclasses.replace(
      data, pool=data.stream.buffer(0, size, seed=config.data.seed))


def _data_problems(config, data: sources.Sources, num_units: int,
                   num_devices: int) -> list[str]:
  """What the built data (its pool holding `num_units` matched units) cannot
  do for this config on `num_devices` devices."""
  found = []
  if config.init.kind == "pretrain" and data.pretrain_pool is not None:
    num_pairs = len(data.pretrain_pool.pairs("image", "text"))
    if num_pairs < num_devices:
      found.append(f"The pre-training set holds {num_pairs} pairs, fewer than "
                   f"one batch over the {num_devices} devices: hold out more "
                   f"(config.data.pretrain_fraction / pretrain_pairs).")
  for name, pool in (("pool", data.pool), ("eval pool", data.eval_pool)):
    if set(pool.modalities) != set(MODALITIES):
      found.append(f"The {name} has modalities {pool.modalities}; training "
                   f"needs {MODALITIES}.")
  found += eval_pool_problems(data.eval_pool)
  dims = config.get("feature_dims", None)
  for m, dim in zip(MODALITIES, dims or ()):
    shape = getattr(data.pool.items.get(m), "shape", ())
    got = f"of width {shape[1]}" if len(shape) == 2 else "not feature rows"
    if shape[1:] != (dim,):
      found.append(f"config.feature_dims gives {m} features of width {dim}, "
                   f"but the data's are {got}: give presets.features() the "
                   f"files' widths.")
  needed = config.budget * config.num_rounds
  if needed > num_units:
    found.append(f"config.budget x config.num_rounds = {needed} queries, but "
                 f"the pool holds {num_units} matched units: lower the budget "
                 f"or the rounds.")
  num_buffers = pool_lib.num_stream_buffers(num_units, config.stream_buffer)
  if config.regime == "stream" and num_buffers < config.num_rounds:
    found.append(f"The stream has {num_buffers} buffers of "
                 f"{config.stream_buffer} units, fewer than "
                 f"config.num_rounds={config.num_rounds}.")
  return found


class Run:
  """One strategy and seed: the rounds of Algorithm 1's outer loop.

  `resume()` restores the run's state (see the module docstring); `run()`
  goes on from there.
  """

  def __init__(self, experiment: Experiment, strategy: str, seed: int):
    self.x = experiment
    self.config = experiment.config
    self.strategy = strategy
    self.seed = seed
    self.dir = os.path.join(experiment.workdir, "runs", strategy,
                            f"seed_{seed}")
    self.label = f"[{strategy} seed {seed}]"
    self.pool = experiment.data.pool
    self.state_path = os.path.join(self.dir, "annotation.json")
    self.checkpoints = run_state.RunCheckpoints(os.path.join(self.dir, "ckpt"))
    self.state = AnnotationState.for_pool(self.pool)
    self.meta = None   # The restored run state, None for a fresh run.
    self.arrays = None
    self._summaries = None
    if self.config.oracle.kind == "file":
      self.oracle = oracle_lib.FileOracle(
          experiment.workdir, self.pool, timeout_s=self.config.oracle.timeout_s)
    else:
      self.oracle = oracle_lib.SimulatedOracle(self.pool)
    self.buffers = None
    if self.config.regime == "stream":
      self.buffers = list(pool_lib.stream_buffers(
          self.pool, self.config.stream_buffer,
          experiment_lib.derived_seed(seed, 1)))

  @property
  def summary_writer(self) -> summaries.SummaryWriter:
    if self._summaries is None:  # Only for a run that has work left.
      self._summaries = experiment_lib.summary_writer(
          self.x.workdir, self.strategy, self.seed)
    return self._summaries

  @property
  def finished(self) -> bool:
    return self.meta is not None and self.meta["phase"] == "evaluated" and (
        self.meta["round"] >= self.config.num_rounds)

  # ------------------------------------------------------------------
  # Resuming.

  def resume(self, initial_params) -> None:
    """Restores the newest good checkpoint and reconciles the outputs.

    Raises RunStateError (one line naming the files) when bought pairs
    recorded somewhere cannot be found or two records contradict each other.
    """
    like_train = lambda: self.x.towers.state_like(self.config.optim,
                                                  initial_params)
    finished = lambda meta: not (meta["phase"] == "evaluated" and
                                 meta["round"] >= self.config.num_rounds)
    latest = self.checkpoints.latest(initial_params, like_train, finished)
    if latest is not None:
      self.meta, self.arrays = latest
    self.state = self._reconcile()
    rows = self.meta["rows"] if self.meta else []
    self.x.rows.set_run(self.strategy, self.seed, rows)
    self._write_annotation_outputs()

  def _saved_states(self) -> list[tuple[str, AnnotationState]]:
    """Every readable record of what this run bought: (file, state)."""
    records = []
    if self.meta is not None:
      records.append((self.checkpoints.directory,
                      AnnotationState.from_obj(self.meta["annotation"],
                                               self.pool)))
    paths = [self.state_path]
    snapshots = os.path.join(self.dir, "annotated")
    if fs.isdir(snapshots):
      paths += fs.glob(snapshots, "round_*.json")
    for path in paths:
      if fs.exists(path):
        try:
          records.append((path, AnnotationState.load(path, self.pool)))
        except ValueError as e:
          logging.warning("%s; it is rewritten from the run's state.", e)
    return records

  def _reconcile(self) -> AnnotationState:
    """The run's annotated set: the longest consistent saved record."""
    records = self._saved_states()
    best_path, best = max(records, key=lambda r: r[1].cost,
                          default=(None, AnnotationState.for_pool(self.pool)))
    for path, state in records:
      if not state.is_prefix_of(best):
        raise RunStateError(
            f"{path} and {best_path} disagree on what run {self.label} bought."
            f" Keep the right one (the checkpoint in {self.checkpoints.directory}"
            f" is the run's own record), delete the other, and rerun.")
    paid = max((r["queries"] for r in self.x.rows.of_run(self.strategy,
                                                         self.seed)),
               default=0)
    if best.cost < paid:
      raise RunStateError(
          f"{self.x.rows.path} records {paid} queries bought by run "
          f"{self.label}, but its saved annotations ({self.state_path}, "
          f"{os.path.join(self.dir, 'annotated')}, "
          f"{self.checkpoints.directory}) hold only {best.cost}. Restore "
          f"annotation.json from a copy; or, to buy the missing ones again, "
          f"delete that run's rows from metrics.jsonl and rerun.")
    self._check_not_more_than_queried(best_path, best)
    if self.meta is not None and best.cost > len(self.meta["annotation"]["log"]):
      logging.warning("%s Resuming with %d bought queries from %s (the "
                      "checkpoint holds %d).", self.label, best.cost,
                      best_path, len(self.meta["annotation"]["log"]))
    return best

  def _check_not_more_than_queried(self, path: str | None,
                                   best: AnnotationState) -> None:
    """#17 item 12: a record longer than the checkpoint is kept only where
    it can be real: answers to rounds the checkpoint has not acquired yet
    (a damaged newest step fell back), at most `config.budget` a round.
    Answers added to rounds the checkpoint holds, or beyond a round's
    budget, were never queried (an edited file): RunStateError naming it."""
    checkpointed = len(self.meta["annotation"]["log"]) if self.meta else 0
    acquired = self.meta["round"] if self.meta else 0
    added = [a for a in best.log[checkpointed:] if a.round_index <= acquired]
    per_round = collections.Counter(a.round_index for a in best.log)
    over = {t: n for t, n in sorted(per_round.items())
            if n > self.config.budget}
    if not added and not over:
      return
    what = (f"{len(added)} answers to rounds {sorted({a.round_index for a in added})} "
            f"that the checkpoint in {self.checkpoints.directory} does not "
            f"hold" if added else
            f"round {min(over)}: {over[min(over)]} answers for a budget of "
            f"{self.config.budget}")
    raise RunStateError(
        f"{path} holds more answers than run {self.label} queried ({what}). "
        f"Delete it (it is rewritten from the checkpoint) or restore it from "
        f"a copy, and rerun.")

  def _write_annotation_outputs(self) -> None:
    """annotation.json and one snapshot per round, where missing or stale."""
    if not sharding.is_main_process():
      return
    wanted = {self.state_path: self.state}
    for t in sorted({a.round_index for a in self.state.log}):
      wanted[os.path.join(self.dir, "annotated", f"round_{t}.json")] = (
          self.state.up_to_round(t))
    for path, state in wanted.items():
      text = state.to_json()
      try:
        current = fs.read_text(path) if fs.exists(path) else None
      except (OSError, UnicodeDecodeError):
        current = ""
      if current == text:
        continue
      if current is not None and not (path == self.state_path and
                                      _is_prefix(current, state)):
        logging.warning("%s is damaged or differs from the run's state; "
                        "rewriting it.", path)
      fs.write_text(path, text)
      faults.point("annotation_written")

  # ------------------------------------------------------------------
  # The rounds.

  def _save(self, round_index: int, phase: str, *, rows, timing, params=None,
            train=None, train_step: int = 0, wait: bool = False) -> None:
    # Copies: an asynchronous save may serialise them after this returns.
    meta = {"round": round_index, "phase": phase, "train_step": train_step,
            "annotation": self.state.to_obj(), "stream_position": round_index,
            "rows": list(rows), "timing": dict(timing)}
    if self._summaries is not None:
      # A resume starts after the saved point: what came before must be in
      # TensorBoard already.
      self._summaries.flush()
    self.checkpoints.save(meta, params=params, train=train, wait=wait)
    self.meta = meta
    faults.point("checkpoint_saved")

  @property
  def rounds_done(self) -> int:
    """Rounds evaluated, round 0 (the initial towers) left out."""
    return max(0, len(self.x.rows.of_run(self.strategy, self.seed)) - 1)

  def run(self, on_round: Callable[[], None] | None = None) -> None:
    """Runs (or resumes) every round; `on_round()` is called after each."""
    initial_params = self.x.initial_params(self.seed)
    meta = self.meta
    rows = list(meta["rows"]) if meta else []
    if meta is None:
      self._evaluate_and_log(0, initial_params, {}, rows)
      t, params, resume, timing, acquired = 1, initial_params, None, {}, False
    elif self.finished:
      self.export_towers(None, initial_params)
      return
    else:
      t = meta["round"] + (meta["phase"] == "evaluated")
      acquired = meta["phase"] != "evaluated"
      timing = dict(meta["timing"]) if acquired else {}
      params, resume = self.arrays, None
      if meta["phase"] == "training":
        params, resume = None, (meta["train_step"], self.arrays)
    while t <= self.config.num_rounds:
      if not acquired:
        if not any(a.round_index == t for a in self.state.log):
          timing = self._acquire(t, params)
        self._save(t, "acquired", rows=rows, timing=timing, params=params,
                   wait=True)
        self._write_annotation_outputs()
      params = self._train(t, initial_params, params, resume, rows, timing)
      self._evaluate_and_log(t, params, timing, rows)
      if on_round:
        on_round()
      t, resume, timing, acquired = t + 1, None, {}, False
    self.checkpoints.wait()
    self.export_towers(params)

  @property
  def towers_path(self) -> str:
    return os.path.join(self.dir, "final_params.npz")

  def export_towers(self, params, like_params=None) -> None:
    """Writes the finished run's towers as a big_vision .npz, `towers_path`,
    unless there: the next experiment's `init.checkpoint`.

    `params`: the last round's; None: restored from the run's last
    checkpoint step (a finished run restores no arrays on resume) in the
    shapes of `like_params`. Every process takes part (FSDP shards); process
    0 writes, atomically. Cost: one host copy and write of the parameters.
    """
    if fs.exists(self.towers_path):
      return
    if params is None:
      params = self.checkpoints.restore_arrays(self.checkpoints.steps()[-1],
                                               "params", like_params)
    params = jax.tree.map(sharding.to_host, params)
    if sharding.is_main_process():
      checkpoint.save(params, self.towers_path)
    sharding.barrier("final_params")

  def _train(self, t: int, initial_params, params, resume, rows, timing):
    """Round t's training; returns the trained params."""
    start = (initial_params if self.config.train.reinit_each_round or
             params is None else params)
    if resume is not None and start is None:
      start = initial_params  # Only shapes matter: the state is resumed.
    done_steps = sum(r.get("train_steps", 0) for r in rows)

    def save(step, state):
      timing["train_s"] = timing.get("train_s", 0.0) + (
          time.perf_counter() - clock[0])
      clock[0] = time.perf_counter()
      self._save(t, "training", rows=rows, timing=timing, train=state,
                 train_step=step)
      faults.point("train_checkpoint")

    clock = [time.perf_counter()]
    result = self.x.towers.fit(
        start, self.pool, self.state.up_to_round(t).pairs("image", "text"),
        optim_config=self.config.optim, epochs=self.config.train.epochs,
        batch_size=self.config.train.batch_size,
        warmup_fraction=self.config.train.warmup_fraction,
        seed=experiment_lib.derived_seed(self.seed, t), resume=resume,
        on_checkpoint=save,
        checkpoint_every=self.config.train.checkpoint_every,
        summaries=self.summary_writer, summary_step=done_steps,
        log_every=self.config.train.log_every,
        label=f"{self.label} round {t}/{self.config.num_rounds}")
    if result.steps == 0:
      timing.setdefault("train_s", 0.0)
    timing["train_steps"] = result.steps
    return result.params

  def _evaluate_and_log(self, t: int, params, timing: dict, rows: list):
    start = time.perf_counter()
    metrics = self.x.evaluate(params, t)
    if t:
      timing["eval_s"] = time.perf_counter() - start
    row = experiment_lib.add_device_hours(
        self._row(t, timing, metrics), rows[-1] if rows else None,
        self.x.mesh.size)
    rows.append(row)
    self._save(t, "evaluated", rows=rows, timing={}, params=params)
    self.x.rows.add(row)
    experiment_lib.row_scalars(self.summary_writer, row)
    main = config_lib.main_metric(self.config)
    logging.info("%s round %d/%d: %d queries (%.1f%%), %d pairs%s", self.label,
                 t, self.config.num_rounds, row["queries"], row["percent"],
                 row["pairs"], f", {main} {metrics[main]:.1f}"
                 if main in metrics else "")

  def _candidates(self, t: int) -> dict[str, np.ndarray]:
    """Indices of the items embedded this round: pool, or buffer + annotated."""
    if self.buffers is None:
      return {m: np.arange(self.pool.num_items(m)) for m in MODALITIES}
    return {m: np.union1d(self.buffers[t - 1][m],
                          np.flatnonzero(self.state.annotated[m]))
            for m in MODALITIES}

  def _acquire(self, t: int, params) -> dict[str, float]:
    """Buys round t's queries; returns the embedding / acquisition seconds."""
    queries = None
    if isinstance(self.oracle, oracle_lib.FileOracle) and (
        self.oracle.pending_queries(t) is not None):
      # Picked before the run stopped for answers. The run's own record of
      # them is the ranking file (written before the queries file); the
      # oracle checks the queries file against it, naming a line that
      # differs. Without a readable record the strategy picks them again.
      try:
        recorded = ranking.load(ranking.path(self.x.workdir, t))
      except ValueError as e:
        logging.warning("%s; round %d's queries are picked again to check "
                        "the queries file.", e, t)
        recorded = None
      queries = None if recorded is None else recorded.queries
    timing = {"embed_s": 0.0, "acquire_s": 0.0}
    if queries is None:
      items = self._candidates(t)
      hparams = dict(self.config.strategy_hparams.get(self.strategy, {}))
      start = time.perf_counter()
      # Left on the mesh in the kernels' layout: nothing goes to the hosts.
      # distances_on="raw": the towers' outputs before normalisation.
      embeddings = jax.block_until_ready({m: self.x.towers.embed_rows(
          params, self.pool, m, items[m], self.config.eval.embed_batch_size,
          raw=hparams.get("distances_on") == "raw") for m in MODALITIES})
      timing["embed_s"] = time.perf_counter() - start
      logging.info("%s round %d: embedded %s in %.1fs", self.label, t,
                   " + ".join(f"{len(items[m])} {m}s" for m in MODALITIES),
                   timing["embed_s"])
      annotated = {m: self.state.annotated[m][items[m]] for m in MODALITIES}
      candidates = None
      if self.buffers is not None:
        candidates = {m: np.isin(items[m], self.buffers[t - 1][m])
                      for m in MODALITIES}
      start = time.perf_counter()
      acquire = cold_start.with_cold_start(STRATEGIES[self.strategy],
                                           self.config.cold_start)
      picked = acquire(
          embeddings, annotated, budget=self.config.budget,
          seed=experiment_lib.derived_seed(self.seed, t), candidates=candidates,
          mesh=self.x.mesh, **config_lib.tiling(self.config.acquisition),
          feature_dtype=self.config.acquisition.feature_dtype,
          **hparams)
      timing["acquire_s"] = time.perf_counter() - start
      logging.info("%s round %d: %s picked %d queries in %.1fs", self.label,
                   t, self.strategy, len(picked), timing["acquire_s"])
      queries = [(m, int(items[m][i])) for m, i in picked]
      if isinstance(self.oracle, oracle_lib.FileOracle):  # For the page.
        o = self.config.oracle
        ranking.write(ranking.path(self.x.workdir, t), embeddings, items,
                      picked, mesh=self.x.mesh, top_k=o.top_k,
                      num_ranked=o.num_ranked, browse_dim=o.browse_dim)
      faults.point("acquired")
    self.state.apply(self.oracle.answer(t, queries))
    return timing

  def _row(self, t: int, timing: dict, metrics: dict[str, float]) -> dict:
    counts = {m: 0 for m in MODALITIES}
    for answer in self.state.log:
      if answer.round_index == t:
        counts[answer.modality] += 1
    state = self.state.up_to_round(t)
    # Non-finite metrics as None: the row is then the same in memory, in the
    # checkpoint and in metrics.jsonl (strict JSON, null).
    return strict_json.finite_or_none({
        "strategy": self.strategy, "seed": self.seed, "round": t,
        "queries": state.cost, "modality_counts": counts,
        "pairs": int(len(state.pairs("image", "text"))),
        "percent": 100.0 * state.cost / self.x.num_units,
        "skipped_items": self.x.data.skipped_items,
        **timing, **metrics})

  def close(self) -> None:
    self.checkpoints.close()
    if self._summaries is not None and hasattr(self._summaries, "close"):
      self._summaries.close()


def _embedding_plot(experiment: Experiment, params, picked) -> None:
  """WORKDIR/embedding.png (paper 1, Fig. 4 left): t-SNE of the pool's images
  under `params` with each strategy's bought images (`picked`) marked.
  Every process embeds (a sharded pass); the main one draws."""
  path = os.path.join(experiment.workdir, "embedding.png")
  if fs.exists(path):
    return
  z = experiment.embed_all(params, experiment.data.pool, "image")
  if sharding.is_main_process():
    config = experiment.config
    plots.embedding_plot(
        z, picked, path, max_points=config.report.embedding_plot_points,
        title=f"Pool images, initial towers; bought in {config.num_rounds} "
              f"rounds (seed {config.seeds[0]})")


def run_experiment(config: ml_collections.ConfigDict, workdir: str,
                   mesh=None) -> str:
  """Runs (or resumes) every strategy x seed; returns the results Markdown
  (`experiment_lib.run`: the workdir's lock is held throughout)."""
  return experiment_lib.run(lambda: Experiment.create(config, workdir, mesh),
                            workdir)
