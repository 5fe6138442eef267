"""The whole state of a run, checkpointed with orbax: what a restart resumes.

One `RunCheckpoints` (an orbax `CheckpointManager`) per run (a strategy and a
seed, or the pre-training) holds, at every save, a JSON `meta` item:

  round, phase ("evaluated": round done; "acquired": round's queries bought,
  not trained yet; "training": mid-training at `train_step` of `total_steps`),
  the annotated set (the query log), the stream position, the metrics rows of
  the run so far, and the seconds spent per phase of the current round,

and the arrays that phase needs: `params` (the towers after the last finished
training; for "evaluated" and "acquired") or `train` (the whole train state:
params, optimizer state, step, RNG key; for "training"). Step numbers are
`round * STRIDE + sub` (sub 0: acquired, 1..total: training steps,
STRIDE - 1: evaluated), so the latest step is the furthest point reached.

Saves are asynchronous (training goes on while arrays are written); a save of
bought annotations is waited for before anything else is written. Restores put
every array back with the sharding of the target given (the current mesh,
which may differ from the one the checkpoint was written on). A step whose
files are damaged is skipped with a warning, falling back to the previous one.
A background save that fails (orbax raises it from the next save) is logged
and superseded by that next save; two failing in a row, or one failing for
a full disk, stop the run.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from absl import logging
import jax
import orbax.checkpoint as ocp

from mmal_jax import fs
from mmal_jax import workdir_lock

STRIDE = 10 ** 7
ACQUIRED = 0
EVALUATED = STRIDE - 1
PHASES = ("evaluated", "acquired", "training")
_VERSION = 1


class RunStateError(ValueError):
  """The run's saved state cannot be resumed; the message says what to do."""


def step_number(round_index: int, phase: str, train_step: int = 0) -> int:
  """The checkpoint step of a point of a run (monotone in run progress)."""
  if phase == "evaluated":
    return round_index * STRIDE + EVALUATED
  if phase == "acquired":
    return round_index * STRIDE + ACQUIRED
  if phase == "training":
    if not 0 < train_step < EVALUATED:
      raise ValueError(f"train_step {train_step} outside (0, {EVALUATED}).")
    return round_index * STRIDE + train_step
  raise ValueError(f"Unknown phase {phase!r}; expected one of {PHASES}.")


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) of a tree of arrays or structs."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
  """Orbax checkpoints of one run's whole state (see the module docstring).

  `max_to_keep` steps are kept (older ones are deleted after a newer save
  commits), so a damaged latest step can fall back to the one before.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = directory
    self._failed_saves = 0
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save))

  def save(self, meta: dict, *, params=None, train=None,
           wait: bool = False) -> None:
    """Saves `meta` (JSON) and `params` or `train` at meta's point.

    Asynchronous unless `wait`; every process of a multi-host job calls it.
    Raises `workdir_lock.WorkdirLost` first if this job lost its workdir.
    Cost: one write of the arrays (in the background) and of the JSON.
    """
    workdir_lock.ensure_held()
    step = step_number(meta["round"], meta["phase"], meta.get("train_step", 0))
    items = {"meta": ocp.args.JsonSave({"version": _VERSION, **meta})}
    if params is not None:
      items["params"] = ocp.args.StandardSave(params)
    if train is not None:
      items["train"] = ocp.args.StandardSave(train)
    self._settle_pending()
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self.manager.wait_until_finished()

  def _settle_pending(self) -> None:
    """Waits for the previous asynchronous save; a failed one is logged.

    The failed step never committed (orbax ignores its temporary folder), the
    save about to start supersedes it, and a restart in between resumes from
    the step before. A second failure in a row is raised: it is no accident.
    """
    try:
      self.manager.wait_until_finished()
      self._failed_saves = 0
    except Exception as e:  # pylint: disable=broad-except
      self._failed_saves += 1
      if self._failed_saves > 1 or fs.no_space_left(e) is not None:
        raise  # A full disk fails the next save too: stop now.
      logging.warning("An asynchronous checkpoint save in %s failed (%s: %s);"
                      " the next save supersedes it.", self.directory,
                      type(e).__name__, str(e).splitlines()[0][:200])

  def wait(self) -> None:
    """Blocks until every asynchronous save has committed."""
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return sorted(self.manager.all_steps())

  def restore_meta(self, step: int) -> dict:
    """The JSON state saved at `step`. Raises on damaged files."""
    meta = self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or meta.get("version") != _VERSION or (
        meta.get("phase") not in PHASES):
      raise ValueError(f"step {step} holds no run state of version "
                       f"{_VERSION}.")
    return meta

  def restore_arrays(self, step: int, item: str, like) -> Any:
    """Item "params" or "train" of `step`, laid out like the tree `like`."""
    return self.manager.restore(step, args=ocp.args.Composite(**{
        item: ocp.args.StandardRestore(_abstract(like))}))[item]

  def latest(self, like_params, like_train_fn,
             wants_arrays: Callable[[dict], bool] = lambda meta: True
             ) -> tuple[dict, Any] | None:
    """The newest restorable (meta, arrays), None if there is no step.

    `like_params`: a params tree (target of "params"); `like_train_fn()`
    builds the target of "train" (only called for a "training" step).
    Where `wants_arrays(meta)` is False (a finished run needs none) only
    the meta is restored and arrays is None. Damaged steps (missing or truncated
    files) are skipped with a warning; if steps exist and none restores,
    raises RunStateError naming the folder.
    """
    steps = self.steps()
    damaged = []
    for step in reversed(steps):
      try:
        meta = self.restore_meta(step)
        arrays = None
        if wants_arrays(meta):
          if meta["phase"] == "training":
            arrays = self.restore_arrays(step, "train", like_train_fn())
          else:
            arrays = self.restore_arrays(step, "params", like_params)
        for bad in damaged:  # Later saves reuse their step numbers.
          self.manager.delete(bad)
        return meta, arrays
      except Exception as e:  # pylint: disable=broad-except
        damaged.append(step)
        # Orbax and tensorstore raise many types for missing / torn files.
        logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s);"
                        " trying the one before.", step, self.directory,
                        type(e).__name__, str(e).splitlines()[0][:200])
    if steps:
      raise RunStateError(
          f"No checkpoint in {self.directory} can be restored (steps "
          f"{steps} are damaged). Delete that folder to redo this run from "
          f"its start, or restore it from a copy.")
    return None

  def close(self) -> None:
    """Waits for pending saves and releases the manager (idempotent)."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


def step_folder(directory: str, step: int) -> str:
  """Where orbax keeps `step` (for messages and tests)."""
  return os.path.join(directory, str(step))
