"""The skeleton both experiment kinds share; each supplies its round body.

The unaligned loop (`loop.Experiment`) and the cold start
(`mmcsal.ColdStartExperiment`) differ in their science only. Here is the
rest: the workdir's config.json and lock (`check_workdir`), reachable
stores (`unreachable_stores`), metrics.jsonl (`Rows`: a row per strategy,
seed and round, the file rewritten whole), TensorBoard
(`tensorboard/<strategy>_seed_<s>/`, a row's scalars at step `queries`),
and `run`: the log file, every (strategy, seed) run resumed then run with
progress, the kill points `round_end` and `report` (`faults`), the report,
the lock released whatever happens.

`run(create, workdir)` takes `create()`, which checks everything, writes
config.json, takes the lock and returns the experiment. It has `config`
(`strategies`, `seeds`), `unit` (what a round is called in progress
lines), `num_rounds` (per run), `rows` (its `Rows`), `start_run(strategy,
seed)` (a run resumed from the workdir, with `rounds_done`, finished at
`num_rounds`; `run(on_round)`, calling `on_round()` after each round; and
`close()`) and `report(runs)` (the results Markdown, written to the
workdir).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from absl import logging
import ml_collections
import numpy as np

from mmal_jax import config_lib
from mmal_jax import faults
from mmal_jax import fs
from mmal_jax import logfile
from mmal_jax import progress
from mmal_jax import report
from mmal_jax import sharding
from mmal_jax import strict_json
from mmal_jax import summaries
from mmal_jax import workdir_lock

ROW_KEY = ("strategy", "seed", "round")


class ConfigMismatchError(config_lib.ConfigError):
  """The workdir holds a run of another config."""


def derived_seed(*parts: int) -> int:
  """A 32-bit seed drawn from the integers `parts` (e.g. seed, round)."""
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return strict_json.finite_or_none(
      json.loads(config.to_json_best_effort(sort_keys=True)))


def check_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                  write: bool = True) -> None:
  """Checks that WORKDIR/config.json, if there, is `config`; else writes it.

  Raises ConfigMismatchError for another config, ConfigError for an
  unreadable config.json. With `write`, process 0 first takes the workdir's
  lock (`workdir_lock.take`: WorkdirBusy if another process holds it; `run`
  releases it) and writes; every process waits for it.
  """
  path = os.path.join(workdir, "config.json")
  current = _config_json(config)
  exists = fs.exists(path)
  if exists:
    try:
      saved = json.loads(fs.read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise config_lib.ConfigError(
          f"{path} cannot be read ({e}). If it held this same config, delete "
          f"it and rerun to resume; otherwise pass a new --workdir.") from None
    saved, compared = config_lib.comparable_configs(saved, current)
    if saved != compared:
      diffs = sorted(_differences(saved, compared))
      raise ConfigMismatchError(
          f"{workdir} holds a run of a different config (differs in: "
          f"{', '.join(diffs[:10])}). Rerun with the same config to resume "
          f"it, or pass a new --workdir.")
  if not write:
    return
  failure = None
  if sharding.is_main_process():
    try:
      # Before the first write: a second process on this workdir stops here.
      workdir_lock.take(workdir)
      if not exists:
        fs.write_text(path, strict_json.dumps(current, indent=2,
                                              sort_keys=True))
    except Exception as e:  # pylint: disable=broad-except
      failure = e  # Raised below, once every process knows.
  # Every process, also one that already sees process 0's file.
  if sharding.any_process(failure is not None):
    if failure is not None:
      raise failure
    raise config_lib.ConfigError(_ELSEWHERE.format(what=f"{workdir}'s lock "
                                                   f"or config.json"))


# What a process that found nothing wrong says when another one did.
_ELSEWHERE = ("process 0 of this job could not go on ({what}; its error line "
              "says why); fix that and rerun the same command on every host.")


def raise_problems(found: list[str]) -> None:
  """`config_lib.raise_problems` on every process of a job: raises one
  ConfigError on each if any process found a problem (process 0 alone
  checks the workdir; the others would wait for it at their next
  collective). Cost: one all-gather of a byte per process."""
  if sharding.any_process(bool(found)):
    config_lib.raise_problems(found or [_ELSEWHERE.format(
        what="the config, data or workdir checks")])


def _differences(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for key in set(a) | set(b):
      yield from _differences(a.get(key), b.get(key), f"{prefix}{key}.")
  elif a != b:
    yield prefix.rstrip(".")


def _strings(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _strings(value)
  elif isinstance(tree, (list, tuple)):
    for value in tree:
      yield from _strings(value)
  elif isinstance(tree, str):
    yield tree


def unreachable_stores(config: ml_collections.ConfigDict,
                       workdir: str) -> list[str]:
  """One line per object store (gs://BUCKET) that does not answer within
  `fs.check_reachable`'s bounded wait (seconds each, instead of a minute of
  retries and a traceback), among those the run reads first: the workdir,
  `init.checkpoint` (when used) and the `config.data` paths. One path per
  bucket is asked. Cost: one metadata request per bucket."""
  paths = [workdir, *_strings(config.data.to_dict())]
  init = config.get("init", None)
  if init is not None and init.kind == "checkpoint":
    paths.append(init.checkpoint)
  first = {}
  for path in paths:
    if fs.is_remote(path):
      scheme, _, rest = path.partition("://")
      first.setdefault(f"{scheme}://{rest.split('/')[0]}", path)
  out = []
  for path in first.values():
    reason = fs.check_reachable(path)
    if reason:
      out.append(f"{reason}; fix access to it or give a path that can be "
                 f"reached.")
  return out


def workdir_problems(config: ml_collections.ConfigDict, workdir: str,
                     found: list[str]) -> list[str]:
  """`found` (the config's own problems) plus what keeps `workdir` from
  holding this run: a folder process 0 cannot write, a config.json that
  cannot be read or holds another config (asked only when `found` is
  empty: a broken config would differ anyway). An unreachable store
  raises ConfigError at once, with `found`: every later check would wait
  on it too. Writes nothing (the probe's file is removed). Cost: a few
  small requests to the workdir's store."""
  unreachable = unreachable_stores(config, workdir)
  if unreachable:
    config_lib.raise_problems(found + unreachable)
  found = list(found)
  if sharding.is_main_process():
    reason = fs.check_writable_dir(workdir)
    if reason:
      found.append(f"--workdir {reason}; pass a folder that can be written.")
  if not found:
    try:
      check_workdir(config, workdir, write=False)
    except config_lib.ConfigError as e:
      found.append(str(e))
  return found


def row_key(row: dict) -> tuple:
  return tuple(row[k] for k in ROW_KEY)


def write_rows(path: str, rows: list[dict]) -> None:
  """Writes metrics rows to `path` whole and atomically, one JSON line each,
  sorted by (strategy, seed, round), a later row replacing an earlier one
  of the same key. With `report.read_rows` (which drops a torn last line)
  this is how a row is added: never appended onto torn text. Cost: one
  write of the file."""
  by_key = {row_key(r): r for r in rows}
  fs.write_text(path, "".join(strict_json.dumps(by_key[k]) + "\n"
                              for k in sorted(by_key)))


class Rows:
  """WORKDIR/metrics.jsonl in memory: rows by (strategy, seed, round).

  Every change rewrites the file whole (`write_rows`, process 0), so the
  file is always the rows held here.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.rows = {}

  def load(self) -> None:
    """Reads the file, if there (`report.read_rows`: a torn last line is
    dropped, a damaged earlier one raises MetricsFileError)."""
    if fs.exists(self.path):
      self.rows = {row_key(r): r for r in report.read_rows(self.path)}

  def of_run(self, strategy: str, seed: int) -> list[dict]:
    """One run's rows, by round."""
    return [self.rows[k] for k in sorted(self.rows) if k[:2] == (strategy,
                                                                  seed)]

  def set_run(self, strategy: str, seed: int, rows: list[dict]) -> None:
    """Replaces a run's rows (e.g. by its checkpoint's); rewrites the file
    if they differ."""
    old = {k: r for k, r in self.rows.items() if k[:2] == (strategy, seed)}
    new = {row_key(r): r for r in rows}
    if old != new:
      for key in old:
        del self.rows[key]
      self.rows.update(new)
      self._write()

  def add(self, row: dict) -> None:
    self.rows[row_key(row)] = row
    self._write()

  def _write(self) -> None:
    if sharding.is_main_process():
      write_rows(self.path, list(self.rows.values()))


def summary_writer(workdir: str, name: str,
                   seed: int) -> summaries.SummaryWriter:
  """A TensorBoard writer in tensorboard/<name>_seed_<s>/ (name: a run's
  strategy, or what else was trained with that seed)."""
  return summaries.SummaryWriter(
      os.path.join(workdir, "tensorboard", f"{name}_seed_{seed}"),
      enabled=sharding.is_main_process())


def add_device_hours(row: dict, previous: dict | None,
                     num_devices: int) -> dict:
  """Sets `row["device_hours"]`: the run's device time so far, i.e. the
  `previous` row's (None: the run's first) plus the row's own `*_s`
  seconds on `num_devices` devices (waiting for answers is in none of
  them). Returns `row`."""
  spent = sum(v for k, v in row.items() if k.endswith("_s")
              and isinstance(v, float))
  row["device_hours"] = ((previous or {}).get("device_hours") or 0.0) + (
      progress.device_hours(spent, num_devices))
  return row


def row_scalars(writer: summaries.SummaryWriter, row: dict) -> None:
  """Queues a metrics row's float values at step `queries` (what was bought
  so far): the same x-axis for both experiment kinds."""
  writer.scalars(row["queries"], {k: v for k, v in row.items()
                                  if k not in ROW_KEY and isinstance(v, float)})


def run(create: Callable[[], Any], workdir: str) -> str:
  """Runs (or resumes) every strategy x seed of the experiment `create()`
  builds (see the module docstring); returns the results Markdown.

  Holds the workdir's lock from `create` on and releases it on any exit
  (done, an error, a signal), so the next process may go on.
  """
  try:
    return _run(create, workdir)
  finally:
    workdir_lock.release(workdir)


def _run(create, workdir: str) -> str:
  start = time.perf_counter()
  experiment = create()
  log_path = logfile.open_in(workdir)
  if log_path:
    logging.info("Logging to %s", log_path)
  experiment.rows.load()
  config = experiment.config
  runs = [experiment.start_run(strategy, seed)
          for strategy in config.strategies for seed in config.seeds]
  pending = [r for r in runs if r.rounds_done < experiment.num_rounds]
  eta = progress.Eta(len(runs) * experiment.num_rounds,
                     sum(r.rounds_done for r in runs), experiment.unit)

  def on_round():
    faults.point("round_end")
    workdir_lock.ensure_held()
    eta()

  if not pending:
    logging.info("All %d runs are finished: nothing left to do. Results in "
                 "%s/results.md.", len(runs), workdir)
  try:
    for r in pending:
      r.run(on_round)
      r.close()
  finally:  # Awaiting annotations, an error: pending saves still commit.
    for r in pending:
      r.close()
  sharding.barrier("metrics.jsonl")
  faults.point("report")
  text = experiment.report(runs)
  logging.info("Finished in %.0fs; results in %s/results.md",
               time.perf_counter() - start, workdir)
  if not pending:
    text = (f"Nothing left to do: all {len(runs)} runs of {workdir} are "
            f"finished.\n\n" + text)
  return text
