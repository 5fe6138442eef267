"""RunCheckpoints: a failed background save is superseded by the next one."""
import errno

import numpy as np
import pytest

from mmal_jax import main
from mmal_jax import run_state


def _meta(round_index, phase="evaluated"):
  return {"round": round_index, "phase": phase, "rows": []}


def _fail_pending_save(checkpoints, error=None):
  """Makes the pending save fail: the next wait raises once, as orbax's."""
  manager = checkpoints.manager
  wait = type(manager).wait_until_finished

  def failing_wait():
    wait(manager)
    del manager.wait_until_finished  # Raised once, then the class's again.
    raise error or ValueError("Checkpoint directory does not exist: x.orbax-"
                              "checkpoint-tmp/train.orbax-checkpoint-tmp.")
  manager.wait_until_finished = failing_wait


def test_a_failed_background_save_is_superseded_by_the_next(tmp_path):
  checkpoints = run_state.RunCheckpoints(str(tmp_path / "ckpt"))
  params = {"w": np.arange(4, dtype=np.float32)}
  checkpoints.save(_meta(0), params=params)
  _fail_pending_save(checkpoints)
  checkpoints.save(_meta(1), params=params)  # Round 0's save failed.
  checkpoints.wait()
  assert checkpoints.restore_meta(checkpoints.steps()[-1])["round"] == 1
  checkpoints.close()


def test_two_failed_saves_in_a_row_stop_the_run(tmp_path):
  checkpoints = run_state.RunCheckpoints(str(tmp_path / "ckpt"))
  params = {"w": np.arange(4, dtype=np.float32)}
  checkpoints.save(_meta(0), params=params)
  _fail_pending_save(checkpoints)
  checkpoints.save(_meta(1), params=params)
  _fail_pending_save(checkpoints)
  with pytest.raises(ValueError, match="does not exist"):
    checkpoints.save(_meta(2), params=params)
  checkpoints.close()


def test_a_save_failed_for_a_full_disk_stops_at_once(tmp_path):
  """#17 item 7: no superseding save (it would fail too): the error, whose
  chain says ENOSPC, reaches the command line's one-line message."""
  checkpoints = run_state.RunCheckpoints(str(tmp_path / "ckpt"))
  params = {"w": np.arange(4, dtype=np.float32)}
  checkpoints.save(_meta(0), params=params)
  try:
    raise OSError(errno.ENOSPC, "No space left on device", "x/train")
  except OSError as cause:
    error = ValueError("tensorstore: writing failed")
    error.__cause__ = cause
  _fail_pending_save(checkpoints, error)
  with pytest.raises(ValueError) as raised:
    checkpoints.save(_meta(1), params=params)
  line = main.disk_full_line(raised.value, str(tmp_path))
  assert line.startswith("no space left on device writing x/train: ")
  checkpoints.close()
